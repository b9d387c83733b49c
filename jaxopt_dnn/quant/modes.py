"""The interpreter's modes (:mod:`jaxopt_dnn.quant.hooks`): what runs at a contraction
that consumes a quantized :class:`~jaxopt_dnn.quant.hooks.Weight`.

* :class:`Qat`: fake-quant of the activation (per-tensor EMA range), the weight already
  fake-quantized by its rule (:func:`fq_weight`, STE); or an ``s8 x s8 -> s32`` forward
  with float gradients (``estimator="int8_forward"``, :func:`int8_forward`);
* :class:`Calib`: records a per-batch range of the activation operand, float math;
* :class:`Serve`: ``s8 x s8 -> s32`` with the :class:`QArray` codes and the calibrated
  activation scale, rescaled after (:func:`int8_contract`, :mod:`jaxopt_dnn.quant.ops`).

The post-training capture's modes (``Gram``, ``Stats``) live with it in
:mod:`jaxopt_dnn.quant.hessian`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxopt_dnn.quant import fake, ops
from jaxopt_dnn.quant.hooks import Mode, Record, Weight, bind
from jaxopt_dnn.quant.qarray import QArray
from jaxopt_dnn.quant.ranges import batch_statistic


# --------------------------------------------------------------------------- int8 contraction
def _swap_dn(dn):
  (lc, rc), (lb, rb) = dn
  return (rc, lc), (rb, lb)


def _unswap(y, n_batch, n_a_free, n_b_free):
  """dot(b, a) output (batch, b_free, a_free) -> dot(a, b) layout (batch, a_free, b_free)."""
  perm = (list(range(n_batch)) + list(range(n_batch + n_b_free, n_batch + n_b_free + n_a_free))
          + list(range(n_batch, n_batch + n_b_free)))
  return jnp.transpose(y, perm)


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
    return bind(eqn, [w.val if i == wpos else v for i, v in enumerate(invals)])

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
      return bind(eqn, args)
    if w.q is not None and w.q.zero_point is not None:
      raise ValueError(f"int8_apply: op {w.op!r}: the int8 path needs symmetric weights "
                       "(zero_point=None); quantize with symmetric=True or give the rule "
                       "act_bits=None (weight-only)")
    why = _int8_why_not(w, eqn, wpos)
    if why:
      self.records.append(Record(w.op, name, False, why))
      return bind(eqn, args)
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
      return bind(eqn, args)
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
          return bind(eqn, a)

        return int8_forward(
            lambda x, wr, s: int8_contract(eqn, x, w.q, s, wpos, w.rule.act_bits, w.op),
            float_fn, x, w.raw, sx)
    self.records.append(Record(w.op, name, False, "fake-quant (float)"))
    args[1 - wpos] = fake.fake_quant_with(x, sx, bits=w.rule.act_bits)
    return bind(eqn, args)


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
