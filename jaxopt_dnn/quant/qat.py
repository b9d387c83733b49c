"""Quantization-aware training of an unmodified Flax model (linen or NNX).

Mechanism (:mod:`jaxopt_dnn.quant.hooks`): the model function is traced to a jaxpr and
re-evaluated with the selected weight leaves (:mod:`jaxopt_dnn.quant.select`) routed
through :class:`~jaxopt_dnn.quant.modes.Qat` at every ``dot_general`` /
``conv_general_dilated`` that consumes them, so ``Dense``, ``DenseGeneral``, ``Conv``,
``Einsum``, ``Embed.attend``, attention projections, their NNX counterparts and a user's
own ``jnp.dot`` on a param are all covered. The user's class is never edited (NNX: a
clone's classes are swapped for quantizing subclasses, so ``qnet.fc(x)`` alone is
quantized too, and the parameter paths stay the same).

Activation ranges (float32 per-tensor ``absmax`` EMAs: ``a <- m a + (1-m) max|x|``) live
in the ``quant_stats`` collection (linen) or in :class:`~jaxopt_dnn.quant.stats.QuantStat`
variables (NNX); see :mod:`jaxopt_dnn.quant.stats`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxopt_dnn import _tree, model_adapter
from jaxopt_dnn.quant import hooks, modes
from jaxopt_dnn.quant import rules as _rules
from jaxopt_dnn.quant.select import split_variables, weight_rule
from jaxopt_dnn.quant.stats import STATS, QuantStat, flat_stats, stat_attr, stats_tree


# --------------------------------------------------------------------------- linen QAT
@dataclasses.dataclass(frozen=True)
class QatModel:
  """A linen model run with W8A8 (per rules) fake-quant; same ``init``/``apply`` API.

  Train with ``apply({"params": p, "quant_stats": s, ...}, x, mutable=["quant_stats"])``
  (ranges updated as EMAs); evaluate without ``mutable`` (ranges frozen). Other
  collections (``batch_stats``...) pass through; list them in ``mutable`` as usual.
  """

  model: Any
  rules: tuple | None = None
  bits: int = 8
  momentum: float = 0.99
  estimator: str = "ste"

  def _apply_fn(self):
    return self.model.apply if isinstance(self.model, nn.Module) else self.model

  def _run(self, variables, args, kwargs, mutable, stats, update):
    leaves, paths, treedef = split_variables(variables)
    mode = modes.Qat(stats, momentum=self.momentum, update=update, estimator=self.estimator)

    def make_weight(i, x, role):
      del role
      if paths[i] is None:
        return None
      r = weight_rule(self.rules, paths[i], x, self.bits)
      if r is None:
        return None
      op = hooks.op_name(paths[i])
      val, q = modes.fq_weight(x, r, op, paths[i])
      return hooks.Weight(op, r, val, raw=x, q=q)

    apply_fn = self._apply_fn()

    def fn(lv, rest):
      a, kw = rest
      v = jax.tree.unflatten(treedef, lv)
      if mutable:
        return apply_fn(v, *a, mutable=mutable, **kw)
      return apply_fn(v, *a, **kw)

    with hooks.tracing():
      out = hooks.run(fn, leaves, (args, kwargs), make_weight, mode)
    return out, mode

  def init(self, rngs, *args, **kwargs):
    """``model.init`` plus the ``quant_stats`` of the first batch (its absmax)."""
    variables = dict(self.model.init(rngs, *args, **kwargs))
    kw = {k: v for k, v in kwargs.items() if k != "mutable"}
    if isinstance(self.model, nn.Module):
      # The ranges pass runs the model once more: with init's keys for every rng stream it
      # draws (dropout on by config, as in flax's lm1b; other names fall back to "params").
      kw.setdefault("rngs", dict(rngs) if isinstance(rngs, Mapping) else {"params": rngs})
    variables[STATS] = self._stats_from(variables, args, kw)
    return variables

  def _stats_from(self, variables, args, kwargs):
    _, mode = self._run(variables, args, kwargs, False, {}, True)
    return stats_tree(mode.stats)

  def apply(self, variables, *args, mutable: Any = False, **kwargs):
    variables = dict(variables)
    stats = variables.pop(STATS, None)
    if mutable is True:
      update, inner = True, True
    elif not mutable:
      update, inner = False, False
    else:
      mut = [mutable] if isinstance(mutable, str) else list(mutable)
      update = STATS in mut
      inner = [m for m in mut if m != STATS] or False
    if stats is None and not update:
      raise ValueError(f"QatModel.apply: no activation ranges in {STATS!r}; pass the "
                       f"collection (from init/init_stats/calibrate) or apply with "
                       f"mutable=[{STATS!r}]")
    out, mode = self._run(variables, args, kwargs, inner, flat_stats(stats or {}), update)
    if not update:
      return out
    new = {STATS: stats_tree(mode.stats)}
    if inner:
      out, state = out
      return out, {**dict(state), **new}
    return out, new

  def init_stats(self, variables, *args, **kwargs) -> dict:
    """Initial ``quant_stats`` from one batch (activation absmax of the QAT model).

    Args:
      variables: the params tree, or a full variables dict (``{"params": ...,
        "batch_stats": ...}``: every collection the model reads).
      *args, **kwargs: one batch of model inputs; ``kwargs`` are closed over (static).
    """
    if not (isinstance(variables, dict) and "params" in variables):
      variables = {"params": variables}
    run = jax.jit(lambda v, a: self._stats_from(v, a, kwargs))
    return run(dict(variables), args)


# --------------------------------------------------------------------------- NNX
def _nnx_weights(module: nnx.Module):
  """``[(relative param path, owner, leaf name, op, rule)]`` of the hooked weights."""
  out = []
  for prefix, node in model_adapter.modules(module).items():
    specs = getattr(node, "quant_specs", None)
    if not specs:
      continue
    for leaf, op, rule in specs:
      out.append(("/".join(x for x in (prefix, leaf) if x), node, leaf, op, rule))
  return out


def _nnx_qat_call(self, base, args, kwargs):
  mode_cfg = self.quant_config
  weights = {p: (owner, leaf, op, rule) for p, owner, leaf, op, rule in _nnx_weights(self)}
  stats = {}
  update = {}
  for _, (owner, leaf, op, rule) in weights.items():
    stats[op] = getattr(owner, stat_attr(leaf))[...]
    update[op] = not getattr(owner, "use_running_average", False)
  gd, params, rest = nnx.split(self, nnx.Param, ...)
  pflat, pdef = jax.tree_util.tree_flatten_with_path(params)
  ppaths = [_tree.path_str(p) for p, _ in pflat]
  pleaves = [x for _, x in pflat]
  mode = modes.Qat(stats, momentum=mode_cfg[0], update=any(update.values()),
                   estimator=mode_cfg[1])

  def make_weight(i, x, role):
    del role
    w = weights.get(ppaths[i])
    if w is None:
      return None
    _, _, op, rule = w
    val, q = modes.fq_weight(x, rule, op, ppaths[i])
    return hooks.Weight(op, rule, val, raw=x, q=q)

  def fn(lv, r):
    a, kw, rest_state = r
    m = nnx.merge(gd, jax.tree.unflatten(pdef, lv), rest_state)
    y = base.__call__(m, *a, **kw)
    return y, nnx.split(m, nnx.Param, ...)[2]

  with hooks.tracing():
    y, new_rest = hooks.run(fn, pleaves, (args, kwargs, rest), make_weight, mode)
  nnx.update(self, new_rest)
  for _, (owner, leaf, op, rule) in weights.items():
    if op in mode.stats and update[op]:
      getattr(owner, stat_attr(leaf))[...] = jnp.asarray(mode.stats[op], jnp.float32)
  return y


@functools.lru_cache(maxsize=None)
def _nnx_class(cls):
  def __call__(self, *args, **kwargs):
    if hooks.active():
      return cls.__call__(self, *args, **kwargs)
    return _nnx_qat_call(self, cls, args, kwargs)

  return type(f"Quantized{cls.__name__}", (cls,), {"__call__": __call__})


def _nnx_install(model: nnx.Module, rs, bits, momentum, estimator) -> nnx.Module:
  model = nnx.clone(model)
  params = nnx.state(model, nnx.Param)
  chosen = {}
  for p, x in _tree.leaves_with_paths(params):
    r = weight_rule(rs, p, x, bits)
    if r is not None:
      chosen[p] = r
  if not chosen:
    raise ValueError("qat: no parameter matched the rules; candidates: "
                     + ", ".join(p for p, _ in _tree.leaves_with_paths(params)))
  owners: dict[str, list] = {}
  for p, r in chosen.items():
    owner, _, leaf = p.rpartition("/")
    owners.setdefault(owner, []).append((leaf, hooks.op_name(p), r))
  nodes = model_adapter.modules(model)
  for owner, specs in owners.items():
    node = nodes[owner]
    for leaf, _, _ in specs:
      setattr(node, stat_attr(leaf), QuantStat(jnp.full((), -1.0, jnp.float32)))
    node.quant_specs = tuple(specs)
    if not hasattr(node, "use_running_average"):
      node.use_running_average = False
  prefixes = {""}
  for owner in owners:   # the owners and every module above them get the quantizing call
    parts = owner.split("/") if owner else []
    prefixes.update("/".join(parts[:k]) for k in range(len(parts) + 1))
  for path, node in nodes.items():
    if (path in prefixes and not isinstance(node, (nnx.Dict, nnx.List))
        and callable(getattr(type(node), "__call__", None))):
      node.__class__ = _nnx_class(type(node))
      node.quant_config = (momentum, estimator)
  return model


# --------------------------------------------------------------------------- API
def qat(model: Any, rules: Any = None, *, bits: int = 8, momentum: float = 0.99,
        estimator: str = "ste"):
  """Quantization-aware training wrapper for an unmodified Flax model.

  Args:
    model: a linen ``nn.Module`` (returns a :class:`QatModel` with ``init``/``apply``)
      or an ``nnx.Module`` (returns a quantizing clone; its ranges are
      :class:`QuantStat` variables, updated in ``model.train()`` mode, frozen after
      ``model.eval()``).
    rules: see :mod:`jaxopt_dnn.quant.rules` (default: W8A8 per-channel on every leaf
      named like a contraction weight: no biases, norm scales or embedding tables).
    momentum: EMA momentum ``m`` of the activation ranges.
    estimator: ``"ste"`` (default): float fake-quant, straight-through gradients inside
      the clip range. ``"int8_forward"``: every quantized contraction runs
      s8 x s8 -> s32 in the forward pass, gradients at the original float operands
      (AQT/qwix "original residuals"; a different gradient than ``"ste"``).
  """
  rs = _rules.as_rules(rules, bits=bits)
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f"qat: momentum must be in [0, 1), got {momentum!r}")
  if estimator not in ("ste", "int8_forward"):
    raise ValueError(f"qat: estimator must be 'ste' or 'int8_forward', got {estimator!r}")
  if not model_adapter.is_module(model):
    raise TypeError(f"qat: expected a flax linen or nnx Module, got {type(model).__name__}")
  return model_adapter.adapt(model).match(
      nnx=lambda m: _nnx_install(m, rs, bits, momentum, estimator),
      linen=lambda m: QatModel(m, rs, bits, momentum, estimator))
