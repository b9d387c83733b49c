"""``NF4Array``: 4-bit NormalFloat storage (QLoRA), a sibling of :class:`QArray`.

NF4 (Dettmers et al., 2023, "QLoRA") stores each weight as the index of the nearest of
16 fixed values, the code book :data:`NF4_CODE`, scaled by the absolute maximum of its
block:

    dequantize(x)[..., i, ...] = NF4_CODE[idx[..., i, ...]] * absmax[..., i // g, ...]

with blocks of ``g = block_size`` consecutive entries along ``block_axis`` (the
contraction axis of a kernel, like a QArray's ``group_axis``; QLoRA blocks the
flattened tensor, a block along the input axis keeps the scale per output channel and
shards like the kernel). The code book holds the quantiles of a standard normal,
normalised to ``[-1, 1]``, with an exact 0: 8 positive values
``Phi^-1(linspace(delta, 0.5, 9))[:-1]`` and 7 negative ones
``-Phi^-1(linspace(delta, 0.5, 8))[:-1]`` (``delta = 0.9677``), all divided by the
largest (:func:`normal_code_book` recomputes them; the constants are those of
the reference implementation, bitsandbytes' ``create_normal_map``).

Indices are stored as ``idx - 8`` in int4 packed two per byte along axis 0
(:func:`~jaxopt_dnn.quant.qarray.pack_int4`), so a ``g = 64`` block with a bfloat16
``absmax`` costs ``4 + 16/64 = 4.25`` bits per weight, as int4 g64 does. NF4 is a
storage format (dequantized to float for the matmul): it is never an integer
contraction, and ``quant.coverage`` reports its consumers as float.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_dnn.quant.qarray import expand_groups
from jaxopt_dnn.quant.qarray import pack_int4
from jaxopt_dnn.quant.qarray import unpack_int4

NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


def normal_code_book(offset: float = 0.9677083) -> np.ndarray:
  """The NF4 code book from the normal quantiles (see the module docstring)."""
  from jax.scipy.special import ndtri
  pos = np.asarray(ndtri(np.linspace(offset, 0.5, 9)[:-1]), np.float64)
  neg = -np.asarray(ndtri(np.linspace(offset, 0.5, 8)[:-1]), np.float64)
  v = np.concatenate([pos, [0.0], neg])
  return np.sort(v / v.max()).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class _Meta:
  shape: tuple[int, ...]
  dtype: str
  block_size: int
  block_axis: int
  name: str = dataclasses.field(default="", compare=False)


@jax.tree_util.register_pytree_with_keys_class
class NF4Array:
  """4-bit NormalFloat leaf: packed code indices and one ``absmax`` per block.

  Attributes:
    value: ``uint8``, the indices minus 8 packed two per byte along axis 0.
    absmax: the block scales, the original shape with ``ceil(n / block_size)`` entries
      along ``block_axis`` (``bfloat16`` by default).
    shape, dtype, block_size, block_axis: static metadata.
  """

  __slots__ = ("value", "absmax", "_meta")

  def __init__(self, value, absmax, *, shape, dtype="float32", block_size: int = 64,
               block_axis: int = 0, name: str = ""):
    self.value = value
    self.absmax = absmax
    shape = tuple(int(d) for d in shape)
    self._meta = _Meta(shape, str(np.dtype(dtype)), int(block_size),
                       int(block_axis) % max(len(shape), 1), name)

  shape = property(lambda self: self._meta.shape)
  dtype = property(lambda self: np.dtype(self._meta.dtype))
  ndim = property(lambda self: len(self._meta.shape))
  block_size = property(lambda self: self._meta.block_size)
  block_axis = property(lambda self: self._meta.block_axis)
  name = property(lambda self: self._meta.name)
  bits = 4

  def tree_flatten_with_keys(self):
    k = jax.tree_util.DictKey
    return ((k("value"), self.value), (k("absmax"), self.absmax)), self._meta

  @classmethod
  def tree_unflatten(cls, meta: _Meta, children):
    obj = object.__new__(cls)
    obj.value, obj.absmax = children
    obj._meta = meta
    return obj

  def __repr__(self):
    where = f"{self.name}: " if self.name else ""
    return (f"NF4Array({where}nf4{list(self.shape)}, block_size={self.block_size} "
            f"(axis {self.block_axis}), dtype={self.dtype})")

  def _float_misuse(self, *_, **__):
    raise TypeError(f"{self!r} was used where a float array is expected; call "
                    "jaxopt_dnn.quant.nf4.dequantize(x) first")

  __jax_array__ = __array__ = _float_misuse
  __add__ = __radd__ = __mul__ = __rmul__ = __matmul__ = __rmatmul__ = _float_misuse


def is_nf4(x: Any) -> bool:
  return isinstance(x, NF4Array)


@functools.partial(jax.jit, static_argnames=("block_size", "block_axis", "absmax_dtype",
                                             "name"))
def quantize(x: jax.Array, *, block_size: int = 64, block_axis: int = 0,
             absmax_dtype: Any = jnp.bfloat16, name: str = "x") -> NF4Array:
  """NF4 of ``x``: ``idx = argmin_j |x / absmax - NF4_CODE[j]|`` per block.

  ``absmax`` is rounded to ``absmax_dtype`` first (and kept >= the smallest normal), so
  the codes are chosen for the stored scale. Works under ``jax.jit``.
  """
  dtype = getattr(x, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{name}: only floating arrays can be NF4-quantized, got dtype {dtype}")
  if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) \
      or block_size < 1:
    raise ValueError(f"{name}: block_size must be a positive int, got {block_size!r}")
  shape = tuple(jnp.shape(x))
  if not shape or 0 in shape:
    raise ValueError(f"{name}: NF4 needs a non-empty array of rank >= 1, got shape {shape}")
  if not -len(shape) <= block_axis < len(shape):
    raise ValueError(f"{name}: block_axis {block_axis!r} out of range for shape {shape}")
  ax = block_axis % len(shape)
  n = shape[ax]
  xf = jnp.asarray(x, jnp.float32)
  nb = -(-n // block_size)
  pad = nb * block_size - n
  xp = jnp.pad(jnp.abs(xf), [(0, pad if a == ax else 0) for a in range(len(shape))])
  blocks = xp.reshape(shape[:ax] + (nb, block_size) + shape[ax + 1:])
  amax = jnp.max(blocks, axis=ax + 1)
  tiny = float(jnp.finfo(absmax_dtype).tiny)
  stored = jnp.maximum(amax, tiny).astype(absmax_dtype)
  full = expand_groups(stored.astype(jnp.float32), block_size, ax, n)
  code = jnp.asarray(NF4_CODE)
  idx = jnp.argmin(jnp.abs((xf / full)[..., None] - code), axis=-1).astype(jnp.int8)
  return NF4Array(pack_int4(idx - 8), stored, shape=shape, dtype=dtype, block_size=block_size,
                  block_axis=ax, name=name)


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize(x: NF4Array, dtype: Any = None) -> jax.Array:
  """``NF4_CODE[idx] * absmax`` (blocks expanded), cast to ``dtype`` (default original)."""
  if not isinstance(x, NF4Array):
    raise TypeError(f"nf4.dequantize expects an NF4Array, got {type(x).__name__}")
  idx = unpack_int4(x.value, x.shape).astype(jnp.int32) + 8
  vals = jnp.asarray(NF4_CODE)[idx]
  scale = expand_groups(jnp.asarray(x.absmax).astype(jnp.float32), x.block_size,
                        x.block_axis, x.shape[x.block_axis])
  return (vals * scale).astype(dtype or x.dtype)
