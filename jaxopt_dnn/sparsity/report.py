"""Sparsity report: per-leaf zeros and density, totals over pruned leaves and the model."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxopt_dnn import _table, _tree
from jaxopt_dnn.sparsity.masks import apply_masks, is_dense

PyTree = Any


@dataclasses.dataclass(frozen=True)
class LeafSparsity:
  path: str
  shape: tuple[int, ...]
  size: int
  zeros: int
  pruned: bool

  @property
  def density(self) -> float:
    return 1.0 - self.zeros / self.size if self.size else 1.0


@dataclasses.dataclass(frozen=True)
class SparsityReport:
  """Rows per leaf plus totals. ``str(report)`` is a table."""

  leaves: tuple[LeafSparsity, ...]

  def _total(self, rows) -> tuple[int, int]:
    return sum(r.size for r in rows), sum(r.zeros for r in rows)

  @property
  def pruned_size(self) -> int:
    return self._total([r for r in self.leaves if r.pruned])[0]

  @property
  def pruned_zeros(self) -> int:
    return self._total([r for r in self.leaves if r.pruned])[1]

  @property
  def pruned_sparsity(self) -> float:
    """Zeros / entries over the pruned leaves."""
    return self.pruned_zeros / max(self.pruned_size, 1)

  @property
  def total_size(self) -> int:
    return self._total(self.leaves)[0]

  @property
  def total_zeros(self) -> int:
    return self._total(self.leaves)[1]

  @property
  def total_sparsity(self) -> float:
    """Zeros / entries over every leaf of the model."""
    return self.total_zeros / max(self.total_size, 1)

  @property
  def nonzeros(self) -> int:
    return self.total_size - self.total_zeros

  def __str__(self) -> str:
    rows = [(r.path, r.shape, r.size, r.zeros, f"{r.density:.4f}", "yes" if r.pruned else "")
            for r in self.leaves]
    rows.append(("pruned leaves", "", self.pruned_size, self.pruned_zeros,
                 f"{1 - self.pruned_sparsity:.4f}", ""))
    rows.append(("whole model", "", self.total_size, self.total_zeros,
                 f"{1 - self.total_sparsity:.4f}", ""))
    return _table.render(("path", "shape", "size", "zeros", "density", "pruned"), rows,
                         right=(2, 3, 4), footer_rows=2)


def sparsity_report(params: PyTree, masks: PyTree | None = None, *, rules=None) -> SparsityReport:
  """Counts zeros per leaf. With ``masks``, params are masked first and "pruned" means
  "has a real mask"; without, "pruned" means chosen by ``rules`` (default: float leaves
  with ``ndim >= 2``)."""
  if masks is not None:
    params = apply_masks(params, masks)
    flags = [not is_dense(m) for _, m in _tree.leaves_with_paths(masks)]
  else:
    flags = [v is not None for _, _, v in _tree.select(params, rules)]
  rows = []
  for (path, x), f in zip(_tree.leaves_with_paths(params), flags):
    x = np.asarray(x)
    rows.append(LeafSparsity(path, tuple(x.shape), int(x.size), int(np.sum(x == 0)), f))
  return SparsityReport(tuple(rows))
