"""Recipes: frozen, serialisable configurations of a compression run.

A :class:`Recipe` names the model, the data budget and one section per transform
family. It is a tree of frozen dataclasses (hashable, usable as a ``jit`` static
argument), loads from JSON or YAML, and dumps back to the same JSON
(``Recipe.from_json(r.to_json()) == r``). Unknown keys are errors that list the valid
ones and suggest the closest; values are type-checked.

:func:`jaxopt_dnn.app.compose.build` turns a recipe into one jitted train step and one
serving function.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import types
import typing
from typing import Any


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """optax optimizer and learning-rate schedule.

  ``schedule``: ``constant`` | ``cosine`` (to 0) | ``linear`` (to ``end_factor * lr``) |
  ``exponential`` (``lr * end_factor^(t / steps)``), after ``warmup_steps`` of linear
  warm-up from 0.
  """
  name: str = "adam"                # adam | adamw | sgd
  learning_rate: float = 1e-3
  schedule: str = "constant"
  warmup_steps: int = 0
  end_factor: float = 0.1
  weight_decay: float = 1e-4        # adamw only
  momentum: float = 0.9             # sgd only


@dataclasses.dataclass(frozen=True)
class PruneConfig:
  """Gradual pruning (``method="none"`` disables it).

  Masks follow a Zhu–Gupta polynomial schedule from 0 to ``sparsity`` between
  ``begin * steps`` and ``end * steps`` (``schedule="constant"``: ``sparsity`` from
  ``begin * steps``), updated every ``update_every`` steps, then frozen.
  """
  method: str = "none"              # none | magnitude | random | nm | channel
  sparsity: float = 0.9
  scope: str = "layer"              # layer | global
  schedule: str = "polynomial"      # polynomial | constant
  begin: float = 0.0
  end: float = 0.5
  update_every: int = 25
  rules: str | None = None          # regex over key paths; None: float leaves, ndim >= 2
  distribution: str = "uniform"     # uniform | erk
  n: int = 2
  m: int = 4


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """Quantization: ``ptq`` (calibrate after training) or ``qat`` (fake-quant training),
  then int8 serving; ``weight_only`` stores int ``bits`` weights, computes in float."""
  mode: str = "none"                # none | ptq | qat
  bits: int = 8
  weight_only: bool = False
  calibration: str = "absmax"       # absmax | percentile | mse
  calibration_batches: int = 4
  estimator: str = "ste"            # qat gradient: ste | int8_forward (see quant.qat)


@dataclasses.dataclass(frozen=True)
class PrecisionConfig:
  """Mixed precision: a policy name or spec string, and loss scaling for fp16."""
  policy: str = "fp32"              # fp32 | bf16 | fp16 | "params=...,compute=...,output=..."
  loss_scale: str = "none"          # none | static | dynamic
  initial_scale: float = 32768.0


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh and parameter sharding (``data=-1``: all remaining devices)."""
  data: int = 1
  fsdp: int = 1
  strategy: str = "data_parallel"   # replicated | data_parallel | fsdp


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Knowledge distillation from a teacher (``teacher=None`` disables it)."""
  teacher: str | None = None        # checkpoint directory, or "baseline" inside compress
  temperature: float = 4.0
  alpha: float = 0.7


@dataclasses.dataclass(frozen=True)
class Recipe:
  """One compression run. ``model_kwargs`` are ``(name, value)`` pairs (hashable)."""
  name: str = "baseline"
  model: str = "cnn"
  model_kwargs: tuple = ()
  steps: int = 600                  # 0: no training (serve init_from as it is)
  batch_size: int = 64
  seed: int = 0
  init_from: str | None = None      # checkpoint directory, or "baseline" inside compress
  fold_batchnorm: bool = False
  optimizer: OptimizerConfig = OptimizerConfig()
  prune: PruneConfig = PruneConfig()
  quant: QuantConfig = QuantConfig()
  precision: PrecisionConfig = PrecisionConfig()
  mesh: MeshConfig = MeshConfig()
  distill: DistillConfig = DistillConfig()

  def __post_init__(self):
    for f in dataclasses.fields(self):     # sections may be given as dicts
      v = getattr(self, f.name)
      if isinstance(v, dict) and f.name != "model_kwargs":
        object.__setattr__(self, f.name, _from_dict(type(f.default), v, f"recipe.{f.name}"))
    kw = self.model_kwargs
    items = kw.items() if isinstance(kw, dict) else kw
    try:
      object.__setattr__(self, "model_kwargs",
                         tuple(sorted((str(k), _hashable(v)) for k, v in items)))
    except (TypeError, ValueError):
      raise TypeError(f"recipe.model_kwargs must be a mapping or (name, value) pairs, "
                      f"got {kw!r}") from None
    _validate(self)

  # ----------------------------------------------------------------- serialisation
  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["model_kwargs"] = {k: v for k, v in self.model_kwargs}
    return d

  def to_json(self, indent: int | None = 2) -> str:
    return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

  @classmethod
  def from_dict(cls, d: dict) -> Recipe:
    return _from_dict(cls, d, "recipe")

  @classmethod
  def from_json(cls, text: str) -> Recipe:
    return cls.from_dict(json.loads(text))

  @classmethod
  def load(cls, path: str | os.PathLike) -> Recipe:
    """Reads a ``.json``, ``.yaml`` or ``.yml`` file."""
    path = os.fspath(path)
    if not os.path.exists(path):
      raise FileNotFoundError(f"recipe file {path!r} does not exist")
    if not os.path.isfile(path):
      raise ValueError(f"recipe file {path!r} is not a regular file (a directory?)")
    if not path.endswith((".yaml", ".yml", ".json")):
      raise ValueError(f"recipe file {path!r}: expected a .json, .yaml or .yml file")
    try:
      with open(path, encoding="utf-8") as f:
        text = f.read()
    except UnicodeDecodeError as e:
      raise ValueError(f"recipe file {path!r} is not UTF-8 text (byte {e.start}: "
                       f"{e.object[e.start:e.start + 1]!r})") from None
    if path.endswith((".yaml", ".yml")):
      from jaxopt_dnn.app import require
      yaml = require("yaml", "a .yaml recipe")
      try:
        d = yaml.safe_load(text)
      except yaml.YAMLError as e:
        what = " ".join(str(e).split())
        if "python/" in what:
          what = "Python-specific tags (!!python/...) are not allowed: " + what
        raise ValueError(f"recipe file {path!r} is not valid YAML: {what}") from None
    else:
      try:
        d = json.loads(text)
      except json.JSONDecodeError as e:
        raise ValueError(f"recipe file {path!r} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
      raise ValueError(f"recipe file {path!r} must hold a mapping, got {type(d).__name__}")
    return cls.from_dict(d)

  def replace(self, **changes) -> Recipe:
    """``dataclasses.replace`` that also accepts section dicts: ``prune={"sparsity": .8}``."""
    for k, v in list(changes.items()):
      cur = getattr(self, k, None)
      if dataclasses.is_dataclass(cur) and isinstance(v, dict):
        changes[k] = dataclasses.replace(cur, **v)
    return dataclasses.replace(self, **changes)


_CHOICES = {
    ("OptimizerConfig", "name"): ("adam", "adamw", "sgd"),
    ("OptimizerConfig", "schedule"): ("constant", "cosine", "linear", "exponential"),
    ("PruneConfig", "method"): ("none", "magnitude", "random", "nm", "channel"),
    ("PruneConfig", "scope"): ("layer", "global"),
    ("PruneConfig", "schedule"): ("polynomial", "constant"),
    ("PruneConfig", "distribution"): ("uniform", "erk"),
    ("QuantConfig", "mode"): ("none", "ptq", "qat"),
    ("QuantConfig", "calibration"): ("absmax", "percentile", "mse"),
    ("QuantConfig", "estimator"): ("ste", "int8_forward"),
    ("PrecisionConfig", "loss_scale"): ("none", "static", "dynamic"),
    ("MeshConfig", "strategy"): ("replicated", "data_parallel", "fsdp"),
}


def _validate(r: Recipe) -> None:
  for section in (r, r.optimizer, r.prune, r.quant, r.precision, r.mesh, r.distill):
    cls = type(section).__name__
    hints = _hints(type(section))
    for f in dataclasses.fields(section):
      v = getattr(section, f.name)
      ann = hints[f.name]
      if dataclasses.is_dataclass(ann):
        if not isinstance(v, ann):
          raise TypeError(f"recipe.{f.name} must be a {ann.__name__} or a mapping, "
                          f"got {type(v).__name__}: {v!r}")
        continue
      if not _type_ok(v, ann):   # the constructor checks types like from_dict does
        raise TypeError(f"{cls}.{f.name} must be {getattr(ann, '__name__', ann)}, "
                        f"got {type(v).__name__}: {v!r}")
      if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"{cls}.{f.name} must be finite, got {v!r}")
      choices = _CHOICES.get((cls, f.name))
      if choices and v not in choices:
        raise ValueError(f"{cls}.{f.name}={v!r} is not one of {list(choices)}")
  for k, v in r.model_kwargs:
    if not _json_like(v):
      raise TypeError(f"recipe.model_kwargs[{k!r}] must be a number, string, bool, None or a "
                      f"list of them, got {type(v).__name__}: {v!r}")
  if r.seed < 0 or r.seed >= 2 ** 32:
    raise ValueError(f"recipe.seed must be in [0, 2**32), got {r.seed}")
  for name in ("steps", "batch_size"):   # the step counter is int32
    if getattr(r, name) >= 2 ** 31:
      raise ValueError(f"recipe.{name} must be < 2**31, got {getattr(r, name)}")
  o = r.optimizer
  if not o.learning_rate > 0:
    raise ValueError(f"optimizer.learning_rate must be > 0, got {o.learning_rate}")
  if o.warmup_steps < 0:
    raise ValueError(f"optimizer.warmup_steps must be >= 0, got {o.warmup_steps}")
  for name in ("end_factor", "weight_decay", "momentum"):
    if getattr(o, name) < 0:
      raise ValueError(f"optimizer.{name} must be >= 0, got {getattr(o, name)}")
  if r.prune.update_every < 1:
    raise ValueError(f"prune.update_every must be >= 1, got {r.prune.update_every}")
  if not 1 <= r.prune.n <= r.prune.m:
    raise ValueError(f"prune.n/m must satisfy 1 <= n <= m, got n={r.prune.n}, m={r.prune.m}")
  if r.quant.calibration_batches < 1:
    raise ValueError(f"quant.calibration_batches must be >= 1, got "
                     f"{r.quant.calibration_batches}")
  if not r.precision.initial_scale > 0:
    raise ValueError(f"precision.initial_scale must be > 0, got {r.precision.initial_scale}")
  if r.mesh.data < 1 and r.mesh.data != -1:
    raise ValueError(f"mesh.data must be >= 1 or -1 (all remaining devices), got {r.mesh.data}")
  if r.mesh.fsdp < 1:
    raise ValueError(f"mesh.fsdp must be >= 1, got {r.mesh.fsdp}")
  if r.steps < 0:
    raise ValueError(f"recipe.steps must be >= 0 (0: no training), got {r.steps}")
  if r.batch_size < 1:
    raise ValueError(f"recipe.batch_size must be >= 1, got {r.batch_size}")
  if not 0.0 <= r.prune.sparsity < 1.0:
    raise ValueError(f"prune.sparsity must be in [0, 1), got {r.prune.sparsity}")
  if not 0.0 <= r.prune.begin < r.prune.end <= 1.0:
    raise ValueError(f"prune.begin/end are fractions of steps with 0 <= begin < end <= 1, "
                     f"got begin={r.prune.begin}, end={r.prune.end}")
  if r.quant.bits not in (4, 8):
    raise ValueError(f"quant.bits must be 4 or 8, got {r.quant.bits}")
  if r.quant.bits == 4 and r.quant.mode != "none" and not r.quant.weight_only:
    raise ValueError("quant.bits=4 is supported for weight_only storage only")
  if r.distill.teacher is not None and not 0.0 <= r.distill.alpha <= 1.0:
    raise ValueError(f"distill.alpha must be in [0, 1], got {r.distill.alpha}")
  if r.distill.temperature <= 0:
    raise ValueError(f"distill.temperature must be > 0, got {r.distill.temperature}")


@functools.cache
def _hints(cls) -> dict:
  return typing.get_type_hints(cls)


def _json_like(v: Any) -> bool:
  if v is None or isinstance(v, (bool, int, str)):
    return True
  if isinstance(v, float):
    return math.isfinite(v)
  return isinstance(v, tuple) and all(_json_like(x) for x in v)


def _type_ok(value: Any, annotation: Any) -> bool:
  """Checks a JSON/YAML value against a field annotation (``int`` accepted for float)."""
  origin = typing.get_origin(annotation)
  if origin in (typing.Union, types.UnionType):
    return any(_type_ok(value, a) for a in typing.get_args(annotation))
  if annotation is type(None):
    return value is None
  if annotation is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if annotation is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if annotation is tuple:
    return isinstance(value, (dict, list, tuple))
  return isinstance(value, annotation)


def _hashable(v: Any) -> Any:
  return tuple(_hashable(x) for x in v) if isinstance(v, (list, tuple)) else v


def _from_dict(cls, d: Any, where: str):
  if not isinstance(d, dict):
    raise TypeError(f"{where} must be a mapping, got {type(d).__name__}: {d!r}")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for key, value in d.items():
    if key not in fields:
      close = difflib.get_close_matches(str(key), list(fields), n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ValueError(f"unknown key {where}.{key}.{hint} Valid keys: {sorted(fields)}")
    ann = hints[key]
    if dataclasses.is_dataclass(ann):
      kwargs[key] = _from_dict(ann, value, f"{where}.{key}")
      continue
    if not _type_ok(value, ann):
      raise TypeError(f"{where}.{key} must be {getattr(ann, '__name__', ann)}, "
                      f"got {type(value).__name__}: {value!r}")
    if ann is float or (isinstance(value, int) and float in typing.get_args(ann)):
      value = float(value) if value is not None else None
    kwargs[key] = value
  return cls(**kwargs)
