"""Where activation ranges live: float32 per-tensor ``absmax`` values, one per op.

Linen: the ``quant_stats`` collection, ``{op...: {"input_amax": f32}}`` (:func:`stats_tree`).
NNX: :class:`QuantStat` variables on the module owning the weight (``quant_input_amax``
for a ``kernel``, ``quant_<leaf>_input_amax`` otherwise, :func:`stat_attr`). Never in
params or optimizer state. :func:`flat_stats` reads either as ``{op: range}``; an op is
named by its weight path with ``/kernel`` dropped (:func:`jaxopt_dnn.quant.hooks.op_name`).
"""

from __future__ import annotations

import re
from typing import Any

import jax.numpy as jnp
from flax import nnx

from jaxopt_dnn import _tree

STATS = "quant_stats"
AMAX = "input_amax"


class QuantStat(nnx.Variable):
  """NNX variable type for float32 activation ranges (not a ``nnx.Param``)."""


def stat_attr(leaf: str) -> str:
  """The NNX attribute holding the range of weight ``leaf``'s activation."""
  return "quant_input_amax" if leaf == "kernel" else f"quant_{leaf}_input_amax"


def stats_tree(amax: dict[str, Any]) -> dict:
  """``{"a/b": v}`` -> ``{"a": {"b": {"input_amax": float32(v)}}}``."""
  out: dict = {}
  for op, v in amax.items():
    d = out
    for part in (op.split("/") if op else []):
      d = d.setdefault(part, {})
    d[AMAX] = jnp.asarray(v, jnp.float32)
  return out


_NNX_STAT = re.compile(r"(^|/)quant_(?:(?P<leaf>\w+?)_)?input_amax$")


def flat_stats(tree: Any) -> dict[str, Any]:
  """Inverse of :func:`stats_tree`; also accepts NNX ``QuantStat`` states / pure dicts
  (``fc/quant_input_amax`` -> op ``fc``; ``blk/quant_w_input_amax`` -> op ``blk/w``)."""
  if isinstance(tree, (dict, nnx.State)) and STATS in tree:
    tree = tree[STATS]
  out = {}
  for p, v in _tree.leaves_with_paths(tree):
    m = _NNX_STAT.search(p)
    if m:
      base = p[: m.start()]
      out["/".join(x for x in (base, m.group("leaf")) if x)] = v
    elif p == AMAX or p.endswith("/" + AMAX):
      out[p[: -len(AMAX)].rstrip("/")] = v
  return out
