"""Reading what XLA compiled: a census of dots and convolutions by dtype.

Fake-quant must never be trusted to become a fast int8 kernel, and a bf16 policy must
be checked to reach the matmuls: both are read off the compiled HLO text. HLO prints an
instruction as ``%name = s32[8,16]{1,0} dot(%a, %b), ...`` with untyped operands, so
the census first maps every instruction name (unique in an HLO module) to its element
type, then resolves the operands of each ``dot`` / ``convolution`` (and the GEMM/conv
custom-calls that GPU and oneDNN backends rewrite them into).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax

_INSTR = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>\(?[a-z]+\d*[a-z0-9]*)\[[^\]]*\][^ ]*\s+"
    r"(?P<op>[\w\-]+)\((?P<args>[^)]*)\)(?P<rest>.*)$")
_GEMM_TARGETS = ("gemm", "matmul", "dot")
_CONV_TARGETS = ("conv",)


def _kind(op: str, rest: str) -> str | None:
  if op == "dot":
    return "dot"
  if op == "convolution":
    return "conv"
  if op == "custom-call":
    m = re.search(r'custom_call_target="([^"]+)"', rest)
    target = (m.group(1) if m else "").lower()
    if any(t in target for t in _CONV_TARGETS):
      return "conv"
    if any(t in target for t in _GEMM_TARGETS):
      return "dot"
  return None


@dataclasses.dataclass(frozen=True)
class DotCensus:
  """Counts of compiled dots/convs keyed by ``"lhs x rhs -> out"`` dtype signature.

  Attributes:
    dots: e.g. ``{"s8 x s8 -> s32": 3, "f32 x f32 -> f32": 1}``.
    convs: the same for convolutions.
  """

  dots: dict[str, int]
  convs: dict[str, int]

  def count(self, lhs: str | None = None, rhs: str | None = None, out: str | None = None,
            kind: str = "both") -> int:
    """Number of ops whose operand/result dtypes match the given ones (None = any)."""
    tables = {"dot": [self.dots], "conv": [self.convs], "both": [self.dots, self.convs]}[kind]
    n = 0
    for table in tables:
      for sig, c in table.items():
        a, rest = sig.split(" x ")
        b, o = rest.split(" -> ")
        if (lhs is None or a == lhs) and (rhs is None or b == rhs) and (out is None or o == out):
          n += c
    return n

  @property
  def int8(self) -> int:
    """Ops whose two operands are both s8."""
    return self.count("s8", "s8")

  @property
  def integer(self) -> int:
    """Ops with integer operands: s8 x s8, plus s8 inputs that XLA widened (e.g. to s32
    for a tiny conv on CPU); no float math."""
    return sum(self.count(lhs=t) for t in ("s8", "s16", "s32", "u8", "s4", "u4"))

  @property
  def total(self) -> int:
    return sum(self.dots.values()) + sum(self.convs.values())

  @property
  def float(self) -> int:
    """Ops whose operands are floating (f32, bf16, f16, f64)."""
    return sum(self.count(lhs=t) for t in ("f32", "bf16", "f16", "f64"))

  def __str__(self) -> str:
    rows = [f"{'op':<6} {'signature':<24} {'count':>5}"]
    for kind, table in (("dot", self.dots), ("conv", self.convs)):
      for sig, c in sorted(table.items()):
        rows.append(f"{kind:<6} {sig:<24} {c:>5}")
    return "\n".join(rows)


def census_from_hlo(text: str) -> DotCensus:
  """Builds a :class:`DotCensus` from optimized HLO text."""
  types: dict[str, str] = {}
  found: list[tuple[str, list[str], str]] = []
  for line in text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    types[m["name"]] = m["type"].lstrip("(")
    kind = _kind(m["op"], m["rest"])
    if kind:
      args = [a.strip().split()[-1].lstrip("%") for a in m["args"].split(",") if a.strip()]
      found.append((kind, args, m["type"].lstrip("(")))
  dots: collections.Counter = collections.Counter()
  convs: collections.Counter = collections.Counter()
  for kind, args, out in found:
    lhs = types.get(args[0], "?") if args else "?"
    rhs = types.get(args[1], "?") if len(args) > 1 else "?"
    (dots if kind == "dot" else convs)[f"{lhs} x {rhs} -> {out}"] += 1
  return DotCensus(dict(dots), dict(convs))


def compiled_text(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
  """Optimized HLO text of ``jax.jit(fn)`` for these arguments."""
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  return jitted.lower(*args, **kwargs).compile().as_text()


def dot_census(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> DotCensus:
  """Compiles ``fn`` for ``args`` and counts its dots/convs by dtype.

  Example::

    census = dot_census(serve, qparams, x)
    assert census.float == 0 and census.int8 > 0   # no silent fall-back to float
  """
  return census_from_hlo(compiled_text(fn, *args, **kwargs))
