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


def shrink_channels(params: dict, masks: dict, layers: Sequence[str] | None = None, *,
                    roles: Any = None) -> dict:
  """Removes channel-pruned outputs, giving smaller layers (two ways to say which).

  **From the traced program** (``roles=jaxopt_dnn.roles.trace(apply_fn, variables,
  *x)``; any topology): ``params`` is the params tree or the whole variables dict
  (``{"params": ..., "batch_stats": ...}``, then the running statistics are shrunk too)
  and ``masks`` are over the params (e.g. from ``channel_masks(..., roles=roles)``).
  For every kernel with a channel mask whose :class:`~jaxopt_dnn.roles.ChannelGroup`
  is removable, the removed channels are dropped from the kernel's output axis, from
  every per-channel leaf on the way (bias, a following BatchNorm's scale, bias, mean,
  var) and from the input axis of every kernel that consumes them. A kernel whose
  channels cannot be removed (its output is added to a residual stream, it is the
  head, ...: ``ChannelGroup.reason``) keeps its shape, with its masked (zero) channels
  baked in, so the result computes exactly what the masked model computes (up to the
  float summation order of the smaller contractions).

  **Sequential layers** (``layers``):

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

  Raises:
    ValueError: both or neither of ``layers`` / ``roles``; a kernel mask that is not
      a channel mask; a params leaf applied per channel (bias, BatchNorm scale / bias)
      that is not masked like its kernel (the removed channel would not be zero).
  """
  if (layers is None) == (roles is None):
    raise ValueError("shrink_channels: pass exactly one of `layers` (a sequential model's "
                     "layer names) or `roles` (jaxopt_dnn.roles.trace of the model)")
  if roles is not None:
    return _shrink_traced(params, masks, roles)
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


def _shrink_traced(variables: Any, masks: Any, roles: Any) -> Any:
  """:func:`shrink_channels` driven by the traced channel groups."""
  from jaxopt_dnn import roles as _roles  # noqa: PLC0415
  whole = isinstance(variables, dict) and "params" in variables and not (
      isinstance(masks, dict) and "params" in masks)
  ptree = variables["params"] if whole else variables
  check_mask_tree(ptree, masks)
  prefix = "params/" if whole else ""
  leaves = {p: np.asarray(x) for p, x in _tree.leaves_with_paths(variables)}
  mlist = dict(_tree.leaves_with_paths(masks))
  for p, m in mlist.items():     # bake every mask in (kept-shape kernels keep their zeros)
    if not is_dense(m):
      leaves[prefix + p] = np.where(np.asarray(m), leaves[prefix + p], 0).astype(
          leaves[prefix + p].dtype)

  def key(path):
    if path in leaves:
      return path
    rel = path.split("/", 1)[-1]
    return rel if rel in leaves else None

  cuts: dict[tuple[str, int], np.ndarray] = {}

  def mask_of(path):
    """The mask of a params leaf (None for other collections)."""
    if whole:
      return mlist.get(path[len(prefix):]) if path.startswith(prefix) else None
    k = key(path)
    return None if k is None else mlist.get(k)

  def cut(path, axis, keep, why):
    k = key(path)
    if k is None:
      raise ValueError(f"shrink_channels: {path!r} ({why}) is not in the given tree; pass the "
                       "whole variables dict ({'params': ..., 'batch_stats': ...})")
    prev = cuts.get((k, axis))
    if prev is not None and not np.array_equal(prev, keep):
      raise ValueError(f"shrink_channels: axis {axis} of {k!r} would be cut by two different "
                       "channel masks")
    cuts[(k, axis)] = keep

  for p, m in mlist.items():
    if is_dense(m):
      continue
    r = _roles.lookup(roles, prefix + p) or _roles.lookup(roles, p)
    g = None if r is None else r.channels
    if g is None or not g.removable or g.axis < 0:
      continue
    m = np.asarray(m)
    other = tuple(d for d in range(m.ndim) if d != g.axis)
    keep = m.all(axis=other)
    if not np.array_equal(m.any(axis=other), keep):
      raise ValueError(f"shrink_channels: mask of {p!r} is not a channel mask along axis "
                       f"{g.axis} (some output channels are partly pruned)")
    if keep.all():
      continue
    cut(prefix + p, g.axis, keep, "the kernel")
    for f, fax in g.per_channel:
      fm = mask_of(f)
      if fm is not None:          # a params leaf: its mask must remove the same channels
        shape = leaves[key(f)].shape
        view = [1] * len(shape)
        view[fax] = shape[fax]
        want = np.broadcast_to(keep.reshape(view), shape)
        if is_dense(fm) or not np.array_equal(np.broadcast_to(np.asarray(fm), shape), want):
          raise ValueError(f"shrink_channels: {f!r} is applied per channel to the output of "
                           f"{p!r} but is not masked like it, so a removed channel would not "
                           "be zero; build the masks with channel_masks(..., roles=roles)")
      cut(f, fax, keep, f"applied per channel to {p!r}")
    for c, cax in g.consumers:
      cut(c, cax, keep, f"consumes the channels of {p!r}")

  out = {}
  for (k, axis), keep in cuts.items():
    x = out.get(k, leaves[k])
    out[k] = np.compress(keep, x, axis=axis)
  return _tree.map_with_path_str(lambda p, x: out.get(p, leaves[p]), variables)


def shrunk_apply(model: Any) -> Any:
  """``apply(variables, *args, **kwargs)`` of a linen ``model`` that accepts the smaller
  params of :func:`shrink_channels` (``model.apply`` would reject them: a ``Conv(8)``
  checks that its kernel has 8 output channels).

  Every submodule with a ``features`` attribute (``Dense``, ``Conv``, ``DenseGeneral``,
  ...) whose ``kernel`` already exists is run with ``features`` read off that kernel's
  trailing axes; everything else (input channels, BatchNorm sizes) already follows the
  activations' shapes. The model's code is not changed.
  """
  import flax.linen as nn  # noqa: PLC0415

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name == "__call__" and hasattr(mod, "features") and mod.scope is not None:
      kernel = mod.scope.get_variable("params", "kernel")
      if kernel is not None:
        feats = mod.features
        n = len(feats) if isinstance(feats, (tuple, list)) else 1
        new = tuple(np.shape(kernel)[-n:]) if isinstance(feats, (tuple, list)) \
            else int(np.shape(kernel)[-1])
        if new != feats:
          object.__setattr__(mod, "features", new)
    return next_fun(*args, **kwargs)

  def apply(variables, *args, **kwargs):
    with nn.intercept_methods(interceptor):
      return model.apply(variables, *args, **kwargs)

  return apply
