"""Hooks that quantize the matmuls/convs of an unmodified Flax model (linen and NNX).

linen: an ``nn.intercept_methods`` interceptor catches ``__call__`` of ``Dense``,
``DenseGeneral``, ``Conv`` and ``Einsum`` and injects a ``dot_general`` /
``conv_general_dilated`` (for ``Einsum``, an einsum) that fake-quantizes (QAT), records
ranges (calibration) or runs the real int8 op (serving). The module is restored after
the call; the user's class is never edited. An op is named by its module path
(``encoder/layer_0/query``) and matched by the rules through its kernel path relative
to the params collection (``encoder/layer_0/query/kernel``), the path
``quantize_params(variables["params"], rules)`` sees.

NNX: :func:`qat` returns a clone whose ``nnx.Linear`` / ``nnx.Conv`` instances get a
quantizing subclass and a :class:`QuantStat` variable (activation range), so the
parameter paths stay the same.

Activation ranges (float32 per-tensor ``absmax`` EMAs during QAT: ``a <- m a + (1-m)
max|x|``) live in the ``quant_stats`` collection / ``QuantStat`` variables, never in
params or optimizer state.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxopt_dnn import _tree
from jaxopt_dnn.quant.calibrate import batch_statistic
from jaxopt_dnn.quant import fake, ops, rules as _rules
from jaxopt_dnn.quant.qarray import is_qarray

STATS = "quant_stats"
AMAX = "input_amax"
_LINEN = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum)
_NNX = (nnx.Linear, nnx.Conv)


class QuantStat(nnx.Variable):
  """NNX variable type for float32 activation ranges (not a ``nnx.Param``)."""


# --------------------------------------------------------------------------- modes
@dataclasses.dataclass(frozen=True, eq=False)
class _Mode:
  rules: tuple | None
  bits: int = 8

  def rule(self, kernel_path: str):
    r = _rules.rule_for_path(self.rules, kernel_path, bits=self.bits)
    return None if r is None or r.skip else r

  def _wq(self, op, rule, w):
    return fake.fake_quant(w, bits=rule.bits, axis=rule.axis, symmetric=rule.symmetric,
                           method=rule.method, name=f"{op}/kernel")


def _int8_forward(int8_fn, float_fn, x, w, x_scale):
  """``int8_fn(x, w, x_scale)`` forward; gradients of ``float_fn(x, w)`` at the original
  float operands (the "original residuals" estimator of AQT / qwix: no fake-quant weight
  is materialised and no clip mask is applied in the backward pass)."""

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


@dataclasses.dataclass(frozen=True, eq=False)
class _Qat(_Mode):
  """Fake-quant weights (per rule) and activations (per tensor, EMA range).

  ``estimator="ste"``: float fake-quant with the straight-through estimator (exact
  clip-range gradients). ``estimator="int8_forward"``: dots/convs run as s8 x s8 -> s32
  in the forward pass (what serving runs), gradients taken at the original float
  operands (AQT/qwix "original residuals"); einsums keep the ``ste`` path.
  """

  momentum: float = 0.99
  estimator: str = "ste"

  def _x(self, ctx, op, rule, x):
    if rule.act_bits is None:
      return x
    amax = ctx.amax(op, x, self.momentum)
    return fake.fake_quant_with(x, fake.scale_from_absmax(amax, rule.act_bits), bits=rule.act_bits)

  def _int8_scale(self, ctx, op, rule, x):
    """The activation scale if this op runs int8 in the forward pass, else None."""
    if self.estimator != "int8_forward" or rule.act_bits is None:
      return None
    if not rule.symmetric:
      raise ValueError(f"qat(estimator='int8_forward'): op {op!r} has an asymmetric rule; "
                       "the int8 path needs symmetric weights")
    return jax.lax.stop_gradient(
        fake.scale_from_absmax(ctx.amax(op, x, self.momentum), rule.act_bits))

  def _qw(self, op, rule, w):
    return fake.quantize(w, bits=rule.bits, axis=rule.axis, symmetric=True,
                         method=rule.method, name=f"{op}/kernel")

  def dot(self, ctx, op, rule, base, x, w, dn, **kw):
    sx = self._int8_scale(ctx, op, rule, x)
    if sx is not None:
      return _int8_forward(
          lambda x, w, sx: ops.int8_dot_general(x, self._qw(op, rule, w), sx, dn, op=op),
          lambda x, w: base(x, w, dn, **kw), x, w, sx)
    return base(self._x(ctx, op, rule, x), self._wq(op, rule, w), dn, **kw)

  def conv(self, ctx, op, rule, base, x, w, window_strides, padding, **kw):
    sx = self._int8_scale(ctx, op, rule, x)
    if sx is not None:
      ikw = {k: v for k, v in kw.items()
             if k not in ("precision", "preferred_element_type", "out_sharding")}
      return _int8_forward(
          lambda x, w, sx: ops.int8_conv(x, self._qw(op, rule, w), sx, window_strides,
                                         padding, op=op, **ikw),
          lambda x, w: base(x, w, window_strides, padding, **kw), x, w, sx)
    return base(self._x(ctx, op, rule, x), self._wq(op, rule, w), window_strides, padding, **kw)

  def einsum(self, ctx, op, rule, eq, x, w, **kw):
    return jnp.einsum(eq, self._x(ctx, op, rule, x), self._wq(op, rule, w), **kw)


@dataclasses.dataclass(frozen=True, eq=False)
class _Calib(_Mode):
  """Float forward; records a per-batch range of each quantized op's input."""

  method: str = "absmax"
  percentile: float = 99.99
  sink: dict = dataclasses.field(default_factory=dict)

  def _rec(self, op, rule, x):
    if rule.act_bits is not None:
      self.sink.setdefault(op, []).append(
          batch_statistic(x, self.method, self.percentile, rule.act_bits))

  def dot(self, ctx, op, rule, base, x, w, dn, **kw):
    self._rec(op, rule, x)
    return base(x, w, dn, **kw)

  def conv(self, ctx, op, rule, base, x, w, *a, **kw):
    self._rec(op, rule, x)
    return base(x, w, *a, **kw)

  def einsum(self, ctx, op, rule, eq, x, w, **kw):
    self._rec(op, rule, x)
    return jnp.einsum(eq, x, w, **kw)


@dataclasses.dataclass(frozen=True, eq=False)
class _Serve(_Mode):
  """Real int8 ops with the QArray weights and calibrated activation scales."""

  qweights: dict = dataclasses.field(default_factory=dict)   # kernel path -> QArray
  amax: dict = dataclasses.field(default_factory=dict)       # op -> float32 range
  prefix: str = "params/"

  def _args(self, op, rule):
    qw = self.qweights.get(f"{self.prefix}{op}/kernel" if op else f"{self.prefix}kernel")
    if qw is None or rule.act_bits is None:
      return None   # float op (weight-only ops got a dequantized kernel)
    if op not in self.amax:
      raise ValueError(f"int8_apply: op {op!r} has no calibrated activation range; run "
                       f"calibrate(...) with the same rules (have: {sorted(self.amax)})")
    return qw, fake.scale_from_absmax(self.amax[op], rule.act_bits)

  def dot(self, ctx, op, rule, base, x, w, dn, **kw):
    a = self._args(op, rule)
    if a is None:
      return base(x, w, dn, **kw)
    return ops.int8_dot_general(x, a[0], a[1], dn, op=op)

  def conv(self, ctx, op, rule, base, x, w, window_strides, padding, **kw):
    a = self._args(op, rule)
    if a is None:
      return base(x, w, window_strides, padding, **kw)
    kw.pop("precision", None)
    kw.pop("preferred_element_type", None)
    kw.pop("out_sharding", None)
    return ops.int8_conv(x, a[0], a[1], window_strides, padding, op=op, **kw)

  def einsum(self, ctx, op, rule, eq, x, w, **kw):
    a = self._args(op, rule)
    if a is None:
      return jnp.einsum(eq, x, w, **kw)
    return ops.int8_einsum(eq, x, a[0], a[1], op=op)


# --------------------------------------------------------------------------- linen
class _LinenCtx:
  def __init__(self, mod):
    self.mod = mod

  def amax(self, op, x, momentum):
    mod = self.mod
    mutable = mod.is_mutable_collection(STATS)
    if not mutable and not mod.has_variable(STATS, AMAX):
      raise ValueError(f"QAT op {op!r}: no activation range in {STATS!r}; pass the "
                       f"collection (from init_stats/calibrate) or apply with mutable=[{STATS!r}]")
    batch = lambda: lax.stop_gradient(batch_statistic(x, "absmax"))  # noqa: E731
    var = mod.variable(STATS, AMAX, batch)
    if mutable and not mod.is_initializing():
      var.value = momentum * var.value + (1.0 - momentum) * batch()
    return var.value


def _linen_einsum(mod, mode, op, rule, inputs, einsum_str=None):
  """``nn.Einsum.__call__`` with the kernel contraction routed through ``mode``."""
  eq = nn.module.merge_param("einsum_str", mod.einsum_str, einsum_str).replace(" ", "")
  kernel = mod.param("kernel", mod.kernel_init, mod.shape, mod.param_dtype)
  bias, bshape = None, None
  if mod.use_bias:
    bias_shape, bshape = mod._get_bias_shape(eq, inputs, kernel)  # noqa: SLF001
    bias = mod.param("bias", mod.bias_init, bias_shape, mod.param_dtype)
  inputs, kernel, bias = mod.promote_dtype(inputs, kernel, bias, dtype=mod.dtype)
  y = mode.einsum(_LinenCtx(mod), op, rule, eq, inputs, kernel, precision=mod.precision,
                  preferred_element_type=mod.preferred_element_type)
  return y if bias is None else y + jnp.reshape(bias, bshape)


def linen_interceptor(mode: _Mode):
  """The ``nn.intercept_methods`` interceptor that routes layer ops through ``mode``."""

  def icpt(next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name != "__call__" or not isinstance(mod, _LINEN):
      return next_fun(*args, **kwargs)
    op = "/".join(mod.path)
    rule = mode.rule("/".join(tuple(mod.path) + ("kernel",)))
    if rule is None:
      return next_fun(*args, **kwargs)
    if isinstance(mod, nn.Einsum):
      return _linen_einsum(mod, mode, op, rule, *args, **kwargs)
    conv = isinstance(mod, nn.Conv)
    attr = "conv_general_dilated" if conv else "dot_general"
    if getattr(mod, attr + "_cls") is not None:
      raise ValueError(f"op {op!r}: {attr}_cls is set on {type(mod).__name__}; quantization "
                       f"hooks need {attr}_cls=None")
    old = getattr(mod, attr)
    base = old or getattr(lax, attr)
    hook = functools.partial(mode.conv if conv else mode.dot, _LinenCtx(mod), op, rule, base)
    object.__setattr__(mod, attr, hook)
    try:
      return next_fun(*args, **kwargs)
    finally:
      object.__setattr__(mod, attr, old)

  return icpt


@dataclasses.dataclass(frozen=True)
class QatModel:
  """A linen model run with W8A8 (per rules) fake-quant; same ``init``/``apply`` API.

  Train with ``apply({"params": p, "quant_stats": s}, x, mutable=["quant_stats"])``
  (ranges updated as EMAs); evaluate without ``mutable`` (ranges frozen).
  """

  model: nn.Module
  rules: tuple | None = None
  bits: int = 8
  momentum: float = 0.99
  estimator: str = "ste"

  def _ctx(self):
    return nn.intercept_methods(linen_interceptor(
        _Qat(self.rules, self.bits, self.momentum, self.estimator)))

  def init(self, *args, **kwargs):
    with self._ctx():
      return self.model.init(*args, **kwargs)

  def apply(self, variables, *args, **kwargs):
    with self._ctx():
      return self.model.apply(variables, *args, **kwargs)

  def init_stats(self, params, *args, **kwargs) -> dict:
    """Initial ``quant_stats`` from one batch (activation absmax of the QAT model).

    Runs one jitted forward (``kwargs`` are closed over, i.e. static).
    """
    run = jax.jit(lambda p, a: self.apply({"params": p}, *a, mutable=[STATS], **kwargs)[1])
    return run(params, args)[STATS]


# --------------------------------------------------------------------------- NNX
class _NnxCtx:
  def __init__(self, mod):
    self.mod = mod

  def amax(self, op, x, momentum):
    var = self.mod.quant_input_amax
    prev = var[...]
    batch = lax.stop_gradient(batch_statistic(x, "absmax"))
    cur = jnp.where(prev < 0, batch, prev)     # -1 = not yet seen
    if not self.mod.use_running_average:
      cur = jnp.where(prev < 0, batch, momentum * prev + (1.0 - momentum) * batch)
      var[...] = cur
    return cur


@functools.lru_cache(maxsize=None)
def _nnx_class(cls):
  attr = "conv_general_dilated" if issubclass(cls, nnx.Conv) else "dot_general"

  def __call__(self, x, *args, **kwargs):
    old = getattr(self, attr)
    mode, rule, op = self.quant_mode, self.quant_rule, self.quant_op
    fn = mode.conv if attr == "conv_general_dilated" else mode.dot
    object.__setattr__(self, attr, functools.partial(fn, _NnxCtx(self), op, rule,
                                                     old or getattr(lax, attr)))
    try:
      return cls.__call__(self, x, *args, **kwargs)
    finally:
      object.__setattr__(self, attr, old)

  return type(f"Quantized{cls.__name__}", (cls,), {"__call__": __call__})


def _nnx_install(model: nnx.Module, mode: _Mode) -> nnx.Module:
  model = nnx.clone(model)
  found = 0
  for path, node in list(nnx.iter_graph(model)):
    if not isinstance(node, _NNX) or hasattr(node, "quant_mode"):
      continue
    op = "/".join(str(p) for p in path)
    rule = mode.rule(f"{op}/kernel" if op else "kernel")
    if rule is None:
      continue
    if getattr(node, "dot_general_cls", None) is not None:
      raise ValueError(f"op {op!r}: dot_general_cls is set; quantization hooks need None")
    node.__class__ = _nnx_class(type(node))
    node.quant_mode, node.quant_rule, node.quant_op = mode, rule, op
    node.quant_input_amax = QuantStat(jnp.full((), -1.0, jnp.float32))
    node.use_running_average = False
    found += 1
  if not found:
    raise ValueError("qat: no nnx.Linear/nnx.Conv matched the rules")
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
    rules: see :mod:`jaxopt_dnn.quant.rules` (default: W8A8 per-channel everywhere).
    momentum: EMA momentum ``m`` of the activation ranges.
    estimator: ``"ste"`` (default): float fake-quant, straight-through gradients inside
      the clip range. ``"int8_forward"``: Dense/Conv run s8 x s8 -> s32 in the forward
      pass, gradients at the original float operands (AQT/qwix "original residuals";
      faster where int8 kernels are, a different gradient than ``"ste"``).
  """
  rs = _rules.as_rules(rules, bits=bits)
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f"qat: momentum must be in [0, 1), got {momentum!r}")
  if estimator not in ("ste", "int8_forward"):
    raise ValueError(f"qat: estimator must be 'ste' or 'int8_forward', got {estimator!r}")
  if isinstance(model, nnx.Module):
    return _nnx_install(model, _Qat(rs, bits, momentum, estimator))
  if isinstance(model, nn.Module):
    return QatModel(model, rs, bits, momentum, estimator)
  raise TypeError(f"qat: expected a flax linen or nnx Module, got {type(model).__name__}")


def stats_tree(amax: dict[str, Any]) -> dict:
  """``{"a/b": v}`` -> ``{"a": {"b": {"input_amax": float32(v)}}}``."""
  out: dict = {}
  for op, v in amax.items():
    d = out
    for part in (op.split("/") if op else []):
      d = d.setdefault(part, {})
    d[AMAX] = jnp.asarray(v, jnp.float32)
  return out


def flat_stats(tree: Any) -> dict[str, Any]:
  """Inverse of :func:`stats_tree` (also accepts NNX ``QuantStat`` states)."""
  out = {}
  for p, v in _tree.leaves_with_paths(tree):
    if p == AMAX or p.endswith("/" + AMAX):
      out[p[: -len(AMAX)].rstrip("/")] = v
  return out


def calibration_runner(apply_fn, variables, *, method, rules, percentile, bits=8):
  """Returns ``run(args) -> {op: batch statistic}`` for :func:`calibrate`."""
  rs = _rules.as_rules(rules, bits=bits)
  if isinstance(variables, nnx.Module):
    def run_nnx(args):
      mode = _Calib(rs, bits, method, percentile, {})
      apply_fn(_nnx_install(variables, mode), *args)
      return _reduce(mode, method)
    return run_nnx

  @jax.jit
  def run(v, args):
    mode = _Calib(rs, bits, method, percentile, {})
    with nn.intercept_methods(linen_interceptor(mode)):
      apply_fn(v, *args)
    return _reduce(mode, method)

  return lambda args: run(variables, args)


def _reduce(mode, method):
  agg = jnp.max if method == "absmax" else jnp.mean
  return {op: agg(jnp.stack(v)) for op, v in mode.sink.items()}


def _nnx_int8_apply(model, qparams, calibration, args, kwargs, rs, bits, weight_only):
  """NNX serving: a clone with the dequantized weights, whose quantized ``nnx.Linear`` /
  ``nnx.Conv`` calls run :class:`_Serve` (``s8 x s8 -> s32``) on the QArray kernels."""
  qmap = {p: q for p, q in _tree.leaves_with_paths(qparams, is_leaf=is_qarray) if is_qarray(q)}
  if not qmap:
    raise ValueError("int8_apply: qvariables has no QArray leaf; run "
                     "quantize_params(nnx.to_pure_dict(nnx.state(model, nnx.Param))) first")
  m = nnx.clone(model)
  nnx.update(m, _rules.dequantize_params(qparams))
  if weight_only:
    return m(*args, **kwargs)
  if calibration is None:
    raise ValueError("int8_apply: no calibration; pass calibrate(...)'s quant_stats")
  m = _nnx_install(m, _Serve(rs, bits, qmap, flat_stats(calibration), prefix=""))
  return m(*args, **kwargs)


def int8_apply(model: nn.Module | nnx.Module, qvariables: Any, calibration: Any = None,
               *args, rules: Any = None, bits: int = 8, weight_only: bool = False, **kwargs):
  """Runs a linen or NNX ``model`` with QArray weights through real int8 ops.

  For an NNX module, ``qvariables`` is
  ``quantize_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), rules)`` (kernel
  paths like ``"fc/kernel"``); the module itself is left untouched (a clone runs).

  Every op whose kernel is a :class:`QArray` and whose rule has ``act_bits`` runs as
  ``s8 x s8 -> s32`` (``ops.int8_dot_general`` / ``int8_conv`` / ``int8_einsum``) with
  the calibrated activation scale; other ops see the dequantized kernel. With
  ``weight_only=True`` every kernel is dequantized inside the (jitted) function and
  all ops are float: a memory win only.

  Args:
    model: the unmodified linen module.
    qvariables: ``{"params": quantize_params(params, rules), ...}``.
    calibration: ``quant_stats`` tree from :func:`calibrate` (default:
      ``qvariables["quant_stats"]``).
    *args, **kwargs: model inputs, as for ``model.apply``.
    rules: the rules used for :func:`quantize_params` (they carry ``act_bits``).
  """
  rs = _rules.as_rules(rules, bits=bits)
  if isinstance(model, nnx.Module):
    return _nnx_int8_apply(model, qvariables, calibration, args, kwargs, rs, bits, weight_only)
  qmap = {p: q for p, q in _tree.leaves_with_paths(qvariables, is_leaf=is_qarray) if is_qarray(q)}
  if not qmap:
    raise ValueError("int8_apply: qvariables has no QArray leaf; run quantize_params first")
  float_vars = _rules.dequantize_params(qvariables)
  if weight_only:
    return model.apply(float_vars, *args, **kwargs)
  if calibration is None:
    calibration = qvariables.get(STATS) if isinstance(qvariables, dict) else None
    if calibration is None:
      raise ValueError("int8_apply: no calibration; pass calibrate(...)'s quant_stats")
  if isinstance(calibration, dict) and STATS in calibration:
    calibration = calibration[STATS]
  mode = _Serve(rs, bits, qmap, flat_stats(calibration))
  with nn.intercept_methods(linen_interceptor(mode)):
    return model.apply(float_vars, *args, **kwargs)
