"""Range estimation (numerics, no hooks): absmax, percentile, MSE-optimal clipping.

All statistics are computed and kept in float32 (bf16 running maxima/sums stall).

* ``absmax``:     ``a = max |x|`` over the reduced axes.
* ``percentile``: ``a = P_p(|x|)`` (default ``p = 99.99``), ignoring rare outliers.
* ``mse``:        ``a = argmin_{c in {r_k * max|x|}} sum (x - fq_c(x))^2`` over a grid of
                  clipping ratios ``r_k in [0.2, 1]``, where ``fq_c`` fake-quantizes with
                  ``s = c / (2^(b-1) - 1)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxopt_dnn.quant.ops import qrange

_MSE_GRID = 48


def estimate_absmax(x: jax.Array, reduce_axes: tuple[int, ...], method: str, *, bits: int = 8,
                    percentile: float = 99.99) -> jax.Array:
  """Clipping threshold of ``|x|`` (keepdims over ``reduce_axes``), float32."""
  a = jnp.abs(jnp.asarray(x, jnp.float32))
  amax = jnp.max(a, axis=reduce_axes, keepdims=True)
  if method == "absmax":
    return amax
  if method == "percentile":
    return jnp.percentile(a, percentile, axis=reduce_axes, keepdims=True).astype(jnp.float32)
  if method == "mse":
    return _mse_threshold(a, amax, reduce_axes, bits)
  raise ValueError(f"method must be absmax|percentile|mse, got {method!r}")


def estimate_minmax(x: jax.Array, reduce_axes: tuple[int, ...], method: str, *, bits: int = 8,
                    percentile: float = 99.99) -> tuple[jax.Array, jax.Array]:
  """``(lo, hi)`` with ``lo <= 0 <= hi`` for asymmetric quantization, float32."""
  x = jnp.asarray(x, jnp.float32)
  if method == "percentile":
    lo = jnp.percentile(x, 100.0 - percentile, axis=reduce_axes, keepdims=True)
    hi = jnp.percentile(x, percentile, axis=reduce_axes, keepdims=True)
  else:
    lo = jnp.min(x, axis=reduce_axes, keepdims=True)
    hi = jnp.max(x, axis=reduce_axes, keepdims=True)
  lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
  if method == "mse":   # shrink both ends by the MSE-optimal ratio of the symmetric case
    amax = jnp.maximum(-lo, hi)
    r = _mse_threshold(jnp.abs(x), amax, reduce_axes, bits) / jnp.where(amax > 0, amax, 1.0)
    lo, hi = lo * r, hi * r
  return lo.astype(jnp.float32), hi.astype(jnp.float32)


def _mse_threshold(a: jax.Array, amax: jax.Array, reduce_axes, bits: int) -> jax.Array:
  qmax = float(qrange(bits)[1])

  def body(k, carry):
    best_err, best_c = carry
    c = amax * (0.2 + 0.8 * k / (_MSE_GRID - 1))
    s = jnp.where(c > 0, c / qmax, 1.0)
    fq = jnp.clip(jnp.round(a * (1.0 / s)), 0, qmax) * s
    err = jnp.sum((a - fq) ** 2, axis=reduce_axes, keepdims=True)
    better = err < best_err
    return jnp.where(better, err, best_err), jnp.where(better, c, best_c)

  init = (jnp.full(amax.shape, jnp.inf, jnp.float32), amax)
  return jax.lax.fori_loop(0, _MSE_GRID, body, init)[1]


def batch_statistic(x: jax.Array, method: str, percentile: float = 99.99, bits: int = 8):
  """Per-tensor clipping threshold of one activation batch (float32 scalar)."""
  return estimate_absmax(x, tuple(range(jnp.ndim(x))), method, bits=bits,
                         percentile=percentile).reshape(())
