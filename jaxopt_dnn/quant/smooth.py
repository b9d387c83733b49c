"""SmoothQuant: migrate activation outliers into the weights, folded into the model.

For a contraction ``y = x W`` (``W``: ``(K, N)``, the kernel read as
:func:`~jaxopt_dnn.quant.layout.kernel_matrix` does) and a per-input-channel scale ``s``,
``y = (x / s) (diag(s) W)`` exactly. The contractions are found by the jaxpr interpreter
(:mod:`jaxopt_dnn.quant.hessian`): ``Dense``, ``DenseGeneral``, ``Einsum``, ``Conv`` and a
raw ``x @ w`` param, linen or NNX; a conv's channels are its input features (``s`` is
shared by the kernel's window positions: rows ``(h, w, c)`` of an HWIO kernel get
``s_c``), a dot's are its contracted activation axes. SmoothQuant (Xiao et al. 2023) picks

    s_j = max|X_j|^alpha / max|W_j,:|^(1 - alpha)       (1 where either range is 0)

so that the activation and weight ranges of channel ``j`` meet in the middle, which makes
per-tensor int8 activations much less lossy. The ``1 / s`` must be applied to the input
*without an extra op at serving time*: it is folded into the op that produced ``x``:

* a per-channel scale (a ``LayerNorm``'s ``scale /= s``, ``bias /= s``), or
* a contraction (``Dense`` / ``Einsum`` / ``Conv``: the kernel's output channels
  ``kernel[..., j] /= s_j``, ``bias /= s``),

  found in the traced program, linen or NNX, through dtype casts, ``relu``
  (``relu(z / s) = relu(z) / s``) and reshapes that keep the channel block
  (:class:`~jaxopt_dnn.quant.hessian.Producer`), or
* any ``Dense``-like producer named in ``folds`` (``{consumer op regex: producer op path}``, e.g. an
  attention output projection fed by the value projection through the attention
  weights, which are linear in ``v``: ``{r"(.*)/attention/out": r"\\1/attention/value"}``).

Every fold is *verified*: the model is run on a calibration batch before and after and
a fold that changes the output (e.g. a post-LN transformer whose LayerNorm output also
feeds the residual stream) is undone. Ops whose input has no valid producer are left as
they are (reported by ``log``). The returned variables therefore compute the same
function as the original ones in float and run unchanged in the model.

All ops that share one input (q/k/v) get one ``s``, with ``max|W_j|`` over all of them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_dnn import _tree
from jaxopt_dnn.quant import hessian as _hessian
from jaxopt_dnn.quant.layout import OpInfo, from_matrix, kernel_matrix, set_leaves
from jaxopt_dnn.quant.qarray import is_qarray


def smooth_scale(amax: jax.Array, wmax: jax.Array, alpha: float) -> jax.Array:
  """``s = amax^alpha / wmax^(1-alpha)``, 1 where either is 0, clipped to [1e-5, 1e5]."""
  ok = (amax > 0) & (wmax > 0)
  s = jnp.where(ok, jnp.power(jnp.where(ok, amax, 1.0), alpha)
                / jnp.power(jnp.where(ok, wmax, 1.0), 1.0 - alpha), 1.0)
  return jnp.clip(s, 1e-5, 1e5).astype(jnp.float32)


def channel_max(w2: jax.Array, row_chan: np.ndarray, c: int) -> jax.Array:
  """``max |W2[k, :]|`` over the rows ``k`` of each input channel (``(c,)``)."""
  return jnp.zeros((c,), jnp.float32).at[jnp.asarray(row_chan)].max(
      jnp.max(jnp.abs(w2), axis=1))


def producer_of(cap: _hessian.HessianCapture, op: OpInfo,
                folds: Mapping[str, str] | None) -> _hessian.Producer | None:
  """The :class:`~jaxopt_dnn.quant.hessian.Producer` of ``op``'s input: a ``folds``
  entry (``{consumer op regex: producer op path}``, a ``Dense``-like producer whose
  ``kernel`` and ``bias`` absorb ``1 / s``) or the traced one, or None."""
  if folds:
    for rx, repl in folds.items():
      if re.search(rx, op.op):
        p = re.sub(rx, repl, op.op)
        pre = f"{p}/" if p else ""
        leaves = tuple(q for q in (pre + "kernel", pre + "bias") if q in cap.leaves)
        return _hessian.Producer("dense", p, leaves)
  return cap.producers.get(op.round)


def fold_updates(cap: _hessian.HessianCapture, leaves: dict, ops: list[OpInfo],
                 prod: _hessian.Producer, s: jax.Array) -> dict[str, Any] | None:
  """New leaves for ``y = (x / s)(diag(s) W)``: each consumer's kernel rows times
  ``s[row_chan]``, the last ``c`` entries of each producer leaf divided by ``s``. None
  if a producer leaf is missing, quantized, or has no trailing block of ``c``."""
  c = s.shape[0]
  new = {}
  for o in ops:
    w = leaves[o.kernel]
    rc = jnp.asarray(cap.channels[o.kernel].row_chan)
    new[o.kernel] = from_matrix(kernel_matrix(w, o) * s[rc][:, None], o).astype(w.dtype)
  if not prod.leaves:
    return None
  for p in prod.leaves:
    v = leaves.get(p)
    if v is None or is_qarray(v) or not _tree.is_float_array(v) or p in new \
        or not _hessian.trailing_ok(np.shape(v), c):
      return None
    new[p] = (jnp.reshape(v, (-1, c)) / s).reshape(np.shape(v)).astype(v.dtype)
  return new


def _same(a, b, rtol=1e-3) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  for x, y in zip(la, lb):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if not np.all(np.abs(x - y) <= rtol * (np.max(np.abs(x)) + 1e-12) + 1e-6):
      return False
  return True


def selector(variables: Any, rules: Any, where: str):
  """``select(path, leaf)`` of the kernels to scale: with ``rules=None`` every leaf named
  like a contraction weight (:func:`jaxopt_dnn._tree.default_prunable`) that a
  contraction consumes; else the params paths the rules choose."""
  if rules is None:
    return lambda p, x: not is_qarray(x) and _tree.default_prunable(p, x)
  params = _hessian.Forward(lambda *a: None, variables, where).params
  chosen = {p for p, _, v in _tree.select(params, rules) if v is not None}
  return lambda p, x: p in chosen


def scaled_rounds(where: str, apply_fn, variables, batches, *, rules, folds, max_batches,
                  choose: Callable, log, max_sample: int = 0):
  """Shared SmoothQuant / AWQ driver: for each round (the kernels sharing one input)
  with a producer, ``choose(ops, kernels, stats, channels)`` returns ``s`` (``(c,)``)
  from the round's :class:`~jaxopt_dnn.quant.hessian.ChannelStats` on the float model;
  the fold is applied and kept only if the model's output on a calibration batch is
  unchanged.

  Returns:
    ``(capture, params with the kept folds, [(op, what happened)])``.
  """
  cap = _hessian.HessianCapture(apply_fn, variables, batches,
                                selector(variables, rules, where),
                                max_batches=max_batches, where=where,
                                require_ops=True)
  ref = cap.output()
  cur: dict[str, Any] = {}                  # {leaf path: folded value}
  report = []
  for ops in cap.rounds():
    prod = producer_of(cap, ops[0], folds)
    if prod is None:
      report.append((ops[0].op, "no producer to fold into: left as is"))
      continue
    chans = {cap.channels.get(o.kernel) for o in ops}
    if len(chans) != 1 or None in chans:
      report.append((ops[0].op, "the round's kernels read their input along different "
                                "channels: left as is"))
      continue
    ch = chans.pop()
    st = cap.channel_stats(None, ops, max_sample=max_sample)[ops[0].kernel]
    flat = {**cap.leaves, **cur}
    s = choose(ops, [flat[o.kernel] for o in ops], st, ch)
    new = fold_updates(cap, flat, ops, prod, s)
    if new is None:
      report.append((ops[0].op, f"producer {prod.path!r} ({prod.kind}) does not fit: "
                                "left as is"))
      continue
    if not _same(cap.output({**cur, **new}), ref):
      report.append((ops[0].op, f"folding into {prod.path!r} changes the model output "
                                 "(its output has other consumers): left as is"))
      continue
    cur.update(new)
    report.append((ops[0].op, f"scaled, 1/s folded into {prod.kind} {prod.path!r}"))
  if log is not None:
    for op, msg in report:
      log(f"{where}: {op}: {msg}")
  return cap, set_leaves(cap.params, cur), report


def smooth(apply_fn: Callable[..., Any], variables: Any, batches: Iterable[Any], *,
           alpha: float = 0.5, rules: Any = None, folds: Mapping[str, str] | None = None,
           max_batches: int | None = None, log: Callable[[str], Any] | None = None) -> Any:
  """SmoothQuant: returns variables with activation outliers migrated into the kernels.

  Args:
    apply_fn: ``apply_fn(variables, *inputs)`` (linen) or ``apply_fn(module, *inputs)``.
    variables: ``{"params": ...}`` or an ``nnx.Module`` (then the NNX pure params dict
      is returned).
    batches: calibration inputs.
    alpha: migration strength in [0, 1] (0.5 in the paper).
    rules: which kernels (regex / sequence / predicate over params paths); default
      every leaf named like a contraction weight that a dot / conv consumes
      (``Dense``, ``DenseGeneral``, ``Einsum``, ``Conv``, a raw ``x @ w`` param).
    folds: ``{consumer op regex: producer op path (re.sub template)}`` for producers
      that the traced detection cannot see (e.g. through attention).
    log: called with one line per round (what was folded where, or why not).

  Returns:
    ``{**variables, "params": smoothed}`` (linen) or the smoothed NNX params dict; the
    float model computes the same outputs (verified on a calibration batch). Then
    ``calibrate`` + ``quantize_params`` + ``int8_apply`` as usual.
  """
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
    raise ValueError(f"smooth: alpha must be in [0, 1], got {alpha!r}")

  def choose(ops, ws, st, ch):
    wmax = jnp.max(jnp.stack([channel_max(kernel_matrix(w, o), ch.row_chan, ch.c)
                              for o, w in zip(ops, ws)]), axis=0)
    return smooth_scale(st.amax, wmax, float(alpha))

  cap, params, _ = scaled_rounds("smooth", apply_fn, variables, batches, rules=rules,
                                 folds=folds, max_batches=max_batches, choose=choose, log=log)
  if not isinstance(variables, dict):
    return params
  return {**variables, "params": params}
