"""The main job: train a baseline, apply each compression recipe, measure, compare.

Every variant is a :class:`~jaxopt_dnn.app.recipe.Recipe` derived from the base one; each is
built with :func:`jaxopt_dnn.app.compose.build`, trained with :func:`jaxopt_dnn.app.train.fit`
(orbax checkpoints under ``out/<variant>/train``), turned into a serving function, and
measured the same way: test accuracy of the serving function, train wall time, median
step time, serving latency per batch, parameter count, nonzeros, bytes on disk of the
saved serving checkpoint (orbax, sparse leaves packed), and XLA's FLOPs per example.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxopt_dnn import compile as compile_lib
from jaxopt_dnn import checkpoint
from jaxopt_dnn.app import compose
from jaxopt_dnn.app import data as data_lib
from jaxopt_dnn.app import train as train_lib
from jaxopt_dnn.app.recipe import Recipe
from jaxopt_dnn.sparsity.export import PackedArray

# Hidden layers of the digits CNN; the first conv (288 weights) and the classifier stay
# dense, as is usual (Zhu & Gupta 2017; Gale et al. 2019).
CNN_HIDDEN = r"^(?!Conv_0/|Dense_1/).*kernel$"


# A smaller student of each reference model, for the distillation variant.
STUDENTS = {
    "cnn": {"features": (16, 32), "dense": 64},
    "cnn_bn": {"features": (16, 32), "dense": 64},
    "mlp": {"features": (32,)},
    "resnet": {"features": (8, 16)},
    "transformer": {"d_model": 16, "mlp_dim": 32, "num_layers": 1},
    "nnx_cnn": {"features": (8, 16), "dense": 32},
}


def default_variants(base: Recipe) -> dict[str, Recipe]:
  """The variants of ``jaxopt-dnn compress``, derived from ``base`` (the baseline)."""
  rules = CNN_HIDDEN if base.model in ("cnn", "cnn_bn") else None
  ft = max(base.steps // 2, 1)
  variants = {
      "baseline": base.replace(name="baseline"),
      "pruned90": base.replace(name="pruned90", init_from="baseline", steps=ft,
                               prune={"method": "magnitude", "sparsity": 0.9, "begin": 0.0,
                                      "end": 0.5, "rules": rules}),
      "int8_ptq": base.replace(name="int8_ptq", init_from="baseline", steps=0,
                               quant={"mode": "ptq"}),
      "int8_qat": base.replace(name="int8_qat", init_from="baseline",
                               steps=max(base.steps // 4, 1),
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
  return variants


@dataclasses.dataclass
class VariantResult:
  name: str
  accuracy: float
  train_time_s: float
  step_time_ms: float
  latency_ms: float
  params: int
  nonzeros: int
  disk_bytes: int
  flops_per_example: float | None
  int8_dots: int
  recipe: dict

  def row(self) -> dict:
    d = dataclasses.asdict(self)
    d.pop("recipe")
    return d


def _weights(storage: Any) -> tuple[int, int]:
  """Parameter count and nonzeros of the ``params`` collection.

  A quantized leaf counts once, by its integer values: its ``scale`` / ``zero_point``
  children (siblings of a ``value`` leaf) are metadata, not parameters. A LayerNorm /
  BatchNorm ``scale`` is a parameter and is counted.
  """
  params = storage["params"]
  leaves = _leaves(params)
  values = {path[: -len("value")] for path, _ in leaves if path.endswith("/value")}
  total = nnz = 0
  for path, x in leaves:
    head, _, name = path.rpartition("/")
    if name in ("scale", "zero_point") and head + "/" in values:
      continue
    if isinstance(x, PackedArray):
      total += int(np.prod(x.shape))
      nnz += int(np.count_nonzero(np.asarray(x.values)))
    else:
      total += int(np.size(x))
      nnz += int(np.count_nonzero(np.asarray(x)))
  return total, nnz


def _leaves(tree):
  """``(path, leaf)`` with packed leaves whole; paths are orbax's raw key names (plain
  ``keystr``, no NNX ``.value`` folding), as :mod:`jaxopt_dnn.app.artifacts` reads them back."""
  flat, _ = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda a: isinstance(a, PackedArray))
  return [(jax.tree_util.keystr(p, simple=True, separator="/"), x) for p, x in flat]


def _latency_ms(fn, variables, x, reps: int = 20) -> float:
  jax.block_until_ready(fn(variables, x))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(variables, x))
    times.append(time.perf_counter() - t)
  return statistics.median(times) * 1e3


def _accuracy(fn, variables, x, y, batch: int = 512) -> float:
  correct = 0
  for i in range(0, len(x), batch):
    logits = fn(variables, x[i:i + batch])
    correct += int(np.sum(np.argmax(np.asarray(logits), -1) == y[i:i + batch]))
  return correct / len(x)


def run_variant(recipe: Recipe, ds: data_lib.Dataset, out: str, *,
                trained: dict[str, tuple[Any, Any]], progress: bool | None = False,
                latency_batch: int = 256) -> tuple[VariantResult, Any]:
  """Trains, serves, saves and measures one variant. ``trained`` maps variant names to
  ``(model, variables)`` for ``init_from`` / distillation teachers."""
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
  built = compose.build(recipe, sample, num_classes=ds.num_classes,
                        init_variables=None if init is None else init[1], teacher=teacher)
  vdir = os.path.join(out, recipe.name)
  steps = recipe.steps   # 0: no training (e.g. post-training quantization)
  cfg = train_lib.TrainConfig(steps=max(steps, 1), batch_size=recipe.batch_size,
                              seed=recipe.seed, log_every=max(steps // 4, 1),
                              checkpoint_dir=os.path.join(vdir, "train"),
                              save_every=max(steps, 1), max_to_keep=1, progress=progress,
                              metrics_path=os.path.join(vdir, "metrics.jsonl"))
  if steps:
    fit = train_lib.fit(built.state, built.train_step, ds, cfg, place_batch=built.place_batch,
                        meta={"recipe": recipe.to_json(indent=None)})
    state, train_s, step_ms = fit.state, fit.wall_time_s, fit.step_time_s * 1e3
  else:
    state, train_s, step_ms = built.state, 0.0, 0.0
  calib = [ds.x_train[i:i + recipe.batch_size]
           for i in range(0, recipe.quant.calibration_batches * recipe.batch_size,
                          recipe.batch_size)]
  served = built.serving(state, calib)
  serve_dir = os.path.join(vdir, "serve")
  packed_shapes = {p: list(x.shape) for p, x in _leaves(served.storage)
                   if isinstance(x, PackedArray)}
  checkpoint.save(serve_dir, 0, served.storage, {
      "recipe": recipe.to_json(indent=None), "num_classes": ds.num_classes,
      "input_shape": list(ds.x_train.shape[1:]), "packed_shapes": packed_shapes})
  xb = ds.x_test[:latency_batch]
  report = compile_lib.analyze(served.fn, served.variables, xb)
  params, nnz = _weights(served.storage)
  result = VariantResult(
      name=recipe.name,
      accuracy=_accuracy(served.fn, served.variables, ds.x_test, ds.y_test),
      train_time_s=train_s, step_time_ms=step_ms,
      latency_ms=_latency_ms(served.fn, served.variables, xb),
      params=params, nonzeros=nnz,
      disk_bytes=checkpoint.checkpoint_bytes(serve_dir),
      flops_per_example=None if report.flops is None else report.flops / len(xb),
      int8_dots=report.census.integer, recipe=recipe.to_dict())
  variables = {"params": state.params, **{k: v for k, v in state.collections.items()
                                          if k != compose.QUANT_STATS}}
  return result, (built.model, variables)


def compress(base: Recipe, ds: data_lib.Dataset, out: str, *,
             variants: Sequence[str] | None = None,
             recipes: dict[str, Recipe] | None = None, progress: bool | None = False,
             log=print) -> list[VariantResult]:
  """Runs the variants in order and writes ``results.json`` to ``out``."""
  recipes = recipes or default_variants(base)
  names = list(variants) if variants else list(recipes)
  unknown = [n for n in names if n not in recipes]
  if unknown:
    raise ValueError(f"unknown variant(s) {unknown}; valid: {list(recipes)}")
  if os.path.isdir(out) and os.listdir(out):
    raise ValueError(f"output directory {out!r} is not empty; choose a new --out (results and "
                     "checkpoints of different runs are never mixed)")
  os.makedirs(out, exist_ok=True)
  trained: dict[str, tuple[Any, Any]] = {}
  results = []
  for name in names:
    t = time.perf_counter()
    res, trained[name] = run_variant(recipes[name], ds, out, trained=trained, progress=progress)
    results.append(res)
    log(f"[{name}] accuracy {res.accuracy * 100:.2f}%  disk {res.disk_bytes} B  "
        f"({time.perf_counter() - t:.1f} s)")
  return results
