"""Quantization by interception at the contraction level: every weight-consuming
``dot_general`` / ``conv_general_dilated`` of any JAX function, whatever module wrote it.

The model function (``model.apply`` for linen, ``merge(graphdef, state)(...)`` for NNX,
or any ``f(variables, *inputs)``) is traced once with ``jax.make_jaxpr`` and the jaxpr is
re-evaluated by :func:`evaluate`. The selected weight leaves enter the evaluation as
:class:`Weight` values; layout-only ops (``convert_element_type``, ``transpose``, sharding
constraints) are applied to them lazily, and ``jit``-ed sub-programs (``jnp.einsum``...)
are entered, and a ``scan`` (``nn.scan`` / ``nnx.scan`` layer stacks) is re-issued with
its body evaluated the same way, a stacked weight sliced per layer (:func:`_scan`).
When a ``dot_general`` / ``conv_general_dilated`` consumes a
:class:`Weight`, the *mode* (a :class:`Mode`) decides what runs: QAT fake-quant,
calibration, ``s8 x s8 -> s32`` serving (:mod:`jaxopt_dnn.quant.modes`), or the
post-training capture's Gram / statistics (:mod:`jaxopt_dnn.quant.hessian`). This module
is the interpreter only: :func:`evaluate`, scan handling, :class:`Weight`,
:class:`Record`, the :class:`Mode` base and the driver :func:`run`.

Every other consumer (an embedding ``gather``, an add, a ``while`` body...) sees the
weight's float value: the fake-quantized weight in QAT, the dequantized one in serving,
so QAT and serving treat every leaf, embedding tables included, the same way. This
covers ``Dense``, ``DenseGeneral``, ``Conv``, ``Einsum``, ``Embed.attend``, attention
projections, ``nnx.Linear`` / ``LinearGeneral`` / ``Einsum`` / ``Conv`` and a user's own
``jnp.dot`` on a param in one place. What actually ran is recorded per op in
``mode.records`` (and independently checked by :func:`jaxopt_dnn.quant.coverage`).

An op is named by its weight leaf's path relative to the params collection, with a
trailing ``/kernel`` dropped (``layer_0/query``, ``w_in``, ``embed/embedding``); all
consumers of one leaf share one activation range.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from jaxopt_dnn import roles as _roles
from jaxopt_dnn.quant.qarray import QArray, int_values

_Q_LAYOUT = ("convert_element_type", "transpose", "copy", "copy_p", "sharding_constraint",
             "reduce_precision")
_RECURSE = ("pjit", "jit", "closed_call", "core_call", "remat", "remat2", "checkpoint")


def op_name(kernel_path: str) -> str:
  """``"layer_0/query/kernel"`` -> ``"layer_0/query"``; other leaves keep their path."""
  if kernel_path == "kernel":
    return ""
  return kernel_path[: -len("/kernel")] if kernel_path.endswith("/kernel") else kernel_path


@dataclasses.dataclass
class Weight:
  """A selected weight leaf in flight through :func:`evaluate`.

  Attributes:
    op: op name (stats key).
    rule: the winning :class:`~jaxopt_dnn.quant.rules.QuantRule`.
    val: float value seen by non-contraction consumers (fake-quantized / dequantized).
    raw: the unquantized float value (QAT), or None.
    q: a :class:`QArray` view with the same layout as ``val``, or None when a layout op
      could not be applied to the codes (then contractions run in float).
    axes: when tracked (set by the caller, e.g. ``tuple(range(ndim))`` for the leaf
      itself), the leaf axis of each axis of ``val`` (follows transposes and dtype
      casts; None after a reshape/broadcast).
  """

  op: str
  rule: Any
  val: Any
  raw: Any = None
  q: QArray | None = None
  axes: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Record:
  """What one contraction consuming a quantized weight ran as."""

  op: str
  primitive: str
  int8: bool
  why: str = ""


def _transpose_q(q: QArray | None, perm) -> QArray | None:
  if q is None or q.zero_point is not None or np.ndim(q.scale) != len(q.shape):
    return None
  codes = int_values(q)
  inv = {p: i for i, p in enumerate(perm)}
  return QArray(jnp.transpose(codes, perm), jnp.transpose(q.scale, perm), None, bits=8,
                channel_axes=sorted(inv[a] for a in q.channel_axes),
                shape=tuple(q.shape[p] for p in perm), dtype=q.dtype, name=q.name,
                super_scale=q.super_scale)


def bind(eqn, invals):
  params = eqn.primitive.get_bind_params(eqn.params)
  with eqn.ctx.manager:
    return eqn.primitive.bind(*invals, **params)


def _layout(eqn, w: Weight, rest) -> Weight:
  val = bind(eqn, [w.val, *rest])
  raw = None if w.raw is None else bind(eqn, [w.raw, *rest])
  name = eqn.primitive.name
  axes = None
  if name == "transpose":
    q = _transpose_q(w.q, eqn.params["permutation"])
    if w.axes is not None:
      axes = tuple(w.axes[p] for p in eqn.params["permutation"])
  elif name in _Q_LAYOUT:
    q, axes = w.q, w.axes
  else:
    q = None
  return Weight(w.op, w.rule, val, raw, q, axes)


def _sub(eqn):
  for k in ("jaxpr", "call_jaxpr"):
    j = eqn.params.get(k)
    if isinstance(j, jcore.ClosedJaxpr):
      return j.jaxpr, j.consts
    if isinstance(j, jcore.Jaxpr):
      return j, ()
  return None


def evaluate(jaxpr: jcore.Jaxpr, consts, args, mode) -> list:
  """Evaluates ``jaxpr`` with :class:`Weight` inputs routed through ``mode`` (see module doc)."""
  env: dict = {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    entered = False
    invals = [read(v) for v in eqn.invars]
    is_w = [isinstance(x, Weight) for x in invals]
    name = eqn.primitive.name
    if not any(is_w):
      out = bind(eqn, invals)
    elif name in _roles.CONTRACTIONS:
      out = mode.contract(eqn, invals)
    elif name in _roles._LAYOUT and is_w[0] and not any(is_w[1:]):   # noqa: SLF001
      out = _layout(eqn, invals[0], invals[1:])
    elif name in _RECURSE and _sub(eqn) is not None:
      sub, sub_consts = _sub(eqn)
      out = evaluate(sub, sub_consts, invals, mode)
      if not eqn.primitive.multiple_results:
        out = out[0]
      entered = True
    elif name == "scan":
      out = _scan(eqn, invals, mode)
    else:
      out = bind(eqn, [x.val if isinstance(x, Weight) else x for x in invals])
    if mode.note is not None and not entered:
      mode.note(eqn, invals, out)
    if eqn.primitive.multiple_results:
      for v, x in zip(eqn.outvars, out):
        env[v] = x
    else:
      env[eqn.outvars[0]] = out
  return [x.val if isinstance(x, Weight) else x for x in (read(v) for v in jaxpr.outvars)]


# --------------------------------------------------------------------------- scan
def _slice_q(q: QArray | None, i) -> QArray | None:
  """Layer ``i`` of a stacked QArray ``(L, ...)``: codes ``[i]``, scale ``[i]`` (per-layer
  scales) or ``[0]`` (one scale shared by the layers); int4 is unpacked to int8 codes
  first (it is packed along axis 0, the layer axis)."""
  if q is None or q.zero_point is not None or q.group_axis == 0 \
      or np.ndim(q.scale) != len(q.shape):
    return None
  codes = lax.dynamic_index_in_dim(int_values(q), i, 0, keepdims=False)
  scale = lax.dynamic_index_in_dim(q.scale, i if q.scale.shape[0] != 1 else 0, 0,
                                   keepdims=False)
  return QArray(codes, scale, None, bits=8,
                channel_axes=[a - 1 for a in q.channel_axes if a != 0],
                shape=q.shape[1:], dtype=q.dtype, name=q.name, super_scale=q.super_scale,
                group_size=q.group_size,
                group_axis=None if q.group_axis is None else q.group_axis - 1)


def _scan(eqn, invals, mode):
  """A ``scan`` whose inputs include :class:`Weight` values, re-issued with its body
  evaluated by :func:`evaluate`, so a stacked kernel ``(L, ...)`` scanned over its
  leading axis (``nn.scan`` / ``nnx.scan`` layer stacks) reaches the body's contraction
  as a :class:`Weight` of layer ``i`` (codes and per-layer or shared scales sliced).

  A weight among the constants is closed over whole; one in the carry runs in float.
  Per-op statistics produced inside the body (calibration ranges, QAT EMAs) leave it as
  extra stacked outputs and are merged into ``mode`` (:meth:`Mode.fork` / ``join``).
  """
  p = eqn.params
  nc, nk = p["num_consts"], p["num_carry"]
  body = p["jaxpr"]
  consts, carry, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
  carry = [x.val if isinstance(x, Weight) else x for x in carry]
  length = p["length"]
  wx = [(j, x) for j, x in enumerate(xs) if isinstance(x, Weight)]
  plain = [None if isinstance(x, Weight) else x for x in xs]
  w_arrays = [(x.val, x.raw) for _, x in wx]
  subs = []

  def step(c, inp):
    sub = mode.fork()   # fresh per trace of the body: no tracer outlives it
    subs.append(sub)
    i, xs_plain, wvals = inp
    xs_i = list(xs_plain)
    for (j, w), (val, raw) in zip(wx, wvals):
      xs_i[j] = Weight(w.op, w.rule, val, raw, _slice_q(w.q, i))
    res = evaluate(body.jaxpr, body.consts, list(consts) + list(c) + xs_i, sub)
    return res[:nk], (res[nk:], sub.export())

  idx = jnp.arange(length)
  c_out, (ys, stats) = lax.scan(step, carry, (idx, plain, w_arrays), length=length,
                                reverse=p["reverse"], unroll=p["unroll"])
  mode.join(subs[-1], stats)
  return list(c_out) + list(ys)


# --------------------------------------------------------------------------- mode base
class Mode:
  """Base: float contraction with weight values; subclasses override :meth:`on_weight`."""

  #: ``note(eqn, invals, out)``, called after every equation that was bound or
  #: contracted (not after a sub-program entered: its own equations were noted), e.g.
  #: to trace where an activation came from (:mod:`jaxopt_dnn.quant.hessian`); None: off.
  note = None

  def __init__(self):
    self.records: list[Record] = []

  def contract(self, eqn, invals):
    is_w = [isinstance(x, Weight) for x in invals]
    name = eqn.primitive.name
    if sum(is_w[:2]) != 1:
      self._float(eqn, invals, "both operands are weights")
      return bind(eqn, [x.val if isinstance(x, Weight) else x for x in invals])
    wpos = is_w.index(True)
    if name == "conv_general_dilated" and wpos != 1:
      self._float(eqn, invals, "weight is the conv input")
      return bind(eqn, [x.val if isinstance(x, Weight) else x for x in invals])
    return self.on_weight(eqn, invals, wpos)

  def fork(self) -> "Mode":
    """The mode a ``scan`` body runs in: records are shared; per-op statistics made in
    the body leave it through :meth:`export` and come back through :meth:`join`."""
    return self

  def export(self) -> dict:
    """Per-iteration statistics of a forked mode (arrays, stacked by ``scan``)."""
    return {}

  def join(self, sub: "Mode", stacked: dict) -> None:
    """Merges the stacked statistics of a scan body's forked mode."""
    del sub, stacked

  def _float(self, eqn, invals, why):
    for x in invals:
      if isinstance(x, Weight):
        self.records.append(Record(x.op, eqn.primitive.name, False, why))

  def on_weight(self, eqn, invals, wpos):
    w = invals[wpos]
    self.records.append(Record(w.op, eqn.primitive.name, False, "float mode"))
    return bind(eqn, [x.val if isinstance(x, Weight) else x for x in invals])


# --------------------------------------------------------------------------- driver
_ACTIVE = threading.local()   # set while a hooked program is being traced


def active() -> bool:
  """Whether a program is being traced for :func:`run` (an NNX quantizing module's
  ``__call__`` then runs its plain body: the outer interpreter already sees its ops)."""
  return getattr(_ACTIVE, "n", 0) > 0


@contextlib.contextmanager
def tracing():
  """Marks the enclosed code as tracing a hooked program (see :func:`active`)."""
  _ACTIVE.n = getattr(_ACTIVE, "n", 0) + 1
  try:
    yield
  finally:
    _ACTIVE.n -= 1


def is_array(x):
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def run(fn: Callable[..., Any], leaves: list, rest: Any, make_weight, mode, *,
        real_leaves: list | None = None):
  """Traces ``fn(leaves, *rest_args)`` and evaluates it with weights routed through ``mode``.

  Args:
    fn: ``fn(leaves, rest)`` -> any pytree (``leaves`` a list of arrays).
    leaves: the leaves that may be weights (float values of the right shape/dtype).
    rest: everything else ``fn`` takes; its array leaves are traced, the others static.
    make_weight: ``make_weight(i, leaf, role) -> Weight | None`` for leaf ``i``
      (``role``: the role string traced by :func:`jaxopt_dnn.roles.classify`).
    mode: a :class:`Mode`; what ran is left in ``mode.records``.
    real_leaves: the values to run with when ``leaves`` are shape placeholders.
  Returns:
    ``fn``'s output.
  """
  rleaves, rdef = jax.tree.flatten(rest)
  dyn = [i for i, x in enumerate(rleaves) if is_array(x) or isinstance(x, jax.core.Tracer)]

  def f(lv, dl):
    rl = list(rleaves)
    for i, x in zip(dyn, dl):
      rl[i] = x
    return fn(lv, jax.tree.unflatten(rdef, rl))

  dyn_vals = [rleaves[i] for i in dyn]
  closed, out_shape = jax.make_jaxpr(f, return_shape=True)(leaves, dyn_vals)
  n = len(leaves)
  cons = _roles.consumers(closed.jaxpr, {i: i for i in range(n)})
  args = []
  for i, x in enumerate(leaves if real_leaves is None else real_leaves):
    cs = tuple(c for c, _ in cons[i])
    w = make_weight(i, x, _roles.classify("", leaves[i], cs) if cs else "other")
    args.append(x if w is None else w)
  flat = evaluate(closed.jaxpr, closed.consts, args + list(jax.tree.leaves(dyn_vals)), mode)
  return jax.tree.unflatten(jax.tree.structure(out_shape), flat)
