"""Per-layer sensitivity and the automatic plan under a bits (or bytes, or quality) budget.

For every chosen layer ``l`` and candidate ``c`` (int4 group 128, int4 group 64, int8 per
channel, 16-bit, ...) the sensitivity is the distortion of the model's outputs on the
calibration batches when **only** ``l`` is compressed by ``c``::

  s[l, c] = mean_b metric(f(W with W_l <- Q_c(W_l); x_b), f(W; x_b))

measured directly: the candidate is realised once for all layers (``method``: RTN,
GPTQ or AWQ), then every layer's compressed kernel is swapped in alone by one compiled
program per input shape (a ``lax.map`` over the layers, reused by every candidate and
fold). For GPTQ each layer is calibrated **alone**, on the float model's inputs (the
setting ``s[l, c]`` describes: only ``l`` compressed): the input Hessians of every layer
are captured once per fold by one jitted forward per batch and shared by all candidates,
and same-shape layers are solved by one ``vmap``-ped GPTQ (SparseGPT first for a sparse
candidate). GPTQ / AWQ are calibrated on one half of the batches and measured on the
other (see :func:`sensitivity`). The plan minimises
``sum_l s[l, c_l]`` (additive, first-order) subject to
``sum_l bits(l, c_l) <= budget * sum_l n_l``, an exact multiple-choice knapsack
(:mod:`jaxopt_dnn.auto.knapsack`); ``bits(l, c)`` counts the stored values **and** scales
of the realised leaf (nonzero values and their index metadata for a sparse candidate:
:mod:`jaxopt_dnn.auto.candidates`). ``verify=True`` realises the plan and measures it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import importlib
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_dnn import _table, _tree
from jaxopt_dnn.model_adapter import adapt
from jaxopt_dnn import quant as quant_lib
from jaxopt_dnn import sparsity as sparsity_lib
from jaxopt_dnn.auto import knapsack
from jaxopt_dnn.auto.candidates import DEFAULT_CANDIDATES, PRUNE_METHOD, Candidate

PyTree = Any
METHODS = ("rtn", "gptq", "awq")
_RESOLUTION = 20000     # knapsack cost units over the model's 16-bit size


def output_distortion(out: jax.Array, ref: jax.Array) -> jax.Array:
  """Default metric: ``mean((out - ref)^2) / mean(ref^2)`` (scale-free MSE)."""
  out, ref = jnp.asarray(out, jnp.float32), jnp.asarray(ref, jnp.float32)
  return jnp.mean((out - ref) ** 2) / jnp.maximum(jnp.mean(ref ** 2), 1e-30)


# ------------------------------------------------------------------- the model


class _Forward:
  """``f(params, *inputs)`` for linen (``apply_fn(variables, ...)``) or an NNX module
  (:func:`jaxopt_dnn.model_adapter.adapt`; NNX ``variables``: the pure params dict,
  ``{"params": pure}`` or ``None``)."""

  def __init__(self, apply_fn: Any, variables: PyTree):
    self.model = adapt(apply_fn, variables)
    if self.model.params is None:
      raise TypeError("variables must be a mapping with a 'params' collection (linen)")
    self.variables, self.params = self.model.variables, self.model.params

  def module(self, params):
    """NNX: a module holding ``params`` (linen: the variables holding them)."""
    return self.model.rebuild(params)

  def __call__(self, params, *inputs):
    return self.model.apply_params(params, *inputs)

  def quant_args(self, params=None) -> tuple[Callable, Any]:
    """``(apply_fn, variables)`` as ``quant.gptq`` / ``awq`` / ``sparsity.oneshot`` take
    them (NNX: ``apply_fn(module, *inputs)`` and the module), holding ``params``."""
    params = self.params if params is None else params
    return self.model.call, self.model.rebuild(params)


def _as_inputs(batch: Any) -> tuple:
  return batch if isinstance(batch, tuple) else (batch,)


def _exact(paths: Iterable[str]) -> list[str]:
  return [f"^{re.escape(p)}$" for p in paths]


def _default_layers(params: PyTree) -> list[str]:
  """Kernels consumed by contractions: floating leaves of ndim >= 2 named ``kernel``."""
  return [p for p, x in _tree.leaves_with_paths(params)
          if _tree.is_float_array(x) and np.ndim(x) >= 2 and p.split("/")[-1] == "kernel"]


def _pruned(method: str, fwd: _Forward, batches: list, layers: Mapping[str, Candidate]):
  """``fwd.params`` with each layer one-shot pruned as its (sparse) candidate says
  (:data:`~jaxopt_dnn.auto.candidates.PRUNE_METHOD`: SparseGPT for GPTQ, Wanda for AWQ,
  magnitude for RTN); one sequential pass per sparsity pattern."""
  params = fwd.params
  patterns: dict[str, list[str]] = {}
  for p, c in layers.items():
    patterns.setdefault(c.sparsity, []).append(p)
  for paths in patterns.values():
    params, _ = sparsity_lib.oneshot(*fwd.quant_args(params), batches,
                                     method=PRUNE_METHOD[method], rules=_exact(paths),
                                     **layers[paths[0]].prune_kwargs)
  return params


def _quantized(method: str, fwd: _Forward, params: PyTree, batches: list, rules: list,
               keep_zeros: bool) -> dict[str, Any]:
  """``{path: QArray}`` of the leaves ``rules`` choose, realised by ``method``."""
  if method == "rtn":
    tree = quant_lib.quantize_params(params, rules)
  elif method in ("gptq", "awq"):
    fn = getattr(quant_lib, method, None)
    if fn is None:
      raise ValueError(f"method={method!r} needs quant.{method}, which this build lacks")
    kw = {"keep_zeros": True} if keep_zeros and method == "gptq" else {}
    tree = fn(*fwd.quant_args(params), batches, bits=4, group_size=None, rules=rules, **kw)
  else:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  return dict(_tree.leaves_with_paths(tree, is_leaf=quant_lib.is_qarray))


def realize(method: str, fwd: _Forward, batches: list,
            layers: Mapping[str, Candidate]) -> dict[str, Any]:
  """``{path: stored leaf}`` (QArray, or a bfloat16 array) for each layer under its
  candidate: sparse layers pruned first, then one (sequential, for GPTQ / AWQ) pass of
  ``method`` over every quantized layer (a pruned weight keeps its 0)."""
  if not layers:
    return {}
  sparse = {p: c for p, c in layers.items() if c.prune_kwargs is not None}
  params = _pruned(method, fwd, batches, sparse) if sparse else fwd.params
  leaves = dict(_tree.leaves_with_paths(params))
  stored = {p: jnp.asarray(leaves[p]).astype(jnp.bfloat16)
            for p, c in layers.items() if c.bits == 16}
  rules = [(f"^{re.escape(p)}$", c.quant_kwargs) for p, c in layers.items() if c.bits != 16]
  if rules:
    out = _quantized(method, fwd, params, batches, rules, keep_zeros=bool(sparse))
    stored.update({p: out[p] for p, c in layers.items() if c.bits != 16})
  return stored


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
    else:
      batches = [_as_inputs(b) for b in batches]
      stored = realize(self.method, fwd, batches,
                       {p: self.candidates[c] for p, c in self.choices.items()})
    return _tree.map_with_path_str(lambda p, x: stored.get(p, x), fwd.params)

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


def _score_all(fwd: _Forward, metric: Callable, layers: Sequence[str]):
  """``f(params, new, ref, *x) -> (L,)``: ``metric(f(params with layer l <- new[l]; x), ref)``
  for every layer ``l``, one compiled program (per input shape) for all layers and
  candidates: a ``lax.map`` over the layer index, each step selecting exactly one
  swapped kernel (``where(l == j, new_j, w_j)``: the swapped tree is exact)."""
  pos = {p: j for j, p in enumerate(layers)}

  @jax.jit
  def f(params, new, ref, *x):
    def one(i):
      swapped = _tree.map_with_path_str(
          lambda q, w: jnp.where(i == pos[q], new[q].astype(w.dtype), w) if q in pos else w,
          params)
      return metric(fwd(swapped, *x), ref)
    return jax.lax.map(one, jnp.arange(len(layers)))
  return f


def _shape_key(args: tuple) -> tuple:
  leaves, tree = jax.tree.flatten(args)
  return (tree,) + tuple((np.shape(x), jnp.result_type(x).name) for x in leaves)


class _Pipeline:
  """Background threads of the sensitivity pass (``workers`` of them, at most 2).

  ``programs`` compiles ``score_all`` ahead of time, once per distinct batch shape, on
  one thread; ``map(fn, jobs)`` yields ``(job, fn(*job))`` in order while a second thread
  computes up to ``lookahead`` jobs ahead. With ``workers=0`` both run in order on the
  calling thread. JAX dispatch and tracing are thread-safe (flax keeps its module and
  interceptor contexts thread-local); each job only reads what earlier jobs wrote.
  """

  def __init__(self, workers: int, lookahead: int = 2):
    if workers not in (0, 1, 2):
      raise ValueError(f"workers must be 0, 1 or 2, got {workers!r}")
    self._pools = [concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jd-auto")
                   for _ in range(workers)]
    self.lookahead = lookahead

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    for pool in self._pools:
      pool.shutdown(wait=True, cancel_futures=True)

  def _submit(self, pool_index: int, fn, *args):
    if not self._pools:
      done = concurrent.futures.Future()
      try:
        done.set_result(fn(*args))
      except BaseException as e:  # noqa: BLE001 - re-raised by .result()
        done.set_exception(e)
      return done
    return self._pools[min(pool_index, len(self._pools) - 1)].submit(fn, *args)

  def programs(self, score_all, fwd, leaves, layers, batches):
    """``program(i)``: the compiled ``score_all`` for batch ``i``'s shapes (falls back to
    the jitted function when an argument's type differs from the ahead-of-time one)."""
    spec = {p: jax.ShapeDtypeStruct(np.shape(leaves[p]), jnp.asarray(leaves[p]).dtype)
            for p in layers}

    def compile_for(b):
      ref = jax.eval_shape(lambda p, *x: fwd(p, *x), fwd.params, *b)
      return score_all.lower(fwd.params, spec, ref, *b).compile()

    futures: dict[tuple, Any] = {}
    if self._pools:   # ahead of time only when a thread can do it
      for b in batches:
        futures.setdefault(_shape_key(b), self._submit(0, compile_for, b))

    def program(i):
      fut = futures.get(_shape_key(batches[i]))
      if fut is None:
        return score_all
      compiled = fut.result()

      def call(*args):
        try:
          return compiled(*args)
        except (TypeError, ValueError):   # e.g. a weak-typed or differently placed input
          return score_all(*args)
      return call
    return program

  def map(self, fn, jobs):
    pending: collections.deque = collections.deque()
    it = iter(jobs)
    while True:
      while len(pending) < max(self.lookahead, 1):
        job = next(it, None)
        if job is None:
          break
        pending.append((job, self._submit(1, fn, *job)))
      if not pending:
        return
      job, fut = pending.popleft()
      yield job, fut.result()


class _Alone:
  """GPTQ (and SparseGPT for sparse candidates) of every layer **alone**: each kernel
  calibrated on the float model's inputs, as it is when only that layer is compressed.
  The input Hessians are captured once (one jitted forward per batch) and shared by
  every candidate; each candidate is then one GPTQ solve per layer
  (:func:`jaxopt_dnn.quant.gptq.solve_alone`)."""

  def __init__(self, method: str, fwd: _Forward, batches: list, layers: Sequence[str]):
    gptq_lib = importlib.import_module("jaxopt_dnn.quant.gptq")   # (the name is the function)
    chosen = set(layers)
    self.gptq = gptq_lib
    hessian_lib = importlib.import_module("jaxopt_dnn.quant.hessian")
    self.cap = hessian_lib.HessianCapture(*fwd.quant_args(), batches,
                                          lambda p, x: p in chosen
                                          and not quant_lib.is_qarray(x),
                                          where="auto.sensitivity")
    got = {o.kernel for o in self.cap.ops}
    # layers no captured contraction consumes (e.g. an embedding table): round to
    # nearest, as quant.gptq does with chosen leaves it cannot calibrate
    self.uncaptured = [p for p in layers if p not in got]
    self.hessians = gptq_lib.input_hessians(self.cap)
    self.layers = [p for p in layers if p in got]
    self.leaves = dict(_tree.leaves_with_paths(fwd.params))

  def _pruned(self, cand: Candidate) -> dict[str, jax.Array]:
    oneshot_lib = importlib.import_module("jaxopt_dnn.sparsity.oneshot")
    kw = cand.prune_kwargs
    out = {}
    for o in self.cap.ops:
      if o.kernel not in self.layers:
        continue
      w = self.cap.leaves[o.kernel]
      new, _ = oneshot_lib.prune_layer(o, w, self.hessians[o.kernel], method="sparsegpt",
                                       **kw)
      out[o.kernel] = new
    return out

  def realize(self, cand: Candidate) -> dict[str, Any]:
    if cand.prune_kwargs is not None and self.uncaptured:
      raise ValueError(f"auto.sensitivity: sparse candidate {cand.name!r} needs captured "
                       f"kernels consumed by a contraction; not captured: {self.uncaptured}")
    weights = self._pruned(cand) if cand.prune_kwargs is not None else None
    if cand.bits == 16:
      src = weights or {p: self.cap.leaves[p] for p in self.layers}
      out = {p: jnp.asarray(src[p]).astype(jnp.bfloat16) for p in self.layers}
      out.update({p: jnp.asarray(self.leaves[p]).astype(jnp.bfloat16) for p in self.uncaptured})
      return out
    rule = quant_lib.QuantRule(".*", **cand.quant_kwargs)
    out = self.gptq.solve_alone(self.cap, self.hessians, {p: rule for p in self.layers},
                                weights=weights, keep_zeros=weights is not None)
    if self.uncaptured:
      rtn = quant_lib.quantize_params(self.leaves_tree(), [(f"^{re.escape(p)}$",
                                                            cand.quant_kwargs)
                                                           for p in self.uncaptured])
      got = dict(_tree.leaves_with_paths(rtn, is_leaf=quant_lib.is_qarray))
      out.update({p: got[p] for p in self.uncaptured})
    return out

  def leaves_tree(self):
    return self.cap.params


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
                metric: Callable | None = None, crossfit: bool | None = None,
                log: Callable[[str], Any] | None = None, workers: int = 2) -> Sensitivity:
  """Measures ``s[l, c]`` (see the module docstring) and each layer's stored bits.

  ``crossfit`` (default: on for GPTQ / AWQ): the batches are split in two folds (even /
  odd batches; a single batch is cut in two halves along its leading axis); each
  candidate is calibrated on one fold and its sensitivities are measured on the other,
  then averaged. A calibrated method fits its calibration tokens: on all-MiniLM-L6-v2
  with 32 sentences, GPTQ int4-g32 keeps a cosine of 0.995 on them but 0.97 on other
  sentences, and measured in-sample the layers whose inputs outnumber the tokens look
  the most harmless (``bench/auto_bench.py``). RTN is not calibrated, so it is measured
  on every batch.
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
  halves = _halves(batches[0]) if len(batches) == 1 else None
  if crossfit is None:
    crossfit = method != "rtn" and (len(batches) >= 2 or halves is not None)
  if crossfit and len(batches) < 2:
    if halves is None:
      raise ValueError("crossfit=True needs two calibration batches, or one whose array "
                       "inputs share a leading (batch) axis of length >= 2 to split")
    batches = list(halves)
  metric = metric or output_distortion
  say = log or (lambda _msg: None)
  t0, c0 = time.perf_counter(), time.process_time()
  score_all = _score_all(fwd, metric, layers)
  values: dict[str, dict[str, float]] = {p: {} for p in layers}
  bits: dict[str, dict[str, int]] = {p: {} for p in layers}
  idx = list(range(len(batches)))
  # (calibrate on, measure on) index sets
  folds = [(idx[0::2], idx[1::2]), (idx[1::2], idx[0::2])] if crossfit else [(idx, idx)]
  kept: dict[str, dict[str, Any]] = {}
  scores: dict[str, dict[str, list[float]]] = {c.name: {p: [] for p in layers} for c in cands}
  jobs = [(k, cand) for k in range(len(folds)) for cand in cands]
  with _Pipeline(workers) as pipe:
    # compile the measuring program for every batch shape while the references run and
    # the first candidates are realised
    program = pipe.programs(score_all, fwd, leaves, layers, batches)
    run = jax.jit(lambda p, *x: fwd(p, *x))
    refs = [run(fwd.params, *b) for b in batches]
    alones: dict[int, Any] = {}

    def realise(k: int, cand: Candidate):
      t1 = time.perf_counter()
      fit = [batches[i] for i in folds[k][0]]
      if method == "gptq" and k not in alones:
        alones[k] = _Alone(method, fwd, fit, layers)
      stored = (alones[k].realize(cand) if method == "gptq"
                else realize(method, fwd, fit, {p: cand for p in layers}))
      new = {p: _float(stored[p], jnp.asarray(leaves[p]).dtype) for p in layers}
      jax.block_until_ready(new)
      return stored, new, time.perf_counter() - t1

    for (k, cand), (stored, new, took) in pipe.map(realise, jobs):
      t2 = time.perf_counter()
      for i in folds[k][1]:
        got = np.asarray(program(i)(fwd.params, new, refs[i], *batches[i]))
        for p, v in zip(layers, got):
          scores[cand.name][p].append(float(v))
      for p in layers:
        bits[p][cand.name] = cand.cost_bits(stored[p])
      if not crossfit:
        kept[cand.name] = stored
      say(f"auto.sensitivity: fold {k + 1}/{len(folds)} {cand.name}: realised in {took:.1f} s, "
          f"measured {len(layers)} layers x {len(folds[k][1])} batches "
          f"{time.perf_counter() - t2:.1f} s (total {time.perf_counter() - t0:.0f} s wall, "
          f"{time.process_time() - c0:.0f} s process CPU)")
  for cand in cands:
    for p in layers:
      values[p][cand.name] = float(np.mean(scores[cand.name][p]))
  return Sensitivity(layers, by_name, values, bits, sizes, method, kept or None)


def _halves(batch: tuple) -> tuple[tuple, tuple] | None:
  """A single batch cut in two along the leading axis its array inputs share (first and
  second half of the rows), or ``None`` when they share none of length >= 2."""
  arrays = [x for x in jax.tree.leaves(batch) if np.ndim(x) >= 1]
  n = {np.shape(x)[0] for x in arrays}
  if not arrays or len(n) != 1 or min(n) < 2:
    return None
  h = min(n) // 2
  cut = lambda sl: jax.tree.map(lambda x: x[sl] if np.ndim(x) >= 1 else x, batch)  # noqa: E731
  return cut(slice(0, h)), cut(slice(h, None))


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
    # the cost units are rounded up: at (or just above) the cheapest plan's exact bits the
    # rounded knapsack may find nothing, but the cheapest plan itself fits
    cheapest = [min(range(len(names)), key=lambda k: (sens.bits[p][names[k]], vals[i][k]))
                for i, p in enumerate(sens.layers)]
    if sum(sens.bits[p][names[k]] for p, k in zip(sens.layers, cheapest)) > \
        bits_per_weight * sum(sens.sizes.values()):
      return None
    solved = cheapest, sum(vals[i][k] for i, k in enumerate(cheapest))
  picks, total = solved
  return Plan({p: names[k] for p, k in zip(sens.layers, picks)}, dict(sens.candidates),
              sens.values, sens.bits, sens.sizes, sens.method, total,
              budget_bits_per_weight=bits_per_weight, stored=sens.stored)


def search(apply_fn: Any, variables: PyTree, batches: Iterable[Any], *,
           bits_per_weight: float | None = 4.5, candidates: Sequence[str] | None = None,
           method: str = "gptq", rules: str | Sequence[str] | None = None,
           metric: Callable | None = None, budget_bytes: int | None = None,
           target: float | None = None, verify: bool = False,
           sens: Sensitivity | None = None, crossfit: bool | None = None,
           log: Callable[[str], Any] | None = None, workers: int = 2) -> Plan:
  """The automatic per-layer plan.

  Args:
    apply_fn: linen ``apply_fn(variables, *inputs)`` or an NNX module.
    variables: linen variables (``{"params": ...}``); NNX: the params pure dict.
    batches: calibration batches (tuples of model inputs).
    bits_per_weight: budget over the chosen layers, scales counted.
    candidates: default :data:`DEFAULT_CANDIDATES` (``int4-g128, int4-g64,
      int4-g32-fp8, int4-g16-fp8, int8, 16-bit``); a ``+2:4`` / ``+50%`` suffix
      (``"int4-g32-fp8+2:4"``) prunes one-shot first, and the budget then counts
      nonzero bits (:mod:`jaxopt_dnn.auto.candidates`).
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
      batches (default: on for GPTQ / AWQ; see :func:`sensitivity`).
    log: called with one progress line per (fold, candidate) of the sensitivity pass
      (``print`` to watch it).
    workers: background threads of the sensitivity pass (see :func:`sensitivity`).
  """
  batches = [_as_inputs(b) for b in batches]
  sens = sens or sensitivity(apply_fn, variables, batches, candidates=candidates,
                             method=method, rules=rules, metric=metric, crossfit=crossfit,
                             log=log, workers=workers)
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
