"""Key-path utilities shared by every transform: path strings and regex rules.

Every rule-driven transform in the library selects leaves the same way: the leaf's
key path is rendered as a ``/``-separated string (``params/Conv_0/kernel``; NNX
``Variable`` leaves drop their trailing ``/value``), and a list of regular expressions
is tried in order with :func:`re.search`; the first one that matches wins.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def path_str(path: Sequence[Any]) -> str:
  """Renders a JAX key path as ``a/b/0/c``.

  A trailing attribute key ``.value`` (how an NNX ``Variable`` flattens) is dropped, so
  linen and NNX kernels are both ``.../kernel``. Only an attribute key is dropped: a
  dict key named ``value`` (e.g. a ``QArray``'s integer values) stays in the path.
  """
  path = tuple(path)
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]
  return jax.tree_util.keystr(path, simple=True, separator="/")


def leaves_with_paths(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None):
  """Returns ``[(path_string, leaf), ...]`` in flatten order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return [(path_str(p), x) for p, x in flat]


def map_with_path_str(fn: Callable[..., Any], tree: PyTree, *rest: PyTree,
                      is_leaf: Callable[[Any], bool] | None = None) -> PyTree:
  """``jax.tree.map`` where ``fn(path_string, leaf, *rest_leaves)``."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x, *r: fn(path_str(p), x, *r), tree, *rest, is_leaf=is_leaf)


def is_float_array(x: Any) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


_NAME_ROLES = (
    (re.compile(r"(?i)(batch_stats|quant_stats|(^|/)(mean|var)$|input_amax$)"), "other"),
    (re.compile(r"(?i)(^|/)(bias|b|beta|b_\w+|\w+_bias)$"), "bias"),
    (re.compile(r"(?i)(^|/)(scale|gamma)$|(^|/)(\w*norm\w*|ln\w*)/\w+$"), "scale"),
    (re.compile(r"(?i)(^|/)(embedding|embeddings|wte|wpe|pos|pos_emb\w*|\w*_embedding)$"),
     "embedding"),
)


def path_role(path: str, x: Any) -> str:
  """A leaf's role guessed from its name (no program at hand; see :mod:`jaxopt_dnn.roles`).

  ``bias`` (``bias``, ``b``, ``beta``, ``b_*``, ``*_bias``), ``scale`` (``scale``,
  ``gamma``, any leaf of a ``*norm*`` / ``ln*`` module), ``embedding`` (``embedding``,
  ``wte``, ``wpe``, ``pos``...), ``other`` (statistics, non-float, ``ndim < 2``), and
  ``kernel`` for the remaining floating leaves with ``ndim >= 2``.
  """
  if not is_float_array(x):
    return "other"
  for rx, role in _NAME_ROLES:
    if rx.search(path):
      return role
  return "kernel" if np.ndim(x) >= 2 else "other"


def default_prunable(path: str, x: Any) -> bool:
  """Default leaf choice, by role: contraction weights only (:func:`path_role` ==
  ``"kernel"``), so 2-D ``DenseGeneral`` biases, norm scales and embedding tables stay
  dense / float unless a rule names them. For the exact, traced choice use
  ``rules=jaxopt_dnn.roles.kernels(jaxopt_dnn.roles.trace(apply_fn, variables, *x))``.
  """
  return path_role(path, x) == "kernel"


def _compile(patterns: Iterable[str], argname: str) -> list[re.Pattern]:
  out = []
  for p in patterns:
    if not isinstance(p, str):
      raise TypeError(f"{argname}: every rule must be a regex string, got {p!r}")
    try:
      out.append(re.compile(p))
    except re.error as e:
      raise ValueError(f"{argname}: invalid regex {p!r}: {e}") from None
  return out


def first_match(patterns: Sequence[str], paths: Sequence[str], *,
                argname: str = "rules", require_all: bool = True) -> list[int]:
  """Index of the first pattern that ``re.search``-matches each path, or -1.

  Args:
    patterns: regexes, tried in order.
    paths: leaf path strings.
    argname: name used in error messages.
    require_all: if True, a pattern that wins no path at all is an error that
      lists the candidate paths (rules that silently stop matching after a model
      refactor are the commonest quantization/pruning bug).
  """
  compiled = _compile(patterns, argname)
  idx = []
  for path in paths:
    hit = -1
    for i, rx in enumerate(compiled):
      if rx.search(path):
        hit = i
        break
    idx.append(hit)
  if require_all:
    unused = [i for i in range(len(patterns)) if i not in idx]
    if unused:
      msgs, none = [], []
      for i in unused:
        hits = [j for j, p in enumerate(paths) if compiled[i].search(p)]
        if hits:   # it matches, but an earlier rule wins every one of its leaves
          winners = sorted({patterns[idx[j]] for j in hits})
          msgs.append(f"pattern {patterns[i]!r} is shadowed: every leaf it matches "
                      f"({', '.join(paths[j] for j in hits[:5])}) is won by the earlier "
                      f"pattern(s) {winners} (first match wins; reorder the rules)")
        else:
          none.append(patterns[i])
      if none:
        msgs.insert(0, f"pattern(s) {none} match no leaf")
      raise ValueError(f"{argname}: " + "; ".join(msgs) + ". Candidate paths: "
                       + ", ".join(paths))
  return idx


def select(tree: PyTree, rules: str | Sequence[str] | Mapping[str, Any] | Callable | None,
           *, argname: str = "rules",
           default: Callable[[str, Any], bool] = default_prunable) -> list[tuple[str, Any, Any]]:
  """Chooses leaves of ``tree`` by rules.

  Args:
    tree: any pytree of arrays.
    rules: ``None`` (use ``default``), a regex, a sequence of regexes, a mapping
      ``{regex: value}`` (first match wins; the value is returned with the leaf), or a
      predicate ``(path, leaf) -> bool``.

  Returns:
    ``[(path, leaf, value_or_None), ...]`` for every leaf in flatten order; ``value``
    is ``None`` for unchosen leaves, ``True`` for leaves chosen by a plain regex or
    predicate, and the mapped value for a mapping.
  """
  items = leaves_with_paths(tree)
  if rules is None:
    return [(p, x, True if default(p, x) else None) for p, x in items]
  if callable(rules) and not isinstance(rules, str):
    return [(p, x, True if rules(p, x) else None) for p, x in items]
  if isinstance(rules, str):
    rules = [rules]
  if isinstance(rules, Mapping):
    patterns, values = list(rules.keys()), list(rules.values())
  else:
    patterns = list(rules)
    values = [True] * len(patterns)
  idx = first_match(patterns, [p for p, _ in items], argname=argname)
  return [(p, x, None if i < 0 else values[i]) for (p, x), i in zip(items, idx)]
