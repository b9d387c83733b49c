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
:class:`Weight`, the *mode* decides what runs:

* :class:`Qat`: fake-quant of the activation (per-tensor EMA range), the weight already
  fake-quantized by its rule (STE); or an ``s8 x s8 -> s32`` forward with float gradients
  (``estimator="int8_forward"``);
* :class:`Calib`: records a per-batch range of the activation operand, float math;
* :class:`Serve`: ``s8 x s8 -> s32`` with the :class:`QArray` codes and the calibrated
  activation scale, rescaled after (:mod:`jaxopt_dnn.quant.ops`).

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

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from jaxopt_dnn import roles as _roles
from jaxopt_dnn.quant import fake, ops
from jaxopt_dnn.quant.qarray import QArray, dequantize, int_values
from jaxopt_dnn.quant.ranges import batch_statistic

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


def _bind(eqn, invals):
  params = eqn.primitive.get_bind_params(eqn.params)
  with eqn.ctx.manager:
    return eqn.primitive.bind(*invals, **params)


def _layout(eqn, w: Weight, rest) -> Weight:
  val = _bind(eqn, [w.val, *rest])
  raw = None if w.raw is None else _bind(eqn, [w.raw, *rest])
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
      out = _bind(eqn, invals)
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
      out = _bind(eqn, [x.val if isinstance(x, Weight) else x for x in invals])
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


# --------------------------------------------------------------------------- modes
def _swap_dn(dn):
  (lc, rc), (lb, rb) = dn
  return (rc, lc), (rb, lb)


def _unswap(y, n_batch, n_a_free, n_b_free):
  """dot(b, a) output (batch, b_free, a_free) -> dot(a, b) layout (batch, a_free, b_free)."""
  perm = (list(range(n_batch)) + list(range(n_batch + n_b_free, n_batch + n_b_free + n_a_free))
          + list(range(n_batch, n_batch + n_b_free)))
  return jnp.transpose(y, perm)


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
      return _bind(eqn, [x.val if isinstance(x, Weight) else x for x in invals])
    wpos = is_w.index(True)
    if name == "conv_general_dilated" and wpos != 1:
      self._float(eqn, invals, "weight is the conv input")
      return _bind(eqn, [x.val if isinstance(x, Weight) else x for x in invals])
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
    return _bind(eqn, [x.val if isinstance(x, Weight) else x for x in invals])


def int8_contract(eqn, x, q: QArray, x_scale, wpos: int, act_bits: int, op: str):
  """The ``s8 x s8 -> s32`` version of ``eqn`` (dot_general or conv) with weight ``q``."""
  out_dtype = eqn.outvars[0].aval.dtype
  p = eqn.params
  if eqn.primitive.name == "conv_general_dilated":
    if p.get("batch_group_count", 1) != 1:
      raise ValueError(f"{op}: batch_group_count != 1 has no int8 path")
    return ops.int8_conv(x, q, x_scale, p["window_strides"], p["padding"],
                         lhs_dilation=p["lhs_dilation"], rhs_dilation=p["rhs_dilation"],
                         dimension_numbers=p["dimension_numbers"],
                         feature_group_count=p["feature_group_count"], out_dtype=out_dtype,
                         op=op, act_bits=act_bits)
  dn = p["dimension_numbers"]
  if wpos == 1:
    return ops.int8_dot_general(x, q, x_scale, dn, out_dtype=out_dtype, op=op,
                                act_bits=act_bits)
  (lc, _), (lb, _) = dn
  y = ops.int8_dot_general(x, q, x_scale, _swap_dn(dn), out_dtype=out_dtype, op=op,
                           act_bits=act_bits)
  n_b = len(lb)
  return _unswap(y, n_b, len(q.shape) - len(lc) - n_b, x.ndim - len(lc) - n_b)


def _int8_why_not(w: Weight, eqn, wpos) -> str:
  """Why ``w`` cannot run int8 in ``eqn`` ("" if it can)."""
  if w.q is None:
    return "weight layout not representable on the int8 codes (reshape/broadcast)"
  if w.q.zero_point is not None:
    return "asymmetric weight (zero point)"
  if eqn.primitive.name == "dot_general":
    (lc, rc), _ = eqn.params["dimension_numbers"]
    contracted = rc if wpos == 1 else lc
  else:
    dn = eqn.params["dimension_numbers"]
    contracted = [a for a in range(len(w.q.shape)) if a != dn.rhs_spec[0]]
  if any(a in w.q.channel_axes for a in contracted):
    return (f"weight scale varies along a contracted axis (channel_axes "
            f"{w.q.channel_axes}, contracted {tuple(contracted)})")
  if np.ndim(w.q.scale) != len(w.q.shape):
    return "weight scale is not per-axis"
  if w.q.group_size is not None:   # exact only along one contracted axis (ops docstring)
    if eqn.primitive.name != "dot_general":
      return "group-wise weight scale in a convolution"
    if w.q.group_axis not in contracted:
      return f"group axis {w.q.group_axis} is not contracted {tuple(contracted)}"
  return ""


class Calib(Mode):
  """Float forward; records a per-batch range of each quantized op's activation."""

  def __init__(self, method="absmax", percentile=99.99):
    super().__init__()
    self.method, self.percentile = method, percentile
    self.sink: dict[str, list] = {}

  def on_weight(self, eqn, invals, wpos):
    w = invals[wpos]
    x = invals[1 - wpos]
    if w.rule.act_bits is not None:
      self.sink.setdefault(w.op, []).append(
          batch_statistic(x, self.method, self.percentile, w.rule.act_bits))
    self.records.append(Record(w.op, eqn.primitive.name, False, "calibration (float)"))
    return _bind(eqn, [w.val if i == wpos else v for i, v in enumerate(invals)])

  def fork(self):
    sub = Calib(self.method, self.percentile)
    sub.records = self.records
    return sub

  def export(self):
    return {op: jnp.stack(v) for op, v in self.sink.items()}

  def join(self, sub, stacked):
    for op, v in stacked.items():   # (length, n): every layer's batch statistic
      self.sink.setdefault(op, []).extend(jnp.reshape(v, (-1,)))
    sub.sink.clear()

  def reduce(self):
    agg = jnp.max if self.method == "absmax" else jnp.mean
    return {op: agg(jnp.stack(v)) for op, v in self.sink.items()}


class Serve(Mode):
  """Real int8 contractions with the QArray codes and calibrated activation scales."""

  def __init__(self, amax: dict[str, Any]):
    super().__init__()
    self.amax = amax

  def on_weight(self, eqn, invals, wpos):
    w = invals[wpos]
    args = [w.val if i == wpos else v for i, v in enumerate(invals)]
    name = eqn.primitive.name
    if w.rule.act_bits is None:
      self.records.append(Record(w.op, name, False, "weight-only rule"))
      return _bind(eqn, args)
    if w.q is not None and w.q.zero_point is not None:
      raise ValueError(f"int8_apply: op {w.op!r}: the int8 path needs symmetric weights "
                       "(zero_point=None); quantize with symmetric=True or give the rule "
                       "act_bits=None (weight-only)")
    why = _int8_why_not(w, eqn, wpos)
    if why:
      self.records.append(Record(w.op, name, False, why))
      return _bind(eqn, args)
    if self.amax is None:   # per-token dynamic activation scales (computed in the op)
      sx = None
    elif w.op not in self.amax:
      raise ValueError(f"int8_apply: op {w.op!r} has no calibrated activation range; run "
                       f"calibrate(...) with the same rules (have: {sorted(self.amax)})")
    else:
      sx = fake.scale_from_absmax(self.amax[w.op], w.rule.act_bits)
    self.records.append(Record(w.op, name, True))
    return int8_contract(eqn, invals[1 - wpos], w.q, sx, wpos, w.rule.act_bits, w.op)


def int8_forward(int8_fn, float_fn, x, w, x_scale):
  """``int8_fn(x, w, x_scale)`` forward; gradients of ``float_fn(x, w)`` at the original
  float operands (the "original residuals" estimator of AQT / qwix)."""

  @jax.custom_vjp
  def f(x, w, x_scale):
    return int8_fn(x, w, x_scale)

  def fwd(x, w, x_scale):
    return int8_fn(x, w, x_scale), (x, w, x_scale)

  def bwd(res, g):
    x, w, x_scale = res
    _, vjp = jax.vjp(float_fn, x, w)
    dx, dw = vjp(g)
    return dx, dw, jnp.zeros_like(x_scale)

  f.defvjp(fwd, bwd)
  return f(x, w, x_scale)


class Qat(Mode):
  """Fake-quant activations at every quantized contraction, EMA ranges (see module doc).

  ``stats``: ``{op: float32 range}`` (negative = not seen yet); ``update``: whether
  to move the EMA ``a <- m a + (1 - m) max|x|`` (train) or keep it (eval).
  """

  def __init__(self, stats, *, momentum=0.99, update=True, estimator="ste"):
    super().__init__()
    self.stats = dict(stats)
    self.momentum, self.update, self.estimator = momentum, update, estimator
    self._seen: set[str] = set()
    self._outer_seen: set[str] = set()   # ops seen before a scan body (fork)

  def amax(self, op, x):
    if op in self._seen:
      return self.stats[op]
    self._seen.add(op)
    batch = lax.stop_gradient(batch_statistic(x, "absmax"))
    prev = self.stats.get(op)
    if prev is None:
      cur = batch
    else:
      prev = jnp.asarray(prev, jnp.float32)
      new = self.momentum * prev + (1.0 - self.momentum) * batch if self.update else prev
      cur = jnp.where(prev < 0, batch, new)
    self.stats[op] = cur
    return cur

  def fork(self):
    sub = Qat(self.stats, momentum=self.momentum, update=self.update,
              estimator=self.estimator)
    sub.records = self.records
    sub._seen = set(self._seen)
    sub._outer_seen = set(self._seen)
    return sub

  def export(self):
    return {op: self.stats[op] for op in self._seen - self._outer_seen}

  def join(self, sub, stacked):
    # a stacked kernel has one range for all its layers: the largest per-layer EMA,
    # which equals the EMA of the largest batch range (the EMA is monotone in it)
    for op, v in stacked.items():
      self.stats[op] = jnp.max(v)
      self._seen.add(op)

  def on_weight(self, eqn, invals, wpos):
    w = invals[wpos]
    x = invals[1 - wpos]
    name = eqn.primitive.name
    args = [w.val if i == wpos else v for i, v in enumerate(invals)]
    if w.rule.act_bits is None:
      self.records.append(Record(w.op, name, False, "weight-only rule"))
      return _bind(eqn, args)
    amax = self.amax(w.op, x)
    sx = lax.stop_gradient(fake.scale_from_absmax(amax, w.rule.act_bits))
    if self.estimator == "int8_forward":
      if not w.rule.symmetric:
        raise ValueError(f"qat(estimator='int8_forward'): op {w.op!r} has an asymmetric "
                         "rule; the int8 path needs symmetric weights")
      why = _int8_why_not(w, eqn, wpos)
      if not why:
        self.records.append(Record(w.op, name, True))

        def float_fn(x, wr):
          a = [wr if i == wpos else x for i in range(2)] + list(invals[2:])
          return _bind(eqn, a)

        return int8_forward(
            lambda x, wr, s: int8_contract(eqn, x, w.q, s, wpos, w.rule.act_bits, w.op),
            float_fn, x, w.raw, sx)
    self.records.append(Record(w.op, name, False, "fake-quant (float)"))
    args[1 - wpos] = fake.fake_quant_with(x, sx, bits=w.rule.act_bits)
    return _bind(eqn, args)


# --------------------------------------------------------------------------- driver
def _is_array(x):
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
  dyn = [i for i, x in enumerate(rleaves) if _is_array(x) or isinstance(x, jax.core.Tracer)]

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


def fq_weight(x, rule, op, path=None):
  """The QAT view of a float weight: fake-quantized value, raw value, QArray codes
  (channel axes as :func:`~jaxopt_dnn.quant.rules.quantize_leaf` chooses them for
  ``path``, so QAT simulates what serving stores)."""
  axis = rule.axis_for(op if path is None else path, x)
  val = fake.fake_quant(x, bits=rule.bits, axis=axis, symmetric=rule.symmetric,
                        method=rule.method, name=f"{op}")
  q = None
  if rule.symmetric:
    q = fake.quantize(lax.stop_gradient(x), bits=rule.bits, axis=axis, symmetric=True,
                      method=rule.method, name=op)
  return val, q


def serve_weight(q: QArray):
  return dequantize(q)
