"""QAT, calibration and int8 serving of an unmodified Flax model (linen, NNX, or any
``f(variables, *inputs)``), and the coverage report that says what really ran.

Mechanism (:mod:`jaxopt_dnn.quant.hooks`): the model function is traced to a jaxpr and
re-evaluated with the selected weight leaves routed through a mode at every
``dot_general`` / ``conv_general_dilated`` that consumes them, so ``Dense``,
``DenseGeneral``, ``Conv``, ``Einsum``, ``Embed.attend``, attention projections, their
NNX counterparts and a user's own ``jnp.dot`` on a param are all covered. The user's
class is never edited (NNX: a clone's classes are swapped for quantizing subclasses, so
``qnet.fc(x)`` alone is quantized too, and the parameter paths stay the same).

Which leaves: with ``rules=None``, every leaf whose *name* says it is a contraction
weight (:func:`jaxopt_dnn._tree.default_prunable`: floating, ``ndim >= 2``, not a bias,
a norm scale or an embedding table), the same choice :func:`quantize_params` makes, so
QAT, calibration and serving agree by construction. Explicit rules match the leaf path
relative to the params collection (``layer_0/query/kernel``, ``embed/embedding``).

Activation ranges (float32 per-tensor ``absmax`` EMAs during QAT: ``a <- m a + (1-m)
max|x|``) live in the ``quant_stats`` collection (linen: ``{op...: {"input_amax": f32}}``)
or in :class:`QuantStat` variables (NNX, on the module owning the weight:
``quant_input_amax`` for a ``kernel``, ``quant_<leaf>_input_amax`` otherwise), never in
params or optimizer state. An op is named by its weight path with ``/kernel`` dropped.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import threading
import warnings
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxopt_dnn import _hlo, _table, _tree
from jaxopt_dnn import roles as _roles
from jaxopt_dnn.quant import hooks, modes
from jaxopt_dnn.quant import rules as _rules
from jaxopt_dnn.quant.qarray import dequantize, is_qarray

STATS = "quant_stats"
AMAX = "input_amax"


class QuantStat(nnx.Variable):
  """NNX variable type for float32 activation ranges (not a ``nnx.Param``)."""


_ACTIVE = threading.local()   # set while a hooked program is being traced


def _active() -> bool:
  return getattr(_ACTIVE, "n", 0) > 0


class _Tracing:
  def __enter__(self):
    _ACTIVE.n = getattr(_ACTIVE, "n", 0) + 1

  def __exit__(self, *exc):
    _ACTIVE.n -= 1


# --------------------------------------------------------------------------- selection
def _rule(rs, path: str, leaf: Any, bits: int):
  """The winning non-skip rule for a float weight leaf (``rules=None``: by name)."""
  if not _tree.is_float_array(leaf) or is_qarray(leaf):
    return None
  if rs is None:
    return _rules.QuantRule(".*", bits=bits) if _tree.default_prunable(path, leaf) else None
  r = _rules.rule_for_path(rs, path, bits=bits)
  return None if r is None or r.skip else r


def _serve_rule(rs, path: str, bits: int):
  r = _rules.QuantRule(".*", bits=bits) if rs is None else _rules.rule_for_path(rs, path, bits=bits)
  if r is None or r.skip:   # a QArray that no rule claims: weight-only (dequantized)
    return _rules.QuantRule(".*", bits=bits, act_bits=None)
  return r


def _split_variables(variables: Any):
  """Leaves (QArray leaves kept whole), their paths relative to ``params``, treedef."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(variables, is_leaf=is_qarray)
  has_params = isinstance(variables, dict) or hasattr(variables, "keys")
  has_params = has_params and "params" in variables
  paths, leaves = [], []
  for p, x in flat:
    s = _tree.path_str(p)
    if has_params:
      s = s[len("params/"):] if s.startswith("params/") else None
    paths.append(s)
    leaves.append(x)
  return leaves, paths, treedef


def _placeholder(x):
  if is_qarray(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  return x


# --------------------------------------------------------------------------- stats trees
def stats_tree(amax: dict[str, Any]) -> dict:
  """``{"a/b": v}`` -> ``{"a": {"b": {"input_amax": float32(v)}}}``."""
  out: dict = {}
  for op, v in amax.items():
    d = out
    for part in (op.split("/") if op else []):
      d = d.setdefault(part, {})
    d[AMAX] = jnp.asarray(v, jnp.float32)
  return out


_NNX_STAT = re.compile(r"(^|/)quant_(?:(?P<leaf>\w+?)_)?input_amax$")


def flat_stats(tree: Any) -> dict[str, Any]:
  """Inverse of :func:`stats_tree`; also accepts NNX ``QuantStat`` states / pure dicts
  (``fc/quant_input_amax`` -> op ``fc``; ``blk/quant_w_input_amax`` -> op ``blk/w``)."""
  if isinstance(tree, (dict, nnx.State)) and STATS in tree:
    tree = tree[STATS]
  out = {}
  for p, v in _tree.leaves_with_paths(tree):
    m = _NNX_STAT.search(p)
    if m:
      base = p[: m.start()]
      out["/".join(x for x in (base, m.group("leaf")) if x)] = v
    elif p == AMAX or p.endswith("/" + AMAX):
      out[p[: -len(AMAX)].rstrip("/")] = v
  return out


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
    leaves, paths, treedef = _split_variables(variables)
    mode = modes.Qat(stats, momentum=self.momentum, update=update, estimator=self.estimator)

    def make_weight(i, x, role):
      del role
      if paths[i] is None:
        return None
      r = _rule(self.rules, paths[i], x, self.bits)
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

    with _Tracing():
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
def _stat_attr(leaf: str) -> str:
  return "quant_input_amax" if leaf == "kernel" else f"quant_{leaf}_input_amax"


def _nnx_weights(module: nnx.Module):
  """``[(relative param path, owner, leaf name, op, rule)]`` of the hooked weights."""
  out = []
  for path, node in nnx.iter_graph(module):
    specs = getattr(node, "quant_specs", None) if isinstance(node, nnx.Module) else None
    if not specs:
      continue
    prefix = "/".join(str(p) for p in path)
    for leaf, op, rule in specs:
      out.append(("/".join(x for x in (prefix, leaf) if x), node, leaf, op, rule))
  return out


def _nnx_qat_call(self, base, args, kwargs):
  mode_cfg = self.quant_config
  weights = {p: (owner, leaf, op, rule) for p, owner, leaf, op, rule in _nnx_weights(self)}
  stats = {}
  update = {}
  for _, (owner, leaf, op, rule) in weights.items():
    stats[op] = getattr(owner, _stat_attr(leaf))[...]
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

  with _Tracing():
    y, new_rest = hooks.run(fn, pleaves, (args, kwargs, rest), make_weight, mode)
  nnx.update(self, new_rest)
  for _, (owner, leaf, op, rule) in weights.items():
    if op in mode.stats and update[op]:
      getattr(owner, _stat_attr(leaf))[...] = jnp.asarray(mode.stats[op], jnp.float32)
  return y


@functools.lru_cache(maxsize=None)
def _nnx_class(cls):
  def __call__(self, *args, **kwargs):
    if _active():
      return cls.__call__(self, *args, **kwargs)
    return _nnx_qat_call(self, cls, args, kwargs)

  return type(f"Quantized{cls.__name__}", (cls,), {"__call__": __call__})


def _nnx_install(model: nnx.Module, rs, bits, momentum, estimator) -> nnx.Module:
  model = nnx.clone(model)
  params = nnx.state(model, nnx.Param)
  chosen = {}
  for p, x in _tree.leaves_with_paths(params):
    r = _rule(rs, p, x, bits)
    if r is not None:
      chosen[p] = r
  if not chosen:
    raise ValueError("qat: no parameter matched the rules; candidates: "
                     + ", ".join(p for p, _ in _tree.leaves_with_paths(params)))
  owners: dict[str, list] = {}
  for p, r in chosen.items():
    owner, _, leaf = p.rpartition("/")
    owners.setdefault(owner, []).append((leaf, hooks.op_name(p), r))
  nodes = {"/".join(str(q) for q in path): node for path, node in nnx.iter_graph(model)
           if isinstance(node, nnx.Module)}
  for owner, specs in owners.items():
    node = nodes[owner]
    for leaf, _, _ in specs:
      setattr(node, _stat_attr(leaf), QuantStat(jnp.full((), -1.0, jnp.float32)))
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
  if isinstance(model, nnx.Module):
    return _nnx_install(model, rs, bits, momentum, estimator)
  if isinstance(model, nn.Module):
    return QatModel(model, rs, bits, momentum, estimator)
  raise TypeError(f"qat: expected a flax linen or nnx Module, got {type(model).__name__}")


def calibration_runner(apply_fn, variables, *, method, rules, percentile, bits=8):
  """Returns ``run(args) -> {op: batch statistic}`` for :func:`calibrate`."""
  rs = _rules.as_rules(rules, bits=bits)
  if isinstance(variables, nnx.Module):
    gd, params, rest = nnx.split(variables, nnx.Param, ...)
    pflat, pdef = jax.tree_util.tree_flatten_with_path(params)
    paths = [_tree.path_str(p) for p, _ in pflat]

    def fn(lv, r):
      a, rest_state = r
      return apply_fn(nnx.merge(gd, jax.tree.unflatten(pdef, lv), rest_state), *a)

    @jax.jit
    def run_nnx(pleaves, rest_state, args):
      mode = modes.Calib(method, percentile)
      with _Tracing():
        hooks.run(fn, pleaves, (args, rest_state), _calib_weight(rs, paths, bits), mode)
      return mode.reduce()

    pleaves = [x for _, x in pflat]
    return lambda args: run_nnx(pleaves, rest, args)

  leaves, paths, treedef = _split_variables(variables)

  @jax.jit
  def run(lv, args):
    mode = modes.Calib(method, percentile)
    with _Tracing():
      hooks.run(lambda v, a: apply_fn(jax.tree.unflatten(treedef, v), *a[0]), lv, (args,),
                _calib_weight(rs, paths, bits), mode)
    return mode.reduce()

  return lambda args: run(leaves, args)


def _calib_weight(rs, paths, bits):
  def make_weight(i, x, role):
    del role
    if paths[i] is None:
      return None
    r = _rule(rs, paths[i], x, bits)
    return None if r is None else hooks.Weight(hooks.op_name(paths[i]), r, x)
  return make_weight


def _serve(fn, leaves, paths, rest, rs, bits, amax):
  """Runs ``fn(leaves, rest)`` with the QArray leaves served through int8 contractions."""
  mode = modes.Serve(amax)

  def make_weight(i, x, role):
    del role
    if not is_qarray(x) or paths[i] is None:
      return None
    r = _serve_rule(rs, paths[i], bits)
    return hooks.Weight(hooks.op_name(paths[i]), r, dequantize(x), q=x)

  with _Tracing():
    out = hooks.run(fn, [_placeholder(x) for x in leaves], rest, make_weight, mode,
                    real_leaves=leaves)
  return out, mode


def _check_coverage(records, strict: bool, where: str = "int8_apply"):
  bad = sorted({f"{r.op} ({r.primitive}: {r.why})" for r in records
                if not r.int8 and r.why != "weight-only rule"})
  if not bad:
    return
  msg = (f"{where}: quantized weight(s) consumed by a float contraction: " + "; ".join(bad))
  if strict:
    raise ValueError(msg)
  warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _nnx_parts(model, qparams):
  gd, state = nnx.split(model)
  flat, sdef = jax.tree_util.tree_flatten_with_path(state)
  qmap = {p: q for p, q in _tree.leaves_with_paths(qparams, is_leaf=is_qarray) if is_qarray(q)}
  if not qmap:
    raise ValueError("int8_apply: qvariables has no QArray leaf; run "
                     "quantize_params(nnx.to_pure_dict(nnx.state(model, nnx.Param))) first")
  paths = [_tree.path_str(p) for p, _ in flat]
  fmap = {p: x for p, x in _tree.leaves_with_paths(qparams, is_leaf=is_qarray)}
  leaves = [qmap.get(p, fmap.get(p, x)) for p, (_, x) in zip(paths, flat)]
  return gd, sdef, leaves, paths, qmap


def int8_apply(model: Any, qvariables: Any, calibration: Any = None,
               *args, rules: Any = None, bits: int = 8, weight_only: bool = False,
               strict: bool = False, **kwargs):
  """Runs a linen or NNX ``model`` with QArray weights through real int8 ops.

  Every contraction (``dot_general`` / ``conv_general_dilated``) that consumes a
  :class:`QArray` weight whose rule has ``act_bits`` runs as ``s8 x s8 -> s32`` with the
  calibrated activation scale; every other consumer sees the dequantized weight. A
  quantized weight that ends up in a float contraction (e.g. its scale varies along
  the contracted axis, or it went through a reshape) is warned about, or raises with
  ``strict=True``. With ``weight_only=True`` every kernel is dequantized inside the
  (jitted) function and all ops are float: a memory win only.

  Args:
    model: the unmodified linen module (or ``model.apply``, or any
      ``f(variables, *args)``), or an NNX module (left untouched; a clone runs).
    qvariables: linen: ``{"params": quantize_params(params, rules), ...}``; NNX:
      ``quantize_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), rules)``.
    calibration: ``quant_stats`` tree from :func:`calibrate` or QAT (linen collection,
      NNX ``nnx.state(qat_model, QuantStat)``); default ``qvariables["quant_stats"]``;
      ``"dynamic"``: per-token dynamic activation scales computed inside each int8 op
      from its input (``max_k |x[t, k]| / 127`` per row; no calibration needed).
    *args, **kwargs: model inputs, as for ``model.apply``.
    rules: the rules used for :func:`quantize_params` (they carry ``act_bits``).
    strict: raise instead of warning when a quantized weight is consumed in float.
  """
  rs = _rules.as_rules(rules, bits=bits)
  if isinstance(model, nnx.Module):
    gd, sdef, leaves, paths, qmap = _nnx_parts(model, qvariables)
    if weight_only:
      return nnx.merge(gd, jax.tree.unflatten(sdef, [dequantize(x) if is_qarray(x) else x
                                                     for x in leaves]))(*args, **kwargs)
    if calibration is None:
      raise ValueError("int8_apply: no calibration; pass calibrate(...)'s quant_stats")

    def fn(lv, r):
      a, kw = r
      with _Tracing():
        return nnx.merge(gd, jax.tree.unflatten(sdef, lv))(*a, **kw)

    out, mode = _serve(fn, leaves, paths, (args, kwargs), rs, bits, _amax(calibration))
    _check_coverage(mode.records, strict)
    return out
  apply_fn = model.apply if isinstance(model, nn.Module) else model
  qmap = [q for q in jax.tree.leaves(qvariables, is_leaf=is_qarray) if is_qarray(q)]
  if not qmap:
    raise ValueError("int8_apply: qvariables has no QArray leaf; run quantize_params first")
  if weight_only:
    return apply_fn(_rules.dequantize_params(qvariables), *args, **kwargs)
  if calibration is None:
    calibration = qvariables.get(STATS) if isinstance(qvariables, dict) else None
    if calibration is None:
      raise ValueError("int8_apply: no calibration; pass calibrate(...)'s quant_stats")
  leaves, paths, treedef = _split_variables(qvariables)

  def fn(lv, r):
    a, kw = r
    return apply_fn(jax.tree.unflatten(treedef, lv), *a, **kw)

  out, mode = _serve(fn, leaves, paths, (args, kwargs), rs, bits, _amax(calibration))
  _check_coverage(mode.records, strict)
  return out


def _amax(calibration):
  """``flat_stats(calibration)``, or ``None`` (per-token dynamic scales) for "dynamic"."""
  if isinstance(calibration, str):
    if calibration != "dynamic":
      raise ValueError(f"int8_apply: calibration must be a quant_stats tree or 'dynamic', "
                       f"got {calibration!r}")
    return None
  return flat_stats(calibration)


# --------------------------------------------------------------------------- coverage
@dataclasses.dataclass(frozen=True)
class CoverageRow:
  """One instruction of the lowered serving program that consumes one quantized weight.

  Attributes:
    path: the weight's leaf path.
    primitive: ``dot_general`` / ``conv_general_dilated`` / ``gather``, or the HLO op
      where the weight's value meets an activation (``add``, ``multiply``...).
    signature: operand and result dtypes as lowered, ``"s8 x s8 -> s32"`` or e.g.
      ``"f32 x f32 -> f32"``.
    instruction: the HLO instruction (``computation/name``); a ``scan`` body's
      instruction appears once, whatever the number of layers it runs.
  """

  path: str
  primitive: str
  signature: str
  instruction: str = ""

  @property
  def int8(self) -> bool:
    return self.signature == "s8 x s8 -> s32"


@dataclasses.dataclass(frozen=True)
class Coverage:
  """Per quantized weight, the instructions of the lowered serving program consuming it.

  Attributes:
    rows: one :class:`CoverageRow` per (instruction, weight).
    weights: the quantized leaf paths.
    census: the dot/conv census of the same lowered HLO
      (:func:`jaxopt_dnn._hlo.census_from_hlo`).
  """

  rows: tuple[CoverageRow, ...]
  weights: tuple[str, ...]
  census: Any = None

  def by_path(self) -> dict[str, list[CoverageRow]]:
    out: dict[str, list[CoverageRow]] = {p: [] for p in self.weights}
    for r in self.rows:
      out[r.path].append(r)
    return out

  @property
  def int8_ops(self) -> int:
    """Distinct ``s8 x s8 -> s32`` contractions of the lowered program fed by a
    quantized weight (a ``scan`` body's contraction counts once, as in the census)."""
    return len({r.instruction for r in self.rows if r.int8})

  @property
  def unattributed_int8(self) -> int:
    """``s8 x s8 -> s32`` contractions of the census that no quantized weight feeds
    (0 unless the program quantizes something else, e.g. a user's own int8 matmul)."""
    if self.census is None:
      return 0
    return self.census.count("s8", "s8", "s32") - self.int8_ops

  def float_contractions(self) -> list[CoverageRow]:
    """Contractions that consumed a quantized weight in float."""
    return [r for r in self.rows if r.primitive in _roles.CONTRACTIONS and not r.int8]

  def __str__(self) -> str:
    lines = []
    w = max([len("weight")] + [len(p) for p in self.weights])
    lines.append(f"{'weight':<{w}}  consumed by (lowered HLO)")
    for p, rows in self.by_path().items():
      what = ", ".join(f"{r.primitive} {r.signature}" for r in rows) or "nothing (unused)"
      lines.append(f"{p:<{w}}  {what}")
    lines.append(f"{self.int8_ops} contraction(s) s8 x s8 -> s32, "
                 f"{len(self.float_contractions())} quantized weight contraction(s) in float")
    return "\n".join(lines)


_HLO_PRIM = {"dot": "dot_general", "convolution": "conv_general_dilated"}


def coverage(apply_fn: Any, qvariables: Any, *inputs: Any, calibration: Any = None,
             rules: Any = None, bits: int = 8, **kwargs) -> Coverage:
  """What consumed each quantized weight in the *lowered* int8 serving program.

  The serving function (``int8_apply(apply_fn, ...)``) is jitted and lowered with the
  QArray children as program parameters (``keep_unused=True``: parameter ``k`` is the
  ``k``-th flattened argument); every instruction of the lowered HLO that those
  parameters reach (through converts, dequantizing multiplies, layouts, ``call``s,
  ``while`` bodies of ``scan``; :func:`jaxopt_dnn._hlo.trace_sources`) is a row, with
  the dtypes it was lowered with. So a branch the program drops (an output the caller
  discards) is not counted, a ``scan`` body's contraction is counted once (as the
  census counts it), and nothing is taken from the rules or from what the interceptor
  intended: ``coverage(...).int8_ops`` is the number of the census's
  ``s8 x s8 -> s32`` contractions fed by a quantized weight, and equals
  ``int8_dot_census(...).lowered.count("s8", "s8", "s32")`` on the same call whenever
  ``unattributed_int8 == 0``.

  Args:
    apply_fn: a linen module / ``model.apply`` / ``f(variables, *inputs)`` (serve
      exactly what is served: e.g. ``lambda v, x: model.apply(v, x)[0]``), or an NNX
      module (then ``qvariables`` is its quantized pure param dict).
    qvariables, calibration, rules, bits: as for :func:`int8_apply`.
    *inputs, **kwargs: sample inputs of the serving call (array inputs are parameters of
      the program, the others static).
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(qvariables, is_leaf=is_qarray)
  qpos = [i for i, (_, x) in enumerate(flat) if is_qarray(x)]
  names = [_tree.path_str(flat[i][0]) for i in qpos]
  sources, pos = {}, 0
  for k, (_, x) in enumerate(flat):
    if is_qarray(x):
      qi = qpos.index(k)
      for key, child in (("value", x.value), ("scale", x.scale),
                         ("zero_point", x.zero_point), ("super_scale", x.super_scale)):
        if child is not None:
          sources[pos] = (qi, "value" if key == "value" else "scale")
          pos += 1
    else:
      pos += len(jax.tree.leaves(x))
  ileaves, idef = jax.tree.flatten(inputs)
  dyn = [i for i, x in enumerate(ileaves) if hooks.is_array(x)]

  def serve(qv, dl):
    il = list(ileaves)
    for i, x in zip(dyn, dl):
      il[i] = x
    return int8_apply(apply_fn, qv, calibration, *jax.tree.unflatten(idef, il),
                      rules=rules, bits=bits, **kwargs)

  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    lowered = jax.jit(serve, keep_unused=True).lower(
        jax.tree.unflatten(treedef, [x for _, x in flat]), [ileaves[i] for i in dyn])
  text = lowered.as_text(dialect="hlo")
  rows = []
  for use in _hlo.trace_sources(text, sources):
    for ids in use.sources:
      owner = _hlo._owner(ids)   # noqa: SLF001
      if owner is None or (owner, "value") not in ids:
        continue
      rows.append(CoverageRow(names[owner], _HLO_PRIM.get(use.op, use.op), use.signature,
                              f"{use.computation}/{use.name}"))
  rows = list(dict.fromkeys(rows))   # one row per (instruction, weight)
  return Coverage(tuple(rows), tuple(names), _hlo.census_from_hlo(text))


# --------------------------------------------------------------------------- explain
def explain(params: Any, rules: Any = None, *, bits: int = 8, print_fn=print,
            apply_fn: Any = None, inputs: tuple = (), variables: Any = None) -> str:
  """One line per leaf: path, shape, winning rule, and what will run.

  Without ``apply_fn`` this is :func:`jaxopt_dnn.quant.rules.explain` (the rules'
  request, marked as such). With ``apply_fn`` (a linen module / ``model.apply`` /
  ``f(variables, *inputs)``, or the NNX module whose pure param dict is ``params``) and
  sample ``inputs``, the params are quantized, ranges calibrated on ``inputs``, the int8
  serving program traced, and the action column says what each quantized leaf's
  consumers compiled to (:func:`coverage`): ``int8 per-channel; dot_general s8 x s8 ->
  s32`` or ``int8 storage; dot_general f32 x f32 -> f32 (float)``.

  Args:
    variables: linen only: the full variables (``{"params": ..., "batch_stats": ...}``)
      when the model reads more than ``params``.
  """
  if apply_fn is None:
    return _rules.explain(params, rules, bits=bits, print_fn=print_fn)
  inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
  qparams = _rules.quantize_params(params, rules, bits=bits)
  if isinstance(apply_fn, nnx.Module):
    stats = stats_tree(calibration_runner(lambda m, *a: m(*a), apply_fn, method="absmax",
                                          rules=rules, percentile=100.0, bits=bits)(inputs))
    cov = coverage(apply_fn, qparams, *inputs, calibration=stats, rules=rules, bits=bits)
    prefix = ""
  else:
    v = dict(variables) if variables is not None else {"params": params}
    fn = apply_fn.apply if isinstance(apply_fn, nn.Module) else apply_fn
    stats = stats_tree(calibration_runner(fn, v, method="absmax", rules=rules,
                                          percentile=100.0, bits=bits)(inputs))
    cov = coverage(fn, {**v, "params": qparams}, *inputs, calibration=stats, rules=rules,
                   bits=bits)
    prefix = "params/"
  used = cov.by_path()
  rows = []
  for p, x, r in _rules.resolve(params, rules, bits=bits):
    pat = "-" if r is None else repr(r.pattern)
    if r is None or r.skip:
      action = "float"
    else:
      cons = used.get(prefix + p, [])
      g = r.granularity if isinstance(r.granularity, str) else f"axes {r.granularity}"
      what = ", ".join(f"{c.primitive} {c.signature}" for c in cons) or "unused"
      kind = ("int8" if any(c.int8 for c in cons) else "float") if any(
          c.primitive in _roles.CONTRACTIONS for c in cons) else "no contraction"
      action = f"int{r.bits} per-{g} storage; {what} ({kind})"
    rows.append((p, str(tuple(np.shape(x))), pat, action))
  text = _table.render(("path", "shape", "rule", "compiled"), rows)
  if print_fn is not None:
    print_fn(text)
  return text
