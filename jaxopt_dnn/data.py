"""Embedded datasets and deterministic batching.

The default dataset is scikit-learn's bundled ``digits`` (1797 8x8 grey images,
10 classes), shipped inside the scikit-learn wheel: nothing is downloaded.
Images are returned NHWC float32 in [0, 1]; labels int32.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np


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
  from sklearn.datasets import load_digits as _sk_digits

  d = _sk_digits()
  x = (d.images.astype(np.float32) / 16.0)[..., None]
  y = d.target.astype(np.int32)
  return split(x, y, test_fraction=test_fraction, seed=seed, num_classes=10, name="digits")


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
                     seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Endless stream of batches, epoch after epoch (deterministic)."""
  epoch = 0
  while True:
    yield from batches(x, y, batch_size, seed=seed, epoch=epoch)
    epoch += 1
