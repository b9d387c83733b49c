"""``QArray``: a quantized array as an ordinary pytree leaf (int8, or int4 packed).

A ``QArray`` stores integers ``q`` and a float32 ``scale`` (plus an optional integer
``zero_point``) such that the represented value is

    x ~= dequantize(q) = (q - zero_point) * scale

``scale`` (and ``zero_point``) have the shape of the original array with every reduced
axis kept as size 1 (``keepdims``), so they broadcast against ``q``. ``channel_axes``
are the axes that keep their own scale (``()`` means one scale for the whole tensor).

Group-wise (sub-channel) scales: with ``group_size = g`` along ``group_axis = a`` (the
contraction / input axis of a kernel, ``-2`` for a Flax ``Dense`` kernel ``(in, out)``),
axis ``a`` of length ``n`` is cut into ``G = ceil(n / g)`` consecutive groups (the last
one shorter when ``g`` does not divide ``n``) and ``scale`` has length ``G`` on that axis:

    dequantize(q)[..., i, ...] = q[..., i, ...] * scale[..., i // g, ...]   (i along a)

``scale`` may be stored as ``bfloat16``/``float16`` (``scale_dtype``); the codes are
computed with the rounded scale, so the error bound ``|x - dequantize(q)| <= scale / 2``
holds for the stored scale. An int4 ``g = 64`` kernel with 16-bit scales costs
``4 + 16/64 = 4.25`` bits per weight.

8-bit scales (``float8_e4m3fn``, "double quantization" of the scales): the stored
scale is relative to one float32 ``super_scale`` per tensor (a power of two putting the
largest scale near the top of the fp8 range), ``scale = stored * super_scale``; an int4
``g = 32`` kernel then costs ``4 + 8/32 = 4.25`` bits per weight (plus 32 bits).

int4 values (``bits=4``, range ``[-8, 7]``) are stored packed two per byte in a
``uint8`` array along axis 0: ``byte[i] = (q[2i] & 0xF) | (q[2i+1] & 0xF) << 4``
(axis 0 padded to even length). A checkpoint of int4 weights is therefore ~1/8 of
float32.

The array children (``value``, ``scale``, ``zero_point``) are pytree children, so a
tree of ``QArray`` goes through ``jax.jit``, ``jax.tree.*`` and orbax unchanged; the
metadata (bits, axes, original shape/dtype) is static. Feeding a ``QArray`` to code
that expects a float array raises a ``TypeError`` naming the leaf.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class _Meta:
  bits: int
  channel_axes: tuple[int, ...]
  shape: tuple[int, ...]
  dtype: str
  name: str = dataclasses.field(default="", compare=False)  # path, for error messages
  group_size: int | None = None
  group_axis: int | None = None


@jax.tree_util.register_pytree_with_keys_class
class QArray:
  """Quantized array leaf; see the module docstring for the representation.

  Attributes:
    value: ``int8`` array of the original shape (bits=8), or ``uint8`` packed pairs of
      int4 along axis 0 (bits=4).
    scale: float32, original shape with reduced axes of size 1.
    zero_point: ``None`` (symmetric) or int32 of the scale's shape.
    super_scale: ``None``, or a float32 scalar multiplying ``scale`` (8-bit float
      scales, see :func:`round_scale`).
    bits: 4 or 8.
    channel_axes: axes with their own scale (non-negative ints); ``()`` = per tensor.
    shape, dtype: the original array's shape and float dtype.
    group_size, group_axis: sub-channel groups (``None`` = not group-wise); the scale
      has ``ceil(shape[group_axis] / group_size)`` entries along ``group_axis``.
  """

  __slots__ = ("value", "scale", "zero_point", "super_scale", "_meta")

  def __init__(self, value, scale, zero_point=None, *, bits: int, channel_axes=(),
               shape=None, dtype="float32", name: str = "", group_size: int | None = None,
               group_axis: int | None = None, super_scale=None):
    where = f"QArray{'(' + name + ')' if name else ''}"
    if bits not in (4, 8):
      raise ValueError(f"{where}: bits must be 4 or 8, got {bits!r}")
    self.value = value
    self.scale = scale
    self.zero_point = zero_point
    self.super_scale = super_scale
    shape = tuple(np.shape(value)) if shape is None else tuple(int(d) for d in shape)
    if group_size is not None:
      if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) \
          or group_size < 1:
        raise ValueError(f"{where}: group_size must be a positive int, got {group_size!r}")
      if group_axis is None or not -len(shape) <= group_axis < len(shape):
        raise ValueError(f"{where}: group_axis {group_axis!r} out of range for shape {shape}")
      group_size, group_axis = int(group_size), int(group_axis) % len(shape)
    else:
      group_axis = None
    self._meta = _Meta(int(bits), tuple(int(a) for a in channel_axes), shape,
                       str(np.dtype(dtype)), name, group_size, group_axis)

  bits = property(lambda self: self._meta.bits)
  channel_axes = property(lambda self: self._meta.channel_axes)
  shape = property(lambda self: self._meta.shape)
  dtype = property(lambda self: np.dtype(self._meta.dtype))
  name = property(lambda self: self._meta.name)
  ndim = property(lambda self: len(self._meta.shape))
  group_size = property(lambda self: self._meta.group_size)
  group_axis = property(lambda self: self._meta.group_axis)

  def tree_flatten_with_keys(self):
    k = jax.tree_util.DictKey   # not GetAttrKey: ".value" is how NNX Variables flatten
    return (((k("value"), self.value), (k("scale"), self.scale),
             (k("zero_point"), self.zero_point), (k("super_scale"), self.super_scale)),
            self._meta)

  @classmethod
  def tree_unflatten(cls, meta: _Meta, children):
    obj = object.__new__(cls)
    obj.value, obj.scale, obj.zero_point, obj.super_scale = children
    obj._meta = meta
    return obj

  def with_name(self, name: str) -> "QArray":
    return QArray(self.value, self.scale, self.zero_point, bits=self.bits,
                  channel_axes=self.channel_axes, shape=self.shape, dtype=self.dtype,
                  name=name, group_size=self.group_size, group_axis=self.group_axis,
                  super_scale=self.super_scale)

  def __repr__(self):
    zp = "" if self.zero_point is None else ", asymmetric"
    where = f"{self.name}: " if self.name else ""
    g = "" if self.group_size is None else f", group_size={self.group_size} (axis {self.group_axis})"
    return (f"QArray({where}int{self.bits}{list(self.shape)}, channel_axes="
            f"{self.channel_axes}{g}{zp}, dtype={self.dtype})")

  def _float_misuse(self, *_, **__):
    raise TypeError(
        f"{self!r} was used where a float array is expected; call "
        "jaxopt_dnn.quant.dequantize(q) / dequantize_params(tree) first, or run the "
        "model through jaxopt_dnn.quant.int8_apply")

  __jax_array__ = _float_misuse
  __array__ = _float_misuse
  __add__ = __radd__ = __mul__ = __rmul__ = __matmul__ = __rmatmul__ = _float_misuse
  __sub__ = __rsub__ = __truediv__ = __neg__ = astype = _float_misuse


def is_qarray(x: Any) -> bool:
  return isinstance(x, QArray)


def pack_int4(q: jax.Array) -> jax.Array:
  """Packs int values in ``[-8, 7]`` two per byte along axis 0 -> ``uint8``."""
  q = jnp.atleast_1d(q).astype(jnp.uint8) & 0xF
  if q.shape[0] % 2:
    q = jnp.concatenate([q, jnp.zeros((1,) + q.shape[1:], jnp.uint8)], axis=0)
  return q[0::2] | (q[1::2] << 4)


def unpack_int4(packed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Inverse of :func:`pack_int4`: ``uint8`` pairs -> ``int8`` of ``shape``."""
  lo = (packed & 0xF).astype(jnp.int8)
  hi = (packed >> 4).astype(jnp.int8)
  both = jnp.stack([lo, hi], axis=1).reshape((-1,) + packed.shape[1:])
  both = jnp.where(both > 7, both - 16, both).astype(jnp.int8)   # sign-extend 4 bits
  n0 = shape[0] if shape else 1
  return both[:n0].reshape(shape)


def int_values(q: QArray) -> jax.Array:
  """The integer values as ``int8`` of the original shape (int4 unpacked)."""
  if not isinstance(q, QArray):
    raise TypeError(f"int_values expects a QArray, got {type(q).__name__}")
  if q.bits == 4:
    return unpack_int4(q.value, q.shape)
  return q.value


def expand_groups(t: jax.Array, group_size: int | None, group_axis: int | None,
                  n: int) -> jax.Array:
  """Repeats a per-group tensor ``group_size`` times along ``group_axis``, cut to ``n``."""
  if group_size is None:
    return t
  t = jnp.repeat(t, group_size, axis=group_axis)
  return jax.lax.slice_in_dim(t, 0, n, axis=group_axis)


def scale_value(stored: jax.Array, super_scale: jax.Array | None = None) -> jax.Array:
  """The float32 scale a stored scale stands for (``stored * super_scale`` for 8-bit
  scales, see :func:`round_scale`)."""
  s = jnp.asarray(stored).astype(jnp.float32)
  return s if super_scale is None else s * jnp.asarray(super_scale, jnp.float32)


def stored_scale(q: QArray) -> jax.Array:
  """The float32 scale of ``q``'s scale shape (8-bit scales times their ``super_scale``)."""
  return scale_value(q.scale, q.super_scale)


FP8_SCALE_DTYPES = ("float8_e4m3fn",)


def round_scale(scale: jax.Array, dtype: Any = None, *, qmax: float | None = None,
                headroom: float = 1.0, super_scale: jax.Array | None = None):
  """``(stored, super_scale)`` with ``stored.astype(f32) * super_scale ~= scale``.

  ``dtype=None``: float32, no super scale. 16-bit floats: ``max(scale, tiny)`` rounded
  (a scale never flushes to 0). 8-bit floats (``float8_e4m3fn``): ``super_scale`` is the
  power of two ``2^ceil(log2(headroom * max(scale) / 448))`` (float32 scalar) and
  ``stored = clip(scale / super_scale, smallest subnormal, 448)`` rounded to the nearest
  fp8 (3 mantissa bits: a scale moves by at most 1/16 of itself; more for a group
  ``2^14`` times smaller than the tensor's largest), except that with ``qmax`` (the
  largest code) a scale is rounded up where rounding down would make
  ``qmax * scale / stored > qmax + 1/2``: the group's largest value then still rounds
  within half a step, so ``|x - dequantize| <= stored / 2`` holds for int8 too. (Always
  rounding up costs more: +19% RTN error on a MiniLM kernel at int4 g16.)
  ``headroom > 1`` leaves room for scales that grow after this call (GPTQ's updated
  weights). Codes must be computed from the returned scale (``stored * super_scale``),
  so the ``<= scale / 2`` error bound holds for it.
  A given ``super_scale`` is used as is (scales rounded piecewise against one tensor's).
  """
  scale = jnp.asarray(scale, jnp.float32)
  if dtype is None:
    return scale, None
  dt = jnp.dtype(dtype)
  if not jnp.issubdtype(dt, jnp.floating):
    raise TypeError(f"scale_dtype must be a float dtype, got {dtype!r}")
  fi = jnp.finfo(dt)
  if dt.itemsize >= 2:
    return jnp.maximum(scale, float(fi.tiny)).astype(dt), None
  if dt.name not in FP8_SCALE_DTYPES:
    raise ValueError(f"8-bit scales must be one of {FP8_SCALE_DTYPES}, got {dt.name}")
  if super_scale is None:
    top = jnp.maximum(jnp.max(scale) * headroom, 1e-30)
    sup = jnp.exp2(jnp.ceil(jnp.log2(top / float(fi.max)))).astype(jnp.float32)
  else:
    sup = jnp.asarray(super_scale, jnp.float32)
  x = jnp.clip(scale / sup, float(fi.smallest_subnormal), float(fi.max))
  r = x.astype(dt).astype(jnp.float32)
  if qmax is not None:    # too far down for the largest code: the next value up
    ulp = jnp.exp2(jnp.floor(jnp.log2(jnp.maximum(r, float(fi.smallest_normal)))) - fi.nmant)
    low = r * (qmax + 0.5) < x * qmax
    r = jnp.minimum(jnp.where(low, r + ulp, r), float(fi.max))
  return r.astype(dt), sup


def full_scale(q: QArray) -> jax.Array:
  """The float32 scale broadcastable to ``q.shape`` (group scales repeated)."""
  s = stored_scale(q)
  if q.group_size is None:
    return s
  return expand_groups(s, q.group_size, q.group_axis, q.shape[q.group_axis])


def dequantize(q: QArray, dtype: Any = None) -> jax.Array:
  """``(q - zero_point) * scale`` in float32, cast to ``dtype`` (default: original)."""
  if not isinstance(q, QArray):
    raise TypeError(f"dequantize expects a QArray, got {type(q).__name__}")
  if dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
    raise TypeError(f"dequantize: dtype must be a floating dtype (the values are scaled "
                    f"reals), got {jnp.dtype(dtype)}")
  dtype = jnp.dtype(dtype or q.dtype)
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(q)):
    return _dequantize(q, dtype)          # inside a trace: inline, as before
  return _dequantize_jit(q, dtype)        # eager: one program per layout, not ~10 ops


def _dequantize(q: QArray, dtype) -> jax.Array:
  v = int_values(q).astype(jnp.float32)
  if q.zero_point is not None:
    zp = q.zero_point.astype(jnp.float32)
    v = v - expand_groups(zp, q.group_size, q.group_axis, q.shape[q.group_axis or 0])
  return (v * full_scale(q)).astype(dtype)


_dequantize_jit = jax.jit(_dequantize, static_argnums=1)
