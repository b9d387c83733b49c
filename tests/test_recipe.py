"""Recipes: round trips, strict keys with suggestions, type checks, optimizer schedules."""

import json

import jax
import numpy as np
import optax
import pytest
import yaml

from jaxopt_dnn.app import compose
from jaxopt_dnn.app.recipe import OptimizerConfig, Recipe


def _full():
  return Recipe().replace(
      name="combo", model_kwargs={"features": [16, 32], "dense": 64}, steps=120,
      prune={"method": "nm", "n": 2, "m": 4, "rules": "Dense_0/kernel"},
      quant={"mode": "qat"}, precision={"policy": "bf16"}, mesh={"data": 2},
      distill={"teacher": "baseline", "temperature": 2.0, "alpha": 0.5},
      optimizer={"name": "adamw", "schedule": "cosine", "warmup_steps": 10})


def test_json_round_trip_is_identity():
  r = _full()
  text = r.to_json()
  assert Recipe.from_json(text) == r
  assert Recipe.from_json(text).to_json() == text
  assert hash(Recipe.from_json(text)) == hash(r)


def test_yaml_and_json_files(tmp_path):
  r = _full()
  (tmp_path / "r.yaml").write_text(yaml.safe_dump(r.to_dict()))
  (tmp_path / "r.json").write_text(r.to_json())
  assert Recipe.load(tmp_path / "r.yaml") == r == Recipe.load(tmp_path / "r.json")
  assert Recipe.load(tmp_path / "r.yaml").to_json() == r.to_json()


def test_unknown_key_lists_valid_ones_and_suggests():
  with pytest.raises(ValueError, match=r"prune.sparsty.*Did you mean 'sparsity'.*Valid keys"):
    Recipe.from_dict({"prune": {"sparsty": 0.5}})
  with pytest.raises(ValueError, match="Did you mean 'steps'"):
    Recipe.from_dict({"stpes": 3})


@pytest.mark.parametrize("bad,match", [
    ({"steps": "100"}, "recipe.steps must be int"),
    ({"prune": {"sparsity": "high"}}, "prune.sparsity must be float"),
    ({"quant": {"bits": 3}}, "bits must be 4 or 8"),
    ({"prune": {"method": "lottery"}}, "method='lottery'"),
    ({"prune": {"sparsity": 1.0}}, r"sparsity must be in \[0, 1\)"),
    ({"optimizer": 3}, "recipe.optimizer must be a mapping"),
    ({"quant": {"bits": 4, "mode": "ptq"}}, "weight_only"),
    ({"quant": {"estimator": "magic"}}, "estimator='magic'"),
])
def test_bad_values(bad, match):
  with pytest.raises((TypeError, ValueError), match=match):
    Recipe.from_dict(bad)


def test_missing_and_wrong_files(tmp_path):
  with pytest.raises(FileNotFoundError):
    Recipe.load(tmp_path / "nope.json")
  (tmp_path / "r.txt").write_text("{}")
  with pytest.raises(ValueError, match=".json, .yaml"):
    Recipe.load(tmp_path / "r.txt")
  (tmp_path / "r.json").write_text(json.dumps([1, 2]))
  with pytest.raises(ValueError, match="mapping"):
    Recipe.load(tmp_path / "r.json")


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear", "exponential"])
@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_make_optimizer(schedule, name):
  cfg = OptimizerConfig(name=name, schedule=schedule, warmup_steps=5, learning_rate=0.1)
  tx = compose.make_optimizer(cfg, 50)
  params = {"w": np.ones(3, np.float32)}
  state = tx.init(params)
  updates, _ = tx.update({"w": np.ones(3, np.float32)}, state, params)
  assert np.all(np.isfinite(updates["w"]))
  # warm-up starts at lr 0: the first update is zero
  assert float(np.abs(updates["w"]).max()) == 0.0


@pytest.mark.slow
def test_make_pruner_reaches_target():
  from jaxopt_dnn.app.recipe import PruneConfig
  tx = compose.make_pruner(optax.sgd(0.1), PruneConfig(method="magnitude", sparsity=0.5,
                                                       end=0.5, update_every=7), 20)
  params = {"k": jax.random.normal(jax.random.key(0), (8, 8))}
  state = tx.init(params)
  for _ in range(12):
    updates, state = tx.update({"k": np.ones((8, 8), np.float32)}, state, params)
    params = optax.apply_updates(params, updates)
  assert int((np.asarray(params["k"]) == 0).sum()) == 32
