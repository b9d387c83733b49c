"""Pruning masks over parameter pytrees: magnitude (layer / global), random, N:M, channel.

A *mask tree* has exactly the structure of the params. A pruned leaf's mask is a bool
array of the leaf's shape (``True`` = keep); a leaf that is not pruned holds the dense
marker, a 0-d ``True`` (it broadcasts, so ``where(mask, p, 0)`` works on every leaf, and
it costs one byte in an optimizer state).

Unstructured selection is exact: for a leaf (or, in global scope, the set of chosen
leaves) with ``n`` entries and sparsity ``s``, exactly ``k = round(s * n)`` entries with
the smallest score are removed, ties broken by position (leaf order, then row-major
index; earlier entries are removed first). The k-th smallest score is found by bisection
over the float32 bit pattern (non-negative floats order like their bit patterns as
int32), followed by a bisection over positions among the tied entries. Every step is a
count, i.e. a scalar reduction, so a kernel sharded over an FSDP mesh axis is never
gathered onto one device (unlike an argsort), and the function runs under ``jit`` with a
traced sparsity.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_dnn import _tree

PyTree = Any
Rules = str | Sequence[str] | Callable[[str, Any], bool] | None
SparsityArg = float | jax.Array | Mapping[str, float]

_INF_BITS = 0x7F800000  # bit pattern of +inf as int32: the largest finite-or-inf key.


def dense_marker() -> jax.Array:
  """The mask of a leaf that is not pruned: a 0-d ``True`` that broadcasts."""
  return jnp.ones((), jnp.bool_)


def is_dense(mask: Any) -> bool:
  """Whether ``mask`` is the dense marker (0-d) rather than a real per-entry mask."""
  return np.ndim(mask) == 0


# --------------------------------------------------------------------------- checks


def _check_sparsity(value: Any, where: str) -> None:
  """Static check of a Python/NumPy sparsity in [0, 1); traced values are not checked."""
  if isinstance(value, jax.core.Tracer):
    return
  v = np.asarray(value)
  if v.ndim != 0 or not np.issubdtype(v.dtype, np.number) or not (0.0 <= float(v) < 1.0):
    raise ValueError(f"sparsity for {where} must be a number in [0, 1), got {value!r}")


def _check_finite(chosen, where: str) -> None:
  """NaN ranks above every magnitude (it would be kept): concrete leaves must be finite."""
  for path, x, c in chosen:
    if c and not isinstance(x, jax.core.Tracer):
      bad = ~np.isfinite(np.asarray(x, np.float32))
      if bad.any():
        raise ValueError(f"{where}: leaf {path!r} has {int(bad.sum())} NaN/inf entries (first at "
                         f"{tuple(int(i) for i in np.argwhere(bad)[0])}); magnitudes cannot "
                         "rank them")


def _chosen(params: PyTree, rules: Rules, argname: str = "rules") -> list[tuple[str, Any, bool]]:
  """``[(path, leaf, chosen)]``; integer/bool leaves chosen by a rule are a TypeError."""
  out = []
  for path, x, val in _tree.select(params, rules, argname=argname):
    chosen = val is not None
    if chosen and not _tree.is_float_array(x):
      raise TypeError(
          f"leaf {path!r} (dtype {getattr(x, 'dtype', type(x).__name__)}) was chosen for "
          "pruning, but only floating-point leaves can be pruned; narrow `rules`")
    out.append((path, x, chosen))
  if not any(c for _, _, c in out):
    raise ValueError("no leaf was chosen for pruning. Candidate paths: "
                     + ", ".join(p for p, _, _ in out))
  return out


def _unflatten_like(params: PyTree, masks: list[Any]) -> PyTree:
  return jax.tree.unflatten(jax.tree.structure(params), masks)


def align_masks(params: PyTree, masks: PyTree) -> PyTree:
  """``masks`` in exactly the structure of ``params``.

  Trees that differ only in their wrappers (an NNX ``nnx.State`` of ``Param`` variables
  vs masks taken from an ``nnx.Optimizer`` state, i.e. ``OptVariable``-wrapped, or plain
  arrays) are matched leaf by leaf by path; anything else is the error of
  :func:`check_mask_tree`.
  """
  check_mask_tree(params, masks)
  if jax.tree.structure(params) == jax.tree.structure(masks):
    return masks
  return jax.tree.unflatten(jax.tree.structure(params), jax.tree.leaves(masks))


def check_mask_tree(params: PyTree, masks: PyTree) -> None:
  """Raises ValueError naming the first leaf where ``masks`` does not fit ``params``.

  The trees must have the same leaf paths (NNX variable wrappers are transparent: a
  ``Param``'s ``/value`` is not part of its path) and each mask must be a dense marker
  or have its leaf's shape.
  """
  ps, ms = jax.tree.structure(params), jax.tree.structure(masks)
  same_paths = ([p for p, _ in _tree.leaves_with_paths(params)]
                == [p for p, _ in _tree.leaves_with_paths(masks)])
  if ps != ms and not same_paths:
    pp = {p for p, _ in _tree.leaves_with_paths(params)}
    mp = {p for p, _ in _tree.leaves_with_paths(masks)}
    raise ValueError(
        "mask tree does not match the params tree: only in params "
        f"{sorted(pp - mp)[:5]}, only in masks {sorted(mp - pp)[:5]} "
        f"(params structure {ps}, masks structure {ms})")
  for (path, p), (_, m) in zip(_tree.leaves_with_paths(params), _tree.leaves_with_paths(masks)):
    if not is_dense(m) and tuple(np.shape(m)) != tuple(np.shape(p)):
      raise ValueError(f"mask for {path!r} has shape {np.shape(m)}, param has {np.shape(p)}")
    if hasattr(m, "dtype") and m.dtype not in (jnp.bool_, jnp.uint8):
      raise TypeError(f"mask for {path!r} has dtype {m.dtype}; masks are bool or uint8")


# ------------------------------------------------------------- per-leaf sparsities


def erk_sparsities(shapes: Mapping[str, tuple[int, ...]], sparsity: float) -> dict[str, float]:
  """Erdős–Rényi-Kernel layer sparsities (Evci et al. 2020, RigL).

  The density of layer ``l`` is ``eps * sum(shape_l) / prod(shape_l)``, with ``eps``
  chosen so that the total number of kept weights is ``(1 - sparsity) * sum(n_l)``.
  Layers whose density would exceed 1 are kept dense and ``eps`` is solved again.
  """
  _check_sparsity(sparsity, "distribution='erk'")
  sizes = {p: math.prod(s) for p, s in shapes.items()}
  raw = {p: sum(s) / sizes[p] for p, s in shapes.items()}
  budget = (1.0 - sparsity) * sum(sizes.values())
  dense: set[str] = set()
  while True:
    rest = [p for p in shapes if p not in dense]
    eps = (budget - sum(sizes[p] for p in dense)) / sum(raw[p] * sizes[p] for p in rest)
    over = [p for p in rest if eps * raw[p] > 1.0]
    if not over:
      break
    dense.add(max(over, key=lambda p: raw[p]))
  return {p: (0.0 if p in dense else 1.0 - eps * raw[p]) for p in shapes}


def leaf_sparsities(chosen: list[tuple[str, Any, bool]], sparsity: SparsityArg,
                    distribution: str) -> list[Any]:
  """Sparsity per chosen leaf (``None`` for leaves that are not pruned)."""
  if isinstance(sparsity, Mapping):
    paths = [p for p, _, c in chosen if c]
    for rx, v in sparsity.items():
      _check_sparsity(v, f"pattern {rx!r}")
    idx = iter(_tree.first_match(list(sparsity), paths, argname="sparsity"))
    values = list(sparsity.values())
    out = []
    for _, _, c in chosen:
      i = next(idx) if c else -1
      out.append(values[i] if i >= 0 else None)
    return out
  _check_sparsity(sparsity, "the model")
  if distribution == "uniform":
    return [sparsity if c else None for _, _, c in chosen]
  if distribution == "erk":
    if isinstance(sparsity, jax.core.Tracer):
      raise TypeError("distribution='erk' needs a concrete (non-traced) sparsity")
    erk = erk_sparsities({p: np.shape(x) for p, x, c in chosen if c}, float(sparsity))
    return [erk[p] if c else None for p, _, c in chosen]
  raise ValueError(f"distribution must be 'uniform', 'erk' or a {{regex: sparsity}} dict, "
                   f"got {distribution!r}")


# ---------------------------------------------------------- exact k-smallest masks


def _keys(score: jax.Array) -> jax.Array:
  """Order-preserving int32 keys of non-negative scores (NaN sorts as +inf: kept)."""
  score = jnp.asarray(score, jnp.float32)
  score = jnp.where(jnp.isnan(score), jnp.inf, jnp.abs(score))
  return jax.lax.bitcast_convert_type(score, jnp.int32)


def _bisect(count_le: Callable[[jax.Array], jax.Array], k: jax.Array, lo: int, hi: int,
            iters: int) -> jax.Array:
  """Smallest ``t`` in ``(lo, hi]`` with ``count_le(t) >= k`` (``count_le`` monotone)."""

  def body(_, lohi):
    lo, hi = lohi
    mid = lo + (hi - lo) // 2
    ok = count_le(mid) >= k
    return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

  _, hi = jax.lax.fori_loop(0, iters, body, (jnp.int32(lo), jnp.int32(hi)))
  return hi


def smallest_k_masks(scores: Sequence[jax.Array], k: Any) -> list[jax.Array]:
  """Keep-masks removing exactly the ``k`` smallest entries over all ``scores`` together.

  Ties are broken by position: score list order, then row-major index. Only scalar
  counts are reduced across the arrays, so sharded inputs stay sharded.

  Args:
    scores: arrays of non-negative scores (any shapes).
    k: number of entries to remove, ``0 <= k <= total size`` (may be traced).

  Returns:
    bool arrays shaped like ``scores``; ``False`` marks a removed entry.
  """
  total = sum(int(np.prod(np.shape(s))) for s in scores)
  if total >= 2**31 - 1:
    raise ValueError(f"too many entries to rank together ({total}); use scope='layer'")
  return list(_smallest_k(tuple(scores), jnp.asarray(k, jnp.int32)))


@jax.jit
def _smallest_k(scores: tuple[jax.Array, ...], k: jax.Array) -> tuple[jax.Array, ...]:
  """Jitted body of :func:`smallest_k_masks` (cached by shapes, so eager calls are cheap)."""
  keys = [_keys(s) for s in scores]
  sizes = [int(np.prod(key.shape)) for key in keys]
  total = sum(sizes)

  def count(pred):
    return sum(jnp.sum(pred(key, i), dtype=jnp.int32) for i, key in enumerate(keys))

  # 1) threshold key t: smallest key with #(key <= t) >= k.
  t = _bisect(lambda mid: count(lambda key, _: key <= mid), k, -1, _INF_BITS, 32)
  # 2) among entries equal to t, remove the first r by global position.
  r = k - count(lambda key, _: key < t)
  offsets = np.cumsum([0] + sizes)
  pos = [int(offsets[i]) + _flat_iota(key.shape) for i, key in enumerate(keys)]
  j = _bisect(lambda mid: count(lambda key, i: (key == t) & (pos[i] <= mid)), r, -1,
              max(total - 1, 0), max(total.bit_length(), 1) + 1)
  return tuple(~(((key < t) | ((key == t) & (p <= j))) & (k > 0)) for key, p in zip(keys, pos))


def _flat_iota(shape: tuple[int, ...]) -> jax.Array:
  """Row-major linear index of every entry, built from per-axis iotas (shard-friendly)."""
  if not shape:
    return jnp.zeros((), jnp.int32)
  idx = jnp.zeros(shape, jnp.int32)
  stride = 1
  for ax in reversed(range(len(shape))):
    idx = idx + jax.lax.broadcasted_iota(jnp.int32, shape, ax) * stride
    stride *= shape[ax]
  return idx


def _num_to_remove(sparsity: Any, size: int) -> jax.Array:
  """``k = round(sparsity * size)`` (round half to even), computed in float32."""
  return jnp.round(jnp.asarray(sparsity, jnp.float32) * size).astype(jnp.int32)


def _masks_from_scores(params: PyTree, chosen, sparsity: SparsityArg, scope: str,
                       distribution: str, score_fn: Callable[[int, str, Any], jax.Array],
                       roles: Mapping[str, Any] | None = None):
  """Shared driver of magnitude and random masks."""
  if scope not in ("layer", "global"):
    raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
  out: list[Any] = [dense_marker() for _ in chosen]
  picked = [i for i, (_, _, c) in enumerate(chosen) if c]
  if scope == "global":
    if isinstance(sparsity, Mapping) or distribution != "uniform":
      raise ValueError("scope='global' ranks all chosen leaves together: pass one float "
                       "sparsity and distribution='uniform'")
    _check_sparsity(sparsity, "the model")
    scores = [score_fn(i, chosen[i][0], chosen[i][1]) for i in picked]
    total = sum(int(np.size(chosen[i][1])) for i in picked)
    for i, m in zip(picked, smallest_k_masks(scores, _num_to_remove(sparsity, total))):
      out[i] = m
  else:
    per_leaf = leaf_sparsities(chosen, sparsity, distribution)
    for i in picked:
      if per_leaf[i] is None:
        continue
      path, x, _ = chosen[i]
      stacked = _stacked_axes(roles, path, np.ndim(x))
      if stacked:
        out[i] = _per_slice(score_fn(i, path, x), stacked, per_leaf[i])
      else:
        (out[i],) = smallest_k_masks([score_fn(i, path, x)],
                                     _num_to_remove(per_leaf[i], np.size(x)))
  return _unflatten_like(params, out)


def _stacked_axes(roles: Mapping[str, Any] | None, path: str, ndim: int) -> tuple[int, ...]:
  """Leaf axes that a traced ``scan`` slices per layer (``LeafRole.stacked``), or ``()``."""
  if roles is None:
    return ()
  from jaxopt_dnn import roles as _roles  # noqa: PLC0415
  r = _roles.lookup(roles, path)
  stacked = () if r is None else tuple(a for a in r.stacked if a < ndim)
  return stacked if len(stacked) < ndim else ()


def _per_slice(score: jax.Array, stacked: tuple[int, ...], sparsity: Any) -> jax.Array:
  """Keep-mask removing exactly ``round(s * slice_size)`` entries of every slice over the
  ``stacked`` axes (each layer of an ``nn.scan`` stack is ranked on its own)."""
  lead = tuple(range(len(stacked)))
  moved = jnp.moveaxis(score, stacked, lead)
  rest = moved.shape[len(stacked):]
  k = _num_to_remove(sparsity, math.prod(rest))
  flat = moved.reshape((-1,) + rest)
  keep = jax.vmap(lambda sl: _smallest_k((sl,), k)[0])(flat)
  return jnp.moveaxis(keep.reshape(moved.shape), lead, stacked)


# ------------------------------------------------------------------ public masks


def magnitude_masks(params: PyTree, sparsity: SparsityArg, *, scope: str = "layer",
                    rules: Rules = None, distribution: str = "uniform",
                    roles: Mapping[str, Any] | None = None) -> PyTree:
  """Masks removing the smallest-``|w|`` weights.

  ``scope="layer"``: each chosen leaf loses exactly ``round(s_l * size_l)`` entries,
  where ``s_l`` is ``sparsity`` (uniform), the ERK share of it (``distribution="erk"``)
  or the value of the first matching regex of a ``{regex: sparsity}`` dict.
  ``scope="global"``: all chosen entries are ranked together and exactly
  ``round(sparsity * sum_l size_l)`` are removed (one threshold for the model).

  Args:
    params: any pytree of arrays.
    sparsity: fraction in [0, 1) to remove (may be traced), or ``{regex: fraction}``.
    scope: ``"layer"`` or ``"global"``.
    rules: which leaves to prune: regex(es) over key paths, a predicate ``(path, leaf)``,
      or None for floating leaves with ``ndim >= 2``.
    distribution: ``"uniform"`` or ``"erk"`` (layer scope only).
    roles: optional ``{path: LeafRole}`` from :func:`jaxopt_dnn.roles.trace`. With it,
      ``scope="layer"`` ranks a kernel that an ``nn.scan`` stacks (``LeafRole.stacked``,
      e.g. ``(depth, in, out)``) per layer slice: every slice loses exactly
      ``round(s_l * slice_size)`` entries. Without it the whole leaf is ranked at once
      (the stacked layers then share one threshold).

  Returns:
    A mask tree (see module docstring).
  """
  chosen = _chosen(params, rules)
  _check_finite(chosen, "magnitude_masks")
  return _masks_from_scores(params, chosen, sparsity, scope, distribution,
                            lambda i, p, x: jnp.abs(x), roles)


def random_masks(key: jax.Array, params: PyTree, sparsity: SparsityArg, *, scope: str = "layer",
                 rules: Rules = None, distribution: str = "uniform",
                 roles: Mapping[str, Any] | None = None) -> PyTree:
  """Masks removing exactly ``round(s * size)`` uniformly random entries per leaf (or
  over all chosen leaves with ``scope="global"``; per ``nn.scan`` layer slice with
  ``roles``, as in :func:`magnitude_masks`); the same key gives the same masks."""
  chosen = _chosen(params, rules)
  return _masks_from_scores(
      params, chosen, sparsity, scope, distribution,
      lambda i, p, x: jax.random.uniform(jax.random.fold_in(key, i), np.shape(x)), roles)


def nm_group_axes(path: str, shape: Sequence[int], m: int, *,
                  axis: int | Sequence[int] | None = None,
                  roles: Mapping[str, Any] | None = None) -> tuple[int, ...]:
  """The leaf axes along which the N:M groups of leaf ``path`` run (non-negative, sorted).

  The kernel of a contraction, reshaped to the 2-D ``(K, N)`` matrix that a sparse
  matmul multiplies (``K`` = the contracted axes flattened row-major in the leaf's own
  axis order, ``N`` = the rest), needs its groups of ``m`` consecutive entries along
  ``K``. So the axes come from the traced program (``roles``, from
  :func:`jaxopt_dnn.roles.trace`), never from positions:

  * ``dot_general`` weight: its contracted axes, flattened (``DenseGeneral`` q/k/v
    ``(embed, heads, head_dim)`` -> ``(0,)``; output ``(heads, head_dim, embed)`` ->
    ``(0, 1)``: a group may span two heads when ``head_dim % m != 0``, as the ``K`` of
    the 2-D kernel does; ``nn.scan``-stacked ``(depth, in, out)`` -> ``(1,)``, so groups
    never cross the layer axis);
  * ``conv_general_dilated`` kernel: its input-feature axis (the ``C_in`` groups of
    2:4 sparse convolutions, for every spatial tap and output channel).

  ``axis`` (an int or a tuple of axes flattened row-major) is an explicit override.

  Raises:
    ValueError: neither ``axis`` nor ``roles``; the leaf is not a traced dot/conv
      weight; its uses disagree on the contraction; or the group axis length is not a
      multiple of ``m`` (the message names the leaf).
  """
  shape = tuple(int(d) for d in shape)
  ndim = len(shape)
  if axis is not None:
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    if not axes or any(not -ndim <= a < ndim for a in axes):
      raise ValueError(f"axis={axis} is out of range for {path!r} with shape {shape}")
    axes = tuple(int(a) % ndim for a in axes)
    what = f"axis {axis}"
  elif roles is None:
    raise ValueError(
        f"N:M masks for leaf {path!r}: the groups run along the contraction of the op "
        "that consumes the kernel, which only the traced program knows: pass "
        "roles=jaxopt_dnn.roles.trace(apply_fn, variables, *sample_inputs) (or an "
        "explicit axis=)")
  else:
    from jaxopt_dnn import roles as _roles  # noqa: PLC0415
    r = _roles.lookup(roles, path)
    uses = [] if r is None else [
        (c.in_features if c.primitive == "conv_general_dilated" else c.contracting)
        for c in r.consumers if c.primitive in _roles.CONTRACTIONS and not c.other_is_param]
    if not uses or any(u is None for u in uses):
      role = "not in the traced program" if r is None else f"role {r.role!r}"
      raise ValueError(
          f"N:M masks for leaf {path!r} ({role}): it is not the weight of a traced "
          "dot_general/conv with known axes, so it has no contraction to group along; "
          "narrow `rules` (e.g. rules=roles.kernels(r)) or pass axis=")
    if any(u != uses[0] for u in uses):
      raise ValueError(f"N:M masks for leaf {path!r}: its uses contract different axes "
                       f"{sorted(set(uses))}; pass axis=")
    axes = tuple(uses[0])
    what = f"contraction axes {axes}"
  length = math.prod(shape[a] for a in axes)
  if length % m:
    raise ValueError(
        f"leaf {path!r} (shape {shape}): {what} has length {length}, which is not a "
        f"multiple of m={m}, so there are no {m}-groups along the contraction; exclude "
        "the leaf with `rules`")
  return tuple(sorted(axes)) if axis is None else axes


def nm_masks(params: PyTree, n: int, m: int, *, axis: int | Sequence[int] | None = None,
             rules: Rules = None, roles: Mapping[str, Any] | None = None) -> PyTree:
  """N:M masks: in every group of ``m`` consecutive weights along the contraction keep the
  ``n`` largest ``|w|`` (ties: the earlier index is kept).

  For a kernel reshaped to the ``(K, N)`` matrix of its matmul, every column has, in
  every run of ``m`` consecutive rows, exactly ``n`` kept entries: the pattern 2:4
  sparse tensor cores run. The group axes of each leaf are those of
  :func:`nm_group_axes`: read off the traced contraction with
  ``roles=jaxopt_dnn.roles.trace(apply_fn, variables, *x)`` (any rank: ``Dense``,
  ``DenseGeneral`` / ``MultiHeadDotProductAttention`` projections, ``Einsum``, convs,
  ``nn.scan``-stacked layers), or given explicitly by ``axis`` (an int, or a tuple of
  axes flattened row-major), which overrides the roles for every chosen leaf.

  Raises:
    ValueError: without ``roles`` and ``axis`` (no axis is guessed from positions), or
      for a chosen leaf without an ``m``-divisible contraction (named).
  """
  if not (isinstance(n, int) and isinstance(m, int)) or not 0 < n <= m:
    raise ValueError(f"N:M needs integers 0 < n <= m, got n={n!r}, m={m!r}")
  chosen = _chosen(params, rules)
  _check_finite(chosen, "nm_masks")
  out = []
  for path, x, c in chosen:
    if not c:
      out.append(dense_marker())
      continue
    out.append(_nm_leaf(x, n, m, nm_group_axes(path, np.shape(x), m, axis=axis, roles=roles)))
  return _unflatten_like(params, out)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _nm_leaf(x: jax.Array, n: int, m: int, axes: tuple[int, ...]) -> jax.Array:
  k = len(axes)
  dest = tuple(range(x.ndim - k, x.ndim))
  moved = jnp.moveaxis(jnp.abs(x), axes, dest)
  flat = moved.reshape(moved.shape[:-k] + (-1,))
  groups = flat.reshape(flat.shape[:-1] + (flat.shape[-1] // m, m))
  order = jnp.argsort(-groups, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1, stable=True)
  return jnp.moveaxis((rank < n).reshape(moved.shape), dest, axes)


def _bias_path(kernel_path: str) -> str | None:
  return kernel_path[: -len("kernel")] + "bias" if kernel_path.endswith("kernel") else None


def _along(keep: jax.Array, shape: tuple[int, ...], axis: int) -> jax.Array:
  """The per-channel ``keep`` (C,) broadcast to ``shape`` along ``axis``."""
  view = [1] * len(shape)
  view[axis] = shape[axis]
  return jnp.broadcast_to(keep.reshape(view), shape)


def removable_kernels(roles: Mapping[str, Any]) -> Callable[[str, Any], bool]:
  """Leaf predicate: the kernels whose output channels
  :func:`~jaxopt_dnn.sparsity.shrink_channels` can remove (``LeafRole.channels`` is
  removable: not added to a residual stream, not the model output, ...)."""
  from jaxopt_dnn import roles as _roles  # noqa: PLC0415

  def pred(path: str, leaf: Any) -> bool:
    del leaf
    r = _roles.lookup(roles, path)
    g = None if r is None else r.channels
    return bool(g is not None and g.removable)

  return pred


def channel_masks(params: PyTree, sparsity: SparsityArg, *, rules: Rules = None,
                  distribution: str = "uniform",
                  roles: Mapping[str, Any] | None = None) -> PyTree:
  """Structured masks removing whole output channels by L2 norm.

  For a kernel ``W`` with ``C_out`` output channels along axis ``a`` (the last axis;
  with ``roles``, the traced output-feature axis) the score of channel ``c`` is
  ``||W[..., c, ...]||_2``; exactly ``round(s * C_out)`` channels with the smallest
  norms are removed (ties: lower index first). A sibling ``bias`` leaf (same path with
  ``kernel`` replaced by ``bias``, shape ``(C_out,)``) gets the same channel mask, so a
  removed channel outputs exactly zero before the activation.

  With ``roles=jaxopt_dnn.roles.trace(apply_fn, variables, *x)`` (trace in inference
  mode, e.g. ``train=False``) the program decides (``LeafRole.channels``, a
  :class:`~jaxopt_dnn.roles.ChannelGroup`):

  * every params leaf applied per channel to the kernel's output on its way to the next
    contraction (a following BatchNorm's ``scale`` and ``bias``, a bias) gets the
    channel mask too. A ``Conv -> BatchNorm`` then outputs exactly
    ``(0 - mean) * rsqrt(var + eps) * 0 + 0 = 0`` for a removed channel in eval mode
    whatever the running statistics, and in train mode (batch mean and variance of a
    zero channel are 0, the output is the masked bias, 0);
  * ``rules=None`` chooses only the kernels whose channels can be removed
    (:func:`removable_kernels`): not a conv whose output is added to a residual
    stream (the skip connection would keep the channel, so neither masking it to
    shrink nor shrinking is possible), not the classifier head (its outputs are the
    model's), not a channel that is reshaped or normalised over. In a ResNet these
    are the inner convs of each block. Kernels chosen explicitly by ``rules`` are
    masked whatever their group (the masked model is well defined);
    :func:`~jaxopt_dnn.sparsity.shrink_channels` then keeps their zeroed channels.

  Without ``roles``, exclude the classifier head with ``rules``; a following BatchNorm
  is not masked (its output for a removed channel is ``beta - mean * gamma /
  sqrt(var + eps)``, not zero).
  """
  from jaxopt_dnn import roles as _roles  # noqa: PLC0415
  if roles is not None and rules is None:
    rules = removable_kernels(roles)
  chosen = _chosen(params, rules)
  _check_finite(chosen, "channel_masks")
  per_leaf = leaf_sparsities(chosen, sparsity, distribution)
  out: list[Any] = [dense_marker() for _ in chosen]
  index = {p: i for i, (p, _, _) in enumerate(chosen)}

  def find(path):
    return index.get(path, index.get(path.split("/", 1)[-1]))

  for i, (path, x, c) in enumerate(chosen):
    if not c or per_leaf[i] is None:
      continue
    r = None if roles is None else _roles.lookup(roles, path)
    group = None if r is None else r.channels
    ax = group.axis if group is not None and group.axis >= 0 else x.ndim - 1
    size = x.shape[ax]
    norms = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)),
                             axis=tuple(d for d in range(x.ndim) if d != ax)))
    (keep,) = smallest_k_masks([norms], _num_to_remove(per_leaf[i], size))
    out[i] = _along(keep, x.shape, ax)
    b = index.get(_bias_path(path) or "")
    if b is not None and np.shape(chosen[b][1]) == (size,):
      out[b] = keep
    if group is not None:
      for f, fax in group.per_channel:
        j = find(f)
        if j is not None and np.shape(chosen[j][1])[fax] == size:
          out[j] = _along(keep, np.shape(chosen[j][1]), fax)
    elif r is not None:
      for f in r.followers:
        j = find(f)
        if j is not None and np.shape(chosen[j][1]) == (size,):
          out[j] = keep
  return _unflatten_like(params, out)


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
  """``where(mask, p, 0)`` leaf by leaf (dense markers leave the leaf as it is)."""
  masks = align_masks(params, masks)
  return jax.tree.map(lambda p, m: p if is_dense(m) else jnp.where(m, p, jnp.zeros((), p.dtype)),
                      params, masks)
