"""Leaf roles: what a parameter *is*, read off what consumes it in the traced program.

A Flax kernel, a ``DenseGeneral`` bias of shape ``(heads, head_dim)`` and an embedding
table all have ``ndim >= 2``; only the program tells them apart. :func:`trace` runs
``jax.make_jaxpr`` on ``apply_fn(variables, *inputs)`` and follows every parameter
leaf through layout-only ops (``convert_element_type``, ``transpose``, ``reshape``,
``broadcast_in_dim``, ``squeeze``, ``expand_dims``, ``copy``, sharding constraints,
and into ``jit``-ed sub-programs) to the ops that consume it:

* ``kernel``:    the weight operand of a ``dot_general`` / ``conv_general_dilated`` whose
                 other operand is not a parameter;
* ``embedding``: the table of a ``gather`` (a lookup), also when the same table feeds a
                 dot (tied logits, ``Embed.attend``);
* ``bias``:      added (``add`` / ``sub``) to an activation;
* ``scale``:     multiplied (``mul`` / ``div``) into an activation (norm scales);
* ``other``:     anything else (non-float leaves, leaves consumed by opaque ops).

For a kernel, ``contracting`` lists the leaf's own axes that the dot contracts
(``DenseGeneral(axis=(-2, -1))``'s ``(heads, head_dim, embed)`` kernel -> ``(0, 1)``,
``nnx.Einsum("BTD,DNH->BTNH")``'s kernel -> ``(0,)``, a HWIO conv kernel ->
``(0, 1, 2)``, ``Embed.attend``'s ``(vocab, embed)`` table -> ``(1,)``); N:M groups and
per-output-channel scales follow it. When only a path is available
(:func:`path_role`), a cheap name-based fallback is used instead.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore

from jaxopt_dnn import _tree

ROLES = ("kernel", "embedding", "bias", "scale", "other")
CONTRACTIONS = ("dot_general", "conv_general_dilated")
_LAYOUT = {"convert_element_type", "transpose", "reshape", "broadcast_in_dim", "squeeze",
           "expand_dims", "copy", "copy_p", "sharding_constraint", "reduce_precision",
           "mesh_cast", "reshard"}
_CALLS = {"pjit", "jit", "closed_call", "core_call", "remat", "checkpoint",
          "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"}
_REMAT = {"remat2"}   # jax.checkpoint / nn.remat bodies (followed by trace_roles)
_ADD = {"add", "sub", "add_any"}
_MUL = {"mul", "div"}


@dataclasses.dataclass(frozen=True)
class Consumer:
  """One op that consumes (a layout-only view of) a leaf.

  Attributes:
    primitive: e.g. ``"dot_general"``, ``"gather"``, ``"add"``.
    operand: which operand of the op the leaf is.
    contracting: the leaf's own axes contracted by this op (dot/conv), or None when the
      view went through a reshape that loses the axis correspondence.
    other_is_param: for a binary op, whether the other operand also derives from a leaf.
    in_features: a conv kernel's input-feature axis (as a 1-tuple of leaf axes).
    scanned: the leaf's axes that enclosing ``scan`` s slice away before this op (an
      ``nn.scan``-stacked kernel ``(depth, in, out)`` consumed per layer: ``(0,)``);
      ``contracting`` / ``in_features`` are axes of the whole (stacked) leaf.
  """

  primitive: str
  operand: int
  contracting: tuple[int, ...] | None = None
  other_is_param: bool = False
  in_features: tuple[int, ...] | None = None
  scanned: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class LeafRole:
  """Role of one leaf (see the module docstring) and its consumers."""

  path: str
  role: str
  consumers: tuple[Consumer, ...] = ()
  followers: tuple[str, ...] = ()
  index: int = -1
  program: Any = dataclasses.field(default=None, compare=False, repr=False)

  @property
  def channels(self) -> "ChannelGroup | None":
    """The :class:`ChannelGroup` of a kernel (computed on first use), else None."""
    if self.role != "kernel" or self.program is None:
      return None
    return self.program.group(self.index)

  @property
  def nm_axes(self) -> tuple[int, ...] | None:
    """Axes along which N:M groups run: a dot's contracted axes (row-major when several,
    as the kernel reshaped to 2-D sees them), a conv kernel's input-feature axis."""
    for c in self.consumers:
      if c.primitive in CONTRACTIONS and not c.other_is_param:
        return c.in_features if c.primitive == "conv_general_dilated" else c.contracting
    return None

  @property
  def contracting(self) -> tuple[int, ...] | None:
    """Contracted axes of the first dot/conv consuming this leaf as a weight."""
    for c in self.consumers:
      if c.primitive in CONTRACTIONS and not c.other_is_param and c.contracting is not None:
        return c.contracting
    return None

  @property
  def stacked(self) -> tuple[int, ...]:
    """Leaf axes that a ``scan`` slices before every dot/conv consuming the leaf as a
    weight (``nn.scan``-stacked layers: ``(0,)`` for ``(depth, in, out)``); ``()``
    when the leaf is used whole (or one of its uses is not inside such a scan)."""
    uses = [c.scanned for c in self.consumers
            if c.primitive in CONTRACTIONS and not c.other_is_param]
    if not uses or any(u != uses[0] for u in uses):
      return ()
    return uses[0]


# --------------------------------------------------------------------------- analysis
@dataclasses.dataclass(frozen=True)
class _Src:
  idx: int                        # which traced input
  perm: tuple[int, ...] | None    # leaf axis of each axis of this view (None: lost)
  scanned: tuple[int, ...] = ()   # leaf axes sliced away by enclosing scans


def _subjaxpr(eqn):
  for k in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    j = eqn.params.get(k)
    if j is None:
      continue
    if isinstance(j, jcore.ClosedJaxpr):
      return j.jaxpr
    if isinstance(j, jcore.Jaxpr):
      return j
  return None


def _layout(eqn, src: _Src) -> _Src:
  name = eqn.primitive.name
  if src.perm is None:
    return src
  if name == "transpose":
    return _Src(src.idx, tuple(src.perm[p] for p in eqn.params["permutation"]), src.scanned)
  if name in ("convert_element_type", "copy", "copy_p", "sharding_constraint",
              "reduce_precision", "mesh_cast", "reshard"):
    return src
  return _Src(src.idx, None, src.scanned)


def _contracted(eqn, operand: int, src: _Src) -> tuple[int, ...] | None:
  if src.perm is None:
    return None
  name = eqn.primitive.name
  if name == "dot_general":
    (lc, rc), _ = eqn.params["dimension_numbers"]
    axes = lc if operand == 0 else rc
  elif name == "conv_general_dilated" and operand == 1:
    dn = eqn.params["dimension_numbers"]
    out_feat = dn.rhs_spec[0]
    axes = [a for a in range(len(src.perm)) if a != out_feat]
  else:
    return None
  return tuple(sorted(src.perm[a] for a in axes))


def _in_features(eqn, operand: int, src: _Src) -> tuple[int, ...] | None:
  if src.perm is None or eqn.primitive.name != "conv_general_dilated" or operand != 1:
    return None
  return (src.perm[eqn.params["dimension_numbers"].rhs_spec[1]],)


def _scan(eqn, srcs, walk, out) -> None:
  """Follows leaves into a ``scan`` body: a const keeps its view; a scanned operand
  (``xs``) is seen per iteration without its leading axis, which is recorded in
  ``_Src.scanned`` (``nn.scan(variable_axes={"params": 0})`` stacks kernels this way).
  A leaf carried through the loop is an opaque consumer (its per-step value changes)."""
  body = eqn.params["jaxpr"].jaxpr
  nc, ncar = eqn.params["num_consts"], eqn.params["num_carry"]
  inner = {}
  for i, (v, s) in enumerate(zip(body.invars, srcs)):
    if s is None:
      continue
    if i < nc:
      inner[v] = s
    elif i < nc + ncar:
      out[s.idx].append((Consumer("scan", i, None, False), eqn))
    else:
      inner[v] = _Src(s.idx, None if s.perm is None else s.perm[1:],
                      s.scanned + ((s.perm[0],) if s.perm else ()))
  if inner:
    walk(body, inner)


def consumers(jaxpr: jcore.Jaxpr, sources: dict[int, int], *, through_all: bool = False,
              through_scan: bool = False) -> dict[int, list[tuple[Consumer, Any]]]:
  """Follows the invars ``{invar position: source id}`` of ``jaxpr`` to their consumers.

  Returns ``{source id: [(Consumer, eqn), ...]}``. Layout-only ops and call-like ops
  (``jit``, custom derivatives, remat) are followed, and with ``through_scan`` ``scan``
  and ``remat2`` (``nn.remat``) bodies too (otherwise they are opaque consumers, which is
  what the quantization interpreter, that does not enter them, needs); with
  ``through_all`` every op except
  a contraction or a ``gather`` whose variable operands all derive from the same
  source is followed too (dequantizing ``convert``/``mul`` by its own scale, int4
  unpacking), to find the contraction that finally consumes a quantized weight; an op
  that mixes the source with anything else (the rescale of an int8 accumulator) is not.
  """
  out: dict[int, list] = {s: [] for s in sources.values()}

  def walk(jx, env):
    for eqn in jx.eqns:
      srcs = [env.get(v) if isinstance(v, jcore.Var) else None for v in eqn.invars]
      if not any(s is not None for s in srcs):
        continue
      name = eqn.primitive.name
      sub = _subjaxpr(eqn)
      calls = _CALLS | {"custom_lin"} | (_REMAT if through_scan else set())
      if sub is not None and name in calls and len(sub.invars) == len(eqn.invars):
        inner = {v: s for v, s in zip(sub.invars, srcs) if s is not None}
        res = walk(sub, inner)
        for ov, r in zip(eqn.outvars, res):
          if r is not None:
            env[ov] = r
        continue
      if name == "scan" and through_scan:
        _scan(eqn, srcs, walk, out)
        continue
      if name in CONTRACTIONS or name == "gather":
        n_params = sum(s is not None for s in srcs[:2])
        for i, s in enumerate(srcs):
          if s is None:
            continue
          out[s.idx].append((Consumer(name, i, _contracted(eqn, i, s), n_params > 1,
                                      _in_features(eqn, i, s), s.scanned), eqn))
        continue
      if name in _LAYOUT and srcs[0] is not None:
        env[eqn.outvars[0]] = _layout(eqn, srcs[0])
        continue
      if through_all:   # follow ops computed from this source alone (dequantize, unpack)
        vars_ = [s for v, s in zip(eqn.invars, srcs) if isinstance(v, jcore.Var)]
        if all(s is not None and s.idx == vars_[0].idx for s in vars_):
          for ov in eqn.outvars:
            env[ov] = _Src(vars_[0].idx, None)
        continue
      others = sum(s is not None for s in srcs)
      for i, s in enumerate(srcs):
        if s is not None:
          out[s.idx].append((Consumer(name, i, None, others > 1), eqn))
    return [env.get(v) if isinstance(v, jcore.Var) else None for v in jx.outvars]

  env = {}
  for pos, sid in sources.items():
    v = jaxpr.invars[pos]
    env[v] = _Src(sid, tuple(range(len(getattr(v.aval, "shape", ())))))
  walk(jaxpr, env)
  return out


_AFFINE = {"add", "sub", "mul", "div", "add_any", "neg"} | _LAYOUT


def followers(jaxpr: jcore.Jaxpr, n: int) -> dict[int, set[int]]:
  """``{kernel input: {input leaves applied per channel to its output}}``.

  The output of a contraction whose weight is input ``k`` is followed through affine
  elementwise ops (add, sub, mul, div, layout ops, ``jit`` sub-programs); every input
  leaf combined with it on the way (a following BatchNorm's scale and bias, running
  statistics, a bias) is a follower of ``k``. A nonlinearity or another contraction ends
  the walk.
  """
  out: dict[int, set[int]] = {}

  def walk(jx, par, act):
    for eqn in jx.eqns:
      ins = [v if isinstance(v, jcore.Var) else None for v in eqn.invars]
      p_in = [par.get(v, frozenset()) if v is not None else frozenset() for v in ins]
      a_in = [act.get(v) if v is not None else None for v in ins]
      name = eqn.primitive.name
      sub = _subjaxpr(eqn)
      if sub is not None and name in _CALLS | _REMAT and len(sub.invars) == len(eqn.invars):
        ipar = {v: p for v, p in zip(sub.invars, p_in) if p}
        iact = {v: a for v, a in zip(sub.invars, a_in) if a is not None}
        rp, ra = walk(sub, ipar, iact)
        for ov, p_, a_ in zip(eqn.outvars, rp, ra):
          if p_:
            par[ov] = p_
          if a_ is not None:
            act[ov] = a_
        continue
      if name in CONTRACTIONS:
        w = [p for p in p_in[:2] if p and len(p) == 1]
        if len(w) == 1 and sum(bool(p) for p in p_in[:2]) == 1:
          act[eqn.outvars[0]] = next(iter(w[0]))
        continue
      tags = [a for a in a_in if a is not None]
      if tags and name in _AFFINE:
        k = tags[0]
        for p in p_in:
          out.setdefault(k, set()).update(p)
        act[eqn.outvars[0]] = k
        continue
      if not tags and any(p_in):
        merged = frozenset().union(*p_in)
        for ov in eqn.outvars:
          par[ov] = merged
    return ([par.get(v, frozenset()) if isinstance(v, jcore.Var) else frozenset()
             for v in jx.outvars],
            [act.get(v) if isinstance(v, jcore.Var) else None for v in jx.outvars])

  walk(jaxpr, {jaxpr.invars[i]: frozenset([i]) for i in range(n)}, {})
  return out


def classify(path: str, leaf: Any, cons: Sequence[Consumer]) -> str:
  """The role of a leaf from its consumers (see the module docstring)."""
  if not _tree.is_float_array(leaf):
    return "other"
  prims = {c.primitive for c in cons}
  if "gather" in {c.primitive for c in cons if c.operand == 0}:
    return "embedding"
  if any(c.primitive in CONTRACTIONS and not c.other_is_param for c in cons):
    return "kernel"
  if prims and prims <= _ADD | _LAYOUT:
    return "bias"
  if prims and prims <= _MUL | _ADD:
    return "scale" if prims & _MUL else "bias"
  return path_role(path, leaf) if not cons else "other"


# --------------------------------------------------------------------- channel groups
@dataclasses.dataclass(frozen=True)
class ChannelGroup:
  """What removing output channels of one kernel touches, read off the traced program.

  For a kernel ``W`` whose contraction has one output-feature axis (``axis``, ``size``
  channels: a ``Dense`` / ``Conv`` kernel's last axis), the output activation is
  followed, channel axis tracked, through elementwise ops, layout ops, reductions and
  pooling over other axes (``reduce_window`` with a unit window on the channel axis) and
  ``jit`` / custom-derivative sub-programs, until contractions that contract the
  channel axis consume it.

  Attributes:
    kernel: the kernel's path.
    axis, size: its output-channel axis and the number of channels.
    per_channel: ``((path, axis), ...)``: leaves applied per channel to the activation
      on the way (a BatchNorm's scale, bias, running mean and variance, a Dense bias),
      with the leaf axis that runs along the channels.
    consumers: ``((path, axis), ...)``: the next kernels and their input axis that
      contracts the channel.
    removable: whether removing a channel from ``kernel``, ``per_channel`` and
      ``consumers`` leaves the function unchanged once the kernel and its
      ``params``-collection ``per_channel`` leaves are masked: the removed channel is
      then exactly zero when every consumer reads it (``BN: (0 - mean) * rsqrt(var +
      eps) * 0 + 0 = 0`` with the scale and bias masked, in eval and train mode) and
      reaches nothing else.
    reason: why not, when ``removable`` is False: the channel is added to another
      activation (a residual connection: the skip would keep it), reduced over
      (LayerNorm), reshaped, reaches the program's output (a classifier head), or is
      not zero where a consumer reads it (``sigmoid(0) = 0.5``, a norm without scale).
  """

  kernel: str
  axis: int
  size: int
  per_channel: tuple[tuple[str, int], ...] = ()
  consumers: tuple[tuple[str, int], ...] = ()
  removable: bool = False
  reason: str = ""


@dataclasses.dataclass(frozen=True)
class _Act:            # the analysed kernel's output: channel on axis ``ch``
  ch: int
  zero: bool           # removed channels are exactly 0 here


@dataclasses.dataclass(frozen=True)
class _Par:            # derived from leaves and constants only
  axes: tuple          # per value axis: frozenset{(leaf, leaf axis)} running along it
  dnf: tuple           # per value axis: frozenset of clauses; zero along it when all the
                       # leaves of one clause are masked along their axis


_DATA = "data"         # derived from the model inputs (other activations)
_ZERO_UNARY = {"neg", "tanh", "sin", "tan", "asin", "atan", "sinh", "asinh", "atanh", "erf",
               "expm1", "log1p", "sign", "abs", "floor", "ceil", "round", "square", "sqrt",
               "cbrt", "stop_gradient", "real", "imag", "erf_inv", "relu"}
_ELEMENTWISE = _ZERO_UNARY | {"add", "sub", "mul", "div", "max", "min", "add_any", "exp",
                              "exp2", "log", "logistic", "rsqrt", "integer_pow", "pow",
                              "select_n", "cos", "atan2", "eq", "ne", "gt", "ge", "lt", "le",
                              "and", "or", "not", "is_finite", "nextafter", "rem", "clamp"}
_SAME = {"convert_element_type", "copy", "copy_p", "sharding_constraint", "reduce_precision",
         "mesh_cast", "reshard", "optimization_barrier"}
_REDUCE = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod"}
_WINDOW = {"reduce_window_max", "reduce_window_min", "reduce_window_sum"}


def _is_zero_literal(v) -> bool:
  return isinstance(v, jcore.Literal) and np.all(np.asarray(v.val) == 0)


def _shape(v) -> tuple[int, ...]:
  return tuple(getattr(v.aval, "shape", ()))


def _par_layout(eqn, p: _Par) -> _Par:
  """A leaf-derived value through a layout op (axis provenance kept where it can be)."""
  name, out = eqn.primitive.name, _shape(eqn.outvars[0])
  empty = (frozenset(),) * len(out)
  if name in _SAME:
    return p
  if name == "transpose":
    perm = eqn.params["permutation"]
    return _Par(tuple(p.axes[i] for i in perm), tuple(p.dnf[i] for i in perm))
  if name == "broadcast_in_dim":
    ax, dn = list(empty), list(empty)
    ins = _shape(eqn.invars[0])
    for i, d in enumerate(eqn.params["broadcast_dimensions"]):
      if ins[i] == out[d]:
        ax[d], dn[d] = p.axes[i], p.dnf[i]
    return _Par(tuple(ax), tuple(dn))
  if name in ("reshape", "squeeze", "expand_dims"):
    ins = _shape(eqn.invars[0])
    src = [i for i, d in enumerate(ins) if d != 1]
    dst = [i for i, d in enumerate(out) if d != 1]
    if [ins[i] for i in src] != [out[i] for i in dst]:
      return _Par(empty, empty)
    ax, dn = list(empty), list(empty)
    for i, j in zip(src, dst):
      ax[j], dn[j] = p.axes[i], p.dnf[i]
    return _Par(tuple(ax), tuple(dn))
  return _Par(empty, empty)


def _act_layout(eqn, a: _Act) -> _Act | str:
  """The kernel's output through a layout op, or the reason it cannot be followed."""
  name, out = eqn.primitive.name, _shape(eqn.outvars[0])
  ins = _shape(eqn.invars[0])
  if name in _SAME:
    return a
  if name == "transpose":
    return _Act(tuple(eqn.params["permutation"]).index(a.ch), a.zero)
  if name == "broadcast_in_dim":
    d = eqn.params["broadcast_dimensions"][a.ch]
    return _Act(d, a.zero) if out[d] == ins[a.ch] else "broadcast along the channel axis"
  if name in ("reshape", "squeeze", "expand_dims"):
    before, c = math.prod(ins[:a.ch]), ins[a.ch]
    for j in range(len(out)):
      if out[j] == c and math.prod(out[:j]) == before:
        return _Act(j, a.zero)
    return f"reshaped ({ins} -> {out}) so that the channel axis is merged"
  return f"{name}"


def _zero(name: str, eqn, states, zeros: list[bool]) -> bool:
  if name == "mul":
    return any(zeros)
  if name == "div":
    return zeros[0]
  if name == "select_n":
    return all(zeros[1:])
  if name == "integer_pow":
    return zeros[0] and eqn.params.get("y", 0) > 0
  if name in ("add", "sub", "add_any", "max", "min"):
    return all(zeros)
  if name in _ZERO_UNARY:
    return zeros[0]
  return False


def _channel_group(jaxpr: jcore.Jaxpr, n_leaves: int, k: int, paths: Sequence[str],
                   maskable: Callable[[int], bool]) -> ChannelGroup | None:
  """The :class:`ChannelGroup` of leaf ``k`` (None if no contraction uses it as a weight)."""
  per: set[tuple[int, int]] = set()
  cons: set[tuple[int, int]] = set()
  why: list[str] = []
  out_axis: set[tuple[int, int]] = set()    # (leaf axis, size) of k's output channels

  def holds(dnf) -> bool:
    return any(all(maskable(i) for i, _ in clause) for clause in dnf)

  def leaf_view(p, leaf_set=None):
    """``{value axis: leaf axis}`` when ``p`` views one leaf, else None."""
    if not isinstance(p, _Par):
      return None
    leaves = {i for ax in p.axes for i, _ in ax}
    if len(leaves) != 1 or any(len(ax) > 1 for ax in p.axes):
      return None
    return next(iter(leaves)), {d: next(iter(ax))[1] for d, ax in enumerate(p.axes) if ax}

  def start(eqn, states):
    """k as the weight of a contraction on data: its output channel axis."""
    name = eqn.primitive.name
    w = 1 if name == "conv_general_dilated" else next(
        (i for i in (0, 1) if isinstance(states[i], _Par)), None)
    if w is None or states[1 - w] != _DATA:
      return None
    view = leaf_view(states[w])
    if view is None or view[0] != k:
      return None
    vmap = view[1]
    wshape = _shape(eqn.invars[w])
    if name == "conv_general_dilated":
      dn = eqn.params["dimension_numbers"]
      wax, oax = dn.rhs_spec[0], dn.out_spec[1]
      if eqn.params.get("feature_group_count", 1) != 1 or eqn.params.get(
          "batch_group_count", 1) != 1:
        why.append("grouped convolution")
    else:
      (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
      c, b = (lc, lb) if w == 0 else (rc, rb)
      free = [d for d in range(len(wshape)) if d not in c and d not in b]
      if len(free) != 1:
        why.append(f"its contraction has {len(free)} output axes")
        return None
      oshape = _shape(eqn.invars[1 - w])
      ofree = len(oshape) - len((rc, lc)[w]) - len(lb)
      wax = free[0]
      oax = len(lb) + (free.index(wax) if w == 0 else ofree)
    if wax not in vmap:
      return None
    out_axis.add((vmap[wax], wshape[wax]))
    return _Act(oax, True)

  def walk(jx, env):
    for eqn in jx.eqns:
      st = [env.get(v) if isinstance(v, jcore.Var) else None for v in eqn.invars]
      name = eqn.primitive.name
      acts = [s for s in st if isinstance(s, _Act)]
      sub = _subjaxpr(eqn)
      if sub is not None and name in _CALLS | _REMAT | {"custom_lin"} and len(sub.invars) == len(st):
        res = walk(sub, {v: s for v, s in zip(sub.invars, st) if s is not None})
        for ov, r in zip(eqn.outvars, res):
          if r is not None:
            env[ov] = r
        continue
      if not acts:
        if name in CONTRACTIONS:
          a = start(eqn, st)
          if a is not None:
            env[eqn.outvars[0]] = a
            continue
        if any(s == _DATA for s in st):
          for ov in eqn.outvars:
            env[ov] = _DATA
          continue
        pars = [s for s in st if isinstance(s, _Par)]
        if not pars:
          continue
        if len(eqn.outvars) == 1 and name in _SAME | {"transpose", "broadcast_in_dim",
                                                      "reshape", "squeeze", "expand_dims"}:
          env[eqn.outvars[0]] = _par_layout(eqn, st[0]) if isinstance(st[0], _Par) else None
          continue
        out = _shape(eqn.outvars[0]) if eqn.outvars else ()
        empty = (frozenset(),) * len(out)
        if name in _ELEMENTWISE and len(eqn.outvars) == 1:
          ops = [s if isinstance(s, _Par) and len(s.axes) == len(out) else None for s in st]
          axes = tuple(frozenset().union(*[o.axes[d] for o in ops if o is not None])
                       for d in range(len(out)))
          dnf = []
          for d in range(len(out)):
            per_op = [o.dnf[d] if o is not None else
                      (frozenset([frozenset()]) if _is_zero_literal(v) else frozenset())
                      for o, v in zip(ops, eqn.invars)]
            if name == "mul":
              dnf.append(frozenset().union(*per_op))
            elif name == "div" or name in _ZERO_UNARY or name == "integer_pow":
              dnf.append(per_op[0])
            elif name in ("add", "sub", "add_any", "max", "min"):
              acc = per_op[0]
              for q in per_op[1:]:
                acc = frozenset(c1 | c2 for c1 in acc for c2 in q)
              dnf.append(acc)
            else:
              dnf.append(frozenset())
          env[eqn.outvars[0]] = _Par(axes, tuple(dnf))
        else:
          for ov in eqn.outvars:
            env[ov] = _Par((frozenset(),) * len(_shape(ov)), (frozenset(),) * len(_shape(ov)))
        continue
      # ------------------------------------------------ an op on k's output activation
      for ov in eqn.outvars:   # data unless the channel is followed into it below
        env[ov] = _DATA
      chs = {a.ch for a in acts}
      if len(chs) != 1:
        why.append(f"{name} combines the channel axis with another axis")
        continue
      a = acts[0]
      if name in CONTRACTIONS:
        i = next(j for j, s in enumerate(st) if isinstance(s, _Act))
        view = leaf_view(st[1 - i]) if len(st) > 1 else None
        ok = False
        if view is not None:
          leaf, vmap = view
          if name == "conv_general_dilated":
            dn = eqn.params["dimension_numbers"]
            if (i == 0 and a.ch == dn.lhs_spec[1]
                and eqn.params.get("feature_group_count", 1) == 1
                and dn.rhs_spec[1] in vmap):
              cons.add((leaf, vmap[dn.rhs_spec[1]]))
              ok = True
          else:
            (lc, rc), _ = eqn.params["dimension_numbers"]
            mine, other = (lc, rc) if i == 0 else (rc, lc)
            if a.ch in mine and other[list(mine).index(a.ch)] in vmap:
              cons.add((leaf, vmap[other[list(mine).index(a.ch)]]))
              ok = True
        if not ok:
          why.append(f"{name} uses the channel other than as a weight's contracted input")
        elif not a.zero:
          why.append(f"removed channels are not zero where {paths[leaf]} reads them")
        continue
      if len(eqn.outvars) == 1 and name in _SAME | {"transpose", "broadcast_in_dim",
                                                    "reshape", "squeeze", "expand_dims"}:
        r = _act_layout(eqn, a)
        if isinstance(r, str):
          why.append(r)
        else:
          env[eqn.outvars[0]] = r
        continue
      if name in _REDUCE:
        axes = eqn.params["axes"]
        if a.ch in axes:
          why.append(f"{name} reduces over the channels")
        else:
          env[eqn.outvars[0]] = _Act(a.ch - sum(d < a.ch for d in axes), a.zero)
        continue
      if name in _WINDOW:
        p = eqn.params
        if p["window_dimensions"][a.ch] != 1 or p["window_strides"][a.ch] != 1 or tuple(
            p["padding"][a.ch]) != (0, 0):
          why.append(f"{name} pools over the channels")
        else:
          env[eqn.outvars[0]] = a
        continue
      if name == "pad":
        cfg = eqn.params["padding_config"][a.ch]
        if tuple(cfg) != (0, 0, 0):
          why.append("pad along the channel axis")
        else:
          env[eqn.outvars[0]] = _Act(a.ch, a.zero and _is_zero_literal(eqn.invars[1]))
        continue
      if name in _ELEMENTWISE and len(eqn.outvars) == 1:
        zeros, bad = [], False
        for v, s in zip(eqn.invars, st):
          if isinstance(s, _Act):
            zeros.append(s.zero)
          elif s == _DATA:
            why.append(f"{name} combines it with another activation (e.g. a residual add)")
            bad = True
          elif isinstance(s, _Par):
            if len(s.axes) > a.ch and len(s.axes) == len(_shape(eqn.outvars[0])):
              per.update(s.axes[a.ch])
              zeros.append(holds(s.dnf[a.ch]))
            else:
              zeros.append(False)
          else:
            zeros.append(_is_zero_literal(v))
        if not bad:
          env[eqn.outvars[0]] = _Act(a.ch, _zero(name, eqn, st, zeros))
        continue
      why.append(f"{name}")
    return [env.get(v) if isinstance(v, jcore.Var) else None for v in jx.outvars]

  env = {}
  for i, v in enumerate(jaxpr.invars):
    if i < n_leaves:
      nd = len(_shape(v))
      env[v] = _Par(tuple(frozenset([(i, d)]) for d in range(nd)),
                    tuple(frozenset([frozenset([(i, d)])]) for d in range(nd)))
    else:
      env[v] = _DATA
  outs = walk(jaxpr, env)
  if not out_axis:
    return None
  if any(isinstance(o, _Act) for o in outs):
    why.append("its channels reach the program's output")
  if len(out_axis) != 1:
    return ChannelGroup(paths[k], -1, 0, reason="its uses have different output axes")
  (ax, size), = out_axis
  if not cons:
    why.append("no later contraction consumes the channels")
  per_ch = tuple(sorted((paths[i], d) for i, d in per if i != k))
  if any(i == k for i, _ in cons):
    why.append("it consumes its own output")
  return ChannelGroup(paths[k], ax, size, per_ch,
                      tuple(sorted((paths[i], d) for i, d in cons)),
                      not why, "; ".join(dict.fromkeys(why)))


class _Program:
  """The traced program behind a ``trace`` result; channel groups are computed lazily."""

  def __init__(self, jaxpr, n_leaves: int, paths: Sequence[str], maskable: Sequence[bool]):
    self.jaxpr, self.n, self.paths, self.maskable = jaxpr, n_leaves, list(paths), list(maskable)
    self.cache: dict[int, ChannelGroup | None] = {}

  def group(self, k: int) -> ChannelGroup | None:
    if k not in self.cache:
      self.cache[k] = _channel_group(self.jaxpr, self.n, k, self.paths,
                                     lambda i: self.maskable[i])
    return self.cache[k]


# --------------------------------------------------------------------------- public API
def _split_static(tree):
  leaves, treedef = jax.tree.flatten(tree)
  dyn = [i for i, x in enumerate(leaves) if isinstance(x, (jax.Array, np.ndarray, np.generic))]
  return leaves, treedef, dyn


def trace_roles(fn: Callable[..., Any], tree: Any, *args: Any,
                maskable: Callable[[str], bool] | None = None,
                **kwargs: Any) -> dict[str, LeafRole]:
  """Roles of the leaves of ``tree`` in ``fn(tree, *args, **kwargs)`` (traced, not run).

  Paths are those of :func:`jaxopt_dnn._tree.leaves_with_paths` on ``tree``.
  ``maskable(path)`` says which leaves pruning masks can zero (default: all; for linen
  variables only the ``params`` collection), which :attr:`LeafRole.channels` needs.
  """
  items = _tree.leaves_with_paths(tree)
  leaves, treedef = jax.tree.flatten(tree)
  rest = (args, kwargs)
  rleaves, rdef, dyn = _split_static(rest)

  def f(tree_leaves, dyn_leaves):
    rl = list(rleaves)
    for i, x in zip(dyn, dyn_leaves):
      rl[i] = x
    a, kw = jax.tree.unflatten(rdef, rl)
    return fn(jax.tree.unflatten(treedef, tree_leaves), *a, **kw)

  closed = jax.make_jaxpr(f)(leaves, [rleaves[i] for i in dyn])
  cons = consumers(closed.jaxpr, {i: i for i in range(len(leaves))}, through_scan=True)
  fol = followers(closed.jaxpr, len(leaves))
  paths = [p for p, _ in items]
  prog = _Program(closed.jaxpr, len(leaves), paths,
                  [True if maskable is None else bool(maskable(p)) for p in paths])
  out = {}
  for i, (p, x) in enumerate(items):
    cs = tuple(c for c, _ in cons[i])
    fs = tuple(items[j][0] for j in sorted(fol.get(i, ())) if j != i)
    out[p] = LeafRole(p, classify(p, x, cs), cs, fs, i, prog)
  return out


def trace(apply_fn: Any, variables: Any, *inputs: Any, **kwargs: Any) -> dict[str, LeafRole]:
  """Roles of every leaf of a linen model's ``variables`` or an NNX module's state.

  Args:
    apply_fn: ``model.apply`` (or any ``f(variables, *inputs)``), a linen ``nn.Module``
      (its ``apply`` is used), or an ``nnx.Module`` (then ``variables`` is ignored and
      may be None; paths are those of ``nnx.state(module)``).
    variables: the variables (``{"params": ..., "batch_stats": ...}``); boxed
      (``LogicallyPartitioned``) leaves are unboxed.
    *inputs, **kwargs: sample model inputs (only shapes/dtypes matter).

  Returns:
    ``{path: LeafRole}``; ``path`` is the leaf path in ``variables``
    (``"params/layer_0/query/kernel"``) or in the NNX state (``"blocks/0/q/kernel"``).
  """
  from jaxopt_dnn.model_adapter import adapt

  fn, tree, maskable = adapt(apply_fn, variables).trace_args()
  return trace_roles(fn, tree, *inputs, maskable=maskable, **kwargs)


def for_params(model: Any, *inputs: Any, **kwargs: Any) -> Callable[[Any], dict[str, LeafRole]]:
  """A callable ``params -> {path: LeafRole}`` for ``prune_optimizer(roles=...)``.

  ``model`` is a linen ``nn.Module`` (its other collections, e.g. ``batch_stats``, are
  taken from an abstract ``model.init(key, *inputs, **kwargs)``; nothing is computed) or
  an ``nnx.Module`` (traced as it is). ``inputs`` / ``kwargs`` are sample inputs and
  inference keyword arguments (``train=False``); only shapes and dtypes matter, and the
  callable works on abstract (traced) params.
  """
  import flax.linen as nn

  from jaxopt_dnn.model_adapter import adapt, is_module

  if not is_module(model):
    raise TypeError(f"roles.for_params: model must be a linen or NNX module, got "
                    f"{type(model).__name__}")

  def linen(module):
    def fn(params):
      keys = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
      shapes = jax.eval_shape(lambda: nn.unbox(module.init(keys, *inputs, **kwargs)))
      cols = {k: v for k, v in shapes.items() if k != "params"}
      return trace(module.apply, {"params": params, **cols}, *inputs, **kwargs)
    return fn

  return adapt(model).match(
      nnx=lambda module: (lambda params: trace(module, None, *inputs, **kwargs)),
      linen=linen)


def kernels(roles: dict[str, LeafRole], *, include: str | None = None) -> Callable[[str, Any], bool]:
  """A leaf predicate ``(path, leaf) -> bool`` choosing the leaves with role ``kernel``.

  It is accepted as ``rules=`` by every rule-driven transform (masks, ...). Paths may be
  given with or without the collection prefix (``params/``). ``include`` is an optional
  regex of extra leaves to choose whatever their role (e.g. ``"embedding"`` to prune or
  quantize embedding tables too).
  """
  chosen = {p for p, r in roles.items() if r.role == "kernel"}
  rel = {p.split("/", 1)[1] for p in chosen if "/" in p}
  rx = re.compile(include) if include else None

  def pred(path: str, leaf: Any) -> bool:
    del leaf
    return path in chosen or path in rel or bool(rx and rx.search(path))

  return pred


def lookup(roles: dict[str, LeafRole], path: str) -> LeafRole | None:
  """The role of ``path``, given with or without the collection prefix (``params/``)."""
  r = roles.get(path)
  if r is None:
    r = next((v for k, v in roles.items() if k.split("/", 1)[-1] == path), None)
  return r


def contracting_axes(roles: dict[str, LeafRole], path: str) -> tuple[int, ...] | None:
  """Contracted axes of the leaf at ``path`` (with or without the collection prefix)."""
  r = lookup(roles, path)
  return None if r is None else r.contracting


def path_role(path: str, leaf: Any) -> str:
  """Name-based fallback when no program is available (see :func:`jaxopt_dnn._tree.path_role`)."""
  return _tree.path_role(path, leaf)
