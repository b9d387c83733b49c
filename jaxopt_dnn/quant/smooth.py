"""SmoothQuant: migrate activation outliers into the weights, folded into the model.

For a contraction ``y = x W`` (``W``: ``(K, N)``) and a per-input-channel scale ``s``,
``y = (x / s) (diag(s) W)`` exactly. SmoothQuant (Xiao et al. 2023) picks

    s_j = max|X_j|^alpha / max|W_j,:|^(1 - alpha)       (1 where either range is 0)

so that the activation and weight ranges of channel ``j`` meet in the middle, which makes
per-tensor int8 activations much less lossy. The ``1 / s`` must be applied to the input
*without an extra op at serving time*: it is folded into the op that produced ``x``:

* a ``LayerNorm`` (``scale /= s``, ``bias /= s``) whose output feeds only these ops, or
* a ``Dense`` (``kernel[:, j] /= s_j``, ``bias /= s``) whose output is the input, or
* any producer named in ``folds`` (``{consumer op regex: producer op path}``, e.g. an
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
from jaxopt_dnn.quant.capture import Capture, OpInfo, kernel_2d, set_leaves
from jaxopt_dnn.quant.qarray import is_qarray


def smooth_scale(amax: jax.Array, wmax: jax.Array, alpha: float) -> jax.Array:
  """``s = amax^alpha / wmax^(1-alpha)``, 1 where either is 0, clipped to [1e-5, 1e5]."""
  ok = (amax > 0) & (wmax > 0)
  s = jnp.where(ok, jnp.power(jnp.where(ok, amax, 1.0), alpha)
                / jnp.power(jnp.where(ok, wmax, 1.0), 1.0 - alpha), 1.0)
  return jnp.clip(s, 1e-5, 1e5).astype(jnp.float32)


def producer_of(cap: Capture, op: OpInfo, folds: Mapping[str, str] | None):
  """``(kind, producer path)`` for the input of ``op`` or None."""
  if folds:
    for rx, repl in folds.items():
      if re.search(rx, op.op):
        return "dense", re.sub(rx, repl, op.op)
  return getattr(cap, "producers", {}).get(op.op)


def fold_updates(cap: Capture, params_flat: dict, ops: list[OpInfo], prod, s: jax.Array,
                 where: str) -> dict[str, Any] | None:
  """New leaves for ``y = (x / s)(s W)``: consumers' rows times ``s``, the producer's
  output channels divided by ``s``. None if the producer's shapes do not fit."""
  kind, p = prod
  k = s.shape[0]
  new = {}
  for o in ops:
    w = params_flat[o.kernel]
    new[o.kernel] = (kernel_2d(w, o.n_in) * s[:, None]).reshape(o.shape).astype(w.dtype)
  pre = f"{p}/" if p else ""
  if kind == "layernorm":
    for leaf in ("scale", "bias"):
      v = params_flat.get(pre + leaf)
      if v is None or v.shape != (k,):
        return None
      new[pre + leaf] = (v / s).astype(v.dtype)
  else:
    w = params_flat.get(pre + "kernel")
    if w is None or is_qarray(w) or w.shape[-1] != k or w.ndim != 2:
      return None
    new[pre + "kernel"] = (w / s[None, :]).astype(w.dtype)
    b = params_flat.get(pre + "bias")
    if b is not None:
      new[pre + "bias"] = (b / s).astype(b.dtype)
  return new


def _model_out(cap: Capture, params):
  if cap.nnx:
    from flax import nnx
    m = nnx.clone(cap.module)
    nnx.update(m, params)
    return cap.apply_fn(m, *cap.batches[0])
  return cap.apply_fn({**cap.variables, "params": params}, *cap.batches[0])


def _same(a, b, rtol=1e-3) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  for x, y in zip(la, lb):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if not np.all(np.abs(x - y) <= rtol * (np.max(np.abs(x)) + 1e-12) + 1e-6):
      return False
  return True


def scaled_rounds(where: str, apply_fn, variables, batches, *, rules, folds, max_batches,
                  choose: Callable, log, max_sample: int = 0):
  """Shared SmoothQuant / AWQ driver: for each round with a foldable producer, ``choose``
  returns ``s`` from the round's statistics; folds are applied and verified."""
  params0 = None if not isinstance(variables, dict) else variables.get("params")
  if rules is None:
    select = lambda p, x: not is_qarray(x)  # noqa: E731
  else:
    chosen = {p for p, _, v in _tree.select(params0 if params0 is not None else
                                            _nnx_params(variables), rules) if v is not None}
    select = lambda p, x: p in chosen  # noqa: E731
  cap = Capture(apply_fn, variables, batches, select, max_batches=max_batches, where=where)
  if not cap.ops:
    raise ValueError(f"{where}: no Dense/DenseGeneral kernel was chosen by the rules")
  jit_out = jax.jit(lambda p: _model_out(cap, p)) if not cap.nnx else (lambda p: _model_out(cap, p))
  ref = jit_out(cap.params)
  flat = dict(_tree.leaves_with_paths(cap.params, is_leaf=is_qarray))
  cur = cap.params
  report = []
  for ops in cap.rounds():
    prod = producer_of(cap, ops[0], folds)
    if prod is None:
      report.append((ops[0].op, "no producer to fold into: left as is"))
      continue
    st = cap.stats(cap.params, ops, hessian=False, max_sample=max_sample)
    s = choose(ops, [flat[o.kernel] for o in ops], st)
    new = fold_updates(cap, flat, ops, prod, s, where)
    if new is None:
      report.append((ops[0].op, f"producer {prod[1]!r} ({prod[0]}) does not fit: left as is"))
      continue
    trial = set_leaves(cur, new)
    if not _same(jit_out(trial), ref):
      report.append((ops[0].op, f"folding into {prod[1]!r} changes the model output "
                                 "(its output has other consumers): left as is"))
      continue
    cur = trial
    flat.update(new)
    report.append((ops[0].op, f"scaled, 1/s folded into {prod[0]} {prod[1]!r}"))
  if log is not None:
    for op, msg in report:
      log(f"{where}: {op}: {msg}")
  return cap, cur, report


def _nnx_params(module):
  from flax import nnx
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def smooth(apply_fn: Callable[..., Any], variables: Any, batches: Iterable[Any], *,
           alpha: float = 0.5, rules: Any = None, folds: Mapping[str, str] | None = None,
           max_batches: int | None = None, log: Callable[[str], Any] | None = None) -> Any:
  """SmoothQuant: returns variables with activation outliers migrated into the kernels.

  Args:
    apply_fn: ``apply_fn(variables, *inputs)`` (linen) or ``apply_fn(module, *inputs)``.
    variables: ``{"params": ...}`` or an ``nnx.Module`` (then the NNX pure params dict
      is returned; NNX producers are only found through ``folds``).
    batches: calibration inputs.
    alpha: migration strength in [0, 1] (0.5 in the paper).
    rules: which kernels (regex / sequence / predicate over params paths); default
      every ``Dense`` / ``DenseGeneral`` kernel.
    folds: ``{consumer op regex: producer op path (re.sub template)}`` for producers
      that the automatic LayerNorm / Dense detection cannot see.
    log: called with one line per round (what was folded where, or why not).

  Returns:
    ``{**variables, "params": smoothed}`` (linen) or the smoothed NNX params dict; the
    float model computes the same outputs (verified on a calibration batch). Then
    ``calibrate`` + ``quantize_params`` + ``int8_apply`` as usual.
  """
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
    raise ValueError(f"smooth: alpha must be in [0, 1], got {alpha!r}")

  def choose(ops, ws, st):
    wmax = jnp.max(jnp.stack([jnp.max(jnp.abs(kernel_2d(w, o.n_in)), axis=1)
                              for o, w in zip(ops, ws)]), axis=0)
    return smooth_scale(st.amax, wmax, float(alpha))

  cap, params, _ = scaled_rounds("smooth", apply_fn, variables, batches, rules=rules,
                                 folds=folds, max_batches=max_batches, choose=choose, log=log)
  if cap.nnx:
    return params
  return {**variables, "params": params}
