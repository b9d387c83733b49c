"""Bad inputs, as a careless or hostile user would give them: each is a clear error that
names the argument, leaf or file (or is handled correctly), never a silent wrong result.

The CLI cases run ``cli.main`` in-process: every user error is one line on stderr, exit
2, and nothing is written to ``--out``.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_dnn.app import cli
from jaxopt_dnn.app import data as data_lib
from jaxopt_dnn.app.recipe import Recipe

jax.devices()  # the backend (8 CPU devices, conftest) exists before any --cpu-devices case

# ------------------------------------------------------------------------- recipes

RECIPE_CASES = [
    (dict(steps="100"), TypeError, "steps"),
    (dict(steps=True), TypeError, "steps"),
    (dict(batch_size=2.5), TypeError, "batch_size"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(optimizer={"learning_rate": -1e-3}), ValueError, "learning_rate"),
    (dict(optimizer={"learning_rate": float("nan")}), ValueError, "learning_rate"),
    (dict(optimizer={"learning_rate": 0}), ValueError, "learning_rate"),
    (dict(optimizer={"learning_rate": float("inf")}), ValueError, "learning_rate"),
    (dict(optimizer={"warmup_steps": -3}), ValueError, "warmup_steps"),
    (dict(precision={"initial_scale": -1.0}), ValueError, "initial_scale"),
    (dict(precision={"initial_scale": 0.0}), ValueError, "initial_scale"),
    (dict(prune={"method": "magnitude", "update_every": 0}), ValueError, "update_every"),
    (dict(prune={"update_every": 2.5}), TypeError, "update_every"),
    (dict(prune={"sparsity": float("nan")}), ValueError, "sparsity"),
    (dict(quant={"calibration_batches": 0}), ValueError, "calibration_batches"),
    (dict(mesh={"data": 0}), ValueError, "mesh.data"),
    (dict(mesh={"fsdp": -2}), ValueError, "mesh.fsdp"),
    (dict(model_kwargs="features"), TypeError, "model_kwargs"),
    (dict(model_kwargs=5), TypeError, "model_kwargs"),
    (dict(model_kwargs={"features": {"a": 1}}), TypeError, "model_kwargs['features']"),
    (dict(model_kwargs={"dense": float("nan")}), TypeError, "model_kwargs['dense']"),
    (dict(optimizer="adam"), TypeError, "optimizer"),
]


@pytest.mark.parametrize("kwargs,exc,needle", RECIPE_CASES,
                         ids=[str(c[0])[:40] for c in RECIPE_CASES])
def test_recipe_constructor_and_from_dict_reject(kwargs, exc, needle):
  with pytest.raises(exc, match=needle.replace("[", r"\[").replace("]", r"\]")):
    Recipe(**kwargs)
  if not isinstance(kwargs.get("model_kwargs"), (str, int)) and "optimizer" not in kwargs \
      or isinstance(kwargs.get("optimizer"), dict):
    d = json.loads(json.dumps(kwargs, allow_nan=True))
    with pytest.raises((TypeError, ValueError), match=needle.split("[")[0].split(".")[-1]):
      Recipe.from_dict(d)


# ------------------------------------------------------------------------- datasets


def _npz(path, **arrays):
  np.savez(path, **arrays)
  return str(path)


def test_npz_with_a_stray_label_names_the_file_and_the_label(tmp_path):
  y = np.arange(200) % 10
  y[7] = 1000
  path = _npz(tmp_path / "d.npz", x=np.random.rand(200, 8).astype(np.float32), y=y)
  with pytest.raises(ValueError, match=r"d\.npz.*label 1000"):
    data_lib.load_npz(path)
  assert data_lib.load_npz(path, num_classes=1001).num_classes == 1001  # explicit: allowed


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_npz_with_nonfinite_features_is_an_error(tmp_path, bad):
  x = np.random.rand(100, 8).astype(np.float32)
  x[3, 5] = bad
  path = _npz(tmp_path / "f.npz", x=x, y=np.arange(100) % 4)
  with pytest.raises(ValueError, match=r"f\.npz.*NaN or infinite.*\(3, 5\)"):
    data_lib.load_npz(path)


@pytest.mark.parametrize("content", [b"hello, this is text\n", b"", b"\x00\xff" * 40])
def test_a_non_npz_file_named_npz_is_a_clear_error(tmp_path, content):
  path = tmp_path / "t.npz"
  path.write_bytes(content)
  with pytest.raises(ValueError, match=r"t\.npz' is not an \.npz archive") as e:
    data_lib.load_npz(path)
  assert "allow_pickle" not in str(e.value)


def test_npz_of_object_arrays_and_single_npy_are_refused(tmp_path):
  path = tmp_path / "o.npz"
  np.savez(path, x=np.array([{"a": 1}] * 4, dtype=object), y=np.arange(4))
  with pytest.raises(ValueError, match="pickled") as e:
    data_lib.load_npz(path)
  assert "allow_pickle" not in str(e.value)
  npy = tmp_path / "s.npz"
  with open(npy, "wb") as f:
    np.save(f, np.zeros(3))
  with pytest.raises(ValueError, match="single .npy array"):
    data_lib.load_npz(npy)


# ------------------------------------------------------------------------- the CLI


def _cli(capsys, *argv):
  rc = cli.main([str(a) for a in argv])
  err = capsys.readouterr().err
  return rc, err


def _assert_one_line(rc, err, needle):
  assert rc == 2, err
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  assert "Traceback" not in err and needle in lines[0], err


def _recipe_file(tmp_path, name, content):
  p = tmp_path / name
  p.write_bytes(content if isinstance(content, bytes) else content.encode())
  return p


CLI_RECIPES = [
    ("r.yaml", "name: !!python/object/apply:os.system ['touch PWNED']\n", "!!python"),
    ("r.yaml", "name: [unclosed\n", "not valid YAML"),
    ("r.json", '{"name": "x",,}', "not valid JSON"),
    ("r.json", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not UTF-8"),
    ("r.yaml", b"\xff\xfe\x00garbage", "not UTF-8"),
    ("r.json", "[1, 2]", "must hold a mapping"),
    ("r.json", '{"steps": "100"}', "steps"),
    ("r.json", '{"optimizer": {"learning_rate": -0.001}}', "learning_rate"),
    ("r.txt", "{}", "expected a .json"),
    ("r.json", '{"model_kwargs": {"features": [99999999]}}', "parameters, more than"),
    ("r.json", '{"model_kwargs": {"nonsense": 3}}', "cannot be built"),
    ("r.json", '{"model": "transformer", "model_kwargs": {"patch": 3}}', "cannot be built"),
    ("r.yaml", "", "must hold a mapping"),
]


@pytest.mark.parametrize("name,content,needle", CLI_RECIPES,
                         ids=[f"{c[0]}:{c[2]}" for c in CLI_RECIPES])
def test_cli_bad_recipe_files_are_one_line(tmp_path, capsys, name, content, needle):
  out = tmp_path / "out"
  rc, err = _cli(capsys, "compress", "--recipe", _recipe_file(tmp_path, name, content),
                 "--out", out, "--steps", 1, "--dataset", "digits")
  _assert_one_line(rc, err, needle)
  assert not out.exists() and not (tmp_path / "PWNED").exists()


def test_cli_directory_as_recipe(tmp_path, capsys):
  d = tmp_path / "dir.yaml"
  d.mkdir()
  rc, err = _cli(capsys, "compress", "--recipe", d, "--out", tmp_path / "o")
  _assert_one_line(rc, err, "not a regular file")


CLI_ARGS = [
    (["--mesh", "data=8,data=2"], "given twice"),
    (["--mesh", "data=0"], "--mesh"),
    (["--mesh", "fsdp=-1"], "--mesh"),
    (["--mesh", ","], "--mesh"),
    (["--cpu-devices", "-1"], "--cpu-devices"),
    (["--cpu-devices", "0"], "--cpu-devices"),
    (["--cpu-devices", "3"], "--cpu-devices"),   # tests run with 8 devices
    (["--seed", "-1"], "seed"),
    (["--steps", "-5"], "steps"),
    (["--mesh", "data=3"], "data=3"),
    (["--mesh", "data=3", "--cpu-devices", "8"], "data=3"),
    (["--mesh", "data=8,fsdp=2"], "needs 16"),
    (["--model", "nope"], "unknown model"),
    (["--variants", "baseline,nope"], "nope"),
    (["--dataset", "tfds:mnist"], "tensorflow"),
    (["--dataset", "nope"], "unknown dataset"),
    (["--steps", "abc"], "invalid int value"),
    (["--steps", str(10 ** 23)], "steps"),
    (["--out", ""], "--out"),
]


@pytest.mark.parametrize("args,needle", CLI_ARGS, ids=[" ".join(c[0]) for c in CLI_ARGS])
def test_cli_bad_arguments_fail_before_writing(tmp_path, capsys, args, needle):
  out = tmp_path / "out"
  if "tfds" in " ".join(args):
    pytest.importorskip("jaxopt_dnn")  # always there; tfds is the optional extra
    try:
      import tensorflow_datasets  # noqa: F401
      pytest.skip("tensorflow_datasets is installed")
    except ImportError:
      pass
  try:
    rc, err = _cli(capsys, "compress", *args, *([] if "--out" in args else ["--out", out]),
                   *([] if "--dataset" in args else ["--dataset", "digits"]))
  except SystemExit as e:   # argparse's own usage errors
    rc, err = e.code, capsys.readouterr().err
  _assert_one_line(rc, err, needle)
  assert not out.exists()


def test_cli_out_must_be_a_new_or_empty_directory(tmp_path, capsys):
  f = tmp_path / "file"
  f.write_text("x")
  rc, err = _cli(capsys, "compress", "--out", f, "--steps", 1)
  _assert_one_line(rc, err, "not a directory")
  rc, err = _cli(capsys, "compress", "--out", f / "sub", "--steps", 1)
  _assert_one_line(rc, err, "is a file")
  full = tmp_path / "full"
  full.mkdir()
  (full / "x").write_text("x")
  rc, err = _cli(capsys, "compress", "--out", full, "--steps", 1)
  _assert_one_line(rc, err, "not empty")
  assert f.read_text() == "x" and os.listdir(full) == ["x"]


def test_cli_bad_npz_datasets(tmp_path, capsys):
  y = np.arange(200) % 10
  y[0] = 1000
  p = _npz(tmp_path / "stray.npz", x=np.random.rand(200, 8, 8, 1), y=y)
  rc, err = _cli(capsys, "compress", "--dataset", p, "--out", tmp_path / "o1", "--steps", 1)
  _assert_one_line(rc, err, "label 1000")
  x = np.random.rand(200, 8, 8, 1)
  x[0, 0, 0, 0] = np.nan
  p = _npz(tmp_path / "nan.npz", x=x, y=np.arange(200) % 10)
  rc, err = _cli(capsys, "compress", "--dataset", p, "--out", tmp_path / "o2", "--steps", 1)
  _assert_one_line(rc, err, "NaN")
  t = tmp_path / "text.npz"
  t.write_text("not an archive")
  rc, err = _cli(capsys, "compress", "--dataset", t, "--out", tmp_path / "o3")
  _assert_one_line(rc, err, "not an .npz archive")
  assert "pickle" not in err
  assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))


@pytest.mark.parametrize("batch", ["0", "-1"])
def test_cli_export_bad_batch(tmp_path, capsys, batch):
  rc, err = _cli(capsys, "export", tmp_path, "--out", tmp_path / "f.bin", "--batch", batch)
  _assert_one_line(rc, err, "--batch")


def test_cli_export_bad_out(tmp_path, capsys):
  rc, err = _cli(capsys, "export", tmp_path, "--out", tmp_path)
  _assert_one_line(rc, err, "is a directory")
  f = tmp_path / "file"
  f.write_text("x")
  rc, err = _cli(capsys, "export", tmp_path, "--out", f / "x.bin")
  _assert_one_line(rc, err, "is a file")


def test_cli_inspect_of_garbage(tmp_path, capsys):
  rc, err = _cli(capsys, "inspect", tmp_path / "missing")
  _assert_one_line(rc, err, "does not exist")
  f = tmp_path / "file"
  f.write_bytes(os.urandom(64))
  rc, err = _cli(capsys, "inspect", f)
  _assert_one_line(rc, err, "file")


def test_cli_debug_shows_the_traceback(tmp_path, capsys):
  with pytest.raises(ValueError, match="given twice"):
    cli.main(["--debug", "compress", "--mesh", "data=8,data=2", "--out", str(tmp_path / "o")])
  with pytest.raises(ValueError, match="given twice"):
    cli.main(["compress", "--debug", "--mesh", "data=8,data=2", "--out", str(tmp_path / "o")])


# ------------------------------------------------------------------------- the core

def _core_cases():
  import optax

  from jaxopt_dnn import compile as compile_lib
  from jaxopt_dnn import distill, precision, quant, sparsity

  w = jnp.arange(1.0, 17.0).reshape(4, 4)
  nan_w = w.at[1, 2].set(jnp.nan)
  inf_w = w.at[0, 0].set(jnp.inf)
  sched = sparsity.constant_schedule(0.5, 0)
  q = quant.quantize(w)
  packed = sparsity.pack({"k": w * (w > 8)})
  bad_packed = sparsity.PackedArray(packed["k"].bits, packed["k"].values[:3], (4, 4),
                                    np.float32)
  short_bits = sparsity.PackedArray(packed["k"].bits[:1], packed["k"].values, (4, 4),
                                    np.float32)
  logits = jnp.zeros((3, 10))
  return [
      ("magnitude_masks NaN", lambda: sparsity.magnitude_masks({"k": nan_w}, 0.5),
       ValueError, r"'k'.*NaN"),
      ("magnitude_masks inf", lambda: sparsity.magnitude_masks({"k": inf_w}, 0.5),
       ValueError, r"'k'.*NaN/inf"),
      ("prune update_every=2.5",
       lambda: sparsity.prune_optimizer(optax.sgd(0.1), sched, update_every=2.5),
       TypeError, "update_every"),
      ("prune update_every='10'",
       lambda: sparsity.prune_optimizer(optax.sgd(0.1), sched, update_every="10"),
       TypeError, "update_every"),
      ("prune update_every=0",
       lambda: sparsity.prune_optimizer(optax.sgd(0.1), sched, update_every=0),
       ValueError, "update_every"),
      ("StaticLossScale(0.0)", lambda: precision.StaticLossScale(0.0), ValueError,
       "loss_scale"),
      ("StaticLossScale(nan)", lambda: precision.StaticLossScale(float("nan")), ValueError,
       "loss_scale"),
      ("DynamicLossScale(-8)", lambda: precision.DynamicLossScale(-8), ValueError,
       "loss_scale"),
      ("DynamicLossScale(jnp 0)", lambda: precision.DynamicLossScale(jnp.float32(0)),
       ValueError, "loss_scale"),
      ("quantize percentile=-5", lambda: quant.quantize(w, method="percentile", percentile=-5),
       ValueError, "percentile"),
      ("quantize percentile=101",
       lambda: quant.quantize(w, method="percentile", percentile=101), ValueError, "percentile"),
      ("quantize percentile='x'",
       lambda: quant.quantize(w, method="percentile", percentile="x"), TypeError, "percentile"),
      ("fake_quant percentile=0",
       lambda: quant.fake_quant(w, method="percentile", percentile=0), ValueError,
       "percentile"),
      ("quantize 0-size", lambda: quant.quantize(jnp.zeros((0, 4))), ValueError, "empty"),
      ("fake_quant 0-size", lambda: quant.fake_quant(jnp.zeros((3, 0))), ValueError, "empty"),
      ("dequantize int8", lambda: quant.dequantize(q, jnp.int8), TypeError, "floating"),
      ("dequantize bool", lambda: quant.dequantize(q, bool), TypeError, "floating"),
      ("unpack short values", lambda: sparsity.unpack({"k": bad_packed}), ValueError,
       r"'k'.*keeps 8 entries"),
      ("unpack short bits", lambda: sparsity.unpack({"k": short_bits}), ValueError,
       r"'k'.*bits"),
      ("distill label >= K",
       lambda: distill.loss(logits, logits, jnp.array([1, 2, 10])), ValueError, "label 10"),
      ("distill label < 0",
       lambda: distill.loss(logits, logits, jnp.array([1, -1, 3])), ValueError, "label -1"),
      ("nm_masks NaN", lambda: sparsity.nm_masks({"k": nan_w}, 2, 4, axis=0), ValueError,
       r"nm_masks: leaf 'k'.*NaN"),
      ("channel_masks NaN", lambda: sparsity.channel_masks({"k": nan_w}, 0.5), ValueError,
       r"channel_masks: leaf 'k'.*NaN"),
      ("quantize scale=0", lambda: quant.quantize(w, scale=0.0), ValueError, "scale"),
      ("quantize scale<0", lambda: quant.quantize(w, scale=-1.0), ValueError, "scale"),
      ("fake_quant scale=nan", lambda: quant.fake_quant(w, scale=float("nan")), ValueError,
       "scale"),
      ("load_exported garbage", lambda: compile_lib.load_exported(_garbage_file()), ValueError,
       "not a serialized"),
  ]


def _garbage_file():
  import tempfile
  f = tempfile.NamedTemporaryFile(suffix=".bin", delete=False)
  f.write(np.random.default_rng(0).bytes(700))
  f.close()
  return f.name


CORE = _core_cases()


@pytest.mark.parametrize("name,fn,exc,needle", CORE, ids=[c[0] for c in CORE])
def test_core_bad_inputs(name, fn, exc, needle):
  with pytest.raises(exc, match=needle):
    fn()


def test_core_good_inputs_still_work():
  from jaxopt_dnn import distill, precision, quant, sparsity

  w = jnp.arange(1.0, 17.0).reshape(4, 4)
  assert float(precision.StaticLossScale(2.0).loss_scale) == 2.0
  assert float(precision.DynamicLossScale(2.0 ** 15).loss_scale) == 2.0 ** 15
  jax.tree.map(lambda x: x, precision.DynamicLossScale(8.0))   # unflatten round trip
  jax.jit(lambda s: s.adjust(jnp.array(True)))(precision.DynamicLossScale(8.0))
  q = quant.quantize(w, method="percentile", percentile=99.0)
  assert quant.dequantize(q, jnp.bfloat16).dtype == jnp.bfloat16
  packed = sparsity.pack({"k": w * (w > 8)})
  np.testing.assert_array_equal(sparsity.unpack(packed)["k"], w * (w > 8))
  loss = distill.loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.array([0, 2]))
  assert np.isfinite(float(loss))
  jax.jit(distill.loss)(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.array([0, 2]))


def test_calibrate_with_batches_that_do_not_fit_the_model():
  import flax.linen as nn

  from jaxopt_dnn import quant

  model = nn.Dense(4)
  variables = model.init(jax.random.key(0), jnp.ones((1, 8)))
  with pytest.raises(ValueError, match=r"batch 0 \(shapes \[\(2, 5\)\]\) does not fit"):
    quant.calibrate(model.apply, variables, [jnp.ones((2, 5))])
  with pytest.raises(ValueError, match="percentile"):
    quant.calibrate(model.apply, variables, [jnp.ones((2, 8))], method="percentile",
                    percentile=-5)


# ------------------------------------------------------------------ serve checkpoints


@pytest.fixture(scope="module")
def serve_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("run")
  recipe = out / "r.json"
  recipe.write_text(json.dumps({"model": "cnn", "model_kwargs": {"features": [4], "dense": 8},
                                "batch_size": 32}))
  assert cli.main(["compress", "--recipe", str(recipe), "--steps", "2", "--variants",
                   "baseline", "--out", str(out / "o")]) == 0
  return out / "o" / "baseline" / "serve"


def _copy(src, dst):
  import shutil
  shutil.copytree(src, dst, symlinks=True)
  return dst


def _rewrite_meta(ckpt, change):
  from jaxopt_dnn import checkpoint
  state, meta, step = checkpoint.restore(ckpt)
  import shutil
  shutil.rmtree(ckpt)
  change(meta)
  checkpoint.save(ckpt, step, state, meta)


@pytest.mark.slow
def test_inspect_and_export_of_a_good_checkpoint(serve_dir, tmp_path, capsys):
  assert cli.main(["inspect", str(serve_dir)]) == 0
  assert cli.main(["export", str(serve_dir), "--out", str(tmp_path / "m.bin")]) == 0


@pytest.mark.parametrize("damage,needle", [
    ("model_kwargs", "asks for a model of"),
    ("bad_kwargs", "cannot be built"),
    ("invalid_recipe", "stored recipe is invalid"),
    ("other_model", "does not fit"),
    ("input_shape", "input_shape"),
    ("num_classes", "num_classes"),
])
@pytest.mark.slow
def test_export_of_a_tampered_checkpoint(serve_dir, tmp_path, capsys, damage, needle):
  ck = _copy(serve_dir, tmp_path / "ck")

  def change(meta):
    r = json.loads(meta["recipe"])
    if damage == "model_kwargs":
      r["model_kwargs"] = {"features": [4096, 4096], "dense": 100000}
    elif damage == "bad_kwargs":
      r["model_kwargs"] = {"nonsense": 1}
    elif damage == "invalid_recipe":
      r["steps"] = "many"
    elif damage == "other_model":
      r["model_kwargs"] = {"features": [5], "dense": 8}
    elif damage == "input_shape":
      meta["input_shape"] = [100000, 100000, 1000]
    elif damage == "num_classes":
      meta["num_classes"] = -3
    meta["recipe"] = json.dumps(r)

  _rewrite_meta(str(ck), change)
  rc, err = _cli(capsys, "export", ck, "--out", tmp_path / "m.bin")
  _assert_one_line(rc, err, needle)
  assert not (tmp_path / "m.bin").exists()


@pytest.mark.parametrize("damage", ["overwrite", "garbage_meta", "no_state", "truncate"])
def test_inspect_of_a_damaged_checkpoint_says_corrupted(serve_dir, tmp_path, capsys, damage):
  ck = _copy(serve_dir, tmp_path / "ck")
  step = ck / "0"
  if damage == "garbage_meta":
    (step / "meta" / "metadata").write_text("{garbage")
  elif damage == "no_state":
    import shutil
    shutil.rmtree(step / "state")
  else:
    files = [p for p in (step / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for f in files:
      data = bytearray(f.read_bytes())
      if damage == "truncate":
        data = data[:len(data) // 3]
      else:
        for i in range(len(data) // 2, min(len(data), len(data) // 2 + 8)):
          data[i] ^= 0x5A
      f.write_bytes(bytes(data))
  rc, err = _cli(capsys, "inspect", ck)
  _assert_one_line(rc, err, "corrupted")
  assert "step 0" in err and "tensorstore_spec" not in err


def test_core_imports_no_app_dependency_and_the_app_names_its_extra():
  """The library core (``import jaxopt_dnn`` and its subpackages) loads none of the app's
  own dependencies (PyYAML is not checked: flax imports it); a missing one is named with
  the extra that brings it."""
  import subprocess
  import sys

  code = ("import sys, jaxopt_dnn, jaxopt_dnn.quant, jaxopt_dnn.sparsity, jaxopt_dnn.auto, "
          "jaxopt_dnn.decode, jaxopt_dnn.lora; "
          "print(sorted(m for m in ('sklearn', 'matplotlib', 'mnist1d', "
          "'jaxopt_dnn.app') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, check=True).stdout
  assert out.strip() == "[]", out
  from jaxopt_dnn.app import require
  with pytest.raises(ImportError, match=r'no_such_module_xyz.*pip install "jaxopt-dnn\[app\]"'):
    require("no_such_module_xyz.sub", "the thing")
