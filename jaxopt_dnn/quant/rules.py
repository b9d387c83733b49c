"""Which leaves/ops are quantized, and how: regex rules over key paths, first match wins.

A rule matches a parameter by its key path (``params/encoder/layer_0/query/kernel``)
through :mod:`jaxopt_dnn._tree`; the same rules drive the activation side, because an
intercepted op (``Dense``, ``Conv``, ``Einsum``, ``nnx.Linear``...) is identified by its
kernel's path. A rule that matches no leaf is an error (rules silently stop matching
after a model refactor), and :func:`explain` prints which rule won each leaf.

Default (``rules=None``): every leaf named like a contraction weight (floating, ``ndim >= 2``,
not a bias, norm parameter or embedding table; :func:`jaxopt_dnn._tree.path_role`) is quantized to
``bits`` per output channel, with 8-bit activations. ``group_size`` adds sub-channel
scales along ``group_axis`` (``-2``: the input axis of a Flax ``Dense`` / ``Conv``
kernel); int4 group-wise scales are stored as ``bfloat16`` unless ``scale_dtype`` says
otherwise (4.25 bits per weight at ``group_size=64``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxopt_dnn import _table, _tree
from jaxopt_dnn.quant import fake
from jaxopt_dnn.quant.qarray import QArray, dequantize, is_qarray

GRANULARITIES = ("channel", "tensor")
SCALE_DTYPES = ("auto", "float32", "bfloat16", "float16", "float8_e4m3fn")


@dataclasses.dataclass(frozen=True)
class QuantRule:
  """One rule: leaves whose path ``re.search``-matches ``pattern``.

  Attributes:
    pattern: regex over ``/``-joined key paths.
    bits: weight bits, 4 or 8.
    granularity: ``"channel"`` (one scale per index of the last axis, i.e. per output
      channel of a Flax kernel; per row, axis 0, for a leaf named like an embedding
      table, see :meth:`axis_for`), ``"tensor"``, or explicit channel axes (int /
      tuple; ``(0, -1)``: per layer and output channel of a stacked ``(layers, in,
      out)`` kernel of ``nn.scan``).
    act_bits: activation bits for the op using this kernel (8, or 4); ``None`` means
      weight-only (activations stay float).
    symmetric: symmetric weights (zero point 0). The int8 serving path needs True.
    method: weight range estimator, ``absmax`` | ``percentile`` | ``mse``.
    skip: leave matching leaves (and their ops) in float.
    group_size: sub-channel groups of this many entries along ``group_axis`` (``None``:
      whole axis). The int8 serving path needs ``None`` (it rescales per output channel).
    group_axis: the contraction axis of the kernel that is cut into groups (``-2``).
    scale_dtype: ``"auto"`` (``bfloat16`` for int4 group-wise, else ``float32``),
      ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"float8_e4m3fn"`` (8-bit scales
      relative to one float32 super scale per tensor: int4 ``g32`` at 4.25 bits/weight).
  """

  pattern: str
  bits: int = 8
  granularity: str | int | tuple[int, ...] = "channel"
  act_bits: int | None = 8
  symmetric: bool = True
  method: str = "absmax"
  skip: bool = False
  group_size: int | None = None
  group_axis: int = -2
  scale_dtype: str = "auto"

  def __post_init__(self):
    where = f"rule {self.pattern!r}"
    if not isinstance(self.pattern, str):
      raise TypeError(f"rule pattern must be a regex string, got {self.pattern!r}")
    fake.check_bits(self.bits, where)
    if self.act_bits is not None:
      fake.check_bits(self.act_bits, where + " act_bits")
    if isinstance(self.granularity, str) and self.granularity not in GRANULARITIES:
      raise ValueError(f"{where}: granularity must be one of {GRANULARITIES} or axes, "
                       f"got {self.granularity!r}")
    if self.method not in fake.METHODS:
      raise ValueError(f"{where}: method must be one of {fake.METHODS}, got {self.method!r}")
    if isinstance(self.granularity, list):
      object.__setattr__(self, "granularity", tuple(self.granularity))
    g = self.group_size
    if g is not None and (isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1):
      raise ValueError(f"{where}: group_size must be a positive int or None, got {g!r}")
    if self.scale_dtype not in SCALE_DTYPES:
      raise ValueError(f"{where}: scale_dtype must be one of {SCALE_DTYPES}, got "
                       f"{self.scale_dtype!r}")

  @property
  def stored_scale_dtype(self):
    """The scale's storage dtype (``None`` = float32)."""
    if self.scale_dtype == "auto":
      return "bfloat16" if (self.bits == 4 and self.group_size is not None) else None
    return None if self.scale_dtype == "float32" else self.scale_dtype

  @property
  def axis(self):
    """Channel axes for :func:`fake.quantize` (``-1`` per channel, ``None`` per tensor)."""
    g = self.granularity
    return -1 if g == "channel" else None if g == "tensor" else g

  def axis_for(self, path: str, leaf: Any):
    """Channel axes for the leaf at ``path``: as :attr:`axis`, except that
    ``"channel"`` on an embedding table ``(vocab, embed)`` (by name,
    :func:`jaxopt_dnn._tree.path_role`) means one scale per row (axis 0). A row is the
    table's output channel in both of its uses: what a lookup returns, and what
    ``Embed.attend`` (tied logits, ``y = x @ table.T``, contracting over embed) gives
    one logit for; a per-embed-column scale would vary along attend's contraction and
    force that dot to float."""
    if self.granularity == "channel" and _tree.path_role(path, leaf) == "embedding":
      return 0
    return self.axis


def as_rules(rules: Any, *, bits: int = 8, **defaults) -> tuple[QuantRule, ...] | None:
  """Normalizes ``None`` / regex / ``QuantRule`` / sequence / ``{regex: kwargs}`` to rules.

  ``defaults`` (e.g. ``group_size``) fill fields of rules given as a regex or a dict.
  """
  fake.check_bits(bits, "quantize_params")
  defaults = {"bits": bits, **{k: v for k, v in defaults.items() if v is not None}}
  if rules is None:
    return None
  if isinstance(rules, (str, QuantRule)):
    rules = [rules]
  if isinstance(rules, Mapping):
    rules = [(k, v) for k, v in rules.items()]
  out = []
  for r in rules:
    if isinstance(r, QuantRule):
      out.append(r)
    elif isinstance(r, str):
      out.append(QuantRule(r, **defaults))
    elif isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], Mapping):
      out.append(QuantRule(r[0], **{**defaults, **r[1]}))
    else:
      raise TypeError(f"rules: each rule must be a QuantRule, a regex or (regex, dict), "
                      f"got {r!r}")
  return tuple(out)


def resolve(tree: Any, rules: Any, *, bits: int = 8,
            **defaults) -> list[tuple[str, Any, QuantRule | None]]:
  """``[(path, leaf, winning rule or None), ...]``; a rule that wins nothing is an error."""
  rs = as_rules(rules, bits=bits, **defaults)
  items = _tree.leaves_with_paths(tree, is_leaf=is_qarray)
  if rs is None:
    default = QuantRule(".*", bits=bits, **{k: v for k, v in defaults.items() if v is not None})
    return [(p, x, default if _tree.default_prunable(p, x) else None) for p, x in items]
  idx = _tree.first_match([r.pattern for r in rs], [p for p, _ in items], argname="rules")
  return [(p, x, None if i < 0 else rs[i]) for (p, x), i in zip(items, idx)]


def rule_for_path(rules: tuple[QuantRule, ...] | None, path: str, *, bits: int = 8):
  """The rule that wins ``path`` (an op's kernel path), or None; no 'unused' check."""
  if rules is None:
    return QuantRule(".*", bits=bits)
  i = _tree.first_match([r.pattern for r in rules], [path], require_all=False)[0]
  return None if i < 0 else rules[i]


def _describe(rule: QuantRule | None, leaf: Any) -> str:
  if rule is None:
    return "float (no rule)"
  if rule.skip:
    return "float (skip)"
  g = rule.granularity if isinstance(rule.granularity, str) else f"axes {rule.granularity}"
  if rule.group_size is not None:
    g += f" group {rule.group_size} (axis {rule.group_axis})"
  act = "weight-only" if rule.act_bits is None else f"a{rule.act_bits}"
  sym = "" if rule.symmetric else " asym"
  return f"int{rule.bits} per-{g} {act}{sym} ({rule.method})"


def explain(params: Any, rules: Any = None, *, bits: int = 8, print_fn=print,
            group_size: int | None = None) -> str:
  """Prints (and returns) one line per leaf: path, shape, winning rule, action."""
  rows = []
  for p, x, r in resolve(params, rules, bits=bits, group_size=group_size):
    pat = "-" if r is None else repr(r.pattern)
    rows.append((p, str(tuple(np.shape(x))), pat, _describe(r, x)))
  text = (_table.render(("path", "shape", "rule", "action"), rows)
          + "\n(what the rules ask for; 'aN' needs a contraction to consume the weight: "
          "quant.explain(..., apply_fn=, inputs=) or quant.coverage shows what runs)")
  if print_fn is not None:
    print_fn(text)
  return text


def quantize_leaf(path: str, x: Any, rule: QuantRule) -> QArray:
  """Quantizes one leaf by its rule (errors name ``path``)."""
  return fake.quantize(x, bits=rule.bits, axis=rule.axis_for(path, x),
                       symmetric=rule.symmetric, method=rule.method, name=path,
                       group_size=rule.group_size,
                       group_axis=rule.group_axis, scale_dtype=rule.stored_scale_dtype)


def quantize_params(params: Any, rules: Any = None, *, bits: int = 8,
                    group_size: int | None = None, scale_dtype: str | None = None) -> Any:
  """Returns ``params`` with every rule-selected leaf replaced by a :class:`QArray`.

  Round-to-nearest (RTN) with the rule's range estimator. ``group_size`` (and
  ``scale_dtype``) are defaults for rules that do not set them: e.g.
  ``quantize_params(params, bits=4, group_size=64)`` stores every kernel as packed
  int4 with one ``bfloat16`` scale per 64 inputs per output channel.

  Unselected and ``skip`` leaves are returned untouched (same tree structure otherwise).
  Integer/boolean leaves selected by a rule raise ``TypeError``; NaN/inf raise
  ``ValueError``; both name the leaf path.
  """
  chosen = {p: r for p, _, r in resolve(params, rules, bits=bits, group_size=group_size,
                                        scale_dtype=scale_dtype)}

  def one(path, x):
    r = chosen[path]
    if r is None or r.skip or is_qarray(x):
      return x
    return quantize_leaf(path, x, r)

  return _tree.map_with_path_str(one, params, is_leaf=is_qarray)


def dequantize_params(tree: Any, dtype: Any = None) -> Any:
  """Replaces every :class:`QArray` leaf by its float value."""
  return jax.tree.map(lambda x: dequantize(x, dtype) if is_qarray(x) else x, tree,
                      is_leaf=is_qarray)
