"""Quantize / fake-quantize with the standard numerics and a straight-through gradient.

For ``b`` bits, symmetric (``zero_point = 0``) quantization with an integer range of
``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (``[-127, 127]`` for int8, as in TFLite's weight
spec and ``torch.fake_quantize_per_channel_affine`` with ``quant_min=-127``):

    s = absmax / (2^(b-1) - 1)     (s := 1 where absmax == 0; s >= 2^-126, never subnormal)
    q = clip(round(x * (1 / s)), -(2^(b-1) - 1), 2^(b-1) - 1)
    fake_quant(x) = q * s

Asymmetric quantization uses the full range ``[qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]``
and a zero point ``z`` so that ``lo = min(x, 0)`` and ``hi = max(x, 0)`` are representable:

    s = (hi - lo) / (qmax - qmin),   z = clip(qmin - round(lo / s), qmin, qmax)
    q = clip(round(x * (1 / s)) + z, qmin, qmax),   fake_quant(x) = (q - z) * s

``round`` is round-half-to-even and ``x * (1/s)`` is computed in float32 with the
reciprocal taken first, exactly like PyTorch's fake-quant kernels, so results agree
bit for bit. Statistics (``absmax``, percentile, MSE-optimal clipping; see
:mod:`jaxopt_dnn.quant.calibrate`) are reduced over every axis except ``axis`` (the
channel axes; ``None`` = one scale per tensor) and kept in float32.

Group-wise (sub-channel) scales: ``group_size = g`` along ``group_axis`` (a kernel's
contraction axis, ``-2`` for Flax ``Dense``) computes one scale per group of ``g``
consecutive entries of that axis (and per channel of ``axis``): the statistic above is
reduced over each group instead of the whole axis. ``scale_dtype`` (``bfloat16`` /
``float16``) rounds the scale to 16 bits *before* the codes are computed, so
``|x - fake_quant(x)| <= s / 2`` holds for the stored scale.

Gradient (straight-through estimator): ``d fake_quant(x) / dx = 1`` where
``qmin <= round(x / s) + z <= qmax`` and ``0`` outside; ``s`` and ``z`` get no gradient.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_dnn.quant.ops import qrange
from jaxopt_dnn.quant.ranges import estimate_absmax, estimate_minmax
from jaxopt_dnn.quant.qarray import QArray, expand_groups, pack_int4, round_scale, scale_value

METHODS = ("absmax", "percentile", "mse")
_TINY = float(np.finfo(np.float32).tiny)   # 2^-126: 1/s stays finite under flush-to-zero


def check_bits(bits: Any, where: str = "bits") -> int:
  if isinstance(bits, bool) or bits not in (4, 8):
    raise ValueError(f"{where}: bits must be 4 or 8, got {bits!r}")
  return int(bits)


def check_percentile(percentile: Any, where: str = "percentile") -> float:
  """A percentile of ``|x|`` (or of ``x``, for asymmetric ranges) in ``(50, 100]``."""
  if isinstance(percentile, bool) or not isinstance(percentile, (int, float, np.number)):
    raise TypeError(f"{where}: percentile must be a number in (50, 100], got "
                    f"{type(percentile).__name__}: {percentile!r}")
  p = float(percentile)
  if not 50.0 < p <= 100.0:
    raise ValueError(f"{where}: percentile must be in (50, 100] (e.g. 99.99), got {percentile!r}")
  return p


def _check_given_scale(scale: Any, name: str) -> None:
  """A scale passed in (concrete) must be finite and > 0 everywhere."""
  if scale is None or isinstance(scale, jax.core.Tracer):
    return
  s = np.asarray(scale, np.float64)
  bad = ~(np.isfinite(s) & (s > 0))
  if bad.any():
    raise ValueError(f"{name}: scale must be finite and > 0, got "
                     f"{s.ravel()[np.argmax(bad.ravel())]!r} ({int(bad.sum())} bad of {s.size})")


def _check_not_empty(x: Any, name: str) -> None:
  if 0 in tuple(jnp.shape(x)):
    raise ValueError(f"{name}: cannot quantize an empty array (shape {tuple(jnp.shape(x))})")


def channel_axes(axis: None | int | tuple[int, ...], ndim: int, name: str = "x") -> tuple[int, ...]:
  """Normalizes ``axis`` (None / int / tuple, negatives allowed) to sorted non-negative axes."""
  if axis is None:
    return ()
  axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
  out = []
  for a in axes:
    if isinstance(a, bool) or not isinstance(a, (int, np.integer)) or not -ndim <= a < ndim:
      raise ValueError(f"{name}: axis {a!r} out of range for an array of rank {ndim}")
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"{name}: repeated axis in {axis!r}")
  return tuple(sorted(out))


def check_array(x: Any, name: str = "x") -> None:
  """TypeError for non-float input; ValueError for NaN/inf (when the value is concrete)."""
  if isinstance(x, QArray):
    raise TypeError(f"{name}: is already a QArray ({x!r})")
  dtype = getattr(x, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{name}: only floating arrays can be quantized, got dtype {dtype} "
                    f"({type(x).__name__})")
  if not isinstance(x, jax.core.Tracer):
    bad = ~np.isfinite(np.asarray(x, np.float32))
    if bad.any():
      idx = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(f"{name}: contains NaN/inf ({int(bad.sum())} values, first at index "
                       f"{idx}: {np.asarray(x)[idx]})")


def check_group(group_size: Any, group_axis: Any, chan: tuple[int, ...], ndim: int,
                name: str = "x") -> tuple[int | None, int | None]:
  """Validates ``group_size`` / ``group_axis``; returns ``(g, non-negative axis)``."""
  if group_size is None:
    return None, None
  if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) \
      or group_size < 1:
    raise ValueError(f"{name}: group_size must be a positive int or None, got {group_size!r}")
  if isinstance(group_axis, bool) or not isinstance(group_axis, (int, np.integer)) \
      or not -ndim <= group_axis < ndim:
    raise ValueError(f"{name}: group_axis {group_axis!r} out of range for an array of "
                     f"rank {ndim}")
  ga = int(group_axis) % ndim
  if ga in chan:
    raise ValueError(f"{name}: group_axis {group_axis} is also a channel axis {chan}")
  return int(group_size), ga


def _split_groups(x: jax.Array, g: int, ga: int) -> jax.Array:
  """``(..., n, ...) -> (..., ceil(n/g), g, ...)`` along ``ga``, zero-padded at the end."""
  n = x.shape[ga]
  G = -(-n // g)
  if G * g != n:
    x = jnp.pad(x, [(0, G * g - n) if i == ga else (0, 0) for i in range(x.ndim)])
  return x.reshape(x.shape[:ga] + (G, g) + x.shape[ga + 1:])


def compute_qparams(x: jax.Array, *, bits: int = 8, axis=None, symmetric: bool = True,
                    method: str = "absmax", percentile: float = 99.99, name: str = "x",
                    group_size: int | None = None, group_axis: int = -2):
  """Scale (float32, keepdims shape) and zero point (int32 or None) for ``x``.

  With ``group_size``, the scale has ``ceil(n / group_size)`` entries along
  ``group_axis`` (see the module docstring); otherwise reduced axes have size 1.
  """
  bits = check_bits(bits, name)
  if group_size is not None:
    chan = channel_axes(axis, jnp.ndim(x), name)
    g, ga = check_group(group_size, group_axis, chan, jnp.ndim(x), name)
    xg = _split_groups(jnp.asarray(x, jnp.float32), g, ga)
    gchan = tuple(a if a < ga else a + 1 for a in chan) + (ga,)
    s, z = compute_qparams(xg, bits=bits, axis=gchan, symmetric=symmetric, method=method,
                           percentile=percentile, name=name)
    return s.squeeze(ga + 1), None if z is None else z.squeeze(ga + 1)
  if method not in METHODS:
    raise ValueError(f"{name}: method must be one of {METHODS}, got {method!r}")
  percentile = check_percentile(percentile, f"{name}: percentile")
  chan = channel_axes(axis, jnp.ndim(x), name)
  red = tuple(a for a in range(jnp.ndim(x)) if a not in chan)
  qmin, qmax = qrange(bits, symmetric)
  xf = jnp.asarray(x, jnp.float32)
  if symmetric:
    amax = estimate_absmax(xf, red, method, bits=bits, percentile=percentile)
    return scale_from_absmax(amax, bits), None
  lo, hi = estimate_minmax(xf, red, method, bits=bits, percentile=percentile)
  s = (hi - lo) / (qmax - qmin)
  s = jnp.where(s > 0, jnp.maximum(s, _TINY), 1.0)
  z = jnp.clip(qmin - jnp.round(lo / s), qmin, qmax).astype(jnp.int32)
  return s, z


def scale_from_absmax(amax: jax.Array, bits: int) -> jax.Array:
  """``s = absmax / (2^(b-1) - 1)`` in float32, with ``s = 1`` where ``absmax == 0``."""
  amax = jnp.asarray(amax, jnp.float32)
  s = jnp.maximum(amax / float(qrange(bits)[1]), _TINY)   # no subnormal scales (FTZ)
  return jnp.where(amax > 0, s, 1.0).astype(jnp.float32)


def _int_q(x, scale, zp, qmin, qmax):
  """Unclipped integer grid position ``round(x * (1/s)) + z`` in float32."""
  inv = 1.0 / scale
  q = jnp.round(x.astype(jnp.float32) * inv)
  return q if zp is None else q + zp.astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fq(x, scale, zp, qmin, qmax):
  # Integer-valued float32 all the way (exact: |q| <= 255). No f32 -> s32 -> f32 round
  # trip (it costs ~35% of this fusion on CPU); the select turns round(-0.3) = -0 into +0,
  # as torch's integer kernel does, so results stay bit-identical.
  q = jnp.clip(_int_q(x, scale, zp, qmin, qmax), qmin, qmax)
  if zp is not None:
    q = q - zp.astype(jnp.float32)
  q = jnp.where(q == 0, 0.0, q)
  return (q * scale).astype(x.dtype)


def _fq_fwd(x, scale, zp, qmin, qmax):
  q = _int_q(x, scale, zp, qmin, qmax)
  inside = (q >= qmin) & (q <= qmax)          # 1-byte residual, fused into the forward
  return _fq(x, scale, zp, qmin, qmax), (inside, scale, zp)


def _fq_bwd(qmin, qmax, res, g):
  inside, scale, zp = res
  zp_ct = None if zp is None else np.zeros(zp.shape, jax.dtypes.float0)
  return (jnp.where(inside, g, jnp.zeros_like(g)), jnp.zeros_like(scale), zp_ct)


_fq.defvjp(_fq_fwd, _fq_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _fq_in_range(x, scale, qmin, qmax):
  """``_fq`` for a symmetric absmax scale of ``x`` itself: nothing is clipped, so the
  STE gradient is exactly the identity and no mask is needed."""
  return _fq(x, scale, None, qmin, qmax)


_fq_in_range.defvjp(lambda x, s, qmin, qmax: (_fq(x, s, None, qmin, qmax), s),
                    lambda qmin, qmax, s, g: (g, jnp.zeros_like(s)))


def fake_quant_with(x: jax.Array, scale: jax.Array, zero_point: jax.Array | None = None, *,
                    bits: int = 8) -> jax.Array:
  """Quantize-dequantize ``x`` with a given scale (and zero point); STE gradient."""
  _check_given_scale(scale, "fake_quant_with")
  qmin, qmax = qrange(bits, zero_point is None)
  return _fq(x, jax.lax.stop_gradient(jnp.asarray(scale, jnp.float32)),
             None if zero_point is None else jax.lax.stop_gradient(zero_point), qmin, qmax)


def fake_quant(x: jax.Array, *, bits: int = 8, axis=None, symmetric: bool = True,
               method: str = "absmax", percentile: float = 99.99, scale=None,
               zero_point=None, name: str = "x", group_size: int | None = None,
               group_axis: int = -2, scale_dtype: Any = None) -> jax.Array:
  """Quantize-dequantize in float: ``(clip(round(x/s) + z, qmin, qmax) - z) * s``.

  Args:
    x: floating array.
    bits: 4 or 8.
    axis: channel axis/axes that keep their own scale (``-1`` for Flax kernels,
      per output channel); ``None`` = per tensor.
    symmetric: zero point 0 and range ``[-(2^(b-1)-1), 2^(b-1)-1]`` if True.
    method: range estimator, ``absmax`` | ``percentile`` | ``mse``.
    scale, zero_point: use these instead of estimating them from ``x``.
    group_size, group_axis: one scale per ``group_size`` consecutive entries along
      ``group_axis`` (sub-channel scales); ``None`` = whole axis.
    scale_dtype: round the scale to this float dtype first (e.g. ``jnp.bfloat16``).

  Returns:
    Array of ``x``'s shape and dtype on the quantization grid; gradient is the STE.
  """
  check_array(x, name)
  _check_not_empty(x, name)
  _check_given_scale(scale, name)
  bits = check_bits(bits, name)
  if group_size is not None or scale_dtype is not None:
    _check_scale_dtype(scale_dtype, symmetric, name)
    chan = channel_axes(axis, jnp.ndim(x), name)
    g, ga = check_group(group_size, group_axis, chan, jnp.ndim(x), name)
    if scale is None:
      scale, zero_point = compute_qparams(x, bits=bits, axis=axis, symmetric=symmetric,
                                          method=method, percentile=percentile, name=name,
                                          group_size=g, group_axis=ga if g else -2)
    scale = _rounded(scale, scale_dtype, bits, symmetric)
    n = x.shape[ga] if g else 0
    return fake_quant_with(x, expand_groups(scale.astype(jnp.float32), g, ga, n),
                           None if zero_point is None else
                           expand_groups(zero_point, g, ga, n), bits=bits)
  if scale is None:
    scale, zero_point = compute_qparams(x, bits=bits, axis=axis, symmetric=symmetric,
                                        method=method, percentile=percentile, name=name)
    if symmetric and method == "absmax":   # |x| <= absmax: every value is in range
      qmin, qmax = qrange(bits, True)
      return _fq_in_range(x, jax.lax.stop_gradient(scale), qmin, qmax)
  return fake_quant_with(x, scale, zero_point, bits=bits)


def _rounded(scale, scale_dtype, bits, symmetric):
  """The float32 scale as ``scale_dtype`` stores it (:func:`qarray.round_scale`)."""
  return scale_value(*round_scale(scale, scale_dtype, qmax=_steps(bits, symmetric)))


def _check_scale_dtype(scale_dtype, symmetric, name):
  """8-bit float scales only for symmetric quantization: an asymmetric zero point is
  anchored to the unrounded scale, and a scale moved by up to 1/16 would shift the range
  by many steps for data far from 0."""
  if scale_dtype is not None and not symmetric and jnp.dtype(scale_dtype).itemsize == 1:
    raise ValueError(f"{name}: scale_dtype={jnp.dtype(scale_dtype).name} needs "
                     "symmetric=True (8-bit scales with zero points are not supported)")


def _steps(bits, symmetric):
  """Quantization steps from 0 (symmetric) or across the range (asymmetric)."""
  qmin, qmax = qrange(bits, symmetric)
  return qmax if symmetric else qmax - qmin


def quantize(x: jax.Array, *, bits: int = 8, axis=None, symmetric: bool = True,
             method: str = "absmax", percentile: float = 99.99, scale=None,
             zero_point=None, name: str = "x", group_size: int | None = None,
             group_axis: int = -2, scale_dtype: Any = None) -> QArray:
  """Quantizes ``x`` to a :class:`QArray` (int8, or int4 packed two per byte).

  Same arguments and numerics as :func:`fake_quant`; ``dequantize(quantize(x))`` equals
  ``fake_quant(x)`` bit for bit. With ``group_size`` the scale (and zero point) has
  ``ceil(n / group_size)`` entries along ``group_axis``; ``scale_dtype`` stores the
  scale in 16 bits (the codes use the rounded scale).
  """
  check_array(x, name)
  _check_not_empty(x, name)
  _check_given_scale(scale, name)
  bits = check_bits(bits, name)
  chan = channel_axes(axis, jnp.ndim(x), name)
  if method not in METHODS:
    raise ValueError(f"{name}: method must be one of {METHODS}, got {method!r}")
  percentile = check_percentile(percentile, f"{name}: percentile")
  g, ga = check_group(group_size, group_axis, chan, jnp.ndim(x), name)
  if g is not None or scale_dtype is not None:
    _check_scale_dtype(scale_dtype, symmetric, name)
    static = (bits, chan, symmetric, method, float(percentile), g, ga, scale_dtype)
    if scale is None and not isinstance(x, jax.core.Tracer):
      # eager: one compiled program per leaf layout instead of ~20 eager primitives
      value, stored, zero_point, sup = _grouped_own_range(x, *static)
    else:
      value, stored, zero_point, sup = _grouped(x, scale, zero_point, *static)
    return QArray(value, stored, zero_point, bits=bits, channel_axes=chan,
                  shape=jnp.shape(x), dtype=x.dtype, name=name, group_size=g, group_axis=ga,
                  super_scale=sup)
  if scale is None:   # one compiled program per leaf instead of ~10 eager primitives
    value, scale, zero_point, _ = _grouped_own_range(x, bits, chan, symmetric, method,
                                                     float(percentile), None, None, None)
  else:
    value = _codes(x, scale, zero_point, bits)
  return QArray(value, jnp.asarray(scale, jnp.float32), zero_point, bits=bits,
                channel_axes=chan, shape=jnp.shape(x), dtype=x.dtype, name=name)


def _codes(x, scale, zero_point, bits):
  """int8 codes ``clip(round(x/s) + z, qmin, qmax)`` (packed two per byte for int4)."""
  qmin, qmax = qrange(bits, zero_point is None)
  q = jnp.clip(_int_q(x, scale, zero_point, qmin, qmax), qmin, qmax).astype(jnp.int8)
  return pack_int4(q) if bits == 4 else q


def _grouped(x, scale, zero_point, bits, chan, symmetric, method, percentile, g, ga,
             scale_dtype):
  """Codes, stored scale, zero point and super-scale of :func:`quantize` (own range when
  ``scale`` is None; ``g = scale_dtype = None``: one float32 scale per channel, no
  rounding)."""
  if scale is None:
    scale, zero_point = compute_qparams(x, bits=bits, axis=chan or None,
                                        symmetric=symmetric, method=method,
                                        percentile=percentile,
                                        group_size=g, group_axis=ga if g else -2)
  stored, sup = round_scale(scale, scale_dtype, qmax=_steps(bits, symmetric))
  n = x.shape[ga] if g else 0
  value = _codes(x, expand_groups(scale_value(stored, sup), g, ga, n),
                 None if zero_point is None else expand_groups(zero_point, g, ga, n), bits)
  return value, stored, zero_point, sup


@functools.partial(jax.jit, static_argnums=tuple(range(1, 9)))
def _grouped_own_range(x, bits, chan, symmetric, method, percentile, g, ga, scale_dtype):
  return _grouped(x, None, None, bits, chan, symmetric, method, percentile, g, ga,
                  scale_dtype)


