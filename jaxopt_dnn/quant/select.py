"""Which leaves the drivers (:mod:`~jaxopt_dnn.quant.qat`, :mod:`~jaxopt_dnn.quant.serve`,
:mod:`~jaxopt_dnn.quant.coverage`) route through the interpreter, and by which rule.

With ``rules=None``, every leaf whose *name* says it is a contraction weight
(:func:`jaxopt_dnn._tree.default_prunable`: floating, ``ndim >= 2``, not a bias, a norm
scale or an embedding table), the same choice :func:`quantize_params` makes, so QAT,
calibration and serving agree by construction. Explicit rules match the leaf path
relative to the params collection (``layer_0/query/kernel``, ``embed/embedding``).
"""

from __future__ import annotations

from typing import Any

import jax

from jaxopt_dnn import _tree
from jaxopt_dnn.quant import rules as _rules
from jaxopt_dnn.quant.qarray import is_qarray


def weight_rule(rs, path: str, leaf: Any, bits: int):
  """The winning non-skip rule for a float weight leaf (``rules=None``: by name)."""
  if not _tree.is_float_array(leaf) or is_qarray(leaf):
    return None
  if rs is None:
    return _rules.QuantRule(".*", bits=bits) if _tree.default_prunable(path, leaf) else None
  r = _rules.rule_for_path(rs, path, bits=bits)
  return None if r is None or r.skip else r


def serve_rule(rs, path: str, bits: int):
  """The rule a stored QArray leaf is served by (weight-only when no rule claims it)."""
  r = _rules.QuantRule(".*", bits=bits) if rs is None else _rules.rule_for_path(rs, path, bits=bits)
  if r is None or r.skip:   # a QArray that no rule claims: weight-only (dequantized)
    return _rules.QuantRule(".*", bits=bits, act_bits=None)
  return r


def split_variables(variables: Any):
  """Leaves (QArray leaves kept whole), their paths relative to ``params``, treedef."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(variables, is_leaf=is_qarray)
  has_params = isinstance(variables, dict) or hasattr(variables, "keys")
  has_params = has_params and "params" in variables
  paths, leaves = [], []
  for p, x in flat:
    s = _tree.path_str(p)
    if has_params:
      s = s[len("params/"):] if s.startswith("params/") else None
    paths.append(s)
    leaves.append(x)
  return leaves, paths, treedef


def placeholder(x):
  """A QArray leaf's float shape/dtype (what the traced program sees); others as is."""
  if is_qarray(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  return x
