"""One-shot (post-training) pruning from calibration data: Wanda, SparseGPT, magnitude.

For a kernel ``W`` (``(K, N)``, inputs first as in Flax) and its calibration inputs
``X`` (``(T, K)``):

* **Wanda** (Sun et al. 2023): score ``S_ij = |W_ij| * ||X_j||_2`` (``||X_j||_2`` over
  all calibration rows); in every output column ``j`` the ``round(s * K)`` inputs with
  the smallest score are removed (ties: the lower input index first). No weight update.
* **magnitude**: the same comparison groups with ``S_ij = |W_ij|``.
* **SparseGPT** (Frantar & Alistarh 2023): with ``H = 2 X^T X + lambda I`` and the upper
  Cholesky factor ``U`` of ``H^-1``, inputs are visited in blocks of ``B = 128``; in each
  block the weights with the smallest ``w_ij^2 / U_ii^2`` are chosen (per output, so that
  every output column ends with exactly ``round(s * K)`` zeros), then each input row is
  zeroed where masked and the error is pushed onto the later rows,
  ``w_l -= U[i, l] (w_i - m_i w_i) / U[i, i]`` (the OBS update of GPTQ).
* **N:M** (``n`` kept of every ``m`` consecutive inputs, e.g. 2:4) along the contraction,
  per output column of the ``(K, N)`` kernel: the groups are runs of ``m`` consecutive
  rows of ``K`` (the kernel's contracted axes, flattened row-major in the kernel's own
  axis order, :func:`~jaxopt_dnn.quant.layout.kernel_matrix`: the same groups as
  :func:`~jaxopt_dnn.sparsity.nm_masks` with traced roles), so ``m`` must divide ``K``.
  SparseGPT chooses each group's mask when the sweep reaches it (by the per-weight
  score, or with ``nm_select="obs"`` the pattern whose simulated sweep over the group
  adds the least OBS error).

Sparsity is exact for every chosen leaf. Layers are solved sequentially by default:
each round of layers is calibrated on the inputs produced by the already-pruned layers
before it (see :mod:`jaxopt_dnn.quant.hessian`).

The returned masks follow the library's mask-tree convention (same structure as the
params, a bool keep-mask per pruned leaf, the 0-d dense marker elsewhere), so they go
straight into :func:`~jaxopt_dnn.sparsity.prune_optimizer` (a short fine-tune keeps
them), :func:`~jaxopt_dnn.sparsity.apply_masks` and :func:`~jaxopt_dnn.sparsity.pack`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_dnn import _tree
from jaxopt_dnn.model_adapter import adapt
from jaxopt_dnn.quant import hessian as _hessian
from jaxopt_dnn.quant.layout import from_matrix, kernel_matrix, set_leaves
from jaxopt_dnn.quant.gptq import inverse_cholesky_upper, prepare_hessian
from jaxopt_dnn.quant.qarray import is_qarray
from jaxopt_dnn.sparsity.masks import dense_marker

METHODS = ("wanda", "sparsegpt", "magnitude")
# SparseGPT's defaults, shared by :func:`oneshot` and :func:`prune_layer` (so ``jd.auto``
# measures a sparse candidate with the settings ``oneshot`` then realises it with); the
# measurements behind them are in :func:`oneshot`'s docstring.
DAMP = 0.3
NM_SELECT = "obs"
REFIT = True


def _keep_lowest_removed(score: jax.Array, k) -> jax.Array:
  """Keep-mask removing the ``k`` smallest entries of each column of ``score`` (K, N);
  ties are broken by position (stable sort)."""
  order = jnp.argsort(score, axis=0, stable=True)
  rank = jnp.argsort(order, axis=0, stable=True)
  return rank >= k


def _nm_keep(score: jax.Array, n: int, m: int) -> jax.Array:
  """Keep-mask of the ``n`` largest of every ``m`` consecutive rows (per column)."""
  k, cols = score.shape
  g = score.reshape(k // m, m, cols)
  order = jnp.argsort(g, axis=1, stable=True)
  rank = jnp.argsort(order, axis=1, stable=True)
  return (rank >= m - n).reshape(k, cols)


@functools.partial(jax.jit, static_argnames=("k_remove", "n", "m"))
def score_mask(score: jax.Array, *, k_remove: int = 0, n: int | None = None,
               m: int | None = None) -> jax.Array:
  """Keep-mask from a ``(K, N)`` score: per column remove ``k_remove`` lowest, or N:M."""
  if n is not None:
    return _nm_keep(score, n, m)
  return _keep_lowest_removed(score, k_remove)


def wanda_score(w: jax.Array, sq: jax.Array) -> jax.Array:
  """``|W_ij| * ||X_j||_2`` for ``w`` (K, N) and ``sq[j] = sum_t X_tj^2``."""
  return jnp.abs(w) * jnp.sqrt(sq)[:, None]


def _nm_patterns(n: int, m: int) -> jax.Array:
  """Every keep-pattern of ``n`` of ``m``: ``(C(m, n), m)`` bool."""
  import itertools
  return jnp.asarray([[j in c for j in range(m)]
                      for c in itertools.combinations(range(m), n)], bool)


def _group_obs_keep(grp: jax.Array, ug: jax.Array, pats: jax.Array) -> jax.Array:
  """The keep-pattern of one N:M group with the smallest OBS error in sweep order.

  ``grp``: the group's current weights ``(N, m)``; ``ug``: its ``(m, m)`` block of the
  upper Cholesky factor of ``H^-1``; ``pats``: :func:`_nm_patterns`. For every pattern
  the sweep over the group's ``m`` inputs is simulated exactly (each zeroed input adds
  ``((w_i - q_i) / U_ii)^2`` and pushes its error onto the group's later inputs), so
  the choice accounts for the updates inside the group, which the per-weight score
  ``w_i^2 / U_ii^2`` ignores. Returns ``(N, m)`` bool."""
  m = grp.shape[1]
  wg = jnp.broadcast_to(grp[None], (pats.shape[0],) + grp.shape)   # (P, N, m)
  loss = jnp.zeros(wg.shape[:2], jnp.float32)
  for j in range(m):
    e = jnp.where(pats[:, None, j], 0.0, wg[:, :, j]) / ug[j, j]
    loss = loss + e ** 2
    wg = wg - e[:, :, None] * ug[j][None, None, :]
  return pats[jnp.argmin(loss, axis=0)]                            # (N, m)


def refit_masked(w: jax.Array, h: jax.Array, keep: jax.Array, w0: jax.Array | None = None,
                 *, iters: int = 64) -> jax.Array:
  """Minimises ``(w' - w)^T H (w' - w)`` per output column of ``w`` (``(K, N)``) over the
  ``w'`` that are zero where ``keep`` (``(K, N)`` bool) is not, i.e. solves
  ``H_SS w'_S = (H w)_S`` on each column's kept set ``S``, by ``iters`` steps of
  Jacobi-preconditioned conjugate gradients on all columns at once, started from ``w0``
  (the SparseGPT sweep's weights; default ``w`` masked): every step lowers the objective,
  so the result is never worse than ``w0``. ``H`` (``(K, K)``) must be positive definite
  (damped). The sweep freezes each input once visited, so its kept weights are optimal
  only towards the inputs pruned after them; this re-fits all of them for the final
  mask."""
  keep = keep.astype(jnp.float32)
  x = keep * (w if w0 is None else w0)
  pre = keep / jnp.diag(h)[:, None]
  r = keep * (h @ (w - x))                     # minus the gradient, on the mask
  z = pre * r
  p = z
  rz = jnp.sum(r * z, axis=0)

  def step(_, c):
    x, r, p, rz = c
    ap = keep * (h @ p)
    pap = jnp.sum(p * ap, axis=0)
    alpha = jnp.where(pap > 0, rz / jnp.where(pap > 0, pap, 1.0), 0.0)
    x = x + alpha * p
    r = r - alpha * ap
    z = pre * r
    rz2 = jnp.sum(r * z, axis=0)
    beta = jnp.where(rz > 0, rz2 / jnp.where(rz > 0, rz, 1.0), 0.0)
    return x, r, z + beta * p, rz2

  x, *_ = jax.lax.fori_loop(0, iters, step, (x, r, p, rz))
  return x


@functools.partial(jax.jit, static_argnames=("sparsity", "n", "m", "block_size",
                                             "nm_select", "act_order", "refit",
                                             "refit_iters"))
def sparsegpt_solve(w: jax.Array, h: jax.Array, *, sparsity: float = 0.5,
                    n: int | None = None, m: int | None = None, damp: float = 0.01,
                    block_size: int = 128, nm_select: str = "score",
                    act_order: bool = False, refit: bool = False, refit_iters: int = 64):
  """SparseGPT on one ``(K, N)`` kernel with its ``(K, K)`` Hessian.

  ``act_order``: visit the inputs by descending ``H_ii`` (N:M: whole groups by
  descending ``sum H_ii`` over the group, so the groups stay those of the kernel).
  ``refit``: after the sweep, re-fit the kept weights for the final mask
  (:func:`refit_masked`, ``refit_iters`` CG steps, same damped Hessian).

  Returns:
    ``(pruned and updated kernel (K, N) float32, keep-mask (K, N) bool)``. Each output
    column has exactly ``round(sparsity * K)`` zeros (or ``m - n`` per group of ``m``).
  """
  k, cols = w.shape
  h, w = prepare_hessian(h.astype(jnp.float32), w.astype(jnp.float32), damp)
  w_orig, h_orig = w, h
  if act_order:
    dg = jnp.diag(h)
    if n is None:
      perm = jnp.argsort(-dg, stable=True)
    else:
      gperm = jnp.argsort(-dg.reshape(k // m, m).sum(1), stable=True)
      perm = (gperm[:, None] * m + jnp.arange(m)[None, :]).reshape(k)
    w, h = w[perm], h[perm][:, perm]
  u = inverse_cholesky_upper(h)
  B = block_size if m is None else max(block_size // m, 1) * m
  kp = -(-k // B) * B
  wt = jnp.pad(w.T, ((0, 0), (0, kp - k)))                       # (N, Kp)
  u = jnp.pad(u, ((0, kp - k), (0, kp - k))) + jnp.diag(
      jnp.concatenate([jnp.zeros(k), jnp.ones(kp - k)]))
  d = jnp.diag(u)
  valid = jnp.arange(kp) < k

  def block(bi, carry):
    wt, keep = carry
    i1 = bi * B
    w1 = jax.lax.dynamic_slice_in_dim(wt, i1, B, axis=1)
    u1 = jax.lax.dynamic_slice(u, (i1, i1), (B, B))
    d1 = jax.lax.dynamic_slice_in_dim(d, i1, B)
    v1 = jax.lax.dynamic_slice_in_dim(valid, i1, B)
    if n is None:   # unstructured: this block's share of the exact per-column count
      kb = (jnp.round(sparsity * jnp.minimum(i1 + B, k)) - jnp.round(sparsity * jnp.minimum(i1, k)))
      score = jnp.where(v1[None, :], w1 ** 2 / d1[None, :] ** 2, jnp.inf)
      order = jnp.argsort(score, axis=1, stable=True)
      rank = jnp.argsort(order, axis=1, stable=True)
      keep1 = rank >= kb.astype(rank.dtype)
    else:
      keep1 = jnp.ones((cols, B), bool)

    def col(i, c):
      w1, e1, keep1 = c
      if n is not None:   # N:M: choose the group's mask when the sweep reaches it
        g0 = (i // m) * m
        grp = jax.lax.dynamic_slice_in_dim(w1, g0, m, axis=1)
        if nm_select == "obs":
          ug = jax.lax.dynamic_slice(u1, (g0, g0), (m, m))
          kg = _group_obs_keep(grp, ug, pats)
        else:
          dg = jax.lax.dynamic_slice_in_dim(d1, g0, m)
          sc = grp ** 2 / dg[None, :] ** 2
          order = jnp.argsort(sc, axis=1, stable=True)
          rank = jnp.argsort(order, axis=1, stable=True)
          kg = rank >= (m - n)
        new = jax.lax.dynamic_update_slice_in_dim(keep1, kg, g0, axis=1)
        keep1 = jnp.where(i % m == 0, new, keep1)
      wc = w1[:, i]
      q = jnp.where(keep1[:, i], wc, 0.0)
      err = (wc - q) / u1[i, i]
      w1 = w1 - err[:, None] * u1[i][None, :]
      w1 = w1.at[:, i].set(q)
      return w1, e1.at[:, i].set(err), keep1

    z = jnp.zeros((cols, B), jnp.float32)
    w1, e1, keep1 = jax.lax.fori_loop(0, B, col, (w1, z, keep1))
    wt = wt - e1 @ jax.lax.dynamic_slice_in_dim(u, i1, B, axis=0)
    wt = jax.lax.dynamic_update_slice_in_dim(wt, w1, i1, axis=1)
    keep = jax.lax.dynamic_update_slice_in_dim(keep, keep1, i1, axis=1)
    return wt, keep

  keep0 = jnp.ones((cols, kp), bool)
  pats = None if n is None else _nm_patterns(n, m)
  wt, keep = jax.lax.fori_loop(0, kp // B, block, (wt, keep0))
  keep = keep[:, :k].T
  new = jnp.where(keep, wt[:, :k].T, 0.0)
  if act_order:
    inv = jnp.argsort(perm)
    new, keep = new[inv], keep[inv]
  if refit:
    new = refit_masked(w_orig, h_orig, keep, new, iters=refit_iters)
  return new, keep


def float_target(w2: jax.Array, h: jax.Array, d: jax.Array, damp: float) -> jax.Array:
  """``W* = W + (H + lambda I)^-1 D W``: the kernel whose (damped) reconstruction on the
  pruned model's inputs best matches the **float** model's outputs.

  With ``X_q`` the inputs the already-pruned earlier layers produce and ``X_f`` the float
  model's, ``H = 2 X_q^T X_q``, ``D = 2 X_q^T (X_f - X_q)`` and
  ``lambda = damp * mean(diag H)`` (SparseGPT's damping)::

    ||X_f W - X_q W'||^2 + lambda ||W' - W||^2 = ||X_q (W' - W*)||^2 + lambda ||W' - W*||^2 + c

  so SparseGPT (which minimises the right side's first two terms) run on ``W*`` instead
  of ``W`` prunes towards the float outputs: the error of the earlier pruned layers is
  compensated instead of carried forward. ``X_q = X_f`` gives ``W* = W``.
  """
  h = h.astype(jnp.float32)
  dg = jnp.diag(h)
  dead = dg <= 0
  h = h + jnp.diag(dead.astype(h.dtype))
  lam = damp * jnp.mean(jnp.diag(h))
  hd = h + lam * jnp.eye(h.shape[0], dtype=h.dtype)
  delta = jax.scipy.linalg.solve(hd, d.astype(jnp.float32) @ w2, assume_a="pos")
  return w2 + jnp.where(dead[:, None], 0.0, delta)


def _sequential_float_targets(apply_fn, variables, batches, select, layer, *, damp,
                              max_batches):
  """Sequential SparseGPT with float targets: each round's rows are captured with the
  earlier rounds pruned (``X_q``) and on the float model (``X_f``), both through the
  interpreter (:meth:`~jaxopt_dnn.quant.hessian.HessianCapture.rows`: Dense, Conv,
  Einsum, raw dots), and each kernel is pruned from :func:`float_target` with
  ``H = 2 X_q^T X_q``: ``layer(o, w*, H)``."""
  cap = _hessian.HessianCapture(apply_fn, variables, batches, select,
                                max_batches=max_batches, where="oneshot", require_ops=True)
  out: dict[str, Any] = {}
  for r, ops in enumerate(cap.rounds()):
    xq = cap.rows({p: v[0] for p, v in out.items()}, ops)
    xf = cap.rows(None, ops) if r and out else None
    for o in ops:
      h = 2.0 * sum(x.T @ x for x in xq[o.kernel])
      w = cap.leaves[o.kernel]
      if xf is not None:
        d = 2.0 * sum(a.T @ (b - a) for a, b in zip(xq[o.kernel], xf[o.kernel]))
        w = from_matrix(float_target(kernel_matrix(w, o), h, d, damp), o).astype(w.dtype)
      out[o.kernel] = layer(o, w, h)
  return cap, out


def bias_path(o, leaves: dict[str, Any]) -> str | None:
  """The bias leaf added to kernel ``o``'s output (the sibling ``bias`` of a ``.../kernel``
  whose shape is the kernel's output axes), or None."""
  if o.perm is not None or not o.kernel.endswith("kernel"):
    return None
  b = o.kernel[:-len("kernel")] + "bias"
  leaf = leaves.get(b)
  if leaf is None or not _tree.is_float_array(leaf) or tuple(np.shape(leaf)) != tuple(
      o.shape[o.n_in:]):
    return None
  return b


def _bias_corrected(apply_fn, variables, batches, select, layer, *, sequential,
                    max_batches):
  """As :func:`_captured`, for kernels with a bias: pruned with the centred Hessian
  ``2 sum_t (x_t - mu)(x_t - mu)^T`` (``mu``: the mean calibration input), the mean
  output shift ``mu (W - W')`` then added to the bias, so the bias is a free parameter of
  the layer's least-squares fit. Returns ``(capture, kernels, {bias path: new bias})``."""
  cap = _hessian.HessianCapture(apply_fn, variables, batches, select,
                                max_batches=max_batches, where="oneshot", require_ops=True)
  out: dict[str, Any] = {}
  biases: dict[str, Any] = {}
  allm = None if sequential else cap.round_moments(None, cap.ops)
  for ops in cap.rounds():
    mom = allm if not sequential else cap.round_moments(
        {**{p: r[0] for p, r in out.items()}, **biases}, ops)
    for o in ops:
      h, sx, t = mom[o.kernel]
      bp = bias_path(o, cap.leaves)
      w = cap.leaves[o.kernel]
      if bp is None:
        out[o.kernel] = layer(o, w, h)
        continue
      mu = sx / t
      out[o.kernel] = layer(o, w, h - 2.0 * t * jnp.outer(mu, mu))
      delta = kernel_matrix(w, o) - kernel_matrix(out[o.kernel][0], o)     # (K, N)
      b = cap.leaves[bp]
      biases[bp] = (jnp.asarray(b, jnp.float32) + (mu @ delta).reshape(np.shape(b))
                    ).astype(b.dtype)
  return cap, out, biases


def _captured(apply_fn, variables, batches, select, layer, *, sequential, max_batches):
  """Rounds of kernels through the interpreter's Hessian capture
  (:class:`~jaxopt_dnn.quant.hessian.HessianCapture`: Dense, Conv, Einsum, raw dots):
  ``layer(o, w, H)`` per kernel, each round on the already-pruned earlier rounds
  when ``sequential``."""
  cap = _hessian.HessianCapture(apply_fn, variables, batches, select,
                                max_batches=max_batches, where="oneshot", require_ops=True)
  out: dict[str, Any] = {}
  hs = None if sequential else cap.hessians()
  for ops in cap.rounds():
    if sequential:
      hs = cap.round_hessians({p: r[0] for p, r in out.items()}, ops)
    for o in ops:
      out[o.kernel] = layer(o, cap.leaves[o.kernel], hs[o.kernel])
  return cap, out


def _check(sparsity, n, m, method):
  if method not in METHODS:
    raise ValueError(f"oneshot: method must be one of {METHODS}, got {method!r}")
  if (n is None) != (m is None):
    raise ValueError(f"oneshot: give both n and m for N:M sparsity, got n={n!r}, m={m!r}")
  if n is not None:
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
      raise ValueError(f"oneshot: need integers 0 < n < m, got n={n!r}, m={m!r}")
    return
  if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) \
      or not 0.0 <= sparsity < 1.0:
    raise ValueError(f"oneshot: sparsity must be a float in [0, 1), got {sparsity!r}")


def prune_layer(o, w: jax.Array, stat: jax.Array | None, *, method: str = "sparsegpt",
                sparsity: float = 0.5, n: int | None = None, m: int | None = None,
                damp: float = DAMP, block_size: int = 128, nm_select: str = NM_SELECT,
                act_order: bool = False, refit: bool = REFIT):
  """Prunes one captured kernel ``w`` (``o``: its :class:`~jaxopt_dnn.quant.layout.OpInfo`).

  ``stat``: the input Hessian ``2 X^T X`` (``(K, K)``) for SparseGPT, the per-input
  ``sum_t X_tj^2`` (``(K,)``) for Wanda, unused by magnitude. The SparseGPT options and
  their defaults are :func:`oneshot`'s. Returns ``(kernel of w's shape and dtype,
  keep-mask of w's shape)``.
  """
  _check(sparsity, n, m, method)
  if n is not None and o.k % m:
    raise ValueError(f"oneshot: leaf {o.kernel!r} {o.shape}: its contraction (the first "
                     f"{o.n_in} axes) has length K={o.k}, which is not a multiple of m={m}, "
                     "so there are no N:M groups along it; exclude it with `rules`")
  w2 = kernel_matrix(w, o)
  k_remove = 0 if n is not None else int(np.round(sparsity * o.k))
  if method == "sparsegpt":
    new, keep = sparsegpt_solve(w2, stat, sparsity=float(sparsity), n=n, m=m,
                                damp=float(damp), block_size=block_size,
                                nm_select=nm_select, act_order=bool(act_order),
                                refit=bool(refit))
  else:
    score = jnp.abs(w2) if method == "magnitude" else wanda_score(w2, stat)
    keep = score_mask(score, k_remove=k_remove, n=n, m=m)
    new = jnp.where(keep, w2, 0.0)
  return from_matrix(new, o).astype(w.dtype), from_matrix(keep, o)


def oneshot(apply_fn: Callable[..., Any], variables: Any, batches: Iterable[Any], *,
            method: str = "wanda", sparsity: float = 0.5, n: int | None = None,
            m: int | None = None, rules: Any = None, damp: float = DAMP,
            sequential: bool = True, block_size: int = 128, float_targets: bool = False,
            nm_select: str = NM_SELECT, act_order: bool = False, refit: bool = REFIT,
            bias_correct: bool = False, max_batches: int | None = None, log: Callable[[str], Any] | None = None):
  """One-shot pruning of a linen or NNX model's kernels from calibration batches.

  Args:
    apply_fn: ``apply_fn(variables, *inputs)``, or ``apply_fn(module, *inputs)`` for NNX
      (``variables`` is then the ``nnx.Module``).
    variables: ``{"params": ...}`` (linen) or an ``nnx.Module``.
    batches: calibration inputs (an iterable of tuples of model inputs).
    method: ``"wanda"`` | ``"sparsegpt"`` | ``"magnitude"``.
    sparsity: fraction of each chosen kernel removed (per output column, exact).
    n, m: N:M sparsity along the contraction axis instead (``n=2, m=4`` for 2:4).
    rules: which kernels (a regex, a sequence of regexes, or a predicate
      ``(path, leaf) -> bool`` over params paths); default every leaf named like a
      contraction weight that a dot / conv consumes (``Dense``, ``Conv``, ``Einsum``, a
      raw ``x @ w``; :mod:`jaxopt_dnn.quant.hessian`), never biases, norm scales or
      embeddings.
    damp: SparseGPT's relative Hessian damping ``lambda = damp * mean(diag H)``.
      The SparseGPT defaults (``damp``, ``nm_select``, ``refit``) were measured on
      all-MiniLM-L6-v2 with 32 calibration sentences (``python bench/ptq_targets.py
      --skip-w8a8 --short 0 --random 0``; min cosine over 16 held-out sentences / 24
      other validation texts / mean over 64): the previous defaults (``damp=0.1``, the
      paper's ``nm_select="score"``, ``refit=False``) give 2:4 0.785 / 0.670 / 0.819 and
      50% 0.859 / 0.798 / 0.899; these defaults 2:4 0.818 / 0.695 / 0.841 and 50% 0.892 / 0.814 /
      0.911 (on the 24 chat-like short texts of ``EVALUATION_VARIED``'s end the 2:4
      minimum falls 0.625 -> 0.609; 50% rises 0.753 -> 0.764). With ``refit`` a larger
      damping works better (2:4 at 0.1: 0.810 / 0.672 / 0.840). Pass the previous values
      to reproduce them (the paper itself damps by 0.01).
    sequential: calibrate each round on the outputs of the already-pruned layers.
    float_targets: SparseGPT (sequential) prunes each kernel towards the **float**
      model's outputs (:func:`float_target`: the earlier layers' pruning error is
      compensated, not carried forward); ``False``: towards its own outputs on the
      pruned inputs (the SparseGPT paper).
    block_size: SparseGPT's block (also the adaptive mask-selection block).
    nm_select: how SparseGPT chooses an N:M group's mask when the sweep reaches it:
      ``"obs"`` (default) the pattern (of all ``C(m, n)``) with the smallest OBS error of
      the group's sweep simulated exactly, the updates inside the group included;
      ``"score"`` the ``n`` largest ``w_i^2 / U_ii^2`` (the SparseGPT paper).
    act_order: SparseGPT visits the inputs by descending Hessian diagonal (N:M: whole
      groups, by the group's sum) instead of in index order.
    refit: (default on) SparseGPT re-fits every kept weight for the final mask after
      the sweep (:func:`refit_masked`: 64 conjugate-gradient steps from the sweep's
      weights towards the least-squares optimum of the damped layer reconstruction for
      that mask; the sweep's kept weights are optimal only towards the inputs pruned after
      them). Cost: each CG step is one ``(K, K) x (K, N)`` product, so the re-fit costs
      several sweeps (a 2048 x 2048 kernel at 2:4 on a 2-core CPU: sweep 0.85 s, with
      refit 5.7 s; the paper's ``"score"`` sweep 2.4 s); pass ``refit=False`` when
      pruning time matters more.
    bias_correct: SparseGPT, for every kernel with a bias (:func:`bias_path`): prune
      with the centred input Hessian and add the mean output shift ``mu (W - W')`` to
      the bias (the bias becomes a free parameter of each layer's fit; the returned
      params then differ from the input ones in those biases too).
    max_batches: use at most this many batches.
    log: called with one line per layer.

  Returns:
    ``(params, masks)``: the params tree (``variables["params"]`` or the NNX pure dict)
    with pruned kernels, and a mask tree of the same structure (bool keep-masks for
    pruned kernels, :func:`~jaxopt_dnn.sparsity.dense_marker` elsewhere).
  """
  _check(sparsity, n, m, method)
  if nm_select not in ("score", "obs"):
    raise ValueError(f"oneshot: nm_select must be 'score' or 'obs', got {nm_select!r}")
  params = adapt(apply_fn, variables).params   # None: linen variables without "params"
  if rules is None:
    select = lambda p, x: not is_qarray(x) and _tree.is_float_array(x)  # noqa: E731
  else:
    if params is None:
      raise TypeError("oneshot: variables must be {'params': ...} or an nnx.Module")
    chosen = {p for p, _, v in _tree.select(params, rules) if v is not None}
    select = lambda p, x: p in chosen  # noqa: E731

  def layer(o, w, h):
    # Wanda's ||X_j||^2 = sum_t X_tj^2 is the diagonal of H / 2
    new, keep = prune_layer(o, w, h if method == "sparsegpt" else 0.5 * jnp.diag(h),
                            method=method, sparsity=sparsity, n=n, m=m, damp=damp,
                            block_size=block_size, nm_select=nm_select,
                            act_order=act_order, refit=refit)
    if log is not None:
      log(f"oneshot[{method}]: {o.kernel} {o.shape} zeros {int((~keep).sum())}/{keep.size}")
    return new, keep

  if bias_correct and (method != "sparsegpt" or float_targets):
    raise ValueError("oneshot: bias_correct is for method='sparsegpt' without float_targets")
  biases: dict[str, Any] = {}
  if bias_correct:
    cap, out, biases = _bias_corrected(
        apply_fn, variables, batches, _tree.default_prunable if rules is None else select,
        layer, sequential=sequential, max_batches=max_batches)
  elif method == "sparsegpt" and sequential and float_targets:
    cap, out = _sequential_float_targets(apply_fn, variables, batches,
                                         _tree.default_prunable if rules is None else select,
                                         layer,
                                         damp=float(damp), max_batches=max_batches)
  else:
    cap, out = _captured(apply_fn, variables, batches,
                         _tree.default_prunable if rules is None else select, layer,
                         sequential=sequential, max_batches=max_batches)
  if rules is not None:
    missing = sorted(set(chosen) - set(out))
    if missing:
      raise ValueError(f"oneshot: rules chose {missing}, which no captured contraction "
                       "(dot_general / conv_general_dilated) consumes")
  new_params = set_leaves(cap.params, {**{p: r[0] for p, r in out.items()}, **biases})
  masks = _tree.map_with_path_str(
      lambda p, x: out[p][1] if p in out else dense_marker(), cap.params, is_leaf=is_qarray)
  return new_params, masks
