"""The ways a layer may be stored, and what each costs in bits.

A candidate is a bit width (int4 / int8 as a :class:`~jaxopt_dnn.quant.QArray`, or 16 =
bfloat16), a scale layout (``group_size`` along the contraction axis, ``None`` = one
scale per output channel; ``scale_dtype``) and optionally one-shot pruning (``2:4`` /
``50%``, :func:`jaxopt_dnn.sparsity.oneshot`) applied before the quantization::

  int4-g128          int4, 128 inputs per bf16 scale            4 + 16/128 = 4.125 bits/w
  int4-g32-fp8       int4, 32 inputs per fp8 scale              4 + 8/32   = 4.25
  int8               int8, one f32 scale per output channel     8 + 32/K
  16-bit             bfloat16                                   16
  int4-g64+2:4       int4 g64, 2 of every 4 inputs kept         (4 + 2)/2 + 16/64 = 3.25

The cost of a sparse candidate counts **nonzero bytes**: the kept values, their index
metadata (``ceil(log2 m)`` bits per kept value for N:M, the 2-bit indices of 2:4
sparse tensor cores; a 1-bit mask per weight for unstructured sparsity) and every
scale. Dense candidates cost every stored array (values, scales, zero points, super
scales).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_dnn import quant as quant_lib

_SCALE_SUFFIX = {"fp8": "float8_e4m3fn", "bf16": "bfloat16", "f32": "float32"}
PRUNE_METHOD = {"rtn": "magnitude", "gptq": "sparsegpt", "awq": "wanda"}
"""How each realisation method prunes a sparse candidate before quantizing it."""


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One way to store a layer (see the module docstring for names and costs).

  Attributes:
    name: the name plans and tables show.
    bits: 4 / 8 (QArray) or 16 (bfloat16).
    group_size: inputs per scale along the contraction axis (``None``: per channel).
    scale_dtype: the scales' storage (``None``: the quantizer's default, bfloat16 for
      int4 group-wise, float32 otherwise; ``"float8_e4m3fn"``: 8-bit scales under one
      float32 super scale per tensor).
    sparsity: ``None``, ``"N:M"`` (``n`` kept of every ``m`` consecutive inputs) or
      ``"P%"`` (that fraction of each output column's inputs removed).
  """
  name: str
  bits: int
  group_size: int | None = None
  scale_dtype: str | None = None
  sparsity: str | None = None

  def __post_init__(self):
    if self.bits not in (4, 8, 16):
      raise ValueError(f"candidate {self.name!r}: bits must be 4, 8 or 16, got {self.bits!r}")
    if self.group_size is not None and (not isinstance(self.group_size, int)
                                        or self.group_size < 1):
      raise ValueError(f"candidate {self.name!r}: group_size must be a positive int or None, "
                       f"got {self.group_size!r}")
    if self.sparsity is not None:
      self.prune_kwargs  # noqa: B018 (validates)

  @classmethod
  def parse(cls, spec: str | Candidate) -> Candidate:
    """``"int4-g128"``, ``"int4-g64"``, ``"int8"`` (per channel), ``"int4"``, ``"16-bit"``;
    a ``-fp8`` / ``-bf16`` / ``-f32`` suffix sets the scales' storage (``"int4-g32-fp8"``);
    ``+2:4`` / ``+50%`` adds one-shot pruning (``"int4-g64+2:4"``, ``"16-bit+50%"``)."""
    if isinstance(spec, Candidate):
      return spec
    text = str(spec).strip().lower()
    base, _, sp = text.partition("+")
    sp = sp or None
    m = re.fullmatch(r"int([48])(?:-g(\d+))?(?:-(fp8|bf16|f32))?", base)
    if m:
      return cls(str(spec), int(m.group(1)), int(m.group(2)) if m.group(2) else None,
                 _SCALE_SUFFIX[m.group(3)] if m.group(3) else None, sp)
    if base in ("16-bit", "bf16", "16bit", "bfloat16"):
      return cls(str(spec), 16, sparsity=sp)
    raise ValueError(f"unknown candidate {spec!r}; use int4-g128, int4-g64, int4-g32-fp8, "
                     "int8, int4, 16-bit, optionally with +2:4 or +50%")

  @property
  def quant_kwargs(self) -> dict[str, Any]:
    """``bits`` / ``group_size`` / ``scale_dtype`` for ``quant.gptq`` / ``awq`` /
    ``quantize_params`` and rules (``group_size=None`` given explicitly: per channel)."""
    kw = {"bits": self.bits, "group_size": self.group_size}
    if self.scale_dtype is not None:
      kw["scale_dtype"] = self.scale_dtype
    return kw

  @property
  def prune_kwargs(self) -> dict[str, Any] | None:
    """``{"n": 2, "m": 4}`` / ``{"sparsity": 0.5}`` for ``sparsity.oneshot`` (``None``:
    dense)."""
    if self.sparsity is None:
      return None
    nm = re.fullmatch(r"(\d+):(\d+)", self.sparsity)
    if nm and 0 < int(nm.group(1)) < int(nm.group(2)):
      return {"n": int(nm.group(1)), "m": int(nm.group(2))}
    pct = re.fullmatch(r"(\d+(?:\.\d+)?)%", self.sparsity)
    if pct and 0 < float(pct.group(1)) < 100:
      return {"sparsity": float(pct.group(1)) / 100}
    raise ValueError(f"candidate {self.name!r}: sparsity must be 'N:M' with 0 < N < M or "
                     f"'P%' with 0 < P < 100, got {self.sparsity!r}")

  def cost_bits(self, leaf: Any) -> int:
    """Bits ``leaf`` (this candidate's realisation of a layer) costs: every stored array,
    or for a sparse candidate its nonzero values + index metadata + scales."""
    dense = stored_bits(leaf)
    kw = self.prune_kwargs
    if kw is None:
      return dense
    n = int(np.prod(np.shape(leaf)))
    values = _array_bits(leaf.value) if quant_lib.is_qarray(leaf) else dense
    rest = dense - values                       # scales, super scales
    if "n" in kw:
      kept = math.ceil(n * kw["n"] / kw["m"])
      meta = kept * math.ceil(math.log2(kw["m"]))
    else:
      kept = n - round(kw["sparsity"] * n)
      meta = n
    return self.bits * kept + meta + rest


def _array_bits(a: Any) -> int:
  return int(np.prod(np.shape(a))) * jnp.dtype(a.dtype).itemsize * 8


def stored_bits(leaf: Any) -> int:
  """Bits a stored leaf costs: every array of a QArray (values, scales, zero points,
  super scale), or the plain array."""
  if quant_lib.is_qarray(leaf):
    return sum(_array_bits(a) for a in jax.tree.leaves(leaf))
  return _array_bits(leaf)


DEFAULT_CANDIDATES = ("int4-g128", "int4-g64", "int4-g32-fp8", "int4-g16-fp8", "int8", "16-bit")
"""int4 group 128 / 64 (bf16 scales: 4.125 / 4.25 bits per weight), int4 group 32 / 16
with fp8 scales (4.25 / 4.5), int8 per channel (~8.05) and bfloat16."""
