import os
import sys
import types

import numpy as np
import pytest

from jaxopt_dnn.app import data


def test_batch_at_matches_infinite_stream_and_start():
  x = np.arange(50, dtype=np.float32)[:, None]
  y = np.arange(50, dtype=np.int32)
  stream = data.infinite_batches(x, y, 8, seed=3)
  seq = [next(stream)[1] for _ in range(20)]  # 6 batches per epoch -> crosses 3 epochs
  for s in range(20):
    np.testing.assert_array_equal(data.batch_at(x, y, 8, s, seed=3)[1], seq[s])
  resumed = data.infinite_batches(x, y, 8, seed=3, start=13)
  for s in range(13, 20):
    np.testing.assert_array_equal(next(resumed)[1], seq[s])
  # each epoch is a permutation: no repeats inside an epoch
  assert len(set(np.concatenate(seq[:6]).tolist())) == 48


def test_batch_sizes_validated():
  x, y = np.zeros((5, 2)), np.zeros(5, np.int32)
  with pytest.raises(ValueError, match="smaller than batch_size=8"):
    data.batch_at(x, y, 8, 0)
  with pytest.raises(ValueError, match="batch_size must be positive"):
    data.steps_per_epoch(5, 0)


def test_synthetic_is_deterministic_balanced_and_learnable():
  a = data.synthetic(400, (4, 4, 2), 5, seed=1)
  b = data.synthetic(400, (4, 4, 2), 5, seed=1)
  np.testing.assert_array_equal(a.x_train, b.x_train)
  assert a.x_train.shape[1:] == (4, 4, 2) and a.x_train.dtype == np.float32
  assert len(a.x_train) + len(a.x_test) == 400 and a.num_classes == 5
  assert np.bincount(np.concatenate([a.y_train, a.y_test])).tolist() == [80] * 5
  # nearest class mean separates it (the set carries signal, not noise)
  means = np.stack([a.x_train[a.y_train == k].mean(0) for k in range(5)])
  d = ((a.x_test[:, None] - means[None]) ** 2).reshape(len(a.x_test), 5, -1).sum(-1)
  assert (d.argmin(1) == a.y_test).mean() > 0.9


def test_load_npz_both_layouts(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (30, 6, 6), dtype=np.uint8)
  y = (np.arange(30) % 3).astype(np.int64)
  np.savez(tmp_path / "xy.npz", x=x, y=y)
  d = data.load_npz(tmp_path / "xy.npz", test_fraction=0.2)
  assert d.x_train.shape == (24, 6, 6, 1) and d.x_test.shape == (6, 6, 6, 1)
  assert d.x_train.dtype == np.float32 and d.x_train.max() <= 1.0 and d.num_classes == 3
  assert d.name == "xy" and d.y_train.dtype == np.int32
  np.savez(tmp_path / "full.npz", x_train=x[:20], y_train=y[:20], x_test=x[20:], y_test=y[20:])
  f = data.load_npz(str(tmp_path / "full.npz"))
  np.testing.assert_array_equal(f.y_test, y[20:])
  assert data.load_dataset(str(tmp_path / "full.npz")).x_train.shape == (20, 6, 6, 1)


def test_load_npz_bad_inputs_are_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found: .*nope.npz"):
    data.load_npz(tmp_path / "nope.npz")
  with pytest.raises(FileNotFoundError):
    data.load_dataset(str(tmp_path / "nope.npz"))
  np.savez(tmp_path / "wrong.npz", images=np.zeros((4, 2)), labels=np.zeros(4))
  with pytest.raises(ValueError, match=r"found \['images', 'labels'\]"):
    data.load_npz(tmp_path / "wrong.npz")
  np.savez(tmp_path / "len.npz", x=np.zeros((4, 2)), y=np.zeros(5, np.int32))
  with pytest.raises(ValueError, match="x has 4 examples but y has 5"):
    data.load_npz(tmp_path / "len.npz")
  np.savez(tmp_path / "float_y.npz", x=np.zeros((4, 2)), y=np.zeros(4))
  with pytest.raises(ValueError, match="integer class labels"):
    data.load_npz(tmp_path / "float_y.npz")
  (tmp_path / "text.npz").write_text("hello")
  with pytest.raises(ValueError, match="not an .npz archive"):
    data.load_npz(tmp_path / "text.npz")
  np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}] * 4, dtype=object), y=np.zeros(4, np.int32))
  with pytest.raises(ValueError, match="object .pickled. arrays, which are refused"):
    data.load_npz(tmp_path / "obj.npz")


def test_load_dataset_names():
  assert data.load_dataset("digits").num_classes == 10
  assert data.load_dataset("synthetic", n=100).x_train.shape == (80, 8, 8, 1)
  with pytest.raises(ValueError, match="Did you mean 'digits'"):
    data.load_dataset("digit")


def test_process_slice_partitions_the_global_batch():
  batch = {"x": np.arange(24).reshape(12, 2), "y": np.arange(12)}
  parts = [data.process_slice(batch, i, 3) for i in range(3)]
  np.testing.assert_array_equal(np.concatenate([p["y"] for p in parts]), batch["y"])
  assert parts[1]["x"].shape == (4, 2)
  assert data.process_slice(batch)["y"].shape == (12,)  # single process: everything
  with pytest.raises(ValueError, match="leaf 'y' with leading size 12 does not split over 5"):
    data.process_slice({"y": np.arange(12)}, 0, 5)
  with pytest.raises(ValueError, match="process_index"):
    data.process_slice(batch, 3, 3)


def _fake_tfds(arrays, calls):
  mod = types.ModuleType("tensorflow_datasets")

  def load(name, split, data_dir, download, batch_size):
    calls.append(dict(name=name, split=split, data_dir=data_dir, download=download))
    if data_dir is None or not os.path.isdir(os.path.join(data_dir, name)):
      raise AssertionError(f"Dataset {name} not found in {data_dir}")
    if split not in arrays:
      raise ValueError(f"Unknown split {split!r}")
    return arrays[split]

  mod.load = load
  mod.as_numpy = lambda ds: ds
  return mod


def test_load_tfds_never_downloads_and_converts(tmp_path, monkeypatch):
  # A stand-in module exercising our side of the TFDS contract (download=False,
  # batch_size=-1 -> dict of arrays); the real package is tested below if installed.
  (tmp_path / "tiny").mkdir()
  img = np.random.default_rng(0).integers(0, 256, (20, 4, 4, 1), dtype=np.uint8)
  lab = np.arange(20) % 2
  calls = []
  monkeypatch.setitem(sys.modules, "tensorflow_datasets",
                      _fake_tfds({"train": {"image": img, "label": lab}}, calls))
  d = data.load_dataset("tfds:tiny", data_dir=str(tmp_path))
  assert all(c["download"] is False for c in calls) and calls[0]["split"] == "train"
  assert d.x_train.shape == (16, 4, 4, 1) and d.x_test.shape == (4, 4, 4, 1)  # no test split
  assert d.x_train.dtype == np.float32 and d.num_classes == 2
  with pytest.raises(FileNotFoundError, match="not prepared under data_dir"):
    data.load_tfds("absent", data_dir=str(tmp_path))


def test_load_tfds_missing_package_is_clear(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
    data.load_tfds("mnist")


def test_load_tfds_real_package_without_download(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(FileNotFoundError, match="not prepared"):
    data.load_tfds("mnist", data_dir=str(tmp_path))


def test_mnist1d_is_generated_deterministically_never_downloaded(monkeypatch):
  """MNIST-1D comes from the package's generator: the standard 4000/1000 split, balanced
  classes, the same arrays every time, no network, and NumPy's global RNG left alone."""
  import socket

  import requests

  def no_network(*a, **k):
    raise AssertionError("MNIST-1D must be generated, not downloaded")
  monkeypatch.setattr(requests, "get", no_network)
  monkeypatch.setattr(socket, "create_connection", no_network)
  monkeypatch.setattr(data, "_MNIST1D_CACHE", {})
  np.random.seed(123)
  before = np.random.get_state()[1].copy()
  ds = data.load_dataset("mnist1d")
  np.testing.assert_array_equal(np.random.get_state()[1], before)
  assert ds.name == "mnist1d" and ds.num_classes == 10
  assert ds.x_train.shape == (4000, 40, 1) and ds.x_test.shape == (1000, 40, 1)
  assert ds.x_train.dtype == np.float32 and ds.y_test.dtype == np.int32
  counts = np.bincount(ds.y_test, minlength=10)
  assert counts.sum() == 1000 and counts.min() >= 80       # all ten classes, near balanced
  assert abs(float(ds.x_train.mean())) < 0.1 and 0.8 < float(ds.x_train.std()) < 1.2
  monkeypatch.setattr(data, "_MNIST1D_CACHE", {})          # regenerate from scratch
  again = data.load_mnist1d()
  np.testing.assert_array_equal(again.x_test, ds.x_test)
  np.testing.assert_array_equal(again.y_train, ds.y_train)
  other = data.load_mnist1d(num_samples=200, seed=1)
  assert other.x_test.shape == (40, 40, 1) and not np.array_equal(other.x_train[:5], ds.x_train[:5])
  with pytest.raises(ValueError, match="num_samples"):
    data.load_mnist1d(num_samples=3)
  with pytest.raises(ValueError, match="train_split"):
    data.load_mnist1d(train_split=1.5)
