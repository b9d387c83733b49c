"""Real integer ops: s8 x s8 -> s32 dot_general / conv / einsum, rescaled after.

With a per-tensor activation scale ``s_x`` and per-output-channel weight scale ``s_w``
(constant along every contracted weight axis):

    q_x = clip(round(x * (1 / s_x)), -(2^(b-1) - 1), 2^(b-1) - 1)  (int8 codes of b = act_bits)
    acc = dot_general(q_x, q_w, preferred_element_type=int32)      (exact int32 sums)
    y   = float32(acc) * (s_x * s_w)                                (s_w broadcast to y)

which equals the fake-quantized float computation up to float summation order.

``x_scale=None`` selects **per-token dynamic** activation scales, computed inside the
(jitted) op from the activation itself: one scale per row of ``x``, i.e. per index of
its non-contracted axes (per example for a convolution, whose outputs mix positions)::

    s_x[t] = max_k |x[t, k]| / (2^(b-1) - 1)      (1 where the row is 0)
    y[t, n] = float32(acc[t, n]) * s_x[t] * s_w[n]

The contraction stays ``s8 x s8 -> s32``; the row maximum is one extra reduction over
``x``.
``preferred_element_type=int32`` keeps XLA on its integer GEMM path (s8 x s8 -> s8 falls
off it). XLA:CPU widens the s8 operands to s32 inside the compiled program (it has no
s8 GEMM); GPU/TPU keep s8. :func:`int8_dot_census` reports both the op the program
asked for and what XLA compiled.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
from jax import lax

from jaxopt_dnn import _hlo
from jaxopt_dnn.quant.qarray import QArray, int_values, stored_scale


def qrange(bits: int, symmetric: bool = True) -> tuple[int, int]:
  """Integer code range of ``bits``: ``(-(2^(b-1)-1), 2^(b-1)-1)`` symmetric (``±127`` for
  int8, ``±7`` for int4), ``(-2^(b-1), 2^(b-1)-1)`` not. The one place this is computed."""
  hi = 2 ** (bits - 1) - 1
  return (-hi, hi) if symmetric else (-hi - 1, hi)


def quantize_activation(x: jax.Array, scale: jax.Array, bits: int = 8) -> jax.Array:
  """Per-tensor symmetric ``int8`` codes of ``x`` in ``[-(2^(b-1)-1), 2^(b-1)-1]``
  (same numerics as ``fake_quant_with(x, scale, bits=bits)``)."""
  _, hi = qrange(bits)
  return jnp.clip(jnp.round(x.astype(jnp.float32) * (1.0 / scale)), -hi, hi).astype(jnp.int8)


def dynamic_scale(x: jax.Array, axes, bits: int = 8) -> jax.Array:
  """Per-row scale ``max |x| / (2^(b-1) - 1)`` over ``axes`` (kept with size 1), float32;
  1 where the row is all zero."""
  _, hi = qrange(bits)
  a = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=tuple(axes), keepdims=True)
  return jnp.where(a > 0, a / hi, 1.0)


def _check_weight(w: QArray, op: str) -> None:
  if not isinstance(w, QArray):
    raise TypeError(f"{op}: int8 op needs a QArray weight, got {type(w).__name__}")
  if w.zero_point is not None:
    raise ValueError(f"{op}: the int8 path needs symmetric weights (zero_point=None); "
                     "quantize with symmetric=True or serve weight-only")


def _scale_keep(w: QArray, contracted, op: str):
  """Weight scale with contracted axes squeezed: ``(kept axes, squeezed scale)``."""
  s = stored_scale(w)   # 16/8-bit stored scales compute in f32
  for a in contracted:
    if s.shape[a] != 1:
      raise ValueError(f"{op}: weight scale varies along contracted axis {a} "
                       f"(channel_axes={w.channel_axes}, shape={w.shape}); the integer "
                       "accumulator cannot be rescaled per input channel. Quantize this "
                       "weight per output channel or per tensor")
  kept = [a for a in range(len(w.shape)) if a not in contracted]
  return kept, s.reshape([s.shape[a] for a in kept])


def _grouped_axis(w: QArray, contracted, op: str):
  """The one contracted weight axis along which a group-wise scale varies, or ``None``.

  Raises when the scale varies along a contracted axis that is not ``w``'s group axis,
  or along more than one contracted axis (no exact integer rescaling exists then)."""
  s_shape = stored_scale(w).shape
  varying = [a for a in contracted if s_shape[a] != 1]
  if not varying:
    return None
  if len(varying) == 1 and w.group_size is not None and w.group_axis == varying[0]:
    return varying[0]
  raise ValueError(f"{op}: weight scale varies along contracted axes {tuple(varying)} "
                   f"(channel_axes={w.channel_axes}, group_size={w.group_size}, group_axis="
                   f"{w.group_axis}, shape={w.shape}); the integer accumulator can only be "
                   "rescaled per group along ONE contracted axis (the group axis). Quantize "
                   "this weight per output channel, per tensor or group-wise along one "
                   "contracted axis")


def _split_axis(a: jax.Array, axis: int, g: int) -> jax.Array:
  """``a`` with ``axis`` (length ``K``) zero-padded to ``G * g`` and cut into ``(G, g)``,
  ``G = ceil(K / g)`` (zero codes add nothing to the integer sums)."""
  k = a.shape[axis]
  n_g = -(-k // g)
  if n_g * g != k:
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, n_g * g - k)
    a = jnp.pad(a, pad)
  return a.reshape(a.shape[:axis] + (n_g, g) + a.shape[axis + 1:])


def _grouped_dims(dimension_numbers, la: int, ra: int):
  """Dimension numbers after splitting lhs axis ``la`` / rhs axis ``ra`` into ``(G, g)``:
  ``g`` contracted, ``G`` the first batch dimension (so the output is ``(G, ...)``)."""
  (lc, rc), (lb, rb) = dimension_numbers

  def shift(axes, p):   # axes after p move one to the right; the split axis becomes g
    return [b + 1 if b >= p else b for b in axes]

  return ((shift(lc, la), shift(rc, ra)), ([la] + shift(lb, la), [ra] + shift(rb, ra)))


def int8_dot_general(x: jax.Array, w: QArray, x_scale: jax.Array | None, dimension_numbers, *,
                     out_dtype=None, op: str = "dot_general", act_bits: int = 8) -> jax.Array:
  """``dot_general(x, dequantize(w))`` computed as s8 x s8 -> s32 and rescaled.

  ``x_scale``: the per-tensor activation scale, or ``None`` for per-token dynamic scales
  (one per index of ``x``'s non-contracted axes, computed here; module docstring).
  ``act_bits``: the activation codes are clipped to ``±(2^(act_bits-1) - 1)``.

  Group-wise weights (``w.group_size = g`` along a contracted ``w.group_axis`` of length
  ``K``, scale ``s_w[G, n]`` with ``G = ceil(K / g)``) are computed exactly: the contracted
  axis is cut into ``(G, g)`` on both operands (zero-padded), ``G`` becomes a batch
  dimension and ``g`` stays contracted::

      acc[j, t, n] = sum_{k < g} q_x[t, j g + k] q_w[j g + k, n]        (s8 x s8 -> s32)
      y[t, n]      = s_x[t] * sum_j float32(acc[j, t, n]) * s_w[j, n]   (float32 sum)

  (``s_x`` per tensor or per token: constant along ``K`` either way).
  """
  _check_weight(w, op)
  (lc, rc), (lb, rb) = dimension_numbers
  ga = _grouped_axis(w, tuple(rc), op)
  dynamic = x_scale is None
  if dynamic:   # per token: one scale per index of x's batch and free axes
    x_scale = dynamic_scale(x, lc, act_bits)
  qx, qw = quantize_activation(x, x_scale, act_bits), int_values(w)
  s_full = stored_scale(w)
  if ga is None:
    kept, s = _scale_keep(w, tuple(rc), op)
    acc = lax.dot_general(qx, qw, dimension_numbers, preferred_element_type=jnp.int32)
  else:   # group axis -> leading batch dim G of acc and of the scale
    kept = [a for a in range(len(w.shape)) if a not in rc]
    s = jnp.moveaxis(s_full, ga, 0).reshape((s_full.shape[ga],)
                                            + tuple(s_full.shape[a] for a in kept))
    la = lc[list(rc).index(ga)]
    acc = lax.dot_general(_split_axis(qx, la, w.group_size), _split_axis(qw, ga, w.group_size),
                          _grouped_dims(dimension_numbers, la, ga),
                          preferred_element_type=jnp.int32)
  # output layout: batch dims (rhs order rb), lhs free dims, rhs free dims
  n_lhs_free = x.ndim - len(lc) - len(lb)
  rfree = [a for a in kept if a not in rb]
  order = [kept.index(a) for a in rb] + [kept.index(a) for a in rfree]
  lead = 0 if ga is None else 1
  s = jnp.transpose(s, list(range(lead)) + [o + lead for o in order])
  shape = list(s.shape[:lead + len(rb)]) + [1] * n_lhs_free + list(s.shape[lead + len(rb):])
  if dynamic:   # x's (batch, free) axes into the output's (batch, lhs free) layout
    rest = [a for a in range(x.ndim) if a not in lc]
    lfree = [a for a in rest if a not in lb]
    sx = jnp.transpose(jnp.squeeze(x_scale, tuple(lc)),
                       [rest.index(a) for a in lb] + [rest.index(a) for a in lfree])
    x_scale = sx.reshape(sx.shape + (1,) * len(rfree))
  if ga is None:
    y = acc.astype(jnp.float32) * (s.reshape(shape) * x_scale)
  else:
    y = jnp.sum(acc.astype(jnp.float32) * s.reshape(shape), axis=0) * x_scale
  return y.astype(out_dtype or x.dtype)


def int8_einsum(eq: str, x: jax.Array, w: QArray, x_scale: jax.Array | None, *, out_dtype=None,
                op: str = "einsum", act_bits: int = 8) -> jax.Array:
  """``einsum(eq, x, dequantize(w))`` as an s8 x s8 -> s32 einsum, rescaled after."""
  _check_weight(w, op)
  eq = eq.replace(" ", "")
  ins, out = eq.split("->")
  _, k_sub = ins.split(",")
  if "." in k_sub:
    raise ValueError(f"{op}: int8 einsum needs explicit kernel subscripts, got {eq!r}")
  contracted = tuple(i for i, c in enumerate(k_sub) if c not in out)
  kept, s = _scale_keep(w, contracted, op)
  x_sub = ins.split(",")[0]
  dynamic = x_scale is None
  if dynamic:
    if "." in x_sub or "." in out:
      raise ValueError(f"{op}: per-token dynamic scales (x_scale=None) need explicit "
                       f"einsum subscripts, got {eq!r}")
    x_scale = dynamic_scale(x, [i for i, c in enumerate(x_sub) if c not in out], act_bits)
  acc = jnp.einsum(eq, quantize_activation(x, x_scale, act_bits), int_values(w),
                   preferred_element_type=jnp.int32)
  letters = out.replace("...", "." * (acc.ndim - len(out.replace("...", ""))))
  kept_letters = [k_sub[a] for a in kept]
  order = sorted(range(len(kept)), key=lambda i: letters.index(kept_letters[i]))
  s = jnp.transpose(s, order)
  sorted_letters = [kept_letters[i] for i in order]
  shape = [s.shape[sorted_letters.index(c)] if c in sorted_letters else 1 for c in letters]
  if dynamic:   # x's kept letters, in the output's order
    xk = [c for c in x_sub if c in out]
    sx = jnp.squeeze(x_scale, tuple(i for i, c in enumerate(x_sub) if c not in out))
    sx = jnp.transpose(sx, sorted(range(len(xk)), key=lambda i: letters.index(xk[i])))
    x_scale = sx.reshape([x.shape[x_sub.index(c)] if c in xk else 1 for c in letters])
  y = acc.astype(jnp.float32) * (s.reshape(shape) * x_scale)
  return y.astype(out_dtype or x.dtype)


@functools.lru_cache(maxsize=None)
def int8_conv_supported(backend: str | None = None) -> bool:
  """Whether this backend compiles ``conv_general_dilated(s8, s8) -> s32`` (probed once)."""
  try:
    f = jax.jit(lambda a, b: lax.conv_general_dilated(
        a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        preferred_element_type=jnp.int32), backend=backend)
    a = jax.ShapeDtypeStruct((1, 4, 4, 2), jnp.int8)
    b = jax.ShapeDtypeStruct((3, 3, 2, 2), jnp.int8)
    f.lower(a, b).compile()
    return True
  except Exception:  # noqa: BLE001 - any backend failure means "not supported"
    return False


def int8_conv(x: jax.Array, w: QArray, x_scale: jax.Array | None, window_strides, padding, *,
              lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
              feature_group_count: int = 1, out_dtype=None, op: str = "conv",
              act_bits: int = 8) -> jax.Array:
  """``conv_general_dilated(x, dequantize(w))`` as s8 x s8 -> s32, rescaled per channel.

  Falls back (with a one-line warning) to a float conv of the dequantized operands where
  the backend cannot compile an int8 convolution.
  """
  _check_weight(w, op)
  dn = lax.conv_dimension_numbers(x.shape, w.shape, dimension_numbers)
  out_feat_w, out_feat_y = dn.rhs_spec[0], dn.out_spec[1]
  contracted = tuple(a for a in range(len(w.shape)) if a != out_feat_w)
  _, s = _scale_keep(w, contracted, op)
  kw = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dn,
            feature_group_count=feature_group_count)
  if x_scale is None:   # per example (an output position mixes input positions)
    x_scale = dynamic_scale(x, [a for a in range(x.ndim) if a != dn.lhs_spec[0]], act_bits)
    out_scale = jnp.reshape(x_scale, (-1,) + (1,) * (x.ndim - 1))
    out_scale = jnp.moveaxis(out_scale, 0, dn.out_spec[0])
  else:
    out_scale = x_scale
  qx = quantize_activation(x, x_scale, act_bits)
  if int8_conv_supported():
    acc = lax.conv_general_dilated(qx, int_values(w), window_strides, padding,
                                   preferred_element_type=jnp.int32, **kw)
    acc = acc.astype(jnp.float32)
  else:
    warnings.warn(f"{op}: this backend has no int8 convolution; using a float conv of the "
                  "dequantized int8 operands", RuntimeWarning, stacklevel=2)
    acc = lax.conv_general_dilated(qx.astype(jnp.float32), int_values(w).astype(jnp.float32),
                                   window_strides, padding, **kw)
  shape = [1] * acc.ndim
  shape[out_feat_y] = s.shape[0]
  y = acc * (s.reshape(shape) * out_scale)
  return y.astype(out_dtype or x.dtype)


@dataclasses.dataclass(frozen=True)
class Int8Census:
  """What the program asked for (``lowered``) and what XLA compiled (``compiled``)."""

  lowered: _hlo.DotCensus
  compiled: _hlo.DotCensus

  def __str__(self):
    return f"requested (lowered HLO):\n{self.lowered}\ncompiled (optimized HLO):\n{self.compiled}"


def int8_dot_census(fn, *args, **kwargs) -> Int8Census:
  """Census of dots/convs by dtype before and after XLA optimization.

  ``lowered`` shows ``s8 x s8 -> s32`` for every integer op the function requested;
  ``compiled`` is the optimized HLO (XLA:CPU widens s8 operands to s32 there, GPU/TPU
  keep s8). A silent fall-back to float shows up as float ops in both.
  """
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  lowered = jitted.lower(*args, **kwargs)
  return Int8Census(_hlo.census_from_hlo(lowered.as_text(dialect="hlo")),
                    _hlo.census_from_hlo(lowered.compile().as_text()))
