"""Multiple-choice knapsack: one option per item, least summed value under a cost budget.

Exact dynamic programming over integer costs::

  best_i(c) = min_k [ best_{i-1}(c - cost_ik) + value_ik ]      best_0(c) = 0

``best_L(C)`` is the optimum for capacity ``C``; since the table for a larger capacity
minimises over a superset of plans, adding budget never makes the optimum worse
(monotone). Real-valued costs are rounded **up** to a fixed unit, so a returned plan never
exceeds the true budget; the unit depends only on the instance, never on the budget.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def solve(costs: Sequence[Sequence[int]], values: Sequence[Sequence[float]],
          capacity: int) -> tuple[list[int], float] | None:
  """Least ``sum(values[i][k_i])`` with ``sum(costs[i][k_i]) <= capacity``.

  Args:
    costs: ``costs[i][k]``, a non-negative int: the cost of option ``k`` of item ``i``.
    values: ``values[i][k]``, the value (to minimise) of that option.
    capacity: the budget, an int.

  Returns:
    ``(choice per item, total value)``, or ``None`` when no plan fits. Ties go to the
    cheaper option.
  """
  if len(costs) != len(values):
    raise ValueError(f"costs has {len(costs)} items but values has {len(values)}")
  capacity = int(capacity)
  if capacity < 0:
    return None
  inf = np.inf
  best = np.zeros(capacity + 1)          # best over the items so far, for each capacity
  choices = []
  for i, (ci, vi) in enumerate(zip(costs, values)):
    if len(ci) != len(vi) or not len(ci):
      raise ValueError(f"item {i}: {len(ci)} costs and {len(vi)} values (need >= 1, equal)")
    if any(int(c) < 0 for c in ci):
      raise ValueError(f"item {i}: costs must be >= 0, got {list(ci)}")
    new = np.full(capacity + 1, inf)
    arg = np.full(capacity + 1, -1, np.int32)
    order = np.lexsort((np.asarray(ci), np.asarray(vi, float)))   # by value, then cost
    for k in order:
      c, v = int(ci[k]), float(vi[k])
      if c > capacity:
        continue
      cand = np.full(capacity + 1, inf)
      cand[c:] = best[:capacity + 1 - c] + v
      better = cand < new
      new[better], arg[better] = cand[better], k
    best = new
    choices.append(arg)
  if not np.isfinite(best[capacity]):
    return None
  picks, cap = [], capacity
  for i in range(len(costs) - 1, -1, -1):
    k = int(choices[i][cap])
    picks.append(k)
    cap -= int(costs[i][k])
  picks.reverse()
  return picks, float(best[capacity])
