"""Reference Flax models used by the main job, the benchmarks and the tests."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
  """Flatten -> [Dense -> relu]* -> Dense(num_classes)."""

  features: Sequence[int] = (128, 64)
  num_classes: int = 10
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = x.reshape((x.shape[0], -1))
    for f in self.features:
      x = nn.relu(nn.Dense(f, dtype=self.dtype)(x))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)


class CNN(nn.Module):
  """Small CNN for 8x8 digits: [Conv3x3 -> (BatchNorm) -> relu]* -> mean pool -> Dense -> Dense.

  With ``batch_norm=True`` the model has a ``batch_stats`` collection; call it with
  ``train=True`` and ``mutable=["batch_stats"]`` during training.
  """

  features: Sequence[int] = (32, 64)
  dense: int = 128
  num_classes: int = 10
  batch_norm: bool = False
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    for f in self.features:
      x = nn.Conv(f, (3, 3), dtype=self.dtype)(x)
      if self.batch_norm:
        x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype)(x)
      x = nn.relu(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.dense, dtype=self.dtype)(x))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)
