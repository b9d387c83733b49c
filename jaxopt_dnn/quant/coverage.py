"""The reports that say what really ran: :func:`coverage` (what consumed each quantized
weight in the *lowered* int8 serving program) and :func:`explain` (one line per leaf:
its rule and what its consumers compiled to). Tables render through
:func:`jaxopt_dnn._table.render`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import numpy as np

from jaxopt_dnn import _hlo, _table, _tree
from jaxopt_dnn import roles as _roles
from jaxopt_dnn.model_adapter import adapt
from jaxopt_dnn.quant import hooks
from jaxopt_dnn.quant import rules as _rules
from jaxopt_dnn.quant.qarray import is_qarray
from jaxopt_dnn.quant.serve import calibration_runner, int8_apply
from jaxopt_dnn.quant.stats import stats_tree


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
    rows = [(p, ", ".join(f"{r.primitive} {r.signature}" for r in rs) or "nothing (unused)")
            for p, rs in self.by_path().items()]
    table = _table.render(("weight", "consumed by (lowered HLO)"), rows)
    return (f"{table}\n{self.int8_ops} contraction(s) s8 x s8 -> s32, "
            f"{len(self.float_contractions())} quantized weight contraction(s) in float")


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
  model = adapt(apply_fn, variables if variables is not None else {"params": params})
  stats = stats_tree(calibration_runner(model.call, model.rebuild(), method="absmax",
                                        rules=rules, percentile=100.0, bits=bits)(inputs))
  cov = coverage(model.model, model.with_params(qparams), *inputs, calibration=stats,
                 rules=rules, bits=bits)
  prefix = model.prefix
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
