"""Per-layer sensitivity and the automatic plan under a bits (or bytes, or quality) budget.

For every chosen layer ``l`` and candidate ``c`` (int4 group 128, int4 group 64, int8 per
channel, 16-bit, ...) the sensitivity is the distortion of the model's outputs on the
calibration batches when **only** ``l`` is compressed by ``c``::

  s[l, c] = mean_b metric(f(W with W_l <- Q_c(W_l); x_b), f(W; x_b))

measured directly, with one compiled forward reused for every (layer, candidate): the
candidate is realised once for all layers (``method``: RTN, GPTQ or AWQ), then each
layer's compressed kernel is swapped in alone (for GPTQ / AWQ, calibrated on one half of
the batches and measured on the other: see :func:`sensitivity`). The plan minimises
``sum_l s[l, c_l]`` (additive, first-order) subject to ``sum_l bits(l, c_l) <= budget * sum_l n_l``, an
exact multiple-choice knapsack (:mod:`jaxopt_dnn.auto.knapsack`); ``bits(l, c)`` counts
the stored values **and** scales of the realised leaf. ``verify=True`` realises the plan
and measures it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxopt_dnn import _table, _tree
from jaxopt_dnn import quant as quant_lib
from jaxopt_dnn.auto import knapsack

PyTree = Any
METHODS = ("rtn", "gptq", "awq")
_RESOLUTION = 20000     # knapsack cost units over the model's 16-bit size


_SCALE_SUFFIX = {"fp8": "float8_e4m3fn", "bf16": "bfloat16", "f32": "float32"}


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One way to store a layer: ``bits`` 4 / 8 (QArray; ``group_size`` along the
  contraction axis, ``None`` = one scale per output channel) or 16 (bfloat16).

  ``scale_dtype``: the scales' storage (``None``: the quantizer's default, bfloat16 for
  int4 group-wise, float32 otherwise; ``"float8_e4m3fn"``: 8-bit scales under one
  float32 super scale per tensor, so ``int4-g32-fp8`` costs 4.25 bits per weight).
  """
  name: str
  bits: int
  group_size: int | None = None
  scale_dtype: str | None = None

  def __post_init__(self):
    if self.bits not in (4, 8, 16):
      raise ValueError(f"candidate {self.name!r}: bits must be 4, 8 or 16, got {self.bits!r}")
    if self.group_size is not None and (not isinstance(self.group_size, int)
                                        or self.group_size < 1):
      raise ValueError(f"candidate {self.name!r}: group_size must be a positive int or None, "
                       f"got {self.group_size!r}")

  @classmethod
  def parse(cls, spec: str | Candidate) -> Candidate:
    """``"int4-g128"``, ``"int4-g64"``, ``"int8"`` (per channel), ``"int4"``, ``"16-bit"``;
    a ``-fp8`` / ``-bf16`` / ``-f32`` suffix sets the scales' storage
    (``"int4-g32-fp8"``)."""
    if isinstance(spec, Candidate):
      return spec
    m = re.fullmatch(r"int([48])(?:-g(\d+))?(?:-(fp8|bf16|f32))?", str(spec).strip().lower())
    if m:
      return cls(str(spec), int(m.group(1)), int(m.group(2)) if m.group(2) else None,
                 _SCALE_SUFFIX[m.group(3)] if m.group(3) else None)
    if str(spec).strip().lower() in ("16-bit", "bf16", "16bit", "bfloat16"):
      return cls(str(spec), 16)
    raise ValueError(f"unknown candidate {spec!r}; use int4-g128, int4-g64, int4-g32-fp8, "
                     "int8, int4, 16-bit")

  @property
  def quant_kwargs(self) -> dict[str, Any]:
    """``bits`` / ``group_size`` / ``scale_dtype`` for ``quant.gptq`` / ``awq`` /
    ``quantize_params`` and rules (``group_size=None`` given explicitly: per channel)."""
    kw = {"bits": self.bits, "group_size": self.group_size}
    if self.scale_dtype is not None:
      kw["scale_dtype"] = self.scale_dtype
    return kw


DEFAULT_CANDIDATES = ("int4-g128", "int4-g64", "int4-g32-fp8", "int4-g16-fp8", "int8", "16-bit")
"""int4 group 128 / 64 (bf16 scales: 4.125 / 4.25 bits per weight), int4 group 32 / 16
with fp8 scales (4.25 / 4.5), int8 per channel (~8.05) and bfloat16."""


def output_distortion(out: jax.Array, ref: jax.Array) -> jax.Array:
  """Default metric: ``mean((out - ref)^2) / mean(ref^2)`` (scale-free MSE)."""
  out, ref = jnp.asarray(out, jnp.float32), jnp.asarray(ref, jnp.float32)
  return jnp.mean((out - ref) ** 2) / jnp.maximum(jnp.mean(ref ** 2), 1e-30)


# ------------------------------------------------------------------- the model


class _Forward:
  """``f(params, *inputs)`` for linen (``apply_fn(variables, ...)``) or an NNX module."""

  def __init__(self, apply_fn: Any, variables: PyTree):
    self.nnx = isinstance(apply_fn, nnx.Module)
    if self.nnx:   # variables: nnx.to_pure_dict(nnx.state(model, nnx.Param)) (or None)
      graphdef, state, rest = nnx.split(apply_fn, nnx.Param, ...)
      if variables is None:
        variables = nnx.to_pure_dict(state)
      elif isinstance(variables, Mapping) and set(variables) == {"params"}:
        variables = variables["params"]
      self._graphdef, self._template, self._rest = graphdef, state, rest
      self.variables = self.params = variables
    else:
      if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable (linen) or an nnx.Module, got {apply_fn!r}")
      if not isinstance(variables, Mapping) or "params" not in variables:
        raise TypeError("variables must be a mapping with a 'params' collection (linen)")
      self.apply_fn, self.variables, self.params = apply_fn, variables, variables["params"]

  def __call__(self, params, *inputs):
    if self.nnx:
      state = jax.tree.map(lambda x: x, self._template)
      nnx.replace_by_pure_dict(state, params)
      return nnx.merge(self._graphdef, state, self._rest)(*inputs)
    return self.apply_fn({**self.variables, "params": params}, *inputs)


def _as_inputs(batch: Any) -> tuple:
  return batch if isinstance(batch, tuple) else (batch,)


def _exact(paths: Iterable[str]) -> list[str]:
  return [f"^{re.escape(p)}$" for p in paths]


def _default_layers(params: PyTree) -> list[str]:
  """Kernels consumed by contractions: floating leaves of ndim >= 2 named ``kernel``."""
  return [p for p, x in _tree.leaves_with_paths(params)
          if _tree.is_float_array(x) and np.ndim(x) >= 2 and p.split("/")[-1] == "kernel"]


def realize(method: str, cand: Candidate, fwd: _Forward, apply_fn: Any, batches: list,
            paths: Sequence[str]) -> dict[str, Any]:
  """``{path: stored leaf}`` (QArray, or a bfloat16 array) of ``paths`` under ``cand``."""
  if not paths:
    return {}
  leaves = dict(_tree.leaves_with_paths(fwd.params))
  if cand.bits == 16:
    return {p: jnp.asarray(leaves[p]).astype(jnp.bfloat16) for p in paths}
  rules = [(r, cand.quant_kwargs) for r in _exact(paths)]
  if method == "rtn":
    tree = quant_lib.quantize_params(fwd.params, rules, bits=cand.bits)
  elif method in ("gptq", "awq"):
    fn = getattr(quant_lib, method, None)
    if fn is None:
      raise ValueError(f"method={method!r} needs quant.{method}, which this build lacks")
    tree = fn(apply_fn, fwd.variables, batches, bits=cand.bits, group_size=cand.group_size,
              rules=rules)
  else:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  out = dict(_tree.leaves_with_paths(tree, is_leaf=quant_lib.is_qarray))
  return {p: out[p] for p in paths}


def stored_bits(leaf: Any) -> int:
  """Bits a stored leaf costs: every array of a QArray (values, scales, zero points)."""
  if quant_lib.is_qarray(leaf):
    return sum(int(np.prod(np.shape(a))) * jnp.dtype(a.dtype).itemsize * 8
               for a in jax.tree.leaves(leaf))
  return int(np.prod(np.shape(leaf))) * jnp.dtype(leaf.dtype).itemsize * 8


def _float(leaf: Any, dtype) -> jax.Array:
  return (quant_lib.dequantize(leaf, dtype) if quant_lib.is_qarray(leaf)
          else jnp.asarray(leaf).astype(dtype))


# ------------------------------------------------------------------------ plan


@dataclasses.dataclass
class Plan:
  """A per-layer choice of candidate, with what it costs and what it is predicted to do.

  Attributes:
    choices: ``{layer path: candidate name}``.
    candidates: the candidates, by name.
    sensitivity: ``{layer path: {candidate name: s[l, c]}}``.
    layer_bits: ``{layer path: {candidate name: stored bits}}``.
    sizes: ``{layer path: number of weights}``.
    method: how candidates are realised (``rtn`` | ``gptq`` | ``awq``).
    predicted: ``sum_l s[l, c_l]``.
    measured: the realised plan's metric (``search(verify=True)`` / :meth:`verify`).
  """
  choices: dict[str, str]
  candidates: dict[str, Candidate]
  sensitivity: dict[str, dict[str, float]]
  layer_bits: dict[str, dict[str, int]]
  sizes: dict[str, int]
  method: str
  predicted: float
  measured: float | None = None
  budget_bits_per_weight: float | None = None
  stored: dict[str, dict[str, Any]] | None = dataclasses.field(default=None, repr=False)

  @property
  def bits_per_weight(self) -> float:
    """Achieved bits per weight over the chosen layers, scales counted."""
    total = sum(self.layer_bits[p][c] for p, c in self.choices.items())
    return total / max(sum(self.sizes.values()), 1)

  @property
  def bytes(self) -> int:
    return math.ceil(sum(self.layer_bits[p][c] for p, c in self.choices.items()) / 8)

  def apply(self, apply_fn: Any, variables: PyTree, batches: Iterable[Any], *,
            reuse: bool | None = None) -> PyTree:
    """The params tree with the plan realised: QArray leaves (bf16 for 16-bit layers).

    RTN is leafwise, so the leaves of the sensitivity pass are reused. GPTQ / AWQ run
    once more, **sequentially over the mixed plan** (one rule per layer with its own bits
    and group size): each layer is calibrated on the inputs the plan's own compressed
    layers before it produce. ``reuse=True`` takes the sensitivity pass's leaves
    instead (each calibrated under its candidate everywhere: faster, less exact; kept
    only by a sensitivity pass without cross-fitting).
    """
    fwd = _Forward(apply_fn, variables)
    reuse = (self.method == "rtn") if reuse is None else reuse
    if reuse and self.stored is not None:
      stored = {p: self.stored[c][p] for p, c in self.choices.items()}
    elif self.method == "rtn":
      batches = [_as_inputs(b) for b in batches]
      stored = {}
      for name, cand in self.candidates.items():
        paths = [p for p, c in self.choices.items() if c == name]
        stored.update(realize(self.method, cand, fwd, apply_fn, batches, paths))
    else:
      stored = self._realize_mixed(fwd, apply_fn, [_as_inputs(b) for b in batches])
    return _tree.map_with_path_str(lambda p, x: stored.get(p, x), fwd.params)

  def _realize_mixed(self, fwd, apply_fn, batches) -> dict[str, Any]:
    """One sequential GPTQ/AWQ pass with a rule per quantized layer."""
    leaves = dict(_tree.leaves_with_paths(fwd.params))
    stored = {p: jnp.asarray(leaves[p]).astype(jnp.bfloat16)
              for p, c in self.choices.items() if self.candidates[c].bits == 16}
    rules = [(f"^{re.escape(p)}$", self.candidates[c].quant_kwargs)
             for p, c in self.choices.items() if self.candidates[c].bits != 16]
    if rules:
      fn = getattr(quant_lib, self.method)
      tree = fn(apply_fn, fwd.variables, batches, bits=4, group_size=None, rules=rules)
      out = dict(_tree.leaves_with_paths(tree, is_leaf=quant_lib.is_qarray))
      stored.update({p: out[p] for p, c in self.choices.items()
                     if self.candidates[c].bits != 16})
    return stored

  def verify(self, apply_fn: Any, variables: PyTree, batches: Iterable[Any],
             metric: Callable | None = None) -> float:
    """Realises the plan and measures its metric against the float model (sets
    :attr:`measured`)."""
    fwd = _Forward(apply_fn, variables)
    batches = [_as_inputs(b) for b in batches]
    realised = self.apply(apply_fn, variables, batches)
    floats = jax.tree.map(lambda x, r: _float(x, jnp.asarray(r).dtype), realised, fwd.params,
                          is_leaf=quant_lib.is_qarray)
    self.measured = _measure(fwd, batches, [floats], metric or output_distortion)[0]
    return self.measured

  def __str__(self) -> str:
    names = list(self.candidates)
    rows = []
    for p, c in self.choices.items():
      rows.append([p, self.sizes[p], c, f"{self.layer_bits[p][c] / self.sizes[p]:.2f}"]
                  + [f"{self.sensitivity[p][n]:.3g}" for n in names])
    head = ["layer", "weights", "choice", "bits/w"] + [f"s[{n}]" for n in names]
    meas = "-" if self.measured is None else f"{self.measured:.4g}"
    title = (f"plan ({self.method}): {self.bits_per_weight:.3f} bits/weight"
             + ("" if self.budget_bits_per_weight is None
                else f" (budget {self.budget_bits_per_weight:g})")
             + f", {self.bytes:,} bytes; predicted {self.predicted:.4g}, measured {meas}")
    return _table.render(head, rows, right=tuple(range(1, len(head))), title=title)


def _measure(fwd: _Forward, batches: list, trees: list, metric: Callable) -> list[float]:
  """``metric`` of each params tree's outputs against the float model's, batch-averaged."""
  run = jax.jit(lambda p, *x: fwd(p, *x))
  refs = [run(fwd.params, *b) for b in batches]
  score = jax.jit(lambda p, r, *x: metric(fwd(p, *x), r))
  return [float(np.mean([float(score(t, r, *b)) for r, b in zip(refs, batches)]))
          for t in trees]


@dataclasses.dataclass
class Sensitivity:
  """``s[l, c]`` and ``bits[l, c]`` for every chosen layer and candidate."""
  layers: list[str]
  candidates: dict[str, Candidate]
  values: dict[str, dict[str, float]]
  bits: dict[str, dict[str, int]]
  sizes: dict[str, int]
  method: str
  stored: dict[str, dict[str, Any]] | None = dataclasses.field(default=None, repr=False)

  def uniform(self, name: str) -> Plan:
    """The plan that puts candidate ``name`` on every layer (for comparisons)."""
    if name not in self.candidates:
      raise ValueError(f"unknown candidate {name!r}; have {sorted(self.candidates)}")
    return Plan({layer: name for layer in self.layers}, dict(self.candidates), self.values,
                self.bits, self.sizes, self.method,
                sum(self.values[layer][name] for layer in self.layers), stored=self.stored)


def sensitivity(apply_fn: Any, variables: PyTree, batches: Iterable[Any], *,
                candidates: Sequence[str | Candidate] | None = None, method: str = "rtn",
                rules: str | Sequence[str] | None = None,
                metric: Callable | None = None, crossfit: bool | None = None) -> Sensitivity:
  """Measures ``s[l, c]`` (see the module docstring) and each layer's stored bits.

  ``crossfit`` (default: on for GPTQ / AWQ given at least two batches): the batches are
  split in two folds (even / odd); each candidate is calibrated on one fold and its
  sensitivities are measured on the other, then averaged. A calibrated method fits its
  calibration tokens: on all-MiniLM-L6-v2 with 32 sentences, GPTQ int4-g32 keeps a
  cosine of 0.995 on them but 0.97 on other sentences, and measured in-sample the
  layers whose inputs outnumber the tokens look the most harmless (``bench/auto_bench.py``).
  RTN is not calibrated, so it is measured on every batch.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  fwd = _Forward(apply_fn, variables)
  batches = [_as_inputs(b) for b in batches]
  if not batches:
    raise ValueError("batches is empty: the sensitivity needs calibration batches")
  cands = [Candidate.parse(c) for c in (candidates or DEFAULT_CANDIDATES)]
  by_name = {c.name: c for c in cands}
  if len(by_name) != len(cands):
    raise ValueError(f"candidate names must be unique, got {[c.name for c in cands]}")
  if rules is None:
    layers = _default_layers(fwd.params)
  else:
    layers = [p for p, _, r in _tree.select(fwd.params, rules, argname="rules") if r is not None]
  if not layers:
    raise ValueError("no layer to plan: rules matched no kernel")
  leaves = dict(_tree.leaves_with_paths(fwd.params))
  sizes = {p: int(np.size(leaves[p])) for p in layers}
  metric = metric or output_distortion
  run = jax.jit(lambda p, *x: fwd(p, *x))
  refs = [run(fwd.params, *b) for b in batches]
  score = jax.jit(lambda p, r, *x: metric(fwd(p, *x), r))
  values: dict[str, dict[str, float]] = {p: {} for p in layers}
  bits: dict[str, dict[str, int]] = {p: {} for p in layers}
  if crossfit is None:
    crossfit = method != "rtn" and len(batches) >= 2
  if crossfit and len(batches) < 2:
    raise ValueError("crossfit=True needs at least two calibration batches")
  idx = list(range(len(batches)))
  # (calibrate on, measure on) index sets
  folds = [(idx[0::2], idx[1::2]), (idx[1::2], idx[0::2])] if crossfit else [(idx, idx)]
  kept: dict[str, dict[str, Any]] = {}
  for cand in cands:
    scores: dict[str, list[float]] = {p: [] for p in layers}
    for fit_on, measure_on in folds:
      stored = realize(method, cand, fwd, apply_fn, [batches[i] for i in fit_on], layers)
      for p in layers:
        bits[p][cand.name] = stored_bits(stored[p])
        swapped = _tree.map_with_path_str(
            lambda q, x, p=p: _float(stored[p], jnp.asarray(x).dtype) if q == p else x,
            fwd.params)
        scores[p] += [float(score(swapped, refs[i], *batches[i])) for i in measure_on]
    if not crossfit:
      kept[cand.name] = stored
    for p in layers:
      values[p][cand.name] = float(np.mean(scores[p]))
  return Sensitivity(layers, by_name, values, bits, sizes, method, kept or None)


def plan_for_budget(sens: Sensitivity, bits_per_weight: float) -> Plan | None:
  """The least-predicted-distortion plan with ``bits <= bits_per_weight * weights``."""
  names = list(sens.candidates)
  total_16 = 16 * sum(sens.sizes.values())
  unit = max(total_16 / _RESOLUTION, 1e-9)
  costs = [[math.ceil(sens.bits[p][n] / unit - 1e-9) for n in names] for p in sens.layers]
  vals = [[sens.values[p][n] for n in names] for p in sens.layers]
  cap = math.floor(bits_per_weight * sum(sens.sizes.values()) / unit + 1e-9)
  solved = knapsack.solve(costs, vals, cap)
  if solved is None:
    return None
  picks, total = solved
  return Plan({p: names[k] for p, k in zip(sens.layers, picks)}, dict(sens.candidates),
              sens.values, sens.bits, sens.sizes, sens.method, total,
              budget_bits_per_weight=bits_per_weight, stored=sens.stored)


def search(apply_fn: Any, variables: PyTree, batches: Iterable[Any], *,
           bits_per_weight: float | None = 4.5, candidates: Sequence[str] | None = None,
           method: str = "gptq", rules: str | Sequence[str] | None = None,
           metric: Callable | None = None, budget_bytes: int | None = None,
           target: float | None = None, verify: bool = False,
           sens: Sensitivity | None = None, crossfit: bool | None = None) -> Plan:
  """The automatic per-layer plan.

  Args:
    apply_fn: linen ``apply_fn(variables, *inputs)`` or an NNX module.
    variables: linen variables (``{"params": ...}``); NNX: the params pure dict.
    batches: calibration batches (tuples of model inputs).
    bits_per_weight: budget over the chosen layers, scales counted.
    candidates: default :data:`DEFAULT_CANDIDATES` (``int4-g128, int4-g64,
      int4-g32-fp8, int4-g16-fp8, int8, 16-bit``).
    method: how each candidate is realised: ``"rtn"`` | ``"gptq"`` | ``"awq"``.
    rules: which layers (regex over key paths); default: every contraction kernel.
    metric: ``metric(outputs, float_outputs) -> scalar`` (default
      :func:`output_distortion`).
    budget_bytes: a bytes budget instead of ``bits_per_weight``.
    target: a quality target instead: the smallest plan whose *measured* metric is
      ``<= target`` (candidates tried from the cheapest predicted-feasible budget up).
    verify: realise the plan and measure it (``plan.measured``).
    sens: reuse a :class:`Sensitivity` (e.g. for several budgets).
    crossfit: calibrate and measure the sensitivities on different halves of the
      batches (default: on for GPTQ / AWQ with two batches or more; see
      :func:`sensitivity`).
  """
  batches = [_as_inputs(b) for b in batches]
  sens = sens or sensitivity(apply_fn, variables, batches, candidates=candidates,
                             method=method, rules=rules, metric=metric, crossfit=crossfit)
  n = sum(sens.sizes.values())
  if target is not None:
    return _smallest_meeting(sens, target, apply_fn, variables, batches, metric)
  if budget_bytes is not None:
    bits_per_weight = 8 * budget_bytes / n
  if bits_per_weight is None or not bits_per_weight > 0:
    raise ValueError(f"bits_per_weight must be > 0, got {bits_per_weight!r}")
  plan = plan_for_budget(sens, bits_per_weight)
  if plan is None:
    cheapest = sum(min(b.values()) for b in sens.bits.values()) / n
    raise ValueError(f"bits_per_weight={bits_per_weight:g} is below the cheapest plan "
                     f"({cheapest:.3f} bits/weight with these candidates)")
  if verify:
    plan.verify(apply_fn, variables, batches, metric)
  return plan


def _smallest_meeting(sens, target, apply_fn, variables, batches, metric) -> Plan:
  n = sum(sens.sizes.values())
  lo = sum(min(b.values()) for b in sens.bits.values()) / n
  hi = sum(max(b.values()) for b in sens.bits.values()) / n
  budgets = np.unique(np.round(np.linspace(lo, hi, 41), 4))
  for b in budgets:
    plan = plan_for_budget(sens, float(b) + 1e-6)
    if plan is None or plan.predicted > target:
      continue
    if plan.verify(apply_fn, variables, batches, metric) <= target:
      return plan
  raise ValueError(f"no plan reaches target={target:g} (the largest candidates everywhere "
                   f"do not); relax the target or add candidates")
