import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from rich.console import Console

from jaxopt_dnn import checkpoint
from jaxopt_dnn.trainer import Trainer
from jaxopt_dnn.app import models, train

MODEL = models.MLP(features=(32,))
TX = optax.adam(3e-3)


@pytest.fixture(scope="module")
def setup(digits):
  trainer = Trainer(MODEL, train.classification_loss, TX, donate=False)
  state = trainer.init(jax.random.key(0), digits.x_train[:1])
  return state, trainer.step


def _equal(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda u, v: bool(np.array_equal(u, v)), a, b)))


def test_fit_trains_logs_and_keeps_k_checkpoints(setup, digits, tmp_path):
  state, step = setup
  cfg = train.TrainConfig(steps=120, batch_size=64, log_every=40, eval_every=60,
                          checkpoint_dir=str(tmp_path / "ck"), save_every=40, max_to_keep=2,
                          metrics_path=str(tmp_path / "m.jsonl"), progress=False)
  r = train.fit(state, step, digits, cfg,
                eval_fn=train.classifier_eval(MODEL.apply, digits.x_test, digits.y_test))
  assert int(r.state.step) == 120 and r.resumed_from is None
  train_recs = [h for h in r.history if h["split"] == "train"]
  assert [h["step"] for h in train_recs] == [1, 40, 80, 120]
  assert train_recs[-1]["loss"] < 0.5 * train_recs[0]["loss"]
  assert all(h["examples_per_s"] > 0 for h in train_recs)
  evals = [h for h in r.history if h["split"] == "eval"]
  assert [h["step"] for h in evals] == [60, 120] and evals[-1]["accuracy"] > 0.85
  lines = [json.loads(ln) for ln in open(tmp_path / "m.jsonl")]
  assert lines == r.history
  assert sorted(int(p) for p in os.listdir(tmp_path / "ck") if p.isdigit()) == [80, 120]
  assert 0 < checkpoint.checkpoint_bytes(tmp_path / "ck") < 200_000
  restored, meta, k = checkpoint.restore(tmp_path / "ck", state)
  assert k == 120 and meta["step"] == 120 and meta["batch_size"] == 64
  assert isinstance(restored, train.TrainState) and _equal(restored, r.state)
  assert r.step_time_s > 0 and r.first_step_s > 0
  # a finished run resumed again does nothing and returns the same state
  again = train.fit(state, step, digits, cfg)
  assert again.resumed_from == 120 and _equal(again.state, r.state)


def test_ctrl_c_saves_the_last_completed_step(setup, digits, tmp_path):
  state, step = setup
  calls = []

  def interrupted(s, batch):
    calls.append(1)
    if len(calls) == 13:
      raise KeyboardInterrupt
    return step(s, batch)

  cfg = train.TrainConfig(steps=50, checkpoint_dir=str(tmp_path), save_every=5, progress=False)
  with pytest.raises(KeyboardInterrupt):
    train.fit(state, interrupted, digits, cfg)
  assert checkpoint.latest_step(tmp_path) == 12  # not just the last periodic save (10)
  ref = train.fit(state, step, digits, train.TrainConfig(steps=12, progress=False)).state
  restored, _, _ = checkpoint.restore(tmp_path, state)
  assert _equal(restored, ref)


def test_restore_onto_a_different_sharding(tmp_path):
  mesh8 = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  rep8 = jax.sharding.NamedSharding(mesh8, jax.P())
  tree = {"w": jax.device_put(jnp.arange(64.0).reshape(16, 4), rep8),
          "b": jax.device_put(jnp.arange(4, dtype=jnp.int32), rep8)}
  checkpoint.save(tmp_path, 3, tree, {"note": "x"})
  mesh4 = jax.make_mesh((4, 2), ("fsdp", "x"), axis_types=(jax.sharding.AxisType.Explicit,) * 2,
                        devices=jax.devices()[:8])
  target = checkpoint.abstract_like(tree, {"w": jax.sharding.NamedSharding(mesh4, jax.P("fsdp", "x")),
                                      "b": jax.sharding.NamedSharding(mesh4, jax.P("x"))})
  got, meta, step = checkpoint.restore(tmp_path, target)
  assert step == 3 and meta["note"] == "x"
  assert got["w"].sharding.spec == jax.P("fsdp", "x") and got["w"].addressable_shards[0].data.shape == (4, 2)
  np.testing.assert_array_equal(got["w"], tree["w"])
  np.testing.assert_array_equal(got["b"], tree["b"])


def test_incompatible_checkpoints_are_clear_errors(setup, digits, tmp_path):
  state, step = setup
  cfg = train.TrainConfig(steps=3, checkpoint_dir=str(tmp_path), progress=False)
  train.fit(state, step, digits, cfg)
  wide = models.MLP(features=(48,)).init(jax.random.key(0), digits.x_train[:1])["params"]
  with pytest.raises(ValueError, match=r"params/Dense_0/kernel: checkpoint \(64, 32\) float32 vs "
                                       r"target \(64, 48\)"):
    checkpoint.restore(tmp_path, train.TrainState.create(wide, TX))
  with pytest.raises(ValueError, match="written with batch_size=64, this run has batch_size=32"):
    train.fit(state, step, digits, train.TrainConfig(steps=6, batch_size=32,
                                                     checkpoint_dir=str(tmp_path), progress=False))
  with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
    checkpoint.restore(tmp_path / "empty", state)


def test_step_must_advance_and_config_is_validated(setup, digits):
  state, _ = setup
  with pytest.raises(ValueError, match="must advance state.step by one"):
    train.fit(state, lambda s, b: (s, {"loss": 0.0}), digits,
              train.TrainConfig(steps=2, progress=False))
  with pytest.raises(ValueError, match=r"TrainConfig.steps must be a positive int, got 0"):
    train.TrainConfig(steps=0)
  with pytest.raises(ValueError, match="smaller than batch_size"):
    train.fit(state, None, (digits.x_train[:10], digits.y_train[:10]),
              train.TrainConfig(steps=2, progress=False))


def test_progress_bar_only_when_asked_or_on_a_terminal(setup, digits):
  state, step = setup
  buf = io.StringIO()
  train.fit(state, step, digits, train.TrainConfig(steps=20, log_every=10, progress=True),
            console=Console(file=buf, force_terminal=True, width=120))
  text = buf.getvalue()
  assert "20/20" in text and "loss=" in text and "accuracy=" in text and "ex/s" in text
  quiet = io.StringIO()  # not a terminal, progress=None (auto): no bar
  train.fit(state, step, digits, train.TrainConfig(steps=5), console=Console(file=quiet))
  assert quiet.getvalue() == ""


class _DenseBN(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(nn.relu(x))


def test_classifier_step_updates_batch_stats(digits):
  m = _DenseBN()
  v = m.init(jax.random.key(0), digits.x_train[:1])
  trainer = Trainer(m, train.classification_loss, TX, donate=False)
  st = trainer.init(jax.random.key(0), digits.x_train[:1])
  st2, metrics = trainer.step(st, (digits.x_train[:64], digits.y_train[:64]))
  assert int(st2.step) == 1 and set(metrics) == {"loss", "accuracy"}
  before = v["batch_stats"]["BatchNorm_0"]["mean"]
  assert not np.allclose(st2.collections["batch_stats"]["BatchNorm_0"]["mean"], before)
  assert not np.array_equal(st2.rng, st.rng)
  typed = train.TrainState.create(v["params"], TX, rng=jax.random.key(5))
  np.testing.assert_array_equal(typed.rng, jax.random.key_data(jax.random.key(5)))
  assert typed.rng.dtype == jnp.uint32


_CHILD = textwrap.dedent('''
  import os, signal, sys
  import jax, jax.numpy as jnp, numpy as np, optax
  from jaxopt_dnn.app import data, models, train

  def run(ckpt, out, kill_at):
    d = data.load_digits()
    m = models.MLP(features=(32,))
    tx = optax.adam(3e-3)
    params = m.init(jax.random.key(0), d.x_train[:1])["params"]
    # ballast: 32 MB in the state so an async save takes long enough to be killed inside
    state = train.TrainState.create(params, tx, rng=7,
                                    collections={"ballast": jnp.zeros((2048, 4096), jnp.float32)})

    @jax.jit
    def step(state, batch):
      x, y = batch
      rng, sub = jax.random.split(state.rng)
      x = x + 0.05 * jax.random.normal(sub, x.shape)  # uses the rng carried in the state
      def lossf(p):
        logits = m.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits
      (loss, logits), g = jax.value_and_grad(lossf, has_aux=True)(state.params)
      acc = jnp.mean((logits.argmax(-1) == y).astype(jnp.float32))
      return state.apply_gradients(g, tx, rng=rng), {"loss": loss, "accuracy": acc}

    calls = []
    def maybe_die(state, batch):
      calls.append(1)
      if len(calls) == kill_at:  # right after the save of the previous step was started
        os.kill(os.getpid(), signal.SIGKILL)
      return step(state, batch)

    cfg = train.TrainConfig(steps=40, batch_size=64, seed=3, log_every=5, save_every=10,
                            max_to_keep=5, checkpoint_dir=None if ckpt == "-" else ckpt,
                            metrics_path=out + ".jsonl", progress=False)
    r = train.fit(state, maybe_die, d, cfg)
    np.savez(out, *[np.asarray(a) for a in jax.tree.leaves(r.state)])
    print("resumed_from", r.resumed_from)

  if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", 8)  # same runtime as the test process
    run(sys.argv[1], sys.argv[2], int(sys.argv[3]))
''')


def _script(tmp_path):
  script = tmp_path / "child.py"
  script.write_text(_CHILD)
  return script


def _child(tmp_path, ckpt, out, kill_at):
  script = _script(tmp_path)
  env = {**os.environ, "PYTHONPATH": os.getcwd(), "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen([sys.executable, str(script), ckpt, str(out), str(kill_at)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_sigkill_mid_save_then_resume_is_bit_identical(tmp_path):
  ck = tmp_path / "ck"
  killed = _child(tmp_path, str(ck), tmp_path / "run", 21)
  # meanwhile, the uninterrupted reference run, in this process (same code, same runtime)
  spec = importlib.util.spec_from_file_location("_resume_child", _script(tmp_path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  mod.run("-", str(tmp_path / "ref"), 0)
  _, kill_err = killed.communicate(timeout=240)
  assert killed.returncode == -signal.SIGKILL, kill_err[-2000:]
  # killed while step 20 was being written: its tmp dir is there, 10 is the latest valid
  assert any(e.startswith("20") and "tmp" in e for e in os.listdir(ck)), os.listdir(ck)
  assert checkpoint.latest_step(ck) == 10
  restored, meta, _ = checkpoint.restore(ck)
  assert int(restored["step"]) == 10 and meta["seed"] == 3
  logged = [json.loads(ln)["step"] for ln in open(tmp_path / "run.jsonl")]
  assert max(logged) == 20  # records past the checkpoint, to be replaced on resume

  resumed = _child(tmp_path, str(ck), tmp_path / "run", 0)
  out, err = resumed.communicate(timeout=240)
  assert resumed.returncode == 0, err[-2000:]
  assert "resumed_from 10" in out, err[-3000:]
  a, b = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "run.npz")
  assert len(a.files) == len(b.files) > 5
  for k in a.files:
    np.testing.assert_array_equal(a[k], b[k])  # bit-identical: params, opt_state, rng, step
  strip = lambda recs: [{k: r[k] for k in ("step", "loss", "accuracy")} for r in recs]
  ref_log = [json.loads(ln) for ln in open(tmp_path / "ref.jsonl")]
  run_log = [json.loads(ln) for ln in open(tmp_path / "run.jsonl")]
  assert strip(run_log) == strip(ref_log)  # same losses at every logged step, no duplicates
