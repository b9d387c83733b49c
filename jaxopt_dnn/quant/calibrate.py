"""Range estimation (absmax, percentile, MSE-optimal clipping) and PTQ calibration.

All statistics are computed and kept in float32 (bf16 running maxima/sums stall).

* ``absmax``:     ``a = max |x|`` over the reduced axes.
* ``percentile``: ``a = P_p(|x|)`` (default ``p = 99.99``), ignoring rare outliers.
* ``mse``:        ``a = argmin_{c in {r_k * max|x|}} sum (x - fq_c(x))^2`` over a grid of
                  clipping ratios ``r_k in [0.2, 1]``, where ``fq_c`` fake-quantizes with
                  ``s = c / (2^(b-1) - 1)``.

:func:`calibrate` runs a model on a few batches with every quantized op's input
recorded and returns the per-op activation ranges as a ``quant_stats`` tree
(``{"Conv_0": {"input_amax": f32[]}, ...}``), the collection the QAT and serving paths
read. Across batches, ``absmax`` takes the maximum, the others the mean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_dnn.quant.ranges import batch_statistic  # noqa: F401  (re-exported)
from jaxopt_dnn.quant.ranges import estimate_absmax  # noqa: F401
from jaxopt_dnn.quant.ranges import estimate_minmax  # noqa: F401
from jaxopt_dnn.quant.serve import calibration_runner
from jaxopt_dnn.quant.stats import stats_tree


def _check_batch(batch: Any, i: int) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
    arr = np.asarray(leaf)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
      raise ValueError(f"calibrate: calibration batch {i} has NaN/inf at "
                       f"{jax.tree_util.keystr(path) or 'input'} "
                       f"({int((~np.isfinite(arr)).sum())} values)")


def calibrate(apply_fn: Callable[..., Any], variables: Any, batches: Iterable[Any], *,
              method: str = "absmax", rules=None, percentile: float = 99.99,
              max_batches: int | None = None) -> dict:
  """Post-training calibration of activation ranges.

  Args:
    apply_fn: ``apply_fn(variables, batch)`` running a linen model (e.g. ``model.apply``
      or a lambda calling it), or ``apply_fn(model, batch)`` for an NNX model when
      ``variables`` is an ``nnx.Module``.
    variables: the float variables (``{"params": ...}``) or the NNX module.
    batches: iterable of model inputs (a tuple is splatted as positional args).
    method: ``absmax`` | ``percentile`` | ``mse``.
    rules: quantization rules (see :mod:`jaxopt_dnn.quant.rules`); ops whose kernel no
      rule quantizes, or whose rule is weight-only, get no statistic.
    max_batches: stop after this many batches.

  Returns:
    ``quant_stats`` tree: ``{op path...: {"input_amax": float32 scalar}}``.
  """
  if method not in ("absmax", "percentile", "mse"):
    raise ValueError(f"calibrate: method must be absmax|percentile|mse, got {method!r}")
  from jaxopt_dnn.quant.fake import check_percentile
  percentile = check_percentile(percentile, "calibrate: percentile")
  run = calibration_runner(apply_fn, variables, method=method, rules=rules,
                                     percentile=percentile)
  per_op: dict[str, list[np.ndarray]] = {}
  n = 0
  for i, batch in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    _check_batch(batch, i)
    args = batch if isinstance(batch, tuple) else (batch,)
    try:
      stats = jax.device_get(run(args))
    except (TypeError, ValueError, flax.errors.FlaxError) as e:   # shape errors: which batch
      shapes = [tuple(np.shape(a)) for a in args]
      msg = " ".join(str(e).split())
      raise ValueError(f"calibrate: batch {i} (shapes {shapes}) does not fit the model: "
                       f"{msg[:300]}") from e
    for op, v in stats.items():
      if not np.isfinite(v):
        raise ValueError(f"calibrate: op {op!r} saw a non-finite activation range {v} "
                         f"on batch {i}")
      per_op.setdefault(op, []).append(np.float32(v))
    n += 1
  if n == 0:
    raise ValueError("calibrate: the batches iterator is empty; pass at least one batch")
  if not per_op:
    raise ValueError("calibrate: no quantized op ran (no contraction consumed a weight "
                     "selected by the rules with act_bits)")
  combine = np.max if method == "absmax" else np.mean
  return stats_tree({op: np.float32(combine(v)) for op, v in per_op.items()})
