"""Mixed precision: dtype policies over pytrees, and loss scaling for float16.

A train step with a policy and a loss scale::

  logits = policy.cast_to_output(model.apply(policy.cast_to_compute(params), x_c))
  loss   = cross_entropy(logits)                 # softmax in output_dtype (float32)
  grads  = d loss / d params                     # float32, the cast is differentiable
  params = params + optimizer(grads)             # float32 update of the master weights

(:func:`with_policy` wraps ``model.apply`` that way; :func:`value_and_grad` and
:func:`guarded_update` add loss scaling and skip non-finite steps.)
"""

from jaxopt_dnn.precision.loss_scale import DynamicLossScale
from jaxopt_dnn.precision.loss_scale import GuardedUpdate
from jaxopt_dnn.precision.loss_scale import NoOpLossScale
from jaxopt_dnn.precision.loss_scale import StaticLossScale
from jaxopt_dnn.precision.loss_scale import all_finite
from jaxopt_dnn.precision.loss_scale import guarded_update
from jaxopt_dnn.precision.loss_scale import select_tree
from jaxopt_dnn.precision.loss_scale import value_and_grad
from jaxopt_dnn.precision.policy import DEFAULT_EXCEPTIONS
from jaxopt_dnn.precision.policy import nnx_apply_policy
from jaxopt_dnn.precision.policy import ComputeCensus
from jaxopt_dnn.precision.policy import Policy
from jaxopt_dnn.precision.policy import as_dtype
from jaxopt_dnn.precision.policy import compute_census
from jaxopt_dnn.precision.policy import with_policy
