"""The main job: train a baseline, apply each compression recipe, measure, compare.

Every variant is a :class:`~jaxopt_dnn.app.recipe.Recipe` derived from the base one; each is
built with :func:`jaxopt_dnn.app.compose.build`, trained with :func:`jaxopt_dnn.app.train.fit`
(orbax checkpoints under ``out/<variant>/train``), turned into a serving function, and
measured the same way (:func:`run_variant`): the per-example test metric of the serving
function (accuracy by default), train wall time, median step time, parameter count,
nonzeros, bytes on disk of the saved serving checkpoint (orbax, sparse leaves packed), and
XLA's FLOPs per example. A channel-pruned variant is served *shrunk*
(:func:`jaxopt_dnn.sparsity.shrink_channels`): its layers really are smaller.

After the last variant, :func:`compress` adds what needs all of them together:

* error bars: a 95% percentile-bootstrap interval of each variant's test metric over the
  test examples, and a *paired* bootstrap of its difference to the baseline (the same
  resampled examples for both); a variant ``differs`` when that difference's interval
  excludes 0;
* latency: every serving function is timed in alternating rounds (forward, then reverse
  order), median of ``reps`` calls per round; reported as the median over rounds with
  the min-max over rounds.

Resume: each finished variant writes ``out/<variant>/result.json`` (and its per-example
test scores); ``compress(..., resume=True)`` reuses those (not retrained; their trained
state is restored from ``out/<variant>/train`` only if a later variant starts from it)
and runs the others.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_dnn import compile as compile_lib
from jaxopt_dnn import checkpoint
from jaxopt_dnn import sparsity as sparsity_lib
from jaxopt_dnn.timing import alternating_latency
from jaxopt_dnn.app import compose
from jaxopt_dnn.app import data as data_lib
from jaxopt_dnn.app import models as models_lib
from jaxopt_dnn.app import train as train_lib
from jaxopt_dnn.app.recipe import Recipe
from jaxopt_dnn.sparsity.export import PackedArray

# Hidden layers of the reference CNNs; the first conv (few weights) and the classifier stay
# dense, as is usual (Zhu & Gupta 2017; Gale et al. 2019).
CNN_HIDDEN = r"^(?!Conv_0/|Dense_1/).*kernel$"
# Channel pruning removes output channels of every layer but the classifier (its outputs
# are the classes); the biases follow their kernels (see sparsity.channel_masks).
CNN_CHANNELS = r"^(?!Dense_1/).*kernel$"

# A smaller student of each reference model, for the distillation variant.
STUDENTS = {
    "cnn": {"features": (16, 32), "dense": 64},
    "cnn_bn": {"features": (16, 32), "dense": 64},
    "cnn1d": {"features": (16, 32, 32), "dense": 64},
    "mlp": {"features": (32,)},
    "resnet": {"features": (8, 16)},
    "transformer": {"d_model": 16, "mlp_dim": 32, "num_layers": 1},
    "nnx_cnn": {"features": (8, 16), "dense": 32},
}

# Sequential zoo models without normalisation: channel pruning can shrink them.
SHRINKABLE = ("cnn", "cnn1d")

DEFAULT_DATASET = "mnist1d"


def default_recipe(dataset: str = DEFAULT_DATASET) -> Recipe:
  """The base recipe of ``jaxopt-dnn compress`` for an embedded dataset.

  ``mnist1d``: the zoo's :class:`~jaxopt_dnn.app.models.CNN1D` (32-64-64 channels,
  kernel 5), Adam 5e-3 with cosine decay, 1000 steps of 64 (16 epochs of the 4000
  training signals). Anything else: ``Recipe()`` (the digits CNN).
  """
  if dataset == "mnist1d":
    return Recipe(model="cnn1d", steps=1000, batch_size=64,
                  optimizer={"learning_rate": 5e-3, "schedule": "cosine"})
  return Recipe()


def default_variants(base: Recipe) -> dict[str, Recipe]:
  """The variants of ``jaxopt-dnn compress``, derived from ``base`` (the baseline)."""
  zoo = base.model in models_lib.model_names()
  rules = CNN_HIDDEN if base.model in ("cnn", "cnn_bn", "cnn1d") else None
  ft = short = max(base.steps // 4, 1)   # fine-tunes from the baseline
  variants = {
      "baseline": base.replace(name="baseline"),
      "pruned90": base.replace(name="pruned90", init_from="baseline", steps=ft,
                               prune={"method": "magnitude", "sparsity": 0.9, "begin": 0.0,
                                      "end": 0.5, "rules": rules}),
      "channel50": base.replace(name="channel50", init_from="baseline", steps=short,
                                prune={"method": "channel", "sparsity": 0.5, "begin": 0.0,
                                       "end": 0.5, "rules": CNN_CHANNELS}),
      "int8_ptq": base.replace(name="int8_ptq", init_from="baseline", steps=0,
                               quant={"mode": "ptq"}),
      "int8_qat": base.replace(name="int8_qat", init_from="baseline", steps=short,
                               optimizer={"learning_rate": base.optimizer.learning_rate / 4},
                               quant={"mode": "qat"}),
      "bf16": base.replace(name="bf16", precision={"policy": "bf16"}),
      "distilled": base.replace(name="distilled",
                                model_kwargs={**dict(base.model_kwargs),
                                              **STUDENTS.get(base.model, {})},
                                distill={"teacher": "baseline"}),
      "combined": base.replace(name="combined", init_from="baseline", steps=ft,
                               precision={"policy": "bf16"}, quant={"mode": "ptq"},
                               prune={"method": "magnitude", "sparsity": 0.8, "begin": 0.0,
                                      "end": 0.5, "rules": rules}),
  }
  for name in unavailable_variants(base):   # see there: they need a zoo model
    del variants[name]
  return variants


def unavailable_variants(base: Recipe) -> dict[str, str]:
  """The default variants that cannot run on ``base.model``, each with the reason.

  ``channel50`` is served shrunk (``sparsity.shrink_channels``), which needs a model whose
  layer sequence it knows: the zoo's ``cnn`` / ``cnn1d``. ``distilled`` trains a smaller
  student of the same family: a zoo model with a known student (:data:`STUDENTS`).
  """
  out = {}
  if base.model not in SHRINKABLE:
    out["channel50"] = (f"channel50 needs a zoo model whose layer structure channel shrinking "
                        f"knows ({', '.join(SHRINKABLE)}); {base.model!r} is not one")
  if base.model not in models_lib.model_names() or base.model not in STUDENTS:
    out["distilled"] = (f"distilled needs a zoo model with a known smaller student "
                        f"({', '.join(STUDENTS)}); {base.model!r} is not one")
  return out


def check_variants(base: Recipe, names: Sequence[str], recipes: dict[str, Recipe],
                   flag: str = "variants") -> None:
  """Raises a ``ValueError`` naming why for each of ``names`` that cannot run."""
  skipped = unavailable_variants(base)
  why = [skipped[n] for n in names if n not in recipes and n in skipped]
  unknown = [n for n in names if n not in recipes and n not in skipped]
  if why:
    raise ValueError(f"{flag}: " + "; ".join(why))
  if unknown:
    raise ValueError(f"{flag}: unknown variant(s) {unknown}; valid: {list(recipes)}")


@dataclasses.dataclass
class VariantResult:
  """One row of the table. ``train_time_s``/``step_time_ms`` are ``None`` for a variant
  that trains nothing (PTQ). Intervals are ``[low, high]`` (95%).

  ``disk_bytes``: the files of the serving checkpoint (arrays + orbax metadata, which
  dominates for a small model); ``array_bytes``: the bytes of its arrays alone
  (``sum(leaf.nbytes)``: integer values, scales, bitmasks). ``flops_per_example``: XLA's
  cost of the whole serving program per example, ``flops_per_device * n_devices / batch``
  with the batch sharded as in training (the same on any mesh).
  """
  name: str
  accuracy: float
  train_time_s: float | None
  step_time_ms: float | None
  latency_ms: float | None
  params: int
  nonzeros: int
  disk_bytes: int
  flops_per_example: float | None
  int8_dots: int
  recipe: dict
  n_test: int = 0
  accuracy_ci: list | None = None
  delta: float | None = None
  delta_ci: list | None = None
  differs: bool | None = None
  latency_min_ms: float | None = None
  latency_max_ms: float | None = None
  served: str = "dense"
  metric: str = "accuracy"
  reused: bool = False
  array_bytes: int | None = None

  def row(self) -> dict:
    d = dataclasses.asdict(self)
    d.pop("recipe")
    return d

  @classmethod
  def from_dict(cls, d: dict) -> VariantResult:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def _weights(storage: Any) -> tuple[int, int]:
  """Parameter count and nonzeros of the ``params`` collection.

  A quantized leaf counts once, by its integer values: its ``scale`` / ``zero_point`` /
  ``super_scale`` children (siblings of a ``value`` leaf) are metadata, not parameters.
  A LayerNorm / BatchNorm ``scale`` is a parameter and is counted.
  """
  params = storage["params"]
  leaves = _leaves(params)
  values = {path[: -len("value")] for path, _ in leaves if path.endswith("/value")}
  total = nnz = 0
  for path, x in leaves:
    head, _, name = path.rpartition("/")
    if name in ("scale", "zero_point", "super_scale") and head + "/" in values:
      continue
    if isinstance(x, PackedArray):
      total += int(np.prod(x.shape))
      nnz += int(np.count_nonzero(np.asarray(x.values)))
    else:
      total += int(np.size(x))
      nnz += int(np.count_nonzero(np.asarray(x)))
  return total, nnz


def array_bytes(storage: Any) -> int:
  """Bytes of the arrays of a serving checkpoint (``sum(leaf.nbytes)`` over its leaves:
  integer values, scales, packed bitmasks and kept values), without orbax's metadata."""
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(np.shape(x)))
                 for x in jax.tree.leaves(storage)))


def program_flops_per_example(report: Any, args: Any, batch: int) -> float | None:
  """Whole-program XLA FLOPs per example: ``flops * n_devices / batch``.

  XLA's cost analysis of an SPMD program is the cost of one device's partition; the
  devices of ``args`` (the sharded variables and batch) each run one, so the program
  costs ``n_devices`` times that, for the global ``batch``.
  """
  if report.flops is None:
    return None
  devices = set()
  for x in jax.tree.leaves(args):
    devices |= set(getattr(getattr(x, "sharding", None), "device_set", ()))
  return float(report.flops) * max(len(devices), 1) / batch


def _leaves(tree):
  """``(path, leaf)`` with packed leaves whole; paths are orbax's raw key names (plain
  ``keystr``, no NNX ``.value`` folding), as :mod:`jaxopt_dnn.app.artifacts` reads them back."""
  flat, _ = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda a: isinstance(a, PackedArray))
  return [(jax.tree_util.keystr(p, simple=True, separator="/"), x) for p, x in flat]


# ------------------------------------------------------------------ measurement


def accuracy_metric(logits, labels):
  """Per-example correctness (1.0 / 0.0): the default metric."""
  return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


def per_example_scores(fn, variables, x, y, metric: Callable = accuracy_metric,
                       batch: int = 256) -> np.ndarray:
  """``metric(logits, labels)`` of the serving function on every test example (float64).

  Every call sees a full ``batch`` (the last one is padded with copies of the first
  example and the padding's scores dropped), so the serving function compiles once, for
  the shape that the latency measurement uses too. A metric returning one number per
  batch (not per example) is an error: the error bars are a bootstrap over examples.
  """
  out = []
  batch = min(batch, len(x))
  for i in range(0, len(x), batch):
    xb, yb = x[i:i + batch], y[i:i + batch]
    n = len(xb)
    if n < batch:
      pad = batch - n
      xb = np.concatenate([xb, np.repeat(x[:1], pad, axis=0)])
      yb_full = np.concatenate([yb, np.repeat(y[:1], pad, axis=0)])
    else:
      yb_full = yb
    s = np.asarray(metric(fn(variables, xb), yb_full), np.float64)
    if s.shape != (batch,):
      raise ValueError(f"the eval metric must return one score per example, shape "
                       f"({batch},); got shape {s.shape} (return e.g. "
                       "`(argmax(logits, -1) == labels)` without the mean)")
    out.append(s[:n])
  return np.concatenate(out)


def bootstrap(scores: dict[str, np.ndarray], reference: str, *, resamples: int = 2000,
              level: float = 0.95, seed: int = 0) -> dict[str, dict]:
  """Percentile-bootstrap intervals over test examples.

  One set of ``resamples`` index draws (with replacement, ``n`` of ``n`` examples) is
  shared by every variant, so the difference to ``reference`` is a paired bootstrap:
  ``delta_b = mean(s_v[idx_b]) - mean(s_ref[idx_b])``.

  Returns:
    ``{name: {"ci": [lo, hi], "delta": d, "delta_ci": [lo, hi], "differs": bool}}``;
    ``differs`` when the difference's interval excludes 0.
  """
  n = {len(s) for s in scores.values()}
  if len(n) != 1:
    raise ValueError(f"bootstrap: variants were scored on different test sets (sizes {n})")
  n = n.pop()
  idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
  q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
  ref = scores[reference]
  out = {}
  for name, s in scores.items():
    means = s[idx].mean(axis=1)
    diffs = (s - ref)[idx].mean(axis=1)
    lo, hi = np.percentile(diffs, q)
    out[name] = {"ci": [float(v) for v in np.percentile(means, q)],
                 "delta": float(s.mean() - ref.mean()), "delta_ci": [float(lo), float(hi)],
                 "differs": bool(lo > 0 or hi < 0)}
  return out


# --------------------------------------------------------------- channel shrinking


def shrink_layers(model_name: str, params: dict) -> list[str] | None:
  """Layer names of a shrinkable zoo model in forward order (``None``: not shrinkable)."""
  if model_name not in SHRINKABLE:
    return None
  convs = sorted((k for k in params if k.startswith("Conv_")), key=lambda k: int(k[5:]))
  return convs + ["Dense_0", "Dense_1"]


def shrink(recipe: Recipe, state: Any) -> tuple[Recipe, Any, dict]:
  """The shrunk model of a channel-pruned state: ``(recipe with the smaller widths,
  params, model kwargs)``. The masks come from the pruning optimizer's state."""
  params = jax.device_get(state.params)
  layers = shrink_layers(recipe.model, params)
  if layers is None:
    raise ValueError(f"variant {recipe.name!r}: model {recipe.model!r} cannot be shrunk "
                     f"(channel shrinking knows {list(SHRINKABLE)})")
  masks = jax.device_get(sparsity_lib.masks_from_state(state.opt_state))
  small = sparsity_lib.shrink_channels(params, masks, layers)
  widths = [int(np.shape(small[name]["kernel"])[-1]) for name in layers]
  kwargs = {**dict(recipe.model_kwargs), "features": tuple(widths[:-2]), "dense": widths[-2]}
  small_recipe = recipe.replace(model_kwargs=kwargs)
  return small_recipe, small, kwargs


# ----------------------------------------------------------------------- variants


def _calibration(recipe: Recipe, ds: data_lib.Dataset) -> list:
  return [ds.x_train[i:i + recipe.batch_size]
          for i in range(0, recipe.quant.calibration_batches * recipe.batch_size,
                         recipe.batch_size)]


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)   # a reader (or a resume after SIGKILL) sees all of it or nothing


def run_variant(recipe: Recipe, ds: data_lib.Dataset, out: str, *,
                trained: dict[str, tuple[Any, Any]], progress: bool | None = False,
                latency_batch: int = 256, metric: Callable = accuracy_metric,
                loss_fn: Callable | None = None, latency_rounds: int = 3
                ) -> tuple[VariantResult, Any, tuple[Callable, Any], np.ndarray]:
  """Trains, serves, saves and measures one variant. ``trained`` maps variant names to
  ``(model, variables)`` for ``init_from`` / distillation teachers.

  Returns:
    ``(result, (model, variables), (serving_fn, serving_variables), per-example scores)``.
    The result's latency is this variant's alone over ``latency_rounds`` rounds (``None``
    with 0); :func:`compress` measures all variants together in alternating rounds.
  """
  def resolve(ref):
    if ref is None:
      return None
    if ref not in trained:
      raise ValueError(f"variant {recipe.name!r} refers to {ref!r}, which has not been trained "
                       f"(available: {sorted(trained)}); list it first in --variants")
    return trained[ref]

  init = resolve(recipe.init_from)
  teacher = resolve(recipe.distill.teacher)
  sample = ds.x_train[:recipe.batch_size]
  kw = {} if loss_fn is None else {"loss_fn": loss_fn}
  built = compose.build(recipe, sample, num_classes=ds.num_classes,
                        init_variables=None if init is None else init[1], teacher=teacher, **kw)
  vdir = os.path.join(out, recipe.name)
  steps = recipe.steps   # 0: no training (e.g. post-training quantization)
  cfg = train_lib.TrainConfig(steps=max(steps, 1), batch_size=recipe.batch_size,
                              seed=recipe.seed, log_every=max(steps // 4, 1),
                              checkpoint_dir=os.path.join(vdir, "train"),
                              save_every=max(steps, 1), max_to_keep=1, progress=progress,
                              metrics_path=os.path.join(vdir, "metrics.jsonl"))
  timing_path = os.path.join(vdir, "train_time.json")
  train_s = step_ms = None
  resumed_from = None
  if steps:
    fit = train_lib.fit(built.state, built.train_step, ds, cfg, place_batch=built.place_batch,
                        meta={"recipe": recipe.to_json(indent=None)})
    state, resumed_from = fit.state, fit.resumed_from
    if resumed_from == steps and os.path.exists(timing_path):
      with open(timing_path) as f:      # trained before an interruption: its own timings
        t = json.load(f)
      train_s, step_ms = t["train_time_s"], t["step_time_ms"]
    else:
      train_s, step_ms = fit.wall_time_s, fit.step_time_s * 1e3
      _write_json(timing_path, {"train_time_s": train_s, "step_time_ms": step_ms,
                                "resumed_from": resumed_from})
  else:
    state = built.state
  calib = _calibration(recipe, ds)
  serve_recipe, served_as = recipe, "dense"
  if recipe.prune.method == "channel" and recipe.model in SHRINKABLE:
    # Served shrunk: the smaller model, built (and served) like any recipe's model.
    serve_recipe, small, _ = shrink(recipe, state)
    cols = {k: v for k, v in state.collections.items() if k != compose.QUANT_STATS}
    small_built = compose.build(
        serve_recipe.replace(init_from=None, distill={"teacher": None},
                             prune={"method": "none"}),
        sample, num_classes=ds.num_classes, init_variables={"params": small, **cols})
    served = small_built.serving(small_built.state, calib)
    place = small_built.place_batch
    served_as = "shrunk"
  else:
    if recipe.prune.method != "none":
      served_as = "masked"
    served = built.serving(state, calib)
    place = built.place_batch
  serve_dir = os.path.join(vdir, "serve")
  if os.path.exists(serve_dir):   # left by an interrupted run: written again, whole
    shutil.rmtree(serve_dir)
  packed_shapes = {p: list(x.shape) for p, x in _leaves(served.storage)
                   if isinstance(x, PackedArray)}
  checkpoint.save(serve_dir, 0, served.storage, {
      "recipe": serve_recipe.to_json(indent=None), "num_classes": ds.num_classes,
      "input_shape": list(ds.x_train.shape[1:]), "packed_shapes": packed_shapes})
  xb = ds.x_test[:latency_batch]
  xb_dev = place((xb, ds.y_test[:latency_batch]))[0]   # sharded as the training batches
  report = compile_lib.analyze(served.fn, served.variables, xb_dev)
  # "int8" only when the lowered program has s8 x s8 -> s32 contractions (the recipe's
  # request is not evidence; XLA:CPU widens s8 to s32 in the optimized HLO)
  if served.int8 and report.lowered_census.count("s8", "s8", "s32") > 0:
    served_as = "int8" if served_as == "dense" else served_as + "+int8"
  params, nnz = _weights(served.storage)
  scores = per_example_scores(served.fn, served.variables, ds.x_test, ds.y_test, metric,
                              batch=latency_batch)
  lat = (None, None, None)
  if latency_rounds:
    lat = alternating_latency({recipe.name: lambda: served.fn(served.variables, xb)},
                              rounds=latency_rounds)[recipe.name]
  result = VariantResult(
      name=recipe.name, accuracy=float(scores.mean()),
      train_time_s=train_s, step_time_ms=step_ms, latency_ms=lat[0],
      latency_min_ms=lat[1], latency_max_ms=lat[2],
      params=params, nonzeros=nnz,
      disk_bytes=checkpoint.checkpoint_bytes(serve_dir),
      array_bytes=array_bytes(served.storage),
      flops_per_example=program_flops_per_example(report, (served.variables, xb_dev), len(xb)),
      int8_dots=report.census.integer, recipe=recipe.to_dict(), n_test=len(scores),
      served=served_as, metric=getattr(metric, "__name__", "metric"))
  if result.metric == "accuracy_metric":
    result.metric = "accuracy"
  variables = {"params": state.params, **{k: v for k, v in state.collections.items()
                                          if k != compose.QUANT_STATS}}
  # The completion marker goes last: scores first, then result.json (atomically).
  np.save(os.path.join(vdir, "test_scores.npy"), scores)
  _write_json(os.path.join(vdir, "result.json"), dataclasses.asdict(result))
  return result, (built.model, variables), (served.fn, served.variables), scores


def _restore_trained(recipe: Recipe, ds: data_lib.Dataset, out: str,
                     trained: dict, loss_fn: Callable | None) -> tuple[Any, Any]:
  """``(model, variables)`` of a variant finished by an earlier (interrupted) run."""
  if recipe.steps == 0:
    if recipe.init_from is None:
      model = models_lib.get_model(recipe.model, ds.num_classes, **dict(recipe.model_kwargs))
      return model, model.init(jax.random.key(recipe.seed), ds.x_train[:recipe.batch_size])
    return trained[recipe.init_from]
  kw = {} if loss_fn is None else {"loss_fn": loss_fn}
  template = compose.build(recipe.replace(init_from=None, distill={"teacher": None}),
                           ds.x_train[:recipe.batch_size], num_classes=ds.num_classes, **kw)
  state, _, _ = checkpoint.restore(os.path.join(out, recipe.name, "train"), template.state)
  variables = {"params": state.params, **{k: v for k, v in state.collections.items()
                                          if k != compose.QUANT_STATS}}
  return template.model, variables


def _ensure_refs(recipe: Recipe, recipes: dict[str, Recipe], ds, out: str, trained: dict,
                 done: dict, loss_fn) -> None:
  """Restores the finished variants that ``recipe`` starts from or distills from."""
  for ref in (recipe.init_from, recipe.distill.teacher):
    if ref is not None and ref not in trained and ref in done:
      _ensure_refs(recipes[ref], recipes, ds, out, trained, done, loss_fn)
      trained[ref] = _restore_trained(recipes[ref], ds, out, trained, loss_fn)


RUN_FILE = "run.json"


def load_run(out: str) -> dict:
  """The settings of a run directory (``run.json``), for ``--resume``."""
  path = os.path.join(out, RUN_FILE)
  if not os.path.isdir(out):
    raise FileNotFoundError(f"--resume: run directory {out!r} does not exist")
  if not os.path.exists(path):
    raise ValueError(f"--resume: {out!r} has no {RUN_FILE}; it was not written by "
                     "jaxopt-dnn compress")
  with open(path) as f:
    return json.load(f)


def compress(base: Recipe, ds: data_lib.Dataset, out: str, *,
             variants: Sequence[str] | None = None,
             recipes: dict[str, Recipe] | None = None, progress: bool | None = False,
             log=print, resume: bool = False, metric: Callable = accuracy_metric,
             loss_fn: Callable | None = None, run_info: dict | None = None,
             latency_rounds: int = 9, latency_reps: int = 10,
             latency_batch: int = 256) -> list[VariantResult]:
  """Runs the variants in order, then the intervals and alternating latency rounds.

  Args:
    base: the baseline recipe; ``recipes`` default to :func:`default_variants`.
    ds: the data (its test split gives the per-example scores).
    out: the run directory; must be new or empty unless ``resume``.
    variants: names to run, in order (default: all).
    resume: continue the run in ``out``: its finished variants (``result.json``) are
      reused, not retrained; the settings must be those it was started with.
    metric: ``(logits, labels) -> per-example scores``; their mean is the ``accuracy``
      column (default: correctness).
    loss_fn: ``(logits, labels) -> scalar`` training loss (default: softmax
      cross-entropy with integer labels).
    run_info: extra JSON-able settings saved in ``out/run.json`` (e.g. the dataset spec).

  Returns:
    One :class:`VariantResult` per variant, in order.
  """
  default = recipes is None
  recipes = recipes or default_variants(base)
  names = list(variants) if variants else list(recipes)
  if default:
    check_variants(base, names, recipes, "variants")
    if not variants and unavailable_variants(base):
      log("note: skipping " + "; ".join(unavailable_variants(base).values()))
  unknown = [n for n in names if n not in recipes]
  if unknown:
    raise ValueError(f"unknown variant(s) {unknown}; valid: {list(recipes)}")
  run = {"base": base.to_dict(), "variants": names, "dataset": ds.name,
         "n_train": int(len(ds.x_train)), "n_test": int(len(ds.x_test)), **(run_info or {})}
  if resume:
    saved = load_run(out)
    diff = sorted(k for k in set(run) | set(saved) if json.loads(json.dumps(run.get(k)))
                  != saved.get(k))
    if diff:
      raise ValueError(f"cannot resume {out!r}: its settings differ in {diff} (resume takes "
                       "the settings the run was started with)")
  elif os.path.isdir(out) and os.listdir(out):
    raise ValueError(f"output directory {out!r} is not empty; choose a new --out (results and "
                     "checkpoints of different runs are never mixed), or --resume it")
  os.makedirs(out, exist_ok=True)
  if not resume:
    _write_json(os.path.join(out, RUN_FILE), run)
  done: dict[str, VariantResult] = {}
  scores: dict[str, np.ndarray] = {}
  if resume:
    for name in names:
      path = os.path.join(out, name, "result.json")
      if os.path.exists(path):
        with open(path) as f:
          done[name] = VariantResult.from_dict(json.load(f))
        scores[name] = np.load(os.path.join(out, name, "test_scores.npy"))
  trained: dict[str, tuple[Any, Any]] = {}
  servings: dict[str, tuple[Callable, Any]] = {}
  results = []
  for name in names:
    t = time.perf_counter()
    if name in done:
      res = done[name]
      res.reused = True
      log(f"[{name}] finished before the interruption: reused from {os.path.join(out, name)} "
          f"(accuracy {res.accuracy * 100:.2f}%), not retrained")
      results.append(res)
      continue
    _ensure_refs(recipes[name], recipes, ds, out, trained, done, loss_fn)
    res, trained[name], servings[name], scores[name] = run_variant(
        recipes[name], ds, out, trained=trained, progress=progress, metric=metric,
        loss_fn=loss_fn, latency_batch=latency_batch, latency_rounds=0)
    results.append(res)
    log(f"[{name}] {res.metric} {res.accuracy * 100:.2f}%  disk {res.disk_bytes} B  "
        f"(arrays {res.array_bytes} B)  "
        f"({time.perf_counter() - t:.1f} s)")

  reference = "baseline" if "baseline" in scores else names[0]
  boot = bootstrap(scores, reference)
  for res in results:
    b = boot[res.name]
    res.accuracy_ci, res.delta, res.delta_ci, res.differs = (
        b["ci"], b["delta"], b["delta_ci"], b["differs"])
  if latency_rounds > 0:
    from jaxopt_dnn.app import artifacts
    for name in names:
      if name not in servings:
        fn, variables, _, _ = artifacts.load_serving(os.path.join(out, name, "serve"))
        servings[name] = (fn, variables)
    xb = ds.x_test[:latency_batch]
    lat = alternating_latency({n: (lambda f=f, v=v: f(v, xb)) for n, (f, v) in servings.items()},
                              rounds=latency_rounds, reps=latency_reps)
    for res in results:
      res.latency_ms, res.latency_min_ms, res.latency_max_ms = lat[res.name]
  return results


# ------------------------------------------------------------- any model (Python API)


def _materialize(data: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
  """``(x, y)`` arrays from a Dataset split, an ``(x, y)`` pair, or an iterable of
  ``(x, y)`` batches (concatenated)."""
  if isinstance(data, tuple) and len(data) == 2 and all(hasattr(a, "shape") for a in data):
    x, y = data
  else:
    try:
      parts = list(data)
    except TypeError:
      raise TypeError(f"{where}: expected (x, y) arrays or an iterable of (x, y) batches, "
                      f"got {type(data).__name__}") from None
    if not parts or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in parts):
      raise ValueError(f"{where}: expected a non-empty iterable of (x, y) batches")
    x = np.concatenate([np.asarray(p[0]) for p in parts])
    y = np.concatenate([np.asarray(p[1]) for p in parts])
  x, y = np.asarray(x), np.asarray(y)
  if len(x) != len(y):
    raise ValueError(f"{where}: x has {len(x)} examples but y has {len(y)}")
  return x, y


def compress_model(model: Any, train_data: Any, test_data: Any, out: str, *,
                   loss_fn: Callable | None = None, metric: Callable | None = None,
                   recipe: Recipe | None = None, variants: Sequence[str] | None = None,
                   num_classes: int | None = None, name: str = "custom",
                   resume: bool = False, log=print, **kwargs) -> list[VariantResult]:
  """The main job on your own model.

  Args:
    model: a linen module (or any object with linen's ``init(rng, x)`` /
      ``apply(variables, x)``), an ``nnx.Module``, or a ``"package.module:factory"``
      string (see :func:`jaxopt_dnn.app.models.load_factory`).
    train_data, test_data: ``(x, y)`` arrays or iterables of ``(x, y)`` batches
      (held in memory; batches of step ``s`` are drawn deterministically from them).
    loss_fn: ``(logits, labels) -> scalar`` (default: softmax cross-entropy).
    metric: ``(logits, labels) -> per-example scores`` (default: correctness).
    recipe: the base recipe (its ``model`` is replaced); default ``Recipe()``'s steps
      and optimizer.
    variants: names from :func:`default_variants` (default: all that apply).
    num_classes: default: ``max(label) + 1`` over both splits.
  """
  if isinstance(model, str):
    spec = model
    m, f_loss, f_metric = models_lib.resolve_model(spec, num_classes or 10)
  else:
    spec = models_lib.register_model(name, model)
    m, f_loss, f_metric = model, None, None
  del m
  loss_fn = loss_fn or f_loss
  metric = metric or f_metric or accuracy_metric
  xtr, ytr = _materialize(train_data, "train_data")
  xte, yte = _materialize(test_data, "test_data")
  if num_classes is None:
    labels = np.concatenate([ytr.ravel(), yte.ravel()])
    num_classes = int(labels.max()) + 1 if np.issubdtype(labels.dtype, np.integer) else 2
  ds = data_lib.Dataset(xtr, ytr, xte, yte, max(int(num_classes), 2), name)
  base = (recipe or Recipe()).replace(model=spec)
  return compress(base, ds, out, variants=variants, loss_fn=loss_fn, metric=metric,
                  resume=resume, log=log, **kwargs)
