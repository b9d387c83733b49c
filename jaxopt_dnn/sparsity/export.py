"""Making pruning pay off outside training: baked masks, packed storage, shrunk layers.

Masks alone give no speedup on dense hardware (a zero costs as much as any other
number in a dense matmul). What pruning really buys here is (1) smaller storage, through
:class:`PackedArray` (a bitmask plus the kept values), and (2) for channel pruning,
smaller layers through :func:`shrink_channels`, which dense hardware does run faster.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxopt_dnn import _tree
from jaxopt_dnn.sparsity.masks import apply_masks, check_mask_tree, is_dense

PyTree = Any


def strip(params: PyTree, masks: PyTree) -> PyTree:
  """Bakes the masks into the params: ``where(mask, p, 0)``; the result needs no masks."""
  return apply_masks(params, masks)


@jax.tree_util.register_pytree_with_keys_class
class PackedArray:
  """A pruned array stored as a bitmask plus its kept values.

  Attributes:
    bits: uint8 ``packbits`` of the row-major keep mask, ``ceil(size / 8)`` bytes.
    values: 1-D array of the kept entries in row-major order (original dtype).
    shape, dtype: of the dense array.

  Storage is ``size / 8 + nnz * itemsize`` bytes instead of ``size * itemsize``.
  """

  def __init__(self, bits, values, shape: tuple[int, ...], dtype):
    self.bits, self.values = bits, values
    self.shape, self.dtype = tuple(shape), np.dtype(dtype)

  def tree_flatten_with_keys(self):
    k = jax.tree_util.GetAttrKey
    return ((k("bits"), self.bits), (k("values"), self.values)), (self.shape, self.dtype.name)

  def tree_flatten(self):
    return (self.bits, self.values), (self.shape, self.dtype.name)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  @property
  def nbytes(self) -> int:
    return int(np.asarray(self.bits).nbytes + np.asarray(self.values).nbytes)

  def __repr__(self):
    return (f"PackedArray(shape={self.shape}, dtype={self.dtype.name}, "
            f"nnz={np.size(self.values)}, nbytes={self.nbytes})")


def _nonzero_bits(x: np.ndarray) -> np.ndarray:
  """Entries whose bit pattern is not all-zero (so -0.0 counts as a kept value)."""
  x = np.ascontiguousarray(x)
  return x.view(np.dtype(f"u{x.dtype.itemsize}")) != 0


def pack(params: PyTree, masks: PyTree | None = None, *, rules=None) -> PyTree:
  """Packs pruned leaves into :class:`PackedArray` (host-side, NumPy).

  With ``masks``, every leaf with a real mask is packed by its mask. Without, the leaves
  chosen by ``rules`` (default: floating, ``ndim >= 2``) are packed by their nonzero
  entries. :func:`unpack` restores the masked params bit for bit.
  """
  if masks is not None:
    check_mask_tree(params, masks)
    flags = [not is_dense(m) for m in jax.tree.leaves(masks)]
    mlist = jax.tree.leaves(masks)
  else:
    flags = [v is not None for _, _, v in _tree.select(params, rules)]
    mlist = [None] * len(flags)
  out = []
  for (path, x), f, m in zip(_tree.leaves_with_paths(params), flags, mlist):
    if not f:
      out.append(x)
      continue
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.number) or x.dtype.name == "bfloat16"):
      raise TypeError(f"leaf {path!r} has dtype {x.dtype}; only numeric leaves are packed")
    keep = np.asarray(m, bool) if m is not None else _nonzero_bits(x)
    keep = np.broadcast_to(keep, x.shape)
    out.append(PackedArray(np.packbits(keep.ravel()), x[keep], x.shape, x.dtype))
  return jax.tree.unflatten(jax.tree.structure(params), out)


def pack_sparse(tree: PyTree) -> PyTree:
  """Packs every numeric leaf (``ndim >= 2``, QArray int8 values included) whose
  packed form is smaller than its dense form; other leaves are kept as they are.

  Packed size: ``ceil(size / 8) + nnz * itemsize`` bytes, smaller than
  ``size * itemsize`` once the density is below ``1 - 1 / (8 * itemsize)``.
  """
  def worth(path, x):
    if np.ndim(x) < 2 or not hasattr(x, "dtype"):
      return False
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.number) and x.dtype.name != "bfloat16":
      return False
    nnz = int(np.count_nonzero(_nonzero_bits(x)))
    return -(-x.size // 8) + nnz * x.dtype.itemsize < x.nbytes
  return pack(tree, rules=worth)


def _is_packed(x) -> bool:
  return isinstance(x, PackedArray)


def unpack(tree: PyTree) -> PyTree:
  """Inverse of :func:`pack`: dense arrays with zeros where the mask was False.

  Raises:
    ValueError: a packed leaf whose ``bits`` or ``values`` do not fit its shape (names
      the leaf).
  """
  def one(path, x):
    if not _is_packed(x):
      return x
    size = int(np.prod(x.shape))
    bits, values = np.asarray(x.bits), np.asarray(x.values)
    if bits.dtype != np.uint8 or bits.ndim != 1 or bits.size != -(-size // 8):
      raise ValueError(f"unpack: leaf {path!r}: bits must be {-(-size // 8)} uint8 bytes for "
                       f"shape {x.shape}, got {bits.dtype}{list(bits.shape)}")
    keep = np.unpackbits(bits, count=size).astype(bool)
    nnz = int(keep.sum())
    if values.ndim != 1 or values.size != nnz:
      raise ValueError(f"unpack: leaf {path!r}: the bitmask keeps {nnz} entries but values has "
                       f"shape {values.shape}")
    dense = np.zeros(size, x.dtype)
    dense[keep] = values
    return dense.reshape(x.shape)
  return _tree.map_with_path_str(one, tree, is_leaf=_is_packed)


def tree_bytes(tree: PyTree) -> int:
  """Bytes of all array data in ``tree`` (packed leaves count their packed size)."""
  total = 0
  for x in jax.tree.leaves(tree, is_leaf=_is_packed):
    total += x.nbytes if _is_packed(x) else int(np.asarray(x).nbytes)
  return total


def _get(tree: dict, path: str):
  node = tree
  for part in path.split("/"):
    if not isinstance(node, dict) or part not in node:
      raise ValueError(f"shrink_channels: no leaf at {path!r}")
    node = node[part]
  return node


def _channel_keep(params: dict, masks: dict, name: str, last: bool) -> np.ndarray | None:
  """The kept output channels of layer ``name`` (None if its kernel is not pruned)."""
  kmask = _get(masks, f"{name}/kernel")
  if is_dense(kmask):
    return None
  flat = np.asarray(kmask).reshape(-1, np.shape(kmask)[-1])
  keep = flat.all(axis=0)
  if not np.array_equal(flat.any(axis=0), keep):
    raise ValueError(f"shrink_channels: mask of {name}/kernel is not a channel mask "
                     "(some output channels are partly pruned)")
  if last and not keep.all():
    raise ValueError(f"shrink_channels: the last layer {name!r} has pruned outputs; its "
                     "outputs are the model's outputs and cannot be removed")
  if "bias" in _get(params, name) and not keep.all():
    bmask = _get(masks, f"{name}/bias")
    if is_dense(bmask) or not np.array_equal(np.asarray(bmask), keep):
      raise ValueError(f"shrink_channels: {name}/bias is not masked like its kernel, so removed "
                       "channels would still output act(bias); use channel_masks' bias masks")
  return keep


def shrink_channels(params: dict, masks: dict, layers: Sequence[str]) -> dict:
  """Removes channel-pruned outputs from a sequential MLP/CNN, giving smaller layers.

  ``layers`` names the layers in forward order (e.g. ``["Conv_0", "Conv_1", "Dense_0",
  "Dense_1"]``, relative to ``params``), each with a ``kernel`` of shape
  ``(..., C_in, C_out)`` and optionally a ``bias`` ``(C_out,)``, an elementwise
  activation with ``act(0) = 0`` between them, and no normalisation. For each layer
  ``i`` whose kernel has a channel mask (from :func:`channel_masks`), the removed output
  channels are dropped from its kernel/bias and the matching inputs from layer ``i+1``.
  A Conv -> Dense flatten (NHWC, channels last) is handled: input ``s * C + c`` of the
  Dense belongs to channel ``c``. The shrunk model computes what the masked model
  computes.

  Returns:
    A new params dict (the input is not modified); unlisted entries are copied.
  """
  check_mask_tree(params, masks)
  keeps = [_channel_keep(params, masks, name, i == len(layers) - 1)
           for i, name in enumerate(layers)]
  out = jax.tree.map(lambda x: x, params)
  for i, name in enumerate(layers):
    layer = dict(_get(out, name))
    kernel = np.asarray(layer["kernel"])
    if keeps[i] is not None:
      kernel = kernel[..., keeps[i]]
      if "bias" in layer:
        layer["bias"] = np.asarray(layer["bias"])[keeps[i]]
    prev = keeps[i - 1] if i > 0 else None
    if prev is not None:
      c = prev.shape[0]
      if kernel.shape[-2] == c:
        kernel = kernel[..., prev, :]
      elif kernel.ndim == 2 and kernel.shape[0] % c == 0:
        kernel = kernel[np.tile(prev, kernel.shape[0] // c)]
      else:
        raise ValueError(f"shrink_channels: {name}/kernel input axis {kernel.shape[-2]} does not "
                         f"follow the {c} outputs of {layers[i - 1]!r}")
    layer["kernel"] = kernel
    _set(out, name, layer)
  return out


def _set(tree: dict, path: str, value) -> None:
  parts = path.split("/")
  node = tree
  for part in parts[:-1]:
    node = node[part]
  node[parts[-1]] = value
