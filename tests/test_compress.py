"""The main job end to end (few steps), its files, inspect/export, and CLI errors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxopt_dnn import sparsity
from jaxopt_dnn.app import artifacts, cli, compose, compress, data
from jaxopt_dnn.app.recipe import Recipe

STEPS = 120


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("compress"))
  assert cli.main(["compress", "--steps", str(STEPS), "--out", out]) == 0
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
  assert cli.main(["compress", "--variants", "baseline,nope", "--steps", "1",
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
