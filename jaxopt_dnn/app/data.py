"""Embedded datasets and deterministic batching.

The default dataset of ``jaxopt-dnn compress`` is MNIST-1D (Greydanus 2020), generated
on the spot by the ``mnist1d`` package's procedural generator (:func:`load_mnist1d`):
nothing is downloaded. scikit-learn's bundled ``digits`` (1797 8x8 grey images, 10
classes) stays available; its images are returned NHWC float32 in [0, 1]. Labels int32.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxopt_dnn._tree import path_str


class Dataset(NamedTuple):
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  name: str = "dataset"


def split(x: np.ndarray, y: np.ndarray, *, test_fraction: float, seed: int,
          num_classes: int, name: str) -> Dataset:
  """Deterministic shuffled train/test split."""
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  perm = np.random.default_rng(seed).permutation(len(x))
  n_test = int(round(len(x) * test_fraction))
  te, tr = perm[:n_test], perm[n_test:]
  return Dataset(x[tr], y[tr], x[te], y[te], num_classes, name)


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
  """scikit-learn's bundled digits as ``(N, 8, 8, 1)`` float32 in [0, 1]."""
  from jaxopt_dnn.app import require

  d = require("sklearn.datasets", "the digits dataset").load_digits()
  x = (d.images.astype(np.float32) / 16.0)[..., None]
  y = d.target.astype(np.int32)
  return split(x, y, test_fraction=test_fraction, seed=seed, num_classes=10, name="digits")


# MNIST-1D's published test accuracies (Greydanus, "Scaling down deep learning", 2020,
# arXiv:2011.14439; also in the mnist1d README) on its standard 4000/1000 split.
MNIST1D_REFERENCE = {"logistic regression": 0.32, "mlp": 0.68, "cnn": 0.94, "gru": 0.91,
                     "human": 0.96}


_MNIST1D_CACHE: dict[tuple, tuple] = {}


def load_mnist1d(*, num_samples: int = 5000, train_split: float = 0.8,
                 seed: int = 42) -> Dataset:
  """MNIST-1D, generated deterministically by ``mnist1d.data.make_dataset``.

  The defaults are the package's (and the paper's) arguments: 5000 signals of length
  40 (10 classes, balanced), the first 4000 for training and the last 1000 for test,
  generator seed 42. Only the procedural generator is called (``get_dataset`` would
  try to download a pickle; it is never used). The generator seeds NumPy's global RNG;
  its state (and Python's ``random``) is restored afterwards.

  Returns:
    ``x`` of shape ``(N, 40, 1)`` float32 (length, channels; standardised by the
    generator), ``y`` int32.
  """
  if not isinstance(num_samples, int) or num_samples < 20:
    raise ValueError(f"mnist1d: num_samples must be an int >= 20, got {num_samples!r}")
  if not 0.0 < train_split < 1.0:
    raise ValueError(f"mnist1d: train_split must be in (0, 1), got {train_split}")
  key = (num_samples, float(train_split), int(seed))
  if key not in _MNIST1D_CACHE:
    from jaxopt_dnn.app import require
    mnist1d_data = require("mnist1d.data", "the MNIST-1D dataset (generated, not downloaded)")
    get_dataset_args, make_dataset = mnist1d_data.get_dataset_args, mnist1d_data.make_dataset
    import random
    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = num_samples, train_split, seed
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
      d = make_dataset(args)
    finally:
      np.random.set_state(np_state)
      random.setstate(py_state)
    _MNIST1D_CACHE[key] = tuple(np.array(a) for a in (d["x"], d["y"], d["x_test"], d["y_test"]))
  x, y, xt, yt = _MNIST1D_CACHE[key]
  return Dataset(x.astype(np.float32)[..., None], y.astype(np.int32),
                 xt.astype(np.float32)[..., None], yt.astype(np.int32), 10, "mnist1d")


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int = 0,
            epoch: int = 0, drop_remainder: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """One epoch of shuffled batches; the order depends only on ``(seed, epoch)``."""
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if len(x) != len(y):
    raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
  perm = np.random.default_rng([seed, epoch]).permutation(len(x))
  stop = len(x) - (len(x) % batch_size if drop_remainder else 0)
  for i in range(0, stop, batch_size):
    idx = perm[i:i + batch_size]
    yield x[idx], y[idx]


def infinite_batches(x: np.ndarray, y: np.ndarray, batch_size: int, *,
                     seed: int = 0, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Endless stream of batches, epoch after epoch (deterministic).

  ``start`` skips the first ``start`` batches: the stream from ``start=k`` equals the
  uninterrupted stream after ``k`` batches, so a resumed run sees the same data.
  """
  per_epoch = steps_per_epoch(len(x), batch_size)
  epoch, skip = divmod(start, per_epoch)
  while True:
    for i, b in enumerate(batches(x, y, batch_size, seed=seed, epoch=epoch)):
      if i >= skip:
        yield b
    skip = 0
    epoch += 1


def steps_per_epoch(n: int, batch_size: int) -> int:
  """Full batches per epoch (the remainder is dropped)."""
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if n < batch_size:
    raise ValueError(f"dataset of {n} examples is smaller than batch_size={batch_size}")
  return n // batch_size


def batch_at(x: np.ndarray, y: np.ndarray, batch_size: int, step: int, *,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """The batch that :func:`infinite_batches` yields at position ``step`` (0-based).

  Random access makes the data position a pure function of the training step:
  ``epoch = step // steps_per_epoch``, then the ``step % steps_per_epoch``-th slice of
  that epoch's permutation (seeded by ``(seed, epoch)``). This is what makes resume
  exact.
  """
  if len(x) != len(y):
    raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
  if step < 0:
    raise ValueError(f"step must be >= 0, got {step}")
  epoch, i = divmod(int(step), steps_per_epoch(len(x), batch_size))
  idx = _permutation(len(x), seed, epoch)[i * batch_size:(i + 1) * batch_size]
  return x[idx], y[idx]


_PERM_CACHE: dict[tuple[int, int, int], np.ndarray] = {}


def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  key = (n, seed, epoch)
  perm = _PERM_CACHE.get(key)
  if perm is None:
    if len(_PERM_CACHE) > 64:
      _PERM_CACHE.clear()
    perm = _PERM_CACHE[key] = np.random.default_rng([seed, epoch]).permutation(n)
  return perm


def synthetic(n: int = 2048, shape: Sequence[int] = (8, 8, 1), num_classes: int = 10, *,
              seed: int = 0, noise: float = 0.5, test_fraction: float = 0.2) -> Dataset:
  """A learnable synthetic classification set, for benchmarks at any size.

  ``x = clip(prototype[y] + noise * N(0, 1), 0, 1)`` with one random prototype in
  ``[0, 1]^shape`` per class and balanced labels ``y = i mod num_classes`` (shuffled).
  Deterministic in ``seed``.
  """
  if n < 2 or num_classes < 2:
    raise ValueError(f"synthetic: need n >= 2 and num_classes >= 2, got n={n}, "
                     f"num_classes={num_classes}")
  shape = tuple(int(s) for s in shape)
  if not shape or min(shape) <= 0:
    raise ValueError(f"synthetic: shape must be non-empty and positive, got {shape}")
  rng = np.random.default_rng(seed)
  protos = rng.random((num_classes,) + shape, dtype=np.float32)
  y = (np.arange(n) % num_classes).astype(np.int32)
  x = protos[y] + np.float32(noise) * rng.standard_normal((n,) + shape, dtype=np.float32)
  x = np.clip(x, 0.0, 1.0).astype(np.float32)
  return split(x, y, test_fraction=test_fraction, seed=seed, num_classes=num_classes,
               name=f"synthetic{n}")


def _as_images(x: np.ndarray, where: str) -> np.ndarray:
  if x.dtype == np.uint8:
    x = x.astype(np.float32) / 255.0
  elif np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating):
    x = x.astype(np.float32)
  else:
    raise TypeError(f"{where}: x must be numeric, got dtype {x.dtype}")
  if x.ndim == 3:  # (N, H, W) grey images -> NHWC
    x = x[..., None]
  if x.ndim < 2:
    raise ValueError(f"{where}: x must have a leading example axis and features, got shape {x.shape}")
  bad = ~np.isfinite(x)
  if bad.any():
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(f"{where}: {int(bad.sum())} features are NaN or infinite (first at index "
                     f"{first}: {x[first]}); clean the data before training")
  return x


def _as_labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{where}: y must be 1-D integer class labels, got shape {y.shape} "
                     f"dtype {y.dtype}")
  if len(y) != n:
    raise ValueError(f"{where}: x has {n} examples but y has {len(y)}")
  if len(y) and y.min() < 0:
    raise ValueError(f"{where}: labels must be >= 0, found {int(y.min())}")
  return y.astype(np.int32)


def from_arrays(x_train, y_train, x_test=None, y_test=None, *, name: str = "arrays",
                num_classes: int | None = None, test_fraction: float = 0.2,
                seed: int = 0) -> Dataset:
  """A :class:`Dataset` from numpy arrays (``uint8`` images scaled to [0, 1]; ``(N, H, W)``
  gets a channel axis). Without a test set, a deterministic split is made."""
  x_train = _as_images(np.asarray(x_train), f"{name}: x_train")
  y_train = _as_labels(np.asarray(y_train), len(x_train), f"{name}: y_train")
  if (x_test is None) != (y_test is None):
    raise ValueError(f"{name}: give both x_test and y_test, or neither")
  if x_test is not None:
    x_test = _as_images(np.asarray(x_test), f"{name}: x_test")
    y_test = _as_labels(np.asarray(y_test), len(x_test), f"{name}: y_test")
    if x_test.shape[1:] != x_train.shape[1:]:
      raise ValueError(f"{name}: x_train examples have shape {x_train.shape[1:]} but x_test "
                       f"examples have {x_test.shape[1:]}")
  labels = y_train if y_test is None else np.concatenate([y_train, y_test])
  found = int(labels.max()) + 1 if len(labels) else 0
  k = found if num_classes is None else int(num_classes)
  if found > k:
    raise ValueError(f"{name}: label {found - 1} >= num_classes={k}")
  if num_classes is None and len(labels):
    present = np.unique(labels)
    missing = k - len(present)
    if missing > max(1, k // 10):   # 0..9 plus a stray 1000 would make 1001 classes
      others = present[:-1]
      span = f"{int(others.min())}..{int(others.max())}" if len(others) else "none"
      raise ValueError(
          f"{name}: labels must be the class indices 0..K-1, but label {int(present[-1])} "
          f"implies {k} classes of which {missing} never occur (other labels: {span}); "
          "fix the labels or pass num_classes explicitly")
  if k < 2:
    raise ValueError(f"{name}: need at least 2 classes, found {k}")
  if x_test is None:
    return split(x_train, y_train, test_fraction=test_fraction, seed=seed, num_classes=k,
                 name=name)
  return Dataset(x_train, y_train, x_test, y_test, k, name)


def load_npz(path: str | os.PathLike, *, num_classes: int | None = None,
             test_fraction: float = 0.2, seed: int = 0) -> Dataset:
  """Loads a user dataset from an ``.npz`` file.

  The file holds either ``x_train, y_train, x_test, y_test`` or ``x, y`` (then split
  deterministically with ``test_fraction``/``seed``). Pickled (object) arrays are
  refused.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not an ``.npz`` archive, or the arrays are missing or malformed
      (the message lists the arrays found).
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    raise ValueError(f"dataset {path!r} is a directory, expected an .npz file")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"dataset file not found: {path!r}")
  with open(path, "rb") as f:
    magic = f.read(6)
  if magic.startswith(b"\x93NUMPY"):
    raise ValueError(f"{path!r} holds a single .npy array, expected an .npz archive "
                     "(numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...))")
  if not magic.startswith(b"PK"):
    raise ValueError(f"{path!r} is not an .npz archive (a zip file; it starts with "
                     f"{magic!r}); write it with numpy.savez")
  import zipfile
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except ValueError as e:
    if "pickle" in str(e):
      raise ValueError(f"{path!r} holds object (pickled) arrays, which are refused; store "
                       "plain numeric arrays") from None
    raise ValueError(f"{path!r} is not a readable .npz archive of plain arrays: {e}") from None
  except (OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path!r} is not a readable .npz archive of plain arrays: {e}") from None
  if not isinstance(arrays, dict):
    raise ValueError(f"{path!r} holds a single array, expected an .npz archive")
  name = os.path.splitext(os.path.basename(path))[0]
  full = ("x_train", "y_train", "x_test", "y_test")
  try:
    if all(k in arrays for k in full):
      return from_arrays(*(arrays[k] for k in full), name=name, num_classes=num_classes)
    if "x" in arrays and "y" in arrays:
      return from_arrays(arrays["x"], arrays["y"], name=name, num_classes=num_classes,
                         test_fraction=test_fraction, seed=seed)
  except (ValueError, TypeError) as e:
    raise type(e)(f"dataset file {path!r}: {e}") from None
  raise ValueError(f"{path!r}: expected arrays x_train, y_train, x_test, y_test (or x, y); "
                   f"found {sorted(arrays) or 'none'}")


def load_tfds(name: str, *, data_dir: str | None = None, train_split: str = "train",
              test_split: str | None = "test", image_key: str = "image",
              label_key: str = "label", test_fraction: float = 0.2, seed: int = 0) -> Dataset:
  """Loads an already-prepared TFDS dataset into memory. Never downloads.

  Needs the optional ``tensorflow_datasets`` package. The dataset must already be
  prepared under ``data_dir`` (``tfds.load(..., download=False)``). With
  ``test_split=None`` (or a dataset without that split) the train split is divided
  deterministically.
  """
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise ImportError("load_tfds needs tensorflow_datasets: pip install tensorflow-datasets "
                      "(and prepare the dataset locally; nothing is downloaded)") from None

  def _load(split_name):
    ds = tfds.load(name, split=split_name, data_dir=data_dir, download=False, batch_size=-1)
    ds = tfds.as_numpy(ds)
    if image_key not in ds or label_key not in ds:
      raise ValueError(f"tfds {name!r}: expected features {image_key!r} and {label_key!r}, "
                       f"found {sorted(ds)}")
    return ds[image_key], ds[label_key]

  try:
    x_tr, y_tr = _load(train_split)
    test = None
    if test_split is not None:
      try:
        test = _load(test_split)
      except (KeyError, ValueError) as e:
        if "split" not in str(e).lower():
          raise
  except (AssertionError, FileNotFoundError, OSError) as e:
    raise FileNotFoundError(f"tfds dataset {name!r} is not prepared under data_dir={data_dir!r} "
                            f"(nothing is downloaded): {e}") from None
  kw = dict(name=name, test_fraction=test_fraction, seed=seed)
  return from_arrays(x_tr, y_tr, *(test if test is not None else (None, None)), **kw)


_NAMED = {"digits": lambda **kw: load_digits(**kw), "synthetic": lambda **kw: synthetic(**kw),
          "mnist1d": lambda **kw: load_mnist1d(**kw)}


def load_dataset(name_or_path: str, **kwargs) -> Dataset:
  """``"mnist1d"``, ``"digits"``, ``"synthetic"``, ``"tfds:NAME"``, or a path to an ``.npz`` file."""
  s = os.fspath(name_or_path)
  if s in _NAMED:
    return _NAMED[s](**kwargs)
  if s.startswith("tfds:"):
    return load_tfds(s[len("tfds:"):], **kwargs)
  if s.endswith(".npz") or os.sep in s or os.path.exists(s):
    return load_npz(s, **kwargs)
  close = difflib.get_close_matches(s, list(_NAMED), n=1)
  hint = f" Did you mean {close[0]!r}?" if close else ""
  raise ValueError(f"unknown dataset {s!r}; valid: {', '.join(sorted(_NAMED))}, "
                   f"'tfds:NAME', or a path to an .npz file.{hint}")


def process_slice(batch: Any, process_index: int | None = None,
                  process_count: int | None = None) -> Any:
  """This process's share of a global batch (multi-host data loading).

  Every process builds the same global batch (same seed, same step) and keeps rows
  ``[i * B/P, (i + 1) * B/P)`` of every leaf, ``i = process_index``, ``P =
  process_count`` (defaults: ``jax.process_index()``, ``jax.process_count()``). The
  slices are what ``jax.make_array_from_process_local_data`` expects.
  """
  i = jax.process_index() if process_index is None else int(process_index)
  p = jax.process_count() if process_count is None else int(process_count)
  if p < 1 or not 0 <= i < p:
    raise ValueError(f"process_slice: need 0 <= process_index < process_count, got {i}, {p}")

  def cut(path, leaf):
    n = np.shape(leaf)[0] if np.ndim(leaf) else None
    if n is None or n % p:
      raise ValueError(f"process_slice: leaf {path_str(path)!r} with leading size "
                       f"{n} does not split over {p} processes")
    k = n // p
    return leaf[i * k:(i + 1) * k]

  return jax.tree_util.tree_map_with_path(cut, batch)
