"""Damaged checkpoints: detected (one line naming the step), skipped on resume in favour
of the newest intact step, and reported as "corrupted" by ``inspect``."""

import json
import os
import shutil

import jax
import numpy as np
import optax
import pytest

from jaxopt_dnn import checkpoint
from jaxopt_dnn.app import models, train
from jaxopt_dnn.trainer import Trainer

MODEL = models.MLP(features=(16,))
TX = optax.adam(3e-3)


@pytest.fixture(scope="module")
def setup(digits):
  trainer = Trainer(MODEL, train.classification_loss, TX, donate=False)
  return trainer.init(jax.random.key(0), digits.x_train[:1]), trainer.step


def _equal(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda u, v: bool(np.array_equal(u, v)), a, b)))


def _cfg(tmp_path, steps, **kw):
  return train.TrainConfig(steps=steps, batch_size=32, log_every=5, checkpoint_dir=str(
      tmp_path / "ck"), save_every=5, max_to_keep=5, progress=False,
      metrics_path=str(tmp_path / "m.jsonl"), **kw)


def _data_files(step_dir):
  return [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state"))
          for f in fs if os.sep + "d" + os.sep in os.path.join(d, f) + os.sep
          or os.path.basename(d) == "d"]


def _overwrite(step_dir):
  files = _data_files(step_dir)
  assert files, os.listdir(step_dir)
  for f in files:
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:   # flip bytes in the middle: same size, wrong values
      fh.seek(size // 2)
      chunk = fh.read(16)
      fh.seek(size // 2)
      fh.write(bytes(b ^ 0x5A for b in chunk))


def _truncate(step_dir):
  for f in _data_files(step_dir):
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 3)


def _delete_manifests(step_dir):
  for d, _, fs in os.walk(step_dir):
    for f in fs:
      if "manifest" in f:
        os.remove(os.path.join(d, f))


def _garbage_meta(step_dir):
  with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
    f.write("{not json at all")


def _delete_state(step_dir):
  shutil.rmtree(os.path.join(step_dir, "state"))


def _junk(step_dir):
  shutil.rmtree(step_dir)
  os.makedirs(step_dir)
  with open(os.path.join(step_dir, "junk"), "w") as f:
    f.write("junk")


DAMAGE = {"overwritten": _overwrite, "truncated": _truncate, "no_manifests": _delete_manifests,
          "garbage_meta": _garbage_meta, "no_state": _delete_state, "junk_dir": _junk}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_restore_reports_damage_in_one_line_naming_the_step(setup, digits, tmp_path, capfd,
                                                            damage):
  state, step = setup
  train.fit(state, step, digits, _cfg(tmp_path, 10))
  ck = tmp_path / "ck"
  DAMAGE[damage](str(ck / "10"))
  with pytest.raises(checkpoint.CheckpointCorruptedError) as e:
    checkpoint.restore(ck, state, step=10)
  msg = str(e.value)
  assert "step 10 is corrupted" in msg and "\n" not in msg and len(msg) < 400, msg
  restored, _, k = checkpoint.restore_latest_intact(ck, state, log=lambda s: None)
  assert k == 5
  capfd.readouterr()


def test_resume_skips_overwritten_newest_step_and_is_bit_identical(setup, digits, tmp_path,
                                                                   capfd):
  state, step = setup
  first = train.fit(state, step, digits, _cfg(tmp_path, 15))
  assert int(first.state.step) == 15
  _overwrite(str(tmp_path / "ck" / "15"))
  with open(tmp_path / "m.jsonl", "a") as f:
    f.write('{"step": 16, "split": "tr')   # a kill mid-write of the metrics file
  capfd.readouterr()
  resumed = train.fit(state, step, digits, _cfg(tmp_path, 20))
  err = capfd.readouterr().err
  assert resumed.resumed_from == 10
  warn = [ln for ln in err.splitlines() if "step 15 is corrupted" in ln]
  assert len(warn) == 1 and "falling back" in warn[0], err
  assert "partial last line" in err
  # An uninterrupted run to step 10 resumed to 20 in a fresh directory: the same bits.
  ref_dir = tmp_path / "ref"
  ref_dir.mkdir()
  train.fit(state, step, digits, _cfg(ref_dir, 10))
  ref = train.fit(state, step, digits, _cfg(ref_dir, 20))
  assert ref.resumed_from == 10 and _equal(ref.state, resumed.state)
  recs = [json.loads(ln) for ln in open(tmp_path / "m.jsonl")]
  assert [r["step"] for r in recs] == [1, 5, 10, 15, 20]
  # The damaged step was moved aside; the new step 15 is intact.
  assert any(n.startswith("corrupted-15-") for n in os.listdir(tmp_path / "ck"))
  again, _, k = checkpoint.restore(tmp_path / "ck", state, step=15)
  assert k == 15


def test_resume_when_every_step_is_damaged_starts_over(setup, digits, tmp_path, capfd):
  state, step = setup
  train.fit(state, step, digits, _cfg(tmp_path, 10))
  steps = [s for s in os.listdir(tmp_path / "ck") if s.isdigit()]
  assert "10" in steps and "5" in steps
  for s in steps:
    _truncate(str(tmp_path / "ck" / s))
  r = train.fit(state, step, digits, _cfg(tmp_path, 10))
  err = capfd.readouterr().err
  assert r.resumed_from is None and int(r.state.step) == 10
  assert "step 10 is corrupted" in err and "step 5 is corrupted" in err
  ref = train.fit(state, step, digits, train.TrainConfig(steps=10, batch_size=32,
                                                          progress=False))
  assert _equal(r.state, ref.state)


def test_a_symlinked_step_is_refused_before_training(setup, digits, tmp_path):
  state, step = setup
  train.fit(state, step, digits, _cfg(tmp_path, 5))
  ck = tmp_path / "ck"
  os.rename(ck / "5", tmp_path / "elsewhere")
  os.symlink(tmp_path / "elsewhere", ck / "5")
  with pytest.raises(ValueError, match="step 5 is a symbolic link"):
    train.fit(state, step, digits, _cfg(tmp_path, 10))
  assert os.path.isdir(tmp_path / "elsewhere")


def test_checksum_covers_metadata_and_missing_checksums_warn(setup, tmp_path, capfd):
  state, _ = setup
  checkpoint.save(tmp_path, 3, state, {"recipe": "a"})
  path = tmp_path / "checksums" / "3.json"
  sums = json.loads(path.read_text())
  sums["meta"] = "0" * 64
  path.write_text(json.dumps(sums))
  with pytest.raises(checkpoint.CheckpointCorruptedError, match="step 3 .*metadata"):
    checkpoint.restore(tmp_path, state)
  path.write_text("garbage")
  with pytest.raises(checkpoint.CheckpointCorruptedError, match="checksum file"):
    checkpoint.restore(tmp_path, state)
  path.unlink()
  capfd.readouterr()
  restored, meta, _ = checkpoint.restore(tmp_path, state)
  assert _equal(restored, state) and "no checksum file" in capfd.readouterr().err


def test_read_jsonl_drops_only_a_partial_last_line(tmp_path, capfd):
  p = tmp_path / "m.jsonl"
  p.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
  assert checkpoint.read_jsonl(p) == [{"step": 1}, {"step": 2}]
  assert "partial last line" in capfd.readouterr().err
  assert checkpoint.read_jsonl(p, repair=True, log=lambda s: None) == [{"step": 1}, {"step": 2}]
  assert p.read_text() == '{"step": 1}\n{"step": 2}\n'
  p.write_text('{"step": 1}\n{"step": 2}')          # no final newline, but complete
  assert checkpoint.read_jsonl(p) == [{"step": 1}, {"step": 2}]
  p.write_text('{"step": 1}\ngarbage\n{"step": 3}\n')
  with pytest.raises(ValueError, match="line 2"):
    checkpoint.read_jsonl(p)
