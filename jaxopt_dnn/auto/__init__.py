"""Which layers can take it: per-layer sensitivity and an automatic plan under a budget.

``plan = jd.auto.search(apply_fn, variables, batches, bits_per_weight=4.5)``; ``print(plan)``;
``plan.apply(apply_fn, variables, batches)`` realises it.
"""

from jaxopt_dnn.auto.knapsack import solve as solve_knapsack
from jaxopt_dnn.auto.candidates import DEFAULT_CANDIDATES
from jaxopt_dnn.auto.candidates import Candidate
from jaxopt_dnn.auto.candidates import stored_bits
from jaxopt_dnn.auto.search import Plan
from jaxopt_dnn.auto.search import Sensitivity
from jaxopt_dnn.auto.search import output_distortion
from jaxopt_dnn.auto.search import plan_for_budget
from jaxopt_dnn.auto.search import search
from jaxopt_dnn.auto.search import sensitivity
