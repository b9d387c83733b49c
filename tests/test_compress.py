"""The main job end to end (few steps), its files, inspect/export, and CLI errors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxopt_dnn import sparsity
from jaxopt_dnn.app import artifacts, cli, compose, compress, data, report
from jaxopt_dnn.app.recipe import Recipe

STEPS = 120


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("compress"))
  assert cli.main(["compress", "--dataset", "digits", "--steps", str(STEPS), "--out", out]) == 0
  with open(os.path.join(out, "results.json")) as f:
    results = {r["name"]: r for r in json.load(f)["results"]}
  return out, results


@pytest.mark.slow
def test_compress_writes_table_files_and_checkpoints(run):
  out, results = run
  assert list(results) == list(compress.default_variants(Recipe()))
  for name in results:
    assert os.path.isdir(os.path.join(out, name, "serve"))
  assert os.path.getsize(os.path.join(out, "accuracy_vs_size.png")) > 10_000
  md = open(os.path.join(out, "results.md")).read()
  assert "| combined |" in md and "disk bytes" in md
  base = results["baseline"]
  assert base["accuracy"] > 0.9 and base["params"] == 544522 and base["int8_dots"] == 0
  for r in results.values():
    assert r["flops_per_example"] and r["latency_ms"] > 0 and 0 <= r["accuracy"] <= 1
    assert r["n_test"] == 359 and r["accuracy_ci"][0] <= r["accuracy"] <= r["accuracy_ci"][1]
    assert r["latency_min_ms"] <= r["latency_ms"] <= r["latency_max_ms"]
  assert results["int8_ptq"]["train_time_s"] is None and results["int8_ptq"]["step_time_ms"] is None
  assert results["channel50"]["served"] == "shrunk"
  assert results["channel50"]["params"] < 0.3 * base["params"]


@pytest.mark.slow
def test_compress_variants_do_what_they_say(run):
  _, r = run
  base = r["baseline"]
  # pruned90: exactly 90% of the two hidden kernels (18432 + 524288 weights) removed
  assert base["params"] - r["pruned90"]["nonzeros"] >= round(0.9 * (18432 + 524288))
  assert r["pruned90"]["disk_bytes"] < 0.15 * base["disk_bytes"]
  # int8 variants serve through real s8 x s8 dots/convs (4 layers)
  for name in ("int8_ptq", "int8_qat", "combined"):
    assert r[name]["int8_dots"] == 4, name
    assert r[name]["accuracy"] >= base["accuracy"] - 0.03, name
  assert r["int8_ptq"]["disk_bytes"] <= 0.27 * base["disk_bytes"]
  assert r["combined"]["disk_bytes"] <= 0.10 * base["disk_bytes"]
  assert r["distilled"]["params"] < 0.3 * base["params"]
  assert r["bf16"]["recipe"]["precision"]["policy"] == "bf16"
  assert r["bf16"]["disk_bytes"] < 0.55 * base["disk_bytes"]     # served in bfloat16


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["combined", "bf16"])
def test_inspect_and_export_round_trip(run, tmp_path, capsys, variant):
  out, _ = run
  ckpt = os.path.join(out, variant, "serve")
  assert cli.main(["inspect", ckpt]) == 0
  text = capsys.readouterr().out
  assert "bytes on disk" in text
  if variant == "combined":
    assert "bitmask+values" in text and "int8" in text
  else:
    assert "bfloat16" in text
  fn, variables, _, recipe = artifacts.load_serving(ckpt)
  assert recipe.name == variant
  x = data.load_digits().x_test[:3]
  path = str(tmp_path / f"{variant}.stablehlo")
  assert cli.main(["export", ckpt, "--out", path, "--batch", "3"]) == 0
  code = ("import sys, numpy as np; from jaxopt_dnn import compile as c; "
          "f = c.load_exported(sys.argv[1]); x = np.load(sys.argv[2]); "
          "np.save(sys.argv[3], np.asarray(f(x)))")
  np.save(tmp_path / "x.npy", x)
  subprocess.run([sys.executable, "-c", code, path, str(tmp_path / "x.npy"),
                  str(tmp_path / "y.npy")], check=True, timeout=120)
  np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), np.asarray(fn(variables, x)))


def test_cli_errors_are_one_line_and_nonzero(tmp_path, capsys):
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"prune": {"sparsty": 0.5}}))
  assert cli.main(["compress", "--recipe", str(bad), "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert "Did you mean 'sparsity'" in err and "Traceback" not in err
  assert cli.main(["compress", "--dataset", str(tmp_path / "missing.npz")]) == 2
  assert "missing.npz" in capsys.readouterr().err
  assert cli.main(["compress", "--dataset", "digits", "--variants", "baseline,nope", "--steps", "1",
                   "--out", str(tmp_path / "o2")]) == 2
  assert "nope" in capsys.readouterr().err
  assert cli.main(["inspect", str(tmp_path / "nothing")]) == 2
  assert cli.main(["compress", "--mesh", "data=x"]) == 2


def test_cli_runs_as_console_script(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "jaxopt_dnn.app.cli", "inspect", str(tmp_path)],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "error" in proc.stderr and "Traceback" not in proc.stderr


def test_variant_needing_untrained_teacher_is_an_error(tmp_path):
  ds = data.load_digits()
  with pytest.raises(ValueError, match="'baseline'.*has not been trained"):
    compress.compress(Recipe(steps=1), ds, str(tmp_path), variants=["distilled"])


def test_build_sharded_equals_single_device():
  """The composed step (pruning + bf16 policy) gives the same params on 1 and 8 devices."""
  ds = data.load_digits()
  recipe = Recipe(steps=6, batch_size=32, model="mlp", model_kwargs={"features": (32,)},
                  optimizer={"name": "sgd", "learning_rate": 0.05},
                  prune={"method": "magnitude", "sparsity": 0.5, "end": 0.5, "update_every": 1})
  finals = []
  for n in (1, 8):
    r = recipe.replace(mesh={"data": n})
    built = compose.build(r, ds.x_train[:32])
    state = built.state
    for s in range(6):
      batch = built.place_batch((ds.x_train[s * 32:(s + 1) * 32], ds.y_train[s * 32:(s + 1) * 32]))
      state, _ = built.train_step(state, batch)
    finals.append(jax.device_get(state.params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *finals)
  k = finals[1]["Dense_0"]["kernel"]
  assert (k == 0).sum() == k.size // 2
  assert sparsity.sparsity_report(finals[0]).pruned_zeros == sparsity.sparsity_report(finals[1]).pruned_zeros


@pytest.mark.slow
@pytest.mark.parametrize("model,variants", [("cnn_bn", ["baseline", "int8_qat", "bf16"]),
                                            ("nnx_cnn", ["baseline", "int8_ptq", "int8_qat"])])
def test_compress_other_models(model, variants, tmp_path):
  """BatchNorm models through QAT (batch_stats kept), NNX models through PTQ and QAT."""
  ds = data.load_digits()
  results = compress.compress(Recipe(model=model, steps=20), ds, str(tmp_path / model),
                              variants=variants)
  by_name = {r.name: r for r in results}
  for int8 in [n for n in variants if n.startswith("int8")]:
    assert by_name[int8].int8_dots >= 3, int8
    assert by_name[int8].accuracy >= by_name["baseline"].accuracy - 0.05, int8


def test_compress_refuses_a_used_output_directory(tmp_path):
  (tmp_path / "old.txt").write_text("x")
  with pytest.raises(ValueError, match="not empty"):
    compress.compress(Recipe(steps=1), data.load_digits(), str(tmp_path), variants=["baseline"])


def test_mesh_flag_parsing():
  assert cli._parse_mesh("data=8") == {"data": 8, "strategy": "data_parallel"}
  assert cli._parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4, "strategy": "fsdp"}
  with pytest.raises(ValueError, match="data=N,fsdp=M"):
    cli._parse_mesh("tensor=2")


# ---------------------------------------------------------------- error bars, latency, table


def test_bootstrap_intervals_and_paired_difference():
  rng = np.random.default_rng(0)
  base = (rng.random(1000) < 0.9).astype(float)
  same = base.copy()
  worse = base.copy()
  worse[np.flatnonzero(base)[:60]] = 0.0          # 60 more errors: -6 points
  flip = base.copy()
  flip[np.flatnonzero(base)[:3]] = 0.0            # 3 more errors: -0.3 points, within noise
  b = compress.bootstrap({"baseline": base, "same": same, "worse": worse, "flip": flip},
                         "baseline")
  lo, hi = b["baseline"]["ci"]
  assert lo < base.mean() < hi
  half = 1.96 * np.sqrt(base.mean() * (1 - base.mean()) / 1000)    # normal approximation
  assert abs((hi - lo) / 2 - half) < 0.004
  assert b["same"]["delta"] == 0 and b["same"]["delta_ci"] == [0.0, 0.0]
  assert not b["same"]["differs"]
  assert b["worse"]["differs"] and b["worse"]["delta_ci"][1] < 0
  assert abs(b["worse"]["delta"] + 0.06) < 1e-12
  assert not b["flip"]["differs"]
  with pytest.raises(ValueError, match="different test sets"):
    compress.bootstrap({"a": base, "b": base[:10]}, "a")


def test_alternating_latency_reports_median_and_range():
  import time as _time
  calls = {"fast": 0, "slow": 0}

  def fast():
    calls["fast"] += 1
    return np.zeros(1)

  def slow():
    calls["slow"] += 1
    _time.sleep(0.004)
    return np.zeros(1)
  lat = compress.alternating_latency({"fast": fast, "slow": slow}, rounds=3, reps=4)
  for med, lo, hi in lat.values():
    assert lo <= med <= hi
  assert lat["slow"][0] >= 4.0 > lat["fast"][0]
  assert calls["fast"] == calls["slow"] == 1 + 3 * 4



def test_one_timer_for_bench_and_app():
  """bench/_timing and the app's table share jaxopt_dnn.timing: alternating order, every
  call counted, medians per call."""
  import importlib.util
  from jaxopt_dnn import timing
  assert compress.alternating_latency is timing.alternating_latency
  spec = importlib.util.spec_from_file_location(
      "_bench_timing", os.path.join(os.path.dirname(__file__), "..", "bench", "_timing.py"))
  bench_timing = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench_timing)
  assert bench_timing.alternate is timing.alternate
  order = []
  fns = {"a": lambda: order.append("a") or np.zeros(1), "b": lambda: order.append("b") or np.zeros(1)}
  samples = timing.alternate_samples(fns, rounds=2, reps=2, warmup=0)
  assert order == ["a", "a", "b", "b", "b", "b", "a", "a"]
  assert {k: len(v) for k, v in samples.items()} == {"a": 4, "b": 4}
  assert set(timing.alternate(fns, rounds=1, reps=1, warmup=0)) == {"a", "b"}
  with pytest.raises(ValueError, match="rounds and reps"):
    timing.alternate(fns, rounds=0)

def test_table_marks_differences_and_dashes_untrained_columns(tmp_path):
  from jaxopt_dnn.app import report
  common = dict(latency_ms=2.0, latency_min_ms=1.5, latency_max_ms=3.0, params=10, nonzeros=10,
                disk_bytes=100, flops_per_example=1e6, int8_dots=0, recipe={}, n_test=1000)
  rs = [compress.VariantResult("baseline", 0.9, 10.0, 1.0, accuracy_ci=[0.88, 0.92], delta=0.0,
                               delta_ci=[0.0, 0.0], differs=False, **common),
        compress.VariantResult("ptq", 0.89, None, None, accuracy_ci=[0.87, 0.91], delta=-0.01,
                               delta_ci=[-0.02, 0.001], differs=False, **common),
        compress.VariantResult("bad", 0.80, 5.0, 1.0, accuracy_ci=[0.77, 0.83], delta=-0.1,
                               delta_ci=[-0.12, -0.08], differs=True, **common)]
  text = report.table(rs)
  lines = {ln.split()[0]: ln for ln in text.splitlines()[2:]}
  assert "90.00 [88.0, 92.0]" in lines["baseline"] and "ref" in lines["baseline"]
  assert lines["ptq"].count("\u2013") == 2 and "*" not in lines["ptq"]
  assert "-10.00 *" in lines["bad"] and "2.00 (1.50-3.00)" in lines["bad"]
  paths = report.write_all(rs, str(tmp_path))
  saved = json.load(open(paths["json"]))["results"]
  assert saved[1]["train_time_s"] is None and saved[1]["accuracy_ci"] == [0.87, 0.91]
  assert saved[2]["differs"] is True and saved[0]["n_test"] == 1000
  assert os.path.getsize(paths["png"]) > 10_000


# ------------------------------------------------------------- MNIST-1D, shrink, resume


def test_default_task_is_mnist1d_with_a_shrunk_channel_variant():
  base = compress.default_recipe()
  assert base.model == "cnn1d" and compress.DEFAULT_DATASET == "mnist1d"
  variants = compress.default_variants(base)
  assert {"baseline", "channel50", "distilled", "int8_ptq"} <= set(variants)
  assert variants["channel50"].prune.method == "channel"
  assert variants["int8_ptq"].steps == 0
  assert cli.build_parser().parse_args(["compress"]).dataset is None   # -> mnist1d


@pytest.mark.slow
def test_channel_variant_is_served_shrunk_and_measured_on_the_shrunk_model(tmp_path):
  ds = data.load_dataset("mnist1d")
  base = compress.default_recipe().replace(steps=8)
  results = compress.compress(base, ds, str(tmp_path), variants=["baseline", "channel50"],
                              latency_rounds=2, latency_reps=2, log=lambda s: None)
  b, c = results
  assert c.served == "shrunk" and b.served == "dense"
  # 50% of the channels of Conv_0..2 and Dense_0 removed: (16, 32, 32) channels, dense 64
  fn, variables, _, recipe = artifacts.load_serving(str(tmp_path / "channel50" / "serve"))
  assert dict(recipe.model_kwargs)["features"] == (16, 32, 32)
  assert dict(recipe.model_kwargs)["dense"] == 64
  assert variables["params"]["Conv_1"]["kernel"].shape == (5, 16, 32)
  assert c.params == sum(np.size(v) for v in jax.tree.leaves(variables)) < 0.3 * b.params
  assert c.flops_per_example < 0.4 * b.flops_per_example
  scores = compress.per_example_scores(fn, variables, ds.x_test, ds.y_test)
  assert scores.mean() == c.accuracy and c.n_test == 1000
  assert c.latency_ms is not None and b.latency_ms is not None


def _wait_for(path, proc, timeout=240):
  import time as _time
  t = _time.time()
  while not os.path.exists(path):
    if proc.poll() is not None:
      raise AssertionError(f"compress exited early: {proc.stderr.read()}")
    if _time.time() - t > timeout:
      raise AssertionError(f"{path} did not appear")
    _time.sleep(0.05)


@pytest.mark.slow
def test_resume_after_sigkill_reuses_finished_variants(tmp_path):
  """SIGKILL once the baseline has finished, then --resume: the baseline is reused (its
  files untouched, its training not rerun), the rest runs, the table has every row."""
  import signal
  out = tmp_path / "run"
  args = ["--dataset", "digits", "--steps", "6", "--variants",
          "baseline,pruned90,int8_ptq,channel50,distilled"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen([sys.executable, "-m", "jaxopt_dnn.app.cli", "compress", *args,
                           "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env)
  try:
    _wait_for(out / "baseline" / "result.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  finished = [n for n in ("pruned90", "int8_ptq", "channel50", "distilled")
              if (out / n / "result.json").exists()]
  assert len(finished) < 4, "the run finished before the kill: nothing left to resume"
  stamp = {p: os.stat(out / "baseline" / p).st_mtime_ns
           for p in ("result.json", "metrics.jsonl", "test_scores.npy")}
  metrics = (out / "baseline" / "metrics.jsonl").read_text()
  # the settings come from the run directory; giving them again is an error
  assert cli.main(["compress", "--resume", str(out), "--steps", "6"]) == 2
  proc = subprocess.run([sys.executable, "-m", "jaxopt_dnn.app.cli", "compress", "--resume",
                         str(out)], capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr
  assert "[baseline] finished before the interruption: reused" in proc.stdout
  for n in finished:
    assert f"[{n}] finished before the interruption: reused" in proc.stdout
  assert {p: os.stat(out / "baseline" / p).st_mtime_ns for p in stamp} == stamp
  assert (out / "baseline" / "metrics.jsonl").read_text() == metrics   # not retrained
  with open(out / "results.json") as f:
    rows = [r["name"] for r in json.load(f)["results"]]
  assert rows == ["baseline", "pruned90", "int8_ptq", "channel50", "distilled"]
  table = proc.stdout.split("variant", 1)[1]
  for n in rows:
    assert f"\n{n} " in table


def test_resume_needs_a_run_directory(tmp_path, capsys):
  assert cli.main(["compress", "--resume", str(tmp_path / "none")]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert cli.main(["compress", "--resume", str(tmp_path)]) == 2
  assert "run.json" in capsys.readouterr().err


# ----------------------------------------------------------------------- any model


FACTORY_MODULE = """
import flax.linen as nn
import jax.numpy as jnp
import optax

TRACED = []


class TinyNet(nn.Module):          # no `train` argument, no zoo naming
  width: int = 16
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    x = nn.tanh(nn.Dense(self.width, name="hidden")(x))
    return nn.Dense(self.classes, name="logits")(x)


def loss(logits, labels):
  TRACED.append(1)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def top2(logits, labels):
  top = jnp.argsort(logits, -1)[:, -2:]
  return jnp.any(top == labels[:, None], -1).astype(jnp.float32)


def make(num_classes):
  return TinyNet(classes=num_classes), loss, top2


def make_model_only():
  return TinyNet()
"""


@pytest.mark.slow
def test_cli_model_factory_from_the_current_directory(tmp_path, monkeypatch, capsys):
  (tmp_path / "thirdparty_net.py").write_text(FACTORY_MODULE)
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
  out = tmp_path / "run"
  assert cli.main(["compress", "--model", "thirdparty_net:make", "--dataset", "digits",
                   "--steps", "8", "--variants", "baseline,int8_ptq,pruned90",
                   "--out", str(out)]) == 0
  text = capsys.readouterr().out
  import thirdparty_net
  assert thirdparty_net.TRACED, "the factory's loss_fn was not used for training"
  with open(out / "results.json") as f:
    res = {r["name"]: r for r in json.load(f)["results"]}
  assert set(res) == {"baseline", "int8_ptq", "pruned90"} and "total time" in text
  assert res["baseline"]["metric"] == "top2" and res["int8_ptq"]["int8_dots"] >= 1
  assert res["baseline"]["params"] == 64 * 16 + 16 + 16 * 10 + 10
  assert res["pruned90"]["nonzeros"] < 0.3 * res["pruned90"]["params"]
  assert "channel50" not in compress.default_variants(Recipe(model="thirdparty_net:make"))
  assert cli.main(["compress", "--model", "thirdparty_net:nope", "--dataset", "digits"]) == 2
  assert "has no 'nope'" in capsys.readouterr().err
  assert cli.main(["compress", "--model", "no_such_pkg.mod:make", "--dataset", "digits"]) == 2
  assert "cannot import" in capsys.readouterr().err


def test_python_api_with_a_model_object_and_batch_iterables(tmp_path):
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(10)(x.reshape((x.shape[0], -1)))
  ds = data.load_digits()
  train_batches = ((ds.x_train[i:i + 100], ds.y_train[i:i + 100])
                   for i in range(0, len(ds.x_train), 100))
  results = compress.compress_model(Net(), train_batches, (ds.x_test, ds.y_test),
                                    str(tmp_path),
                                    recipe=Recipe(steps=60, optimizer={"learning_rate": 0.01}),
                                    variants=["baseline", "int8_ptq"], log=lambda s: None,
                                    latency_rounds=1, latency_reps=2)
  assert [r.name for r in results] == ["baseline", "int8_ptq"]
  assert results[0].accuracy > 0.5 and results[0].n_test == len(ds.x_test)
  assert results[1].int8_dots >= 1 and results[1].train_time_s is None
  with pytest.raises(TypeError, match="linen Module"):
    compress.compress_model(object(), (ds.x_train, ds.y_train), (ds.x_test, ds.y_test),
                            str(tmp_path / "x"))


def test_python_api_with_an_nnx_module_instance(tmp_path):
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.hidden = nnx.Linear(64, 32, rngs=rngs)
      self.out = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
      return self.out(nnx.relu(self.hidden(x.reshape((x.shape[0], -1)))))
  ds = data.load_digits()
  results = compress.compress_model(Net(nnx.Rngs(0)), (ds.x_train, ds.y_train),
                                    (ds.x_test, ds.y_test), str(tmp_path),
                                    recipe=Recipe(steps=40, optimizer={"learning_rate": 0.01}),
                                    variants=["baseline", "int8_ptq"], log=lambda s: None,
                                    latency_rounds=1)
  assert results[0].accuracy > 0.8 and results[0].params == 64 * 32 + 32 + 32 * 10 + 10
  assert results[1].int8_dots == 2 and results[1].accuracy > results[0].accuracy - 0.05


def test_resolve_model_factory_forms(tmp_path, monkeypatch):
  """``(model, sample_inputs)`` factories and ``**kw`` factories (no ``num_classes`` named)
  resolve to the model alone; bad specs are clear errors."""
  from jaxopt_dnn.app import models
  model, loss, metric = models.resolve_model("zoo_thirdparty:linen_resnet", 7)
  assert type(model).__name__ == "LinenResNet" and model.classes == 10
  assert loss is None and metric is None
  model, _, _ = models.resolve_model("zoo_thirdparty:linen_user_einsum", 3, hidden=8)
  assert model.inner.hidden == 8                # no `train` argument: wrapped
  (tmp_path / "forms_mod.py").write_text(
      "import flax.linen as nn\n"
      "def fixed():\n  return nn.Dense(3)\n"
      "def bad_loss():\n  return nn.Dense(3), 'cross-entropy'\n"
      "NOT_A_FUNCTION = 3\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(TypeError, match="does not accept model_kwargs"):
    models.resolve_model("forms_mod:fixed", 10, width=3)
  with pytest.raises(TypeError, match="loss_fn is a str"):
    models.resolve_model("forms_mod:bad_loss")
  with pytest.raises(TypeError, match="not callable"):
    models.resolve_model("forms_mod:NOT_A_FUNCTION")
  with pytest.raises(ValueError, match="expected 'package.module:function'"):
    models.resolve_model("no_colon")
  file_model, _, _ = models.resolve_model(f"{tmp_path / 'forms_mod.py'}:fixed")
  assert file_model.inner.features == 3


def test_variants_that_need_a_zoo_model_are_explained_not_unknown(tmp_path, capsys):
  """A user model: channel50/distilled are skipped with a printed note (default list) and
  asking for one is an error that says why (not "unknown variant")."""
  base = Recipe(model="zoo_thirdparty:linen_resnet")
  assert {"channel50", "distilled"}.isdisjoint(compress.default_variants(base))
  assert set(compress.unavailable_variants(base)) == {"channel50", "distilled"}
  assert compress.unavailable_variants(Recipe(model="cnn")) == {}
  assert cli.main(["compress", "--dataset", "digits", "--model", "zoo_thirdparty:linen_resnet",
                   "--variants", "baseline,channel50", "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert "channel50 needs a zoo model" in err and "cnn, cnn1d" in err and "unknown" not in err
  assert not (tmp_path / "o").exists()
  with pytest.raises(ValueError, match="distilled needs a zoo model with a known smaller student"):
    compress.compress(base, data.load_digits(), str(tmp_path / "p"), variants=["distilled"])

  class Stop(Exception):
    pass

  def log(line):           # the note comes before any training: stop the run there
    if line.startswith("note:"):
      raise Stop(line)
  ds = data.load_digits()
  with pytest.raises(Stop, match=r"note: skipping channel50 needs a zoo model.*distilled"):
    compress.compress_model("zoo_thirdparty:linen_resnet", (ds.x_train, ds.y_train),
                            (ds.x_test, ds.y_test), str(tmp_path / "q"), log=log)


def test_steps_help_states_the_default_that_runs():
  parser = cli.build_parser()
  sub = next(a for a in parser._actions if a.dest == "command").choices["compress"]
  (steps,) = [a for a in sub._actions if a.dest == "steps"]
  runs = compress.default_recipe(compress.DEFAULT_DATASET).steps   # what `compress` trains
  assert runs == 1000
  assert f"default: {runs} on {compress.DEFAULT_DATASET}, {Recipe().steps} on the other" \
      in steps.help


@pytest.mark.slow   # three small runs of the job (~15 s unloaded)
def test_array_bytes_and_whole_program_flops_per_example_equal_across_meshes(tmp_path):
  """MFLOPs/example is the whole program's (every device's partition) per example: the
  same on one device, data=2 and fsdp=2; array bytes are the arrays' bytes alone."""
  ds = data.load_digits()
  base = Recipe(model="mlp", model_kwargs={"features": (32,)}, steps=2, batch_size=32)
  flops = {}
  for name, mesh in [("one", None), ("data2", {"data": 2}),
                     ("fsdp2", {"data": 1, "fsdp": 2, "strategy": "fsdp"})]:
    (res,) = compress.compress(base.replace(mesh=mesh) if mesh else base, ds,
                               str(tmp_path / name), variants=["baseline"], log=lambda s: None,
                               latency_rounds=0)
    flops[name] = res.flops_per_example
    assert res.array_bytes == 4 * (64 * 32 + 32 + 32 * 10 + 10)    # float32 params
    assert res.disk_bytes > res.array_bytes                           # + orbax metadata
  assert flops["one"] == flops["data2"] == flops["fsdp2"], flops
  assert flops["one"] >= 2 * (64 * 32 + 32 * 10)     # at least the two matmuls' MACs x 2
  row = report.rows([res])[0]
  assert row["array_ratio"] == 1.0 and "array bytes" in report.table([res])
