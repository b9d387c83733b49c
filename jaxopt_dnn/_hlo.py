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


# --------------------------------------------------------------------------- dataflow
# What feeds each dot / conv of an HLO module: the census above counts instructions by
# dtype; :func:`trace_sources` says which program inputs (e.g. the int8 codes of one
# quantized weight) reach each of them, through layouts, dequantization, ``call``s,
# ``while`` bodies (``scan``) and ``conditional`` branches.
OTHER = -1   # a source id standing for "anything that is not a tracked input"
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*(?:\(.*\)\s*->\s*.*)?\{\s*$")
_CALLED = re.compile(r"\b(to_apply|calls|body|condition|true_computation|false_computation)"
                     r"=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_PASS = {"convert", "bitcast-convert", "bitcast", "reshape", "transpose", "copy", "broadcast",
         "slice", "reverse", "pad", "dynamic-slice", "opt-barrier", "copy-start", "copy-done"}
_EMPTY_OPS = {"constant", "iota", "rng", "rng-bit-generator", "partition-id", "replica-id",
              "after-all", "rng-get-and-update-state"}
_SHARDING_TARGETS = ("sharding", "spmdfulltoshardshape", "spmdshardtofullshape")


@dataclasses.dataclass(frozen=True)
class Instr:
  """One HLO instruction: ``name = type op(operands), rest``."""

  name: str
  type: str
  op: str
  operands: tuple[str, ...]
  rest: str

  @property
  def dtype(self) -> str:
    return self.type.split("[", 1)[0].lstrip("(")


def _balanced(s: str, i: int) -> int:
  """Index just past the bracket group opening at ``s[i]``."""
  depth = 0
  pairs = {"(": ")", "{": "}", "[": "]"}
  closing = set(pairs.values())
  for j in range(i, len(s)):
    c = s[j]
    if c in pairs:
      depth += 1
    elif c in closing:
      depth -= 1
      if depth == 0:
        return j + 1
  return len(s)


def _split_top(s: str) -> list[str]:
  out, depth, cur = [], 0, []
  for c in s:
    if c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
    if c == "," and depth == 0:
      out.append("".join(cur))
      cur = []
    else:
      cur.append(c)
  if cur:
    out.append("".join(cur))
  return [x.strip() for x in out if x.strip()]


def _parse_instr(line: str) -> Instr | None:
  s = line.strip()
  if s.startswith("ROOT "):
    s = s[5:]
  if " = " not in s:
    return None
  name, body = s.split(" = ", 1)
  name = name.strip().lstrip("%")
  if body.startswith("("):
    end = _balanced(body, 0)
    typ, body = body[:end], body[end:].lstrip()
  else:
    typ, _, body = body.partition(" ")
  m = re.match(r"([\w\-]+)\(", body)
  if not m:
    return None
  end = _balanced(body, m.end() - 1)
  args = body[m.end(): end - 1]
  operands = tuple(a.split()[-1].lstrip("%") for a in _split_top(args))
  return Instr(name, typ, m.group(1), operands, body[end:])


def parse_module(text: str) -> tuple[dict[str, list[Instr]], str]:
  """``({computation: [instructions]}, entry name)`` of an HLO module's text."""
  comps: dict[str, list[Instr]] = {}
  entry, cur = None, None
  for line in text.splitlines():
    if cur is None:
      m = _HEADER.match(line.strip())
      if m and not line.startswith(" "):
        cur = m["name"]
        comps[cur] = []
        if line.lstrip().startswith("ENTRY"):
          entry = cur
      continue
    if line.strip() == "}":
      cur = None
      continue
    ins = _parse_instr(line)
    if ins is not None:
      comps[cur].append(ins)
  if entry is None:
    raise ValueError("HLO text has no ENTRY computation")
  return comps, entry


@dataclasses.dataclass(frozen=True)
class Use:
  """A dot / conv / gather (or an op mixing a tracked value with anything else) that an
  input source reaches. ``sources[i]``: the source ids reaching operand ``i``."""

  computation: str
  name: str
  op: str
  signature: str
  sources: tuple[frozenset, ...]


def _flat(p) -> frozenset:
  if isinstance(p, tuple):
    return frozenset().union(*(_flat(x) for x in p)) if p else frozenset()
  return p


def _join(a, b):
  if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
    return tuple(_join(x, y) for x, y in zip(a, b))
  return _flat(a) | _flat(b)


def _owner(ids: frozenset):
  """The one tracked source group of ``ids`` (ids are ``(group, part)`` pairs), or None."""
  groups = {i[0] if isinstance(i, tuple) else i for i in ids}
  if len(groups) == 1 and OTHER not in groups:
    return next(iter(groups))
  return None


def trace_sources(text: str, sources: dict[int, Any]) -> list[Use]:
  """Which entry parameters reach each dot, conv and gather of an HLO module.

  Args:
    text: HLO module text (e.g. ``jax.jit(f, keep_unused=True).lower(...).as_text(
      dialect="hlo")``: entry parameter ``k`` is the ``k``-th flattened argument).
    sources: ``{entry parameter index: source id}``; a source id is a ``(group, part)``
      pair (e.g. ``(weight index, "value")``); untracked parameters count as ``OTHER``.

  Returns:
    One :class:`Use` per contraction / gather instruction reached by a tracked source,
    and per other instruction where a tracked group's value first meets an untracked one
    (e.g. a dequantized table added to activations). A value stays attributed to a group
    through layout ops and through element-wise ops whose other operands are constants or
    the same group (dequantization, int4 unpacking); mixing it with anything else makes it
    ``OTHER``. Each instruction of a ``while`` body (``scan``) appears once, as in the
    census, whatever the trip count.
  """
  comps, entry = parse_module(text)
  types = {i.name: i.type for c in comps.values() for i in c}
  uses: dict[tuple[str, str], Use] = {}
  empty = frozenset()
  other = frozenset([OTHER])

  def sig(ins):
    def dt(n):
      return types.get(n, "?").split("[", 1)[0].lstrip("(")
    return " x ".join(dt(o) for o in ins.operands[:2]) + f" -> {ins.dtype}"

  def record(comp, ins, provs):
    key = (comp, ins.name)
    flat = tuple(_flat(p) for p in provs)
    old = uses.get(key)
    if old is not None:
      flat = tuple(a | b for a, b in zip(old.sources, flat))
    uses[key] = Use(comp, ins.name, ins.op, sig(ins), flat)

  memo: dict = {}

  def run(comp, params):
    key = (comp, params)
    if key in memo:
      return memo[key]
    memo[key] = tuple(empty for _ in params)   # recursion guard
    env: dict[str, Any] = {}
    root = None
    for ins in comps.get(comp, ()):
      provs = [env.get(o, empty) for o in ins.operands]
      op = ins.op
      called = dict(_CALLED.findall(ins.rest))
      if op == "parameter":
        k = int(ins.operands[0]) if ins.operands else 0
        out = params[k] if k < len(params) else empty
      elif op in _EMPTY_OPS:
        out = empty
      elif op == "get-tuple-element":
        k = int(re.search(r"index=(\d+)", ins.rest).group(1))
        t = provs[0]
        out = t[k] if isinstance(t, tuple) and k < len(t) else _flat(t)
      elif op == "tuple":
        out = tuple(provs)
      elif op in ("call", "fusion", "async-start") and called.get("to_apply", called.get("calls")):
        out = run(called.get("to_apply", called.get("calls")), tuple(provs))
      elif op == "while":
        state = provs[0]
        for _ in range(16):
          new = _join(state, run(called["body"], (state,)))
          if new == state:
            break
          state = new
        run(called["condition"], (state,))
        out = state
      elif op == "conditional":
        m = _BRANCHES.search(ins.rest)
        names = [n.strip().lstrip("%") for n in m.group(1).split(",")] if m else \
            [called.get("true_computation"), called.get("false_computation")]
        out = None
        for j, b in enumerate(names):
          if b is None:
            continue
          r = run(b, (provs[j + 1],) if j + 1 < len(provs) else ())
          out = r if out is None else _join(out, r)
        out = empty if out is None else out
      elif op in ("dot", "convolution", "gather") or (
          op == "custom-call" and _kind(op, ins.rest)):
        if any(_owner(_flat(p)) is not None for p in provs):
          record(comp, ins, provs)
        out = other if any(_flat(p) for p in provs) else empty
      elif op in _PASS or (op == "custom-call" and any(
          t in ins.rest.lower() for t in _SHARDING_TARGETS)):
        rest = _flat(tuple(provs[1:])) if op in ("dynamic-slice", "pad") else empty
        out = provs[0] if provs and (not rest or rest <= _flat(provs[0])) else (
            other if any(_flat(p) for p in provs) else empty)
      else:
        u = _flat(tuple(provs))
        if not u:
          out = empty
        elif _owner(u) is not None:
          out = u
        else:
          if any(_owner(_flat(p)) is not None for p in provs):
            record(comp, ins, provs)
          out = other
      env[ins.name] = out
      root = out
    res = root if root is not None else empty
    # the ROOT is the last instruction of a computation in HLO text
    memo[key] = res
    return res

  entry_params = [i for i in comps[entry] if i.op == "parameter"]
  params = []
  for ins in sorted(entry_params, key=lambda i: int(i.operands[0])):
    k = int(ins.operands[0])
    params.append(frozenset([sources[k]]) if k in sources else other)
  run(entry, tuple(params))
  return list(uses.values())
