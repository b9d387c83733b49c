"""How a captured contraction reads its kernel leaf as a ``(K, N)`` matrix.

The post-training solvers (GPTQ, AWQ, SmoothQuant, Wanda, SparseGPT) work on one matrix
per kernel: with ``c_1 < ... < c_n`` the kernel leaf's contracted axes and
``f_1 < ... < f_m`` its free (output) axes,

    W2 = reshape(transpose(w, (c_1..c_n, f_1..f_m)), (K, N))   K = prod_i w.shape[c_i]

and the contraction's output is ``X W2`` up to a reshape (``X``: ``(T, K)``, the rows
:mod:`jaxopt_dnn.quant.hessian` captures). :class:`OpInfo` records that layout for one
kernel; :func:`kernel_matrix` / :func:`from_matrix` go back and forth, and
:func:`set_leaves` installs solved kernels into a params tree.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_dnn import _tree
from jaxopt_dnn.quant.qarray import is_qarray


@dataclasses.dataclass(frozen=True)
class OpInfo:
  """One captured kernel.

  Attributes:
    op: op name (the kernel path without a trailing ``/kernel``: ``encoder/layer_0/query``).
    kernel: the kernel's path in the params tree (``encoder/layer_0/query/kernel``).
    shape: the kernel leaf's shape.
    n_in: number of contracted (input) kernel axes.
    round: index of the group of kernels that share one activation operand, in order
      of first use.
    perm: ``None`` when the contracted axes are the leading ``n_in`` axes; else the
      kernel's contracted axes then its free axes (ascending each), the order in
      which :func:`kernel_matrix` reads it (an ``Einsum`` ``"btd,ndh->btnh"`` kernel:
      ``(1, 0, 2)``).
  """

  op: str
  kernel: str
  shape: tuple[int, ...]
  n_in: int
  round: int
  perm: tuple[int, ...] | None = None

  @property
  def tshape(self) -> tuple[int, ...]:
    """The kernel's shape with its contracted axes first (``shape`` permuted)."""
    return self.shape if self.perm is None else tuple(self.shape[a] for a in self.perm)

  @property
  def k(self) -> int:
    """``K``: the contracted size (rows of :func:`kernel_matrix`)."""
    return math.prod(self.tshape[:self.n_in])

  @property
  def n(self) -> int:
    """``N``: the free size (columns of :func:`kernel_matrix`)."""
    return math.prod(self.tshape[self.n_in:])


def set_leaves(tree: Any, new: dict[str, Any]) -> Any:
  """Returns ``tree`` with the leaves at the given paths replaced (QArrays are leaves)."""
  return _tree.map_with_path_str(lambda p, x: new.get(p, x), tree, is_leaf=is_qarray)


def kernel_2d(w: jax.Array, n_in: int) -> jax.Array:
  """Kernel ``(k1..kn, out...) -> (K, N)`` float32 (contracted axes already leading)."""
  k = math.prod(w.shape[:n_in])
  return jnp.asarray(w, jnp.float32).reshape((k, -1))


def kernel_matrix(w: jax.Array, o: OpInfo) -> jax.Array:
  """The ``(K, N)`` float32 matrix ``W2`` of kernel ``w`` as ``o`` contracts it:
  contracted axes first (``o.perm``), then :func:`kernel_2d`."""
  w = jnp.asarray(w)
  return kernel_2d(w if o.perm is None else jnp.transpose(w, o.perm), o.n_in)


def from_matrix(w2: jax.Array, o: OpInfo) -> jax.Array:
  """Inverse of :func:`kernel_matrix`: ``(K, N)`` -> the kernel's own shape."""
  w = w2.reshape(o.tshape)
  return w if o.perm is None else jnp.transpose(w, np.argsort(o.perm))
