"""Calibration and int8 serving of an unmodified Flax model (linen, NNX, or any
``f(variables, *inputs)``) through the interpreter (:mod:`jaxopt_dnn.quant.hooks`).

:func:`calibration_runner` runs the float model in :class:`~jaxopt_dnn.quant.modes.Calib`
mode (the per-batch activation ranges :func:`~jaxopt_dnn.quant.calibrate.calibrate`
combines); :func:`int8_apply` runs it in :class:`~jaxopt_dnn.quant.modes.Serve` mode:
every contraction consuming a :class:`QArray` runs ``s8 x s8 -> s32``, every other
consumer sees the dequantized weight, and what ran in float is warned about.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax

from jaxopt_dnn.model_adapter import adapt
from jaxopt_dnn.quant import hooks, modes
from jaxopt_dnn.quant import rules as _rules
from jaxopt_dnn.quant.qarray import dequantize, is_qarray
from jaxopt_dnn.quant.select import placeholder, serve_rule, weight_rule
from jaxopt_dnn.quant.stats import STATS, flat_stats


# --------------------------------------------------------------------------- calibration
def calibration_runner(apply_fn, variables, *, method, rules, percentile, bits=8):
  """Returns ``run(args) -> {op: batch statistic}`` for :func:`calibrate`."""
  rs = _rules.as_rules(rules, bits=bits)
  sp = adapt(apply_fn, variables).split(is_qarray)

  @jax.jit
  def run(lv, rest, args):
    mode = modes.Calib(method, percentile)
    with hooks.tracing():
      hooks.run(lambda v, r: sp.call(v, r[1], *r[0]), lv, (args, rest),
                _calib_weight(rs, sp.paths, bits), mode)
    return mode.reduce()

  return lambda args: run(sp.leaves, sp.rest, args)


def _calib_weight(rs, paths, bits):
  def make_weight(i, x, role):
    del role
    if paths[i] is None:
      return None
    r = weight_rule(rs, paths[i], x, bits)
    return None if r is None else hooks.Weight(hooks.op_name(paths[i]), r, x)
  return make_weight


# --------------------------------------------------------------------------- serving
def _serve(fn, leaves, paths, rest, rs, bits, amax):
  """Runs ``fn(leaves, rest)`` with the QArray leaves served through int8 contractions."""
  mode = modes.Serve(amax)

  def make_weight(i, x, role):
    del role
    if not is_qarray(x) or paths[i] is None:
      return None
    r = serve_rule(rs, paths[i], bits)
    return hooks.Weight(hooks.op_name(paths[i]), r, dequantize(x), q=x)

  with hooks.tracing():
    out = hooks.run(fn, [placeholder(x) for x in leaves], rest, make_weight, mode,
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
  am = adapt(model)
  if not any(is_qarray(q) for q in jax.tree.leaves(qvariables, is_leaf=is_qarray)):
    raise ValueError("int8_apply: qvariables has no QArray leaf; run quantize_params("
                     f"{am.params_expr}) first")
  sp = am.flatten(qvariables, is_leaf=is_qarray)
  if weight_only:
    return sp.call([dequantize(x) if is_qarray(x) else x for x in sp.leaves], None,
                   *args, **kwargs)
  if calibration is None:
    calibration = qvariables.get(STATS) if isinstance(qvariables, dict) else None
    if calibration is None:
      raise ValueError("int8_apply: no calibration; pass calibrate(...)'s quant_stats")

  def fn(lv, r):
    a, kw = r
    return sp.call(lv, None, *a, **kw)

  out, mode = _serve(fn, sp.leaves, sp.paths, (args, kwargs), rs, bits, _amax(calibration))
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
