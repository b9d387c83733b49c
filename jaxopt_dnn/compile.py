"""Static-graph tooling: what XLA compiled, serialized StableHLO, the persistent cache.

Every step in this library is traced once and compiled by XLA ahead of time::

  lowered  = jax.jit(fn).lower(*args)    # StableHLO: the program as written
  compiled = lowered.compile()           # XLA-optimized executable

:func:`analyze` reads both: XLA's cost model (FLOPs, bytes accessed), the executable's
memory (arguments, outputs, temporaries), the lower/compile wall times, and the dtype
census of dots and convolutions (:mod:`jaxopt_dnn._hlo`) of the optimized HLO *and* of
the pre-optimization HLO. The second matters on CPU, where XLA rewrites bf16 dots into
f32 ones: a bf16 policy is visible in ``lowered_census`` (the dtypes the program asked
for) while ``census`` shows what the backend chose to run.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxopt_dnn import _table
from jaxopt_dnn._hlo import DotCensus, census_from_hlo, dot_census  # noqa: F401  (re-export)

__all__ = ["CompileReport", "analyze", "dot_census", "export", "load_exported",
           "Served", "enable_compilation_cache", "lowered_hlo_text"]


def _jitted(fn: Callable[..., Any]) -> Any:
  return fn if hasattr(fn, "lower") else jax.jit(fn)


def lowered_hlo_text(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
  """Pre-optimization HLO text of ``jax.jit(fn)`` (the dtypes the program asked for)."""
  return _jitted(fn).lower(*args, **kwargs).as_text(dialect="hlo")


def _fmt_bytes(n: float | None) -> str:
  if n is None:
    return "n/a"
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
    n /= 1024
  return f"{n}"


def _fmt_num(n: float | None) -> str:
  if n is None:
    return "n/a"
  for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= div:
      return f"{n / div:.3f} {unit}"
  return f"{n:.0f}"


@dataclasses.dataclass(frozen=True)
class CompileReport:
  """What XLA compiled for one function and one set of argument shapes.

  Attributes:
    name: the function's name.
    flops: XLA cost-model floating-point operations per call (None if unavailable).
    bytes_accessed: cost-model bytes read + written per call.
    argument_bytes, output_bytes, temp_bytes, alias_bytes, generated_code_bytes: from
      ``compiled.memory_analysis()`` (per device; None if the backend gives none).
    lower_seconds: trace + lower to StableHLO wall time.
    compile_seconds: XLA compile wall time.
    census: dots/convs by dtype in the optimized HLO (what runs).
    lowered_census: dots/convs by dtype in the pre-optimization HLO (what was asked).
    hlo: optimized HLO text.
    lowered_hlo: pre-optimization HLO text.
  """

  name: str
  flops: float | None
  bytes_accessed: float | None
  argument_bytes: int | None
  output_bytes: int | None
  temp_bytes: int | None
  alias_bytes: int | None
  generated_code_bytes: int | None
  lower_seconds: float
  compile_seconds: float
  census: DotCensus
  lowered_census: DotCensus
  hlo: str = dataclasses.field(repr=False)
  lowered_hlo: str = dataclasses.field(repr=False)

  def off_dtype(self, compute_dtype: Any) -> dict[str, int]:
    """Floating dots/convs of the lowered program whose operands are not
    ``compute_dtype`` (e.g. the f32 dots left under a bf16 policy): ``{"dot f32 x f32 ->
    f32": 2}``; empty when every floating contraction computes in ``compute_dtype``."""
    want = {"float32": "f32", "bfloat16": "bf16", "float16": "f16",
            "float64": "f64"}[np.dtype(compute_dtype).name]
    floats = {"f32", "bf16", "f16", "f64"}
    out = {}
    for kind, table in (("dot", self.lowered_census.dots), ("conv", self.lowered_census.convs)):
      for sig, c in table.items():
        a, rest = sig.split(" x ")
        b = rest.split(" -> ")[0]
        if (a in floats or b in floats) and (a != want or b != want):
          out[f"{kind} {sig}"] = c
    return out

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready summary (without the HLO texts)."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
         if f.name not in ("hlo", "lowered_hlo", "census", "lowered_census")}
    d["census"] = {"dots": self.census.dots, "convs": self.census.convs}
    d["lowered_census"] = {"dots": self.lowered_census.dots,
                           "convs": self.lowered_census.convs}
    return d

  def __str__(self) -> str:
    rows = [("function", self.name),
            ("FLOPs", _fmt_num(self.flops)),
            ("bytes accessed", _fmt_bytes(self.bytes_accessed)),
            ("argument memory", _fmt_bytes(self.argument_bytes)),
            ("output memory", _fmt_bytes(self.output_bytes)),
            ("temp memory", _fmt_bytes(self.temp_bytes)),
            ("aliased (donated)", _fmt_bytes(self.alias_bytes)),
            ("lower seconds", f"{self.lower_seconds:.3f}"),
            ("compile seconds", f"{self.compile_seconds:.3f}")]
    for label, census in (("compiled", self.census), ("lowered", self.lowered_census)):
      for kind, table in (("dot", census.dots), ("conv", census.convs)):
        for sig, c in sorted(table.items()):
          rows.append((f"{label} {kind} {sig}", str(c)))
    return _table.render(("compiled program", "value"), rows, right=(1,))


def _cost(compiled: Any) -> dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jaxlibs: one dict per partition
    cost = cost[0] if cost else {}
  return dict(cost or {})


def analyze(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> CompileReport:
  """Lowers and compiles ``fn`` (a function or a ``jax.jit`` object) for ``args``.

  Arguments may be arrays or ``jax.ShapeDtypeStruct`` (with shardings): nothing runs.
  """
  jitted = _jitted(fn)
  t0 = time.perf_counter()
  lowered = jitted.lower(*args, **kwargs)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  cost = _cost(compiled)
  mem = compiled.memory_analysis()
  hlo = compiled.as_text()
  lowered_hlo = lowered.as_text(dialect="hlo")

  def m(attr):
    return None if mem is None else int(getattr(mem, attr))

  return CompileReport(
      name=getattr(fn, "__name__", type(fn).__name__),
      flops=cost.get("flops"), bytes_accessed=cost.get("bytes accessed"),
      argument_bytes=m("argument_size_in_bytes"), output_bytes=m("output_size_in_bytes"),
      temp_bytes=m("temp_size_in_bytes"), alias_bytes=m("alias_size_in_bytes"),
      generated_code_bytes=m("generated_code_size_in_bytes"),
      lower_seconds=t1 - t0, compile_seconds=t2 - t1,
      census=census_from_hlo(hlo), lowered_census=census_from_hlo(lowered_hlo),
      hlo=hlo, lowered_hlo=lowered_hlo)


# ---------------------------------------------------------------------------- export


_FLAT = "jaxopt_dnn_flat_args__"
_PLAIN_NODES = (tuple, list, dict, type(None))


def _plain_tree(tree: Any) -> bool:
  """Whether every container node of ``tree`` is one ``jax.export`` serializes as is."""
  def ok(td) -> bool:
    if jax.tree_util.treedef_is_leaf(td):
      return True
    data = td.node_data()
    if data is None or data[0] not in _PLAIN_NODES:
      return False
    return all(ok(c) for c in td.children())
  return ok(jax.tree.structure(tree))


class Served:
  """A deserialized ``jax.export.Exported``, callable like the original function.

  A function exported with its arguments flattened (weights as ``QArray``,
  ``LogicallyPartitioned`` or NNX variable trees) is called with the same trees, or with
  their array leaves: the arguments are flattened in ``jax.tree.leaves`` order.
  """

  def __init__(self, exported: jax.export.Exported):
    self.exported = exported
    self._call = jax.jit(exported.call)
    self.flat_args = exported.fun_name.startswith(_FLAT)

  @property
  def in_avals(self):
    return self.exported.in_avals

  @property
  def out_avals(self):
    return self.exported.out_avals

  @property
  def platforms(self) -> tuple[str, ...]:
    return tuple(self.exported.platforms)

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    if self.flat_args:
      leaves = jax.tree.leaves((args, kwargs))
      if len(leaves) != len(self.exported.in_avals):
        raise ValueError(f"{self!r}: expected {len(self.exported.in_avals)} array leaves "
                         f"in the arguments, got {len(leaves)}")
      return self._call(*leaves)
    return self._call(*args, **kwargs)

  def __repr__(self) -> str:
    return f"Served({self.exported.fun_name}, platforms={self.platforms})"


def export(fn: Callable[..., Any], *args: Any, path: str | os.PathLike,
           platforms: Sequence[str] | None = None,
           flatten_args: bool | None = None) -> jax.export.Exported:
  """Serializes ``jax.jit(fn)`` for these argument shapes as StableHLO to ``path``.

  ``args`` are example arrays or ``jax.ShapeDtypeStruct`` (pytrees of dicts, lists and
  tuples are fine); ``platforms`` (e.g. ``("cpu", "cuda", "tpu")``) defaults to the
  current backend. The file is self-contained: :func:`load_exported` needs neither
  ``fn`` nor the model code.

  Weights passed as arguments may be any pytree: ``QArray`` leaves, boxed
  (``nn.LogicallyPartitioned``) params, NNX ``State`` / ``Variable`` trees. Their
  containers cannot be serialized by ``jax.export`` without a registration per class
  (and the reloading process would need the classes), so with ``flatten_args`` (default:
  exactly when ``args`` hold such a container) the function is exported over the array
  leaves of ``args`` in ``jax.tree.leaves`` order and rebuilt inside; the
  :class:`Served` from :func:`load_exported` flattens its arguments the same way.
  """
  if flatten_args is None:
    flatten_args = not _plain_tree(args)
  target = _jitted(fn)
  call_args = args
  if flatten_args:
    treedef = jax.tree.structure(args)
    call_args = tuple(jax.tree.leaves(args))

    def flat(*leaves):
      return fn(*jax.tree.unflatten(treedef, list(leaves)))

    flat.__name__ = _FLAT + getattr(fn, "__name__", "fn")
    target = jax.jit(flat)
  exp = jax.export.export(target, platforms=platforms)(*call_args)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(exp.serialize())
  return exp


def load_exported(path: str | os.PathLike) -> Served:
  """Reads a file written by :func:`export`; the result is callable."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no exported function at {path}")
  data = path.read_bytes()
  try:
    exported = jax.export.deserialize(bytearray(data))
  except Exception as e:  # noqa: BLE001 - flatbuffers/MLIR raise anything on garbage
    raise ValueError(f"{path} is not a serialized jax.export function written by "
                     f"compile.export ({len(data)} bytes; {type(e).__name__}: "
                     f"{' '.join(str(e).split())[:160]})") from None
  return Served(exported)


# ----------------------------------------------------------------------------- cache


def enable_compilation_cache(directory: str | os.PathLike) -> pathlib.Path:
  """Turns on JAX's persistent compilation cache in ``directory``.

  Both thresholds are lowered so that every program is cached, small ones included
  (``jax_persistent_cache_min_compile_time_secs=0``,
  ``jax_persistent_cache_min_entry_size_bytes=-1``). Call it before the first compile of
  the process: the cache is set up by the first compilation.
  """
  d = pathlib.Path(directory).expanduser().resolve()
  d.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(d))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  return d


