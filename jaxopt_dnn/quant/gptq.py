"""GPTQ: post-training weight quantization with second-order error compensation.

For a kernel ``W`` (``(K, N)``: ``K`` inputs, ``N`` outputs) and calibration inputs
``X`` (``(T, K)``), GPTQ (Frantar et al. 2022) minimizes ``||X W - X Q||_F^2`` over
quantized ``Q`` one input row of ``W`` at a time, with the Hessian
``H = 2 X^T X + lambda I`` (``lambda = damp * mean(diag(2 X^T X))``):

    U = chol(H^-1)^T                    (upper triangular, H^-1 = U^T U)
    for each input index i (in order, or by decreasing diag(H) with act_order):
      q_i  = Q(w_i)                     (w_i: row i of W, all N outputs; RTN on the grid)
      e_i  = (w_i - q_i) / U[i, i]
      w_j -= U[i, j] e_i   for j > i    (compensate the not yet quantized rows)

with lazy batch updates: inside a block of ``B = 128`` rows the update touches only the
block; the rest of ``W`` gets ``E_block @ U[block, rest]`` once per block.

Scales: per output channel (``group_size=None``) from the whole original row range, or
one scale per ``group_size`` consecutive inputs. Without ``act_order`` a group's scale is
taken when the sweep reaches the group (from the already-updated weights, as in the
reference implementation); with ``act_order`` the groups stay contiguous in the
original input order (so the stored ``QArray`` is ordinary) and their scales are taken
from the original weights before the sweep ("static groups").

The per-layer solve is one jitted function (compiled once per kernel shape).
:func:`gptq` drives it over a model: sequentially by default, i.e. the inputs of each
round of layers are captured with every earlier layer already quantized.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_dnn import _tree
from jaxopt_dnn.quant import fake
from jaxopt_dnn.quant import hessian as _hessian
from jaxopt_dnn.quant import rules as _rules
from jaxopt_dnn.quant.layout import OpInfo, kernel_matrix, set_leaves
from jaxopt_dnn.quant.ops import qrange
from jaxopt_dnn.quant.qarray import QArray, is_qarray, pack_int4, round_scale, scale_value


def _scale(amax, qmax, sdt, sup=None):
  """``absmax / qmax`` (1 where the range is 0), rounded to ``sdt`` (8-bit floats:
  relative to the tensor's ``sup``), as float32."""
  s = jnp.where(amax > 0, jnp.maximum(amax / qmax, 1e-30), 1.0)
  return scale_value(*round_scale(s, sdt, qmax=qmax, super_scale=sup))


_CLIP_GRID = 16


def _search_scale(wg, hd, qmax, sdt, clip, sup=None):
  """Scale of each row of ``wg`` (N, g): absmax / qmax, or with ``clip`` the clipping
  ratio ``r in [clip, 1]`` minimizing ``sum_j hd_j (w_j - q_r(w_j))^2`` (``hd``: the
  Hessian diagonal, i.e. the input's energy per column)."""
  amax = jnp.max(jnp.abs(wg), axis=1)
  if clip is None:
    return _scale(amax, qmax, sdt, sup)
  best_s = _scale(amax, qmax, sdt, sup)
  best_e = jnp.full(amax.shape, jnp.inf)
  for t in range(_CLIP_GRID):
    r = 1.0 - (1.0 - clip) * t / (_CLIP_GRID - 1)
    s = _scale(amax * r, qmax, sdt, sup)
    q = jnp.clip(jnp.round(wg / s[:, None]), -qmax, qmax) * s[:, None]
    e = jnp.sum(hd[None, :] * (wg - q) ** 2, axis=1)
    better = e < best_e
    best_e, best_s = jnp.where(better, e, best_e), jnp.where(better, s, best_s)
  return best_s


def prepare_hessian(h: jax.Array, w: jax.Array, damp: float):
  """Dead inputs (``H_ii = 0``) get ``H_ii = 1`` and zero weights; adds the damping."""
  d = jnp.diag(h)
  dead = d <= 0
  h = h + jnp.diag(dead.astype(h.dtype))
  w = jnp.where(dead[:, None], 0.0, w)
  lam = damp * jnp.mean(jnp.diag(h))
  return h + lam * jnp.eye(h.shape[0], dtype=h.dtype), w


def inverse_cholesky_upper(h: jax.Array) -> jax.Array:
  """Upper ``U`` with ``H^-1 = U^T U``."""
  eye = jnp.eye(h.shape[0], dtype=h.dtype)
  lo = jnp.linalg.cholesky(h)
  hinv = jax.scipy.linalg.cho_solve((lo, True), eye)
  hinv = 0.5 * (hinv + hinv.T)
  return jnp.linalg.cholesky(hinv).T


def block_for(group_size: int | None, block_size: int) -> int:
  """Block size aligned with the groups (one divides the other)."""
  if group_size is None or group_size % block_size == 0 or block_size % group_size == 0:
    return block_size
  return group_size


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "act_order", "block_size",
                                             "scale_dtype", "clip"))
def gptq_solve(w: jax.Array, h: jax.Array, *, bits: int = 4, group_size: int | None = 128,
               act_order: bool = True, damp: float = 0.01, block_size: int = 128,
               scale_dtype: Any = None, clip: float | None = None,
               keep: jax.Array | None = None):
  """Quantizes one ``(K, N)`` kernel with its ``(K, K)`` Hessian.

  Args:
    w: float kernel ``(K, N)`` (inputs first, Flax layout).
    h: ``2 X^T X`` (any positive multiple works; damping is relative).
    bits: 4 or 8 (symmetric, ``[-(2^(b-1)-1), 2^(b-1)-1]``).
    group_size: inputs per scale group, or ``None`` for one scale per output channel.
    act_order: visit inputs by decreasing ``diag(H)``.
    damp: relative damping ``lambda = damp * mean(diag H)``.
    block_size: lazy-update block ``B``.
    scale_dtype: round scales to this dtype (e.g. ``jnp.bfloat16``) before use.
    clip: if set (e.g. ``0.75``), each scale is ``r * absmax / qmax`` with the ratio
      ``r in [clip, 1]`` (16-point grid) minimizing the ``diag(H)``-weighted rounding
      error of its group; ``None``: ``r = 1``.
    keep: optional bool ``(K, N)`` mask: where ``False`` the code is 0 (a pruned weight
      stays pruned) and its whole value is error pushed onto the later rows, as
      SparseGPT does with a fixed mask.

  Returns:
    ``(codes int8 (K, N), scales float32 (G, N))`` with ``G = ceil(K / group_size)``
    (``G = 1`` per channel); ``dequantized = codes * scales[i // group_size]``.
  """
  qmax = float(qrange(bits)[1])
  sdt = None if scale_dtype is None else jnp.dtype(scale_dtype)
  k, n = w.shape
  w = w.astype(jnp.float32)
  h = h.astype(jnp.float32)
  h, w = prepare_hessian(h, w, damp)
  g = group_size
  B = block_for(g, min(block_size, k) if g is None else block_size)
  unit = B if g is None else max(B, g)
  kp = -(-k // unit) * unit
  # scales from the original weights (per channel, or static groups for act_order)
  hd = jnp.diag(h)
  # 8-bit scales: one power-of-two super scale for the kernel, 2x headroom for the
  # scales taken from updated weights during the sweep
  sup = None if sdt is None or sdt.itemsize > 1 else \
      round_scale(jnp.max(jnp.abs(w)) / qmax, sdt, headroom=2.0)[1]
  search = functools.partial(_search_scale, qmax=qmax, sdt=sdt, clip=clip, sup=sup)
  if g is None:
    static = search(w.T, hd)[None]                                            # (1, N)
  else:
    wpad = jnp.pad(w, ((0, kp - k), (0, 0))).reshape(kp // g, g, n)
    hdp = jnp.pad(hd, (0, kp - k)).reshape(kp // g, g)
    static = jax.vmap(lambda a, b: search(a.T, b))(wpad, hdp)
  if act_order:
    perm = jnp.argsort(-jnp.diag(h), stable=True)
  else:
    perm = jnp.arange(k)
  wt = w[perm].T                                      # (N, K): row i of W is column i
  hp = h[perm][:, perm]
  u = inverse_cholesky_upper(hp)
  wt = jnp.pad(wt, ((0, 0), (0, kp - k)))
  kt = None if keep is None else jnp.pad(keep[perm].T, ((0, 0), (0, kp - k)))
  u = jnp.pad(u, ((0, kp - k), (0, kp - k))) + jnp.diag(
      jnp.concatenate([jnp.zeros(k), jnp.ones(kp - k)]))
  orig_idx = jnp.concatenate([perm, jnp.arange(k, kp)])   # permuted position -> input index
  dynamic = g is not None and not act_order
  hdiag = jnp.pad(jnp.diag(hp), (0, kp - k))

  def block(bi, carry):
    wt, codes, sc = carry
    i1 = bi * B
    w1 = jax.lax.dynamic_slice_in_dim(wt, i1, B, axis=1)           # (N, B)
    k1 = None if kt is None else jax.lax.dynamic_slice_in_dim(kt, i1, B, axis=1)
    u1 = jax.lax.dynamic_slice(u, (i1, i1), (B, B))
    if dynamic and g > B:   # a group may start at this block: scale from updated weights
      grp = jax.lax.dynamic_slice_in_dim(wt, i1, g, axis=1)
      new = search(grp, jax.lax.dynamic_slice_in_dim(hdiag, i1, g))
      sc = jnp.where(i1 % g == 0, sc.at[i1 // g].set(new), sc)

    def col(i, c):
      w1, e1, q1, sc = c
      j = i1 + i
      if dynamic and g <= B:   # the sweep reaches a group: scale from the current block
        def start(sc):
          grp = jax.lax.dynamic_slice_in_dim(w1, (i // g) * g, g, axis=1)
          new = search(grp, jax.lax.dynamic_slice_in_dim(hdiag, i1 + (i // g) * g, g))
          return sc.at[j // g].set(new)
        sc = jax.lax.cond(j % g == 0, start, lambda sc: sc, sc)
      if g is None:
        s = sc[0]
      elif dynamic:
        s = sc[j // g]
      else:
        s = sc[jnp.minimum(orig_idx[j] // g, sc.shape[0] - 1)]
      wc = w1[:, i]
      q = jnp.clip(jnp.round(wc / s), -qmax, qmax)
      if k1 is not None:
        q = jnp.where(k1[:, i], q, 0.0)
      err = (wc - q * s) / u1[i, i]
      w1 = w1 - err[:, None] * u1[i][None, :]
      return w1, e1.at[:, i].set(err), q1.at[:, i].set(q), sc

    z = jnp.zeros((n, B), jnp.float32)
    w1, e1, q1, sc = jax.lax.fori_loop(0, B, col, (w1, z, z, sc))
    wt = wt - e1 @ jax.lax.dynamic_slice_in_dim(u, i1, B, axis=0)   # lazy update of the rest
    codes = jax.lax.dynamic_update_slice_in_dim(codes, q1, i1, axis=1)
    return wt, codes, sc

  codes0 = jnp.zeros((n, kp), jnp.float32)
  _, codes, scales = jax.lax.fori_loop(0, kp // B, block, (wt, codes0, static))
  inv = jnp.argsort(perm)
  codes = codes[:, :k][:, inv].T.astype(jnp.int8)
  return codes, scales


def layer_groups(shape: tuple[int, ...], n_in: int, group_size: int | None,
                 name: str = "kernel") -> int | None:
  """The group size along the last contracted axis that a flattened ``(K, N)`` sweep can
  use for ``shape`` (groups never straddle two indices of an earlier contracted axis)."""
  if group_size is None:
    return None
  last = shape[n_in - 1]
  if n_in > 1 and group_size < last and last % group_size:
    raise ValueError(f"{name}: group_size {group_size} must divide the last contracted "
                     f"axis ({last}) of a kernel with {n_in} contracted axes {shape}")
  return min(group_size, last) if n_in > 1 else group_size


def to_qarray(codes: jax.Array, scales: jax.Array, shape: tuple[int, ...], n_in: int, *,
              bits: int, group_size: int | None, dtype: Any = jnp.float32, name: str = "",
              scale_dtype: Any = None, perm: tuple[int, ...] | None = None) -> QArray:
  """Wraps a ``(K, N)`` solve result as a :class:`QArray` of the kernel's ``shape``.

  The group axis is the last contracted axis (``n_in - 1``); channel axes are the output
  axes; int4 codes are packed two per byte; scales are stored as ``scale_dtype``.
  With ``perm`` (:attr:`~jaxopt_dnn.quant.layout.OpInfo.perm`), ``shape`` is the
  kernel's shape with its contracted axes first and the QArray is laid out in the
  kernel's own axis order (codes and scales transposed by ``argsort(perm)``; the group
  axis is then ``perm[n_in - 1]``).
  """
  inv = None if perm is None else tuple(int(a) for a in np.argsort(perm))
  put = (lambda a: a) if inv is None else (lambda a: jnp.transpose(a, inv))  # noqa: E731
  own = tuple(shape) if perm is None else tuple(shape[i] for i in inv)
  axis = (lambda a: a) if perm is None else (lambda a: int(perm[a]))  # noqa: E731
  q = put(codes.reshape(shape))
  value = pack_int4(q) if bits == 4 else q.astype(jnp.int8)
  out_axes = tuple(sorted(axis(a) for a in range(n_in, len(shape))))
  if group_size is None:
    sc = put(scales.reshape((1,) * n_in + tuple(shape[n_in:])))
    stored, sup = round_scale(sc, scale_dtype)
    return QArray(value, stored, None, bits=bits, channel_axes=out_axes, shape=own,
                  dtype=dtype, name=name, super_scale=sup)
  ga = n_in - 1
  g_last = -(-shape[ga] // group_size)
  total = math.prod(shape[:ga]) * g_last
  sc = put(scales[:total].reshape(tuple(shape[:ga]) + (g_last,) + tuple(shape[n_in:])))
  # exact: the solve's scales are on this grid (8-bit: its super scale >= this one, both
  # powers of two)
  stored, sup = round_scale(sc, scale_dtype)
  return QArray(value, stored, None, bits=bits, channel_axes=out_axes, shape=own,
                dtype=dtype, name=name, group_size=group_size, group_axis=axis(ga),
                super_scale=sup)


def op_rules(params: Any, rules: Any, *, bits: int, group_size: int | None,
             scale_dtype: str | None = None, where: str = "gptq"):
  """``(rule for each chosen leaf path, select(path, leaf))``.

  ``rules=None`` chooses every kernel of a captured contraction (never biases, norm
  scales or embeddings); with rules, the winning non-``skip`` rule decides (and its
  ``bits`` / ``group_size``), and chosen leaves that are not captured kernels are
  quantized round-to-nearest.
  """
  fake.check_bits(bits, where)
  if rules is None:
    default = _rules.QuantRule(".*", bits=bits, group_size=group_size,
                               scale_dtype=scale_dtype or "auto")
    return None, default
  chosen = {p: r for p, _, r in _rules.resolve(params, rules, bits=bits, group_size=group_size,
                                               scale_dtype=scale_dtype)
            if r is not None and not r.skip}
  return chosen, None


def _sdt(rule):
  d = rule.stored_scale_dtype
  return None if d is None else jnp.dtype(d)


def gptq(apply_fn: Callable[..., Any], variables: Any, batches: Iterable[Any], *,
         bits: int = 4, group_size: int | None = 128, rules: Any = None,
         act_order: bool = True, damp: float = 0.1, sequential: bool = True,
         block_size: int = 128, scale_dtype: str | None = None, clip: float | None = None,
         max_batches: int | None = None, log: Callable[[str], Any] | None = None,
         keep_zeros: bool = False) -> Any:
  """GPTQ post-training quantization of a linen or NNX model's kernels.

  Args:
    apply_fn: ``apply_fn(variables, *inputs)`` (e.g. ``model.apply``), or for NNX
      ``apply_fn(module, *inputs)`` with ``variables`` the ``nnx.Module``.
    variables: ``{"params": ..., ...}`` (linen) or an ``nnx.Module``.
    batches: calibration inputs (an iterable of tuples of model inputs), read once.
    bits: 4 or 8.
    group_size: inputs per scale along the contraction axis (``None``: per channel).
    rules: quantization rules (see :mod:`jaxopt_dnn.quant.rules`); default: every
      leaf named like a contraction weight (:func:`jaxopt_dnn._tree.default_prunable`)
      that a ``dot_general`` / ``conv_general_dilated`` consumes: ``Dense``,
      ``DenseGeneral``, ``Conv``, ``Einsum``, a raw ``x @ w`` param, linen or NNX
      (Hessians from :mod:`jaxopt_dnn.quant.hessian`).
    act_order: visit inputs by decreasing Hessian diagonal (static groups).
    damp: relative Hessian damping ``lambda = damp * mean(diag H)``. The default 0.1
      (the GPTQ paper uses 0.01) suits the small calibration sets of post-training
      use (a few hundred tokens, fewer than a 1536-wide MLP's inputs): measured on
      all-MiniLM-L6-v2 with 32 calibration sentences, int4 g64 min-cosine 0.960 at
      0.01 vs 0.974 at 0.1 (``bench/ptq_bench.py``).
    sequential: capture each round of layers with the earlier layers already
      quantized (default); ``False`` uses the float model's inputs for every layer.
    block_size: lazy-update block.
    clip: search each scale's clipping ratio in ``[clip, 1]`` (see :func:`gptq_solve`).
    scale_dtype: scale storage (``None``/``"auto"``: bfloat16 for int4 group-wise,
      else float32).
    max_batches: use at most this many calibration batches.
    log: called with one line per layer (``print`` for progress).
    keep_zeros: weights that are exactly 0 (e.g. pruned by :func:`sparsity.oneshot`)
      keep code 0, their error compensated by the others (``keep`` of
      :func:`gptq_solve`): the sparsity pattern survives quantization.

  Returns:
    The params tree (``variables["params"]``, or the NNX pure dict
    ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``) with :class:`QArray` kernels:
    ready for ``dequantize_params``, ``int8_apply(..., weight_only=True)`` and orbax.
  """
  if not (isinstance(damp, (int, float)) and damp >= 0):
    raise ValueError(f"gptq: damp must be a float >= 0, got {damp!r}")
  if not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"gptq: block_size must be a positive int, got {block_size!r}")
  solve = functools.partial(_gptq_kernel, act_order=act_order, damp=float(damp),
                            block_size=block_size, clip=clip, keep_zeros=bool(keep_zeros))
  params = _hessian.Forward(apply_fn, variables, "gptq").params
  chosen, default = op_rules(params, rules, bits=bits, group_size=group_size,
                             scale_dtype=scale_dtype, where="gptq")
  select = _tree.default_prunable if chosen is None else (lambda p, x: p in chosen)
  cap = _hessian.HessianCapture(apply_fn, variables, batches, select,
                                max_batches=max_batches, where="gptq", require_ops=True)
  out: dict[str, Any] = {}

  def layer(o, h):
    rule = default if chosen is None else chosen[o.kernel]
    if log is not None:
      log(f"gptq: {o.kernel} {o.shape} int{rule.bits} g{rule.group_size}")
    out[o.kernel] = solve(o, cap.leaves[o.kernel], h, rule)

  if sequential:   # each round sees the earlier rounds quantized
    for ops in cap.rounds():
      hs = cap.round_hessians(out, ops)
      for o in ops:
        layer(o, hs[o.kernel])
  else:
    hs = cap.hessians()
    for o in cap.ops:
      layer(o, hs[o.kernel])
  if chosen is not None:   # chosen leaves that no contraction consumes: round to nearest
    for p, r in chosen.items():
      if p not in out and not is_qarray(cap.leaves[p]):
        out[p] = _rules.quantize_leaf(p, cap.leaves[p], r)
  return set_leaves(cap.params, out)


def _gptq_kernel(o: OpInfo, w: jax.Array, h: jax.Array, rule, *, act_order, damp,
                 block_size, clip=None, keep_zeros=False) -> QArray:
  """GPTQ of kernel ``w`` (contracted as ``o`` says) with its ``(K, K)`` Hessian ``h``:
  a :class:`QArray` of ``w``'s shape, groups along its last contracted axis."""
  g = layer_groups(o.tshape, o.n_in, rule.group_size, o.kernel)
  w2 = kernel_matrix(w, o)
  codes, scales = gptq_solve(w2, h, bits=rule.bits, group_size=g,
                             act_order=act_order, damp=damp, block_size=block_size,
                             scale_dtype=_sdt(rule), clip=clip,
                             keep=(w2 != 0) if keep_zeros else None)
  return to_qarray(codes, scales, o.tshape, o.n_in, bits=rule.bits, group_size=g,
                   dtype=w.dtype, name=o.kernel, scale_dtype=_sdt(rule), perm=o.perm)


# ----------------------------------------------------------- every layer alone (float inputs)
def input_hessians(cap: _hessian.HessianCapture) -> dict[str, jax.Array]:
  """``{kernel path: H = 2 sum_b X_b^T X_b}`` of every captured kernel on the **float**
  model: one jitted forward per batch records every Gram at once (instead of one eager
  forward per round). These are the Hessians :func:`gptq` uses with
  ``sequential=False``, e.g. to quantize each layer *alone* under several settings from
  one capture (:func:`solve_alone`).
  """
  return cap.hessians()


def solve_alone(cap: _hessian.HessianCapture, hessians: dict[str, jax.Array],
                rules: dict[str, Any], *,
                weights: dict[str, jax.Array] | None = None, act_order: bool = True,
                damp: float = 0.1, block_size: int = 128, clip: float | None = None,
                keep_zeros: bool = False) -> dict[str, QArray]:
  """``{kernel path: QArray}``: GPTQ of each chosen kernel with its float-input Hessian
  (``hessians`` from :func:`input_hessians`), i.e. every layer quantized as if it were
  the only compressed one (:func:`gptq` with ``sequential=False``).

  Kernels with the same ``(K, N)`` shape and rule are solved together: one
  ``vmap``-ped :func:`gptq_solve` (one compiled program and one sweep for all of them).

  ``rules``: ``{kernel path: QuantRule}`` (bits, group size, scale storage);
  ``weights``: kernels to solve instead of the captured ones (e.g. pruned first, with
  ``keep_zeros``).
  """
  by_kernel = {o.kernel: o for o in cap.ops}
  groups: dict[tuple, list] = {}
  for path, rule in rules.items():
    if path not in by_kernel:
      raise ValueError(f"solve_alone: {path!r} is not a captured kernel")
    o = by_kernel[path]
    w = cap.leaves[path] if weights is None or path not in weights else weights[path]
    g = layer_groups(o.tshape, o.n_in, rule.group_size, o.kernel)
    key = (kernel_matrix(w, o).shape, rule.bits, g, _sdt(rule))
    groups.setdefault(key, []).append((path, o, w, rule, g))
  out = {}
  for (_, bits, g, sdt), items in groups.items():
    w2 = jnp.stack([kernel_matrix(w, o) for _, o, w, _, _ in items])
    hs = jnp.stack([hessians[o.kernel] for _, o, _, _, _ in items])
    keep = (w2 != 0) if keep_zeros else None
    solve = functools.partial(gptq_solve, bits=bits, group_size=g, act_order=act_order,
                              damp=float(damp), block_size=block_size, scale_dtype=sdt,
                              clip=clip)
    if keep is None:
      codes, scales = jax.vmap(lambda a, b: solve(a, b))(w2, hs)
    else:
      codes, scales = jax.vmap(lambda a, b, c: solve(a, b, keep=c))(w2, hs, keep)
    for i, (path, o, w, rule, g) in enumerate(items):
      out[path] = to_qarray(codes[i], scales[i], o.tshape, o.n_in, bits=rule.bits,
                            group_size=g, dtype=w.dtype, name=o.kernel,
                            scale_dtype=_sdt(rule), perm=o.perm)
  return {p: out[p] for p in rules}
