"""AWQ: activation-aware weight quantization (Lin et al. 2023), folded into the model.

For the ops that share one input ``X`` (``(T, K)``) and a per-input-channel scale
``s``, ``X W = (X / s)(diag(s) W)``; quantizing ``diag(s) W`` instead of ``W`` protects
the input channels with large activations. AWQ searches

    s(alpha) = m^alpha / sqrt(max(m^alpha) * min(m^alpha)),   m_c = mean |X_tk|, k in c
    alpha*   = argmin_{alpha in {0, 1/19, ..., 1}} sum_ops || X W - (X / s) Q(diag(s) W) ||^2

on a sample of calibration rows (``Q``: round-to-nearest with the rule's bits and
group-wise scales; ``X`` / ``W``: the rows and the ``(K, N)`` kernel matrix of
:mod:`jaxopt_dnn.quant.hessian`, ``s`` indexed by input channel ``c`` and repeated over
the kernel rows ``k`` of that channel: a conv's window positions share it), folds
``1 / s`` into the producer of ``X`` (a per-channel scale such as a ``LayerNorm``'s, or a
``Dense`` / ``Einsum`` / ``Conv``, traced through ``relu`` and casts, linen or NNX, or a
producer named in ``folds``; every fold is verified to leave the float model's output
unchanged, see :mod:`jaxopt_dnn.quant.smooth`) and finally quantizes every chosen
kernel round-to-nearest. Ops without a valid producer are quantized without a scale (plain
RTN), so the returned params always run unchanged in the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_dnn.quant import fake
from jaxopt_dnn.quant import rules as _rules
from jaxopt_dnn.quant.layout import kernel_matrix
from jaxopt_dnn.quant.gptq import layer_groups
from jaxopt_dnn.quant.smooth import scaled_rounds

GRID = 20


def _rtn(w2, bits, g):
  return fake.fake_quant(w2, bits=bits, axis=-1, group_size=g, group_axis=0)


def awq_search(x: jax.Array, ws: list[jax.Array], *, bits: int, group_size: int | None,
               grid: int = GRID, row_chan: Any = None) -> tuple[jax.Array, jax.Array]:
  """``(s, errors per alpha)`` for sample rows ``x`` (T, K) and ``(K, N_i)`` kernels.

  ``row_chan``: ``(K,)`` input channel of each row (``None``: each row its own channel);
  ``s`` then has one entry per channel and row ``k`` is scaled by ``s[row_chan[k]]``.
  """
  col = jnp.mean(jnp.abs(x), axis=0)
  if row_chan is None:
    rc, m = None, col
  else:
    rc = jnp.asarray(row_chan)
    c = int(np.max(row_chan)) + 1
    m = jnp.zeros((c,), jnp.float32).at[rc].add(col) / jnp.zeros((c,), jnp.float32).at[
        rc].add(1.0)
  m = jnp.where(m > 0, m, jnp.min(jnp.where(m > 0, m, jnp.inf)))
  ys = [x @ w for w in ws]

  def err(alpha):
    s = m ** alpha
    s = s / jnp.sqrt(jnp.max(s) * jnp.min(s))
    sr = s if rc is None else s[rc]
    e = 0.0
    for w, y in zip(ws, ys):
      q = _rtn(w * sr[:, None], bits, group_size)
      e = e + jnp.sum((y - (x / sr) @ q) ** 2)
    return e, s

  alphas = jnp.linspace(0.0, 1.0, grid)
  errs, ss = jax.lax.map(err, alphas)
  best = jnp.argmin(errs)
  return ss[best], errs


def awq(apply_fn: Callable[..., Any], variables: Any, batches: Iterable[Any], *, bits: int = 4,
        group_size: int | None = 128, rules: Any = None, folds: Mapping[str, str] | None = None,
        max_sample: int = 2048, max_batches: int | None = None,
        log: Callable[[str], Any] | None = None) -> Any:
  """AWQ post-training weight quantization of a linen or NNX model.

  Args:
    apply_fn, variables, batches: as for :func:`~jaxopt_dnn.quant.gptq`.
    bits, group_size: weight format (symmetric, group-wise along the contraction).
    rules: which kernels (regex / sequence / predicate over params paths); default every
      leaf named like a contraction weight that a dot / conv consumes (``Dense``,
      ``DenseGeneral``, ``Einsum``, ``Conv``, a raw ``x @ w`` param).
    folds: extra ``{consumer op regex: producer op path}`` folds (see ``smooth``).
    max_sample: calibration rows kept per round for the search.
    log: called with one line per round.

  Returns:
    The params tree with :class:`~jaxopt_dnn.quant.QArray` kernels (scaled where a fold
    was possible); norm scales / producer kernels absorb ``1 / s`` and stay float.
  """
  fake.check_bits(bits, "awq")

  def choose(ops, ws, st, ch):
    g = [layer_groups(o.tshape, o.n_in, group_size, o.kernel) for o in ops]
    if len(set(g)) != 1:
      g = [None]
    s, _ = awq_search(st.sample, [kernel_matrix(w, o) for o, w in zip(ops, ws)], bits=bits,
                      group_size=g[0], row_chan=ch.row_chan)
    return s

  cap, params, _ = scaled_rounds("awq", apply_fn, variables, batches, rules=rules, folds=folds,
                                 max_batches=max_batches, choose=choose, log=log,
                                 max_sample=max_sample)
  kernels = {o.kernel: o for o in cap.ops}
  qrules = [_rules.QuantRule("^" + _escape(p) + "$", bits=bits,
                             group_size=layer_groups(o.tshape, o.n_in, group_size, p),
                             group_axis=o.n_in - 1 if o.perm is None else o.perm[o.n_in - 1])
            for p, o in kernels.items()]
  return _rules.quantize_params(params, qrules, bits=bits)


def _escape(p: str) -> str:
  import re
  return re.escape(p)
