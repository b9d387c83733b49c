"""LoRA / QLoRA: low-rank adapters on a frozen (float, bf16, int8, int4 or NF4) base.

:func:`lora` replaces every selected kernel ``W`` of a parameter tree by a
:class:`LoraArray` leaf ``(base, a, b)``. With ``K`` the kernel's contracted axes (what
the dot/conv that consumes it sums over, traced by :func:`jaxopt_dnn.roles.trace`) and
``N`` its other axes, ``a`` is ``(prod K, r)`` and ``b`` is ``(r, prod N)``; the
effective kernel is (Hu et al., 2021, eq. 3)

    W_eff = dequantize(base) + (alpha / r) * (a @ b).reshape(K..., N...)   (axes put back)

so a Flax ``Dense`` ``(in, out)`` kernel gets ``a: (in, r)``, ``b: (r, out)``; a
``DenseGeneral`` query kernel ``(embed, heads, head_dim)`` gets ``a: (embed, r)``,
``b: (r, heads * head_dim)``; its output kernel ``(heads, head_dim, embed)``: ``a:
(heads * head_dim, r)``; a HWIO conv kernel: ``a: (H * W * I, r)``, ``b: (r, O)``. A
delta of rank ``r`` in the contraction's own input/output split is what "low rank"
means for the op; without a traced program the kernel's last axis is taken as ``N``
(the Flax convention).

``a`` starts uniform in ``+-1/sqrt(prod K)`` (Kaiming-uniform with ``a = sqrt(5)``, as
in the reference implementation), ``b`` at zero: the initial forward equals the base.
``init="loftq"`` (LoftQ, Li et al., 2023) starts them instead at the best rank-``r``
correction of the quantization error: ``(alpha / r) a @ b = SVD_r(W - dequantize(base))``
(:func:`loftq_factors`; ``loftq_iters`` > 1 alternates re-quantizing ``W - delta``).
The base is frozen and stored as given (``base=None``), as ``bfloat16``, or quantized:
``int8`` (per output channel), ``int4`` (``group_size`` groups along the last
contracted axis, ``bfloat16`` scales: 4.25 bits per weight at ``g = 64``) as a
:class:`~jaxopt_dnn.quant.QArray`, or ``nf4`` (:class:`~jaxopt_dnn.quant.nf4.NF4Array`,
QLoRA's NormalFloat, blocks along the same axis). A leaf that already is a ``QArray`` or
``NF4Array`` (a GPTQ result, say) is kept as the base as it is.

A model never sees a ``LoraArray``: :func:`materialize` maps the tree to ordinary
params (every adapter leaf to ``W_eff``, every bare ``QArray`` / ``NF4Array`` to its
float value) and is called inside the jitted forward, so the base stays quantized in
memory and in checkpoints and is dequantized by XLA where it is used. Training touches
only the adapters: :func:`adapters` is the ``{path: {"a", "b"}}`` tree the optimizer
sees, :func:`with_adapters` puts it back; ``Trainer(lora=LoraConfig(...))`` does both
inside its step. :func:`merge` folds the adapters into the kernels (optionally
re-quantized in the base's format) for serving.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_dnn import _tree
from jaxopt_dnn import roles as roles_lib
from jaxopt_dnn.quant import fake as fake_lib
from jaxopt_dnn.quant import nf4 as nf4_lib
from jaxopt_dnn.quant.qarray import QArray
from jaxopt_dnn.quant.qarray import dequantize as q_dequantize

PyTree = Any
BASES = (None, "float", "bf16", "int8", "int4", "nf4")
INITS = ("zero", "loftq")


@dataclasses.dataclass(frozen=True)
class _Meta:
  scale: float
  contracting: tuple[int, ...]
  shape: tuple[int, ...]
  dtype: str
  name: str = dataclasses.field(default="", compare=False)


@jax.tree_util.register_pytree_with_keys_class
class LoraArray:
  """A frozen base kernel plus a trainable low-rank delta; see the module docstring.

  Attributes:
    base: the frozen kernel: a float array, a ``QArray`` or an ``NF4Array``.
    a: ``(prod K, r)`` float adapter (``K`` = the contracted axes).
    b: ``(r, prod N)`` float adapter, zero at initialisation.
    scale: ``alpha / r`` (static).
    contracting: the kernel's contracted axes ``K`` (static).
    shape, dtype: the kernel's shape and float dtype.
  """

  __slots__ = ("base", "a", "b", "_meta")

  def __init__(self, base, a, b, *, scale: float, contracting: Sequence[int], shape=None,
               dtype=None, name: str = ""):
    self.base, self.a, self.b = base, a, b
    shape = tuple(np.shape(base) if shape is None else shape)
    dtype = str(np.dtype(base.dtype if dtype is None else dtype))
    self._meta = _Meta(float(scale), tuple(int(c) for c in contracting), shape, dtype, name)

  scale = property(lambda self: self._meta.scale)
  contracting = property(lambda self: self._meta.contracting)
  shape = property(lambda self: self._meta.shape)
  dtype = property(lambda self: np.dtype(self._meta.dtype))
  ndim = property(lambda self: len(self._meta.shape))
  name = property(lambda self: self._meta.name)
  rank = property(lambda self: int(np.shape(self.a)[-1]))

  def tree_flatten_with_keys(self):
    k = jax.tree_util.DictKey
    return ((k("base"), self.base), (k("a"), self.a), (k("b"), self.b)), self._meta

  @classmethod
  def tree_unflatten(cls, meta: _Meta, children):
    obj = object.__new__(cls)
    obj.base, obj.a, obj.b = children
    obj._meta = meta
    return obj

  def __repr__(self):
    where = f"{self.name}: " if self.name else ""
    return (f"LoraArray({where}{list(self.shape)}, rank={self.rank}, scale={self.scale:g}, "
            f"contracting={self.contracting}, base={_base_kind(self.base)})")

  def _float_misuse(self, *_, **__):
    raise TypeError(f"{self!r} was used where a float array is expected; call "
                    "jaxopt_dnn.lora.materialize(params) inside the forward first")

  __jax_array__ = __array__ = _float_misuse
  __add__ = __radd__ = __mul__ = __rmul__ = __matmul__ = __rmatmul__ = _float_misuse


def is_lora(x: Any) -> bool:
  return isinstance(x, LoraArray)


def _is_stored(x: Any) -> bool:
  return isinstance(x, (LoraArray, QArray, nf4_lib.NF4Array))


def _base_kind(base: Any) -> str:
  if isinstance(base, QArray):
    g = "" if base.group_size is None else f"-g{base.group_size}"
    return f"int{base.bits}{g}"
  if isinstance(base, nf4_lib.NF4Array):
    return f"nf4-g{base.block_size}"
  dtype = getattr(base, "dtype", None)   # absent when a tree.map put other leaves here
  return str(np.dtype(dtype)) if dtype is not None else type(base).__name__


def _perm(shape: Sequence[int], contracting: Sequence[int]) -> tuple[list[int], list[int]]:
  k = sorted(contracting)
  return k, [d for d in range(len(shape)) if d not in k]


def _dequant(base: Any) -> jax.Array:
  if isinstance(base, QArray):
    return q_dequantize(base, jnp.float32)
  if isinstance(base, nf4_lib.NF4Array):
    return nf4_lib.dequantize(base, jnp.float32)
  return jnp.asarray(base).astype(jnp.float32)


def delta(x: LoraArray) -> jax.Array:
  """``(alpha / r) * (a @ b)`` reshaped to the kernel's shape (float32)."""
  k, n = _perm(x.shape, x.contracting)
  d = x.scale * (jnp.asarray(x.a, jnp.float32) @ jnp.asarray(x.b, jnp.float32))
  d = d.reshape([x.shape[i] for i in k] + [x.shape[i] for i in n])
  return jnp.transpose(d, np.argsort(k + n))


def effective(x: LoraArray, dtype: Any = None) -> jax.Array:
  """``dequantize(base) + delta(x)`` in float32, cast to ``dtype`` (default: original)."""
  return (_dequant(x.base) + delta(x)).astype(dtype or x.dtype)


def materialize(params: PyTree, dtype: Any = None) -> PyTree:
  """Ordinary params: every :class:`LoraArray` -> :func:`effective`, every ``QArray`` /
  ``NF4Array`` -> its float value; other leaves unchanged. Call it inside the jitted
  forward (``model.apply({"params": lora.materialize(p)}, x)``)."""
  def one(x):
    if isinstance(x, LoraArray):
      return effective(x, dtype)
    if isinstance(x, QArray):
      return q_dequantize(x, dtype)
    if isinstance(x, nf4_lib.NF4Array):
      return nf4_lib.dequantize(x, dtype)
    return x
  return jax.tree.map(one, params, is_leaf=_is_stored)


def _requantize(path: str, w: jax.Array, base: Any) -> Any:
  if isinstance(base, QArray):
    sdt = None if jnp.dtype(base.scale.dtype) == jnp.float32 and base.super_scale is None \
        else jnp.dtype(base.scale.dtype)
    return fake_lib.quantize(w, bits=base.bits, axis=base.channel_axes or None,
                             symmetric=base.zero_point is None, name=path,
                             group_size=base.group_size,
                             group_axis=-2 if base.group_axis is None else base.group_axis,
                             scale_dtype=sdt)
  if isinstance(base, nf4_lib.NF4Array):
    return nf4_lib.quantize(w, block_size=base.block_size, block_axis=base.block_axis,
                            absmax_dtype=jnp.asarray(base.absmax).dtype, name=path)
  return w.astype(jnp.asarray(base).dtype)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _merge_leaf(x: LoraArray, path: str, requantize: bool):
  w = effective(x)
  return _requantize(path, w, x.base) if requantize else w


def merge(params: PyTree, *, requantize: bool = False) -> PyTree:
  """Folds every adapter into its kernel: ``W = dequantize(base) + (alpha/r) a @ b``.

  ``requantize=False``: float kernels (the original dtype), the same values as
  :func:`materialize` (other ``QArray`` leaves stay quantized). ``requantize=True``:
  each merged kernel is stored again in its base's format (same bits, channel axes,
  groups and scale dtype; NF4 blocks; ``bfloat16``), e.g. for int4 serving after QLoRA.
  """
  def one(path, x):
    if not isinstance(x, LoraArray):
      return x
    return _merge_leaf(x, path, requantize)
  return _tree.map_with_path_str(one, params, is_leaf=_is_stored)


def adapters(params: PyTree) -> dict[str, dict[str, Any]]:
  """The trainable part: ``{path: {"a": a, "b": b}}`` of every :class:`LoraArray`.

  Works on any tree with the params' structure (abstract values, shardings)."""
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lora)[0]
  return {_tree.path_str(p): {"a": x.a, "b": x.b} for p, x in flat if isinstance(x, LoraArray)}


def with_adapters(params: PyTree, ad: Mapping[str, Mapping[str, Any]]) -> PyTree:
  """``params`` with each :class:`LoraArray`'s ``a`` / ``b`` taken from ``ad``
  (the output of :func:`adapters`, e.g. after an optimizer update); bases untouched."""
  def one(path, x):
    if not isinstance(x, LoraArray):
      return x
    if path not in ad:
      raise ValueError(f"with_adapters: no adapter for {path!r}; have {sorted(ad)}")
    n = ad[path]
    return LoraArray.tree_unflatten(x._meta, (x.base, n["a"], n["b"]))
  return _tree.map_with_path_str(one, params, is_leaf=is_lora)


def nbytes(tree: PyTree) -> int:
  """Bytes of the array leaves of ``tree`` (abstract values count too)."""
  return int(sum(np.prod(np.shape(x)) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


def count(params: PyTree) -> dict[str, int]:
  """``{"adapters": trainable values, "adapter_bytes": ..., "base_bytes": every other
  leaf's bytes, "kernels": number of adapted kernels}``."""
  ad = adapters(params)
  n = int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(ad)))
  ab = nbytes(ad)
  return {"adapters": n, "adapter_bytes": ab, "base_bytes": nbytes(params) - ab,
          "kernels": len(ad)}


# ------------------------------------------------------------------------ creation


def _check_rank(rank: Any) -> int:
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
    raise ValueError(f"lora: rank must be a positive int, got {rank!r}")
  return int(rank)


def _contracting_of(path: str, x: Any, roles: Mapping | None) -> tuple[int, ...]:
  if roles is not None:
    r = roles_lib.lookup(roles, path)
    if r is not None and r.contracting is not None:
      return tuple(r.contracting)
  return tuple(range(np.ndim(x) - 1))


def _make_base(path: str, x: Any, base: str | None, contracting: tuple[int, ...],
               group_size: int) -> Any:
  if isinstance(x, (QArray, nf4_lib.NF4Array)) or base in (None, "float"):
    return x
  if base == "bf16":
    return jnp.asarray(x).astype(jnp.bfloat16)
  out_axes = tuple(d for d in range(np.ndim(x)) if d not in contracting)
  gax = max(contracting)
  if base == "int8":
    return fake_lib.quantize(x, bits=8, axis=out_axes or None, name=path)
  if base == "int4":
    return fake_lib.quantize(x, bits=4, axis=out_axes or None, name=path,
                             group_size=min(group_size, np.shape(x)[gax]), group_axis=gax,
                             scale_dtype=jnp.bfloat16)
  return nf4_lib.quantize(x, block_size=min(group_size, np.shape(x)[gax]), block_axis=gax,
                          name=path)


def _as_matrix(w: jax.Array, k: Sequence[int]) -> jax.Array:
  """``w`` with its contracted axes ``k`` first, reshaped to ``(prod K, prod N)``."""
  kk, n = _perm(w.shape, k)
  kdim = int(np.prod([w.shape[d] for d in kk]))
  return jnp.transpose(w, kk + n).reshape(kdim, -1)


def loftq_factors(residual: jax.Array, rank: int, scale: float) -> tuple[jax.Array, jax.Array]:
  """The best rank-``r`` correction of ``residual`` ``(prod K, prod N)`` as adapters.

  With the SVD ``residual = U S V^T`` (singular values descending),

      a = U_r sqrt(S_r / scale),   b = sqrt(S_r / scale) V_r^T,
      scale * a @ b = U_r S_r V_r^T   (Eckart-Young: the closest rank-r matrix, Frobenius)

  (LoftQ, Li et al., 2023, eq. 6, with the singular values split evenly between the two
  factors). Returns float32 ``a: (prod K, r)``, ``b: (r, prod N)``; when ``r`` exceeds
  ``min(prod K, prod N)`` the extra columns of ``a`` / rows of ``b`` are zero.
  """
  u, s, vt = jnp.linalg.svd(residual.astype(jnp.float32), full_matrices=False)
  m = min(rank, s.shape[0])
  root = jnp.sqrt(s[:m] / scale)
  a = u[:, :m] * root
  b = root[:, None] * vt[:m]
  if m < rank:
    a = jnp.pad(a, ((0, 0), (0, rank - m)))
    b = jnp.pad(b, ((0, rank - m), (0, 0)))
  return a, b


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7, 8, 9))
def _make_leaf(x, key, path, base, k, group_size, rank, scale, init="zero",
               loftq_iters=1) -> LoraArray:
  """One adapted kernel (one compiled program per leaf signature, not ~30 eager ops).

  ``init="loftq"``: ``loftq_iters`` alternations of ``Q = quantize(W - scale a b)``,
  ``(a, b) = loftq_factors(W - dequantize(Q))`` starting from ``a b = 0`` (one
  iteration: the base is the plain round-to-nearest quantization of ``W``)."""
  shape, dtype = tuple(x.shape), x.dtype
  kdim = int(np.prod([shape[d] for d in k]))
  adt = dtype if jnp.dtype(dtype) != jnp.bfloat16 else jnp.float32
  if init == "loftq":
    w = jnp.asarray(x, jnp.float32)
    corr = jnp.zeros_like(w)
    for _ in range(loftq_iters):
      q = _make_base(path, (w - corr).astype(dtype), base, k, group_size)
      a, b = loftq_factors(_as_matrix(w - _dequant(q), k), rank, scale)
      corr = delta(LoraArray(q, a, b, scale=scale, contracting=k, shape=shape, dtype=dtype))
    return LoraArray(q, a.astype(adt), b.astype(adt), scale=scale, contracting=k,
                     shape=shape, dtype=dtype, name=path)
  init_fn = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
  a = init_fn(key, (kdim, rank), adt)
  b = jnp.zeros((rank, int(np.prod(shape)) // kdim), adt)
  return LoraArray(_make_base(path, x, base, k, group_size), a, b, scale=scale,
                   contracting=k, shape=shape, dtype=dtype, name=path)


def lora(params: PyTree, rules: Any = None, rank: int = 8, alpha: float | None = None, *,
         key: Any = 0, base: str | None = None, group_size: int = 64,
         roles: Mapping | None = None, init: str = "zero", loftq_iters: int = 1) -> PyTree:
  """Adds rank-``rank`` adapters to the kernels chosen by ``rules``.

  Args:
    params: a parameter tree (linen ``params``, an NNX pure dict, any pytree); leaves may
      already be ``QArray`` / ``NF4Array`` (kept as the frozen base).
    rules: ``None`` (the traced kernels of ``roles`` when given, else
      :func:`jaxopt_dnn._tree.default_prunable`), a regex or a list of regexes over leaf
      paths (every one must match a leaf), or a predicate ``(path, leaf) -> bool``
      (e.g. ``roles.kernels(r)``).
    rank: ``r``, the adapters' inner dimension.
    alpha: the delta is scaled by ``alpha / r`` (default ``alpha = r``: scale 1).
    key: PRNG key or int seed for ``a`` (leaf ``i`` uses ``fold_in(key, i)``).
    base: how the frozen kernel is stored: ``None`` (as given), ``"bf16"``, ``"int8"``,
      ``"int4"`` or ``"nf4"``.
    group_size: int4 groups / NF4 blocks along the last contracted axis (cut to the
      axis length).
    roles: ``roles.trace(apply_fn, variables, *x)``: the kernels' contracted axes (and
      the default choice); without it the last axis of a kernel is its output.
    init: ``"zero"`` (``a`` Kaiming-uniform, ``b = 0``: the initial forward is the base's)
      or ``"loftq"`` (LoftQ: the adapters start at the best rank-``r`` correction of the
      quantization error, ``scale * a @ b = SVD_r(W - dequantize(base))``, see
      :func:`loftq_factors`; needs float kernels and a lossy ``base``: ``"bf16"``,
      ``"int8"``, ``"int4"`` or ``"nf4"``).
    loftq_iters: LoftQ's alternations ``Q = quantize(W - scale a b)``, ``(a, b) =
      SVD_r(W - dequantize(Q))``; ``1`` (default) keeps the base the round-to-nearest
      quantization of ``W``, more lower ``||W - dequantize(Q) - scale a b||``.

  Returns:
    ``params`` with every chosen leaf replaced by a :class:`LoraArray`; the other leaves
    unchanged.
  """
  rank = _check_rank(rank)
  if base not in BASES:
    raise ValueError(f"lora: base must be one of {BASES}, got {base!r}")
  if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) \
      or group_size < 1:
    raise ValueError(f"lora: group_size must be a positive int, got {group_size!r}")
  if init not in INITS:
    raise ValueError(f"lora: init must be one of {INITS}, got {init!r}")
  if isinstance(loftq_iters, bool) or not isinstance(loftq_iters, (int, np.integer)) \
      or loftq_iters < 1:
    raise ValueError(f"lora: loftq_iters must be a positive int, got {loftq_iters!r}")
  if init == "loftq" and base in (None, "float"):
    raise ValueError("lora: init='loftq' corrects the quantization error of a lossy base; "
                     f"give base='bf16'|'int8'|'int4'|'nf4' (got base={base!r})")
  if alpha is None:
    alpha = float(rank)
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
    raise ValueError(f"lora: alpha must be a finite number, got {alpha!r}")
  if isinstance(key, (int, np.integer)):
    key = jax.random.key(int(key))
  items = _tree.leaves_with_paths(params, is_leaf=_is_stored)
  for p, x in items:
    if isinstance(x, LoraArray):
      raise ValueError(f"lora: {p!r} already has adapters ({x!r})")
  if rules is None:
    rules = roles_lib.kernels(roles) if roles is not None else _tree.default_prunable
  if callable(rules) and not isinstance(rules, str):
    chosen = [bool(rules(p, x)) for p, x in items]
  else:
    pats = [rules] if isinstance(rules, str) else list(rules)
    chosen = [i >= 0 for i in _tree.first_match(pats, [p for p, _ in items], argname="lora rules")]
  if not any(chosen):
    raise ValueError("lora: the rules chose no leaf; candidate paths: "
                     + ", ".join(p for p, _ in items))
  leaves, treedef = jax.tree.flatten(params, is_leaf=_is_stored)
  out = []
  for i, ((p, x), c) in enumerate(zip(items, chosen)):
    if not c:
      out.append(x)
      continue
    shape, dtype = tuple(x.shape), x.dtype
    if not jnp.issubdtype(dtype, jnp.floating) or len(shape) < 2:
      raise TypeError(f"lora: {p!r} must be a floating kernel of rank >= 2, got "
                      f"{dtype}{list(shape)}")
    role = None if roles is None else roles_lib.lookup(roles, p)
    if role is not None and role.role != "kernel":
      raise TypeError(f"lora: {p!r} is traced as a {role.role!r}, not a kernel (the weight "
                      "of a dot/conv); adapters go on kernels")
    if init == "loftq" and isinstance(x, (QArray, nf4_lib.NF4Array)):
      raise TypeError(f"lora: init='loftq' needs the float kernel of {p!r}, which is already "
                      f"stored as {_base_kind(x)}; pass the float params with base=")
    k = _contracting_of(p, x, roles)
    if not k or len(k) == len(shape):
      raise ValueError(f"lora: {p!r} {list(shape)} has contracted axes {k}; need some but "
                       "not all axes")
    out.append(_make_leaf(x, jax.random.fold_in(key, i), p, base, k, group_size, rank,
                          float(alpha) / rank, init, int(loftq_iters)))
  return jax.tree.unflatten(treedef, out)


# ------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA in the :class:`~jaxopt_dnn.Trainer`: only the adapters are trained.

  Attributes:
    rank, alpha, base, group_size, init, loftq_iters: as for :func:`lora`.
    rules: as for :func:`lora`; ``None`` adapts every kernel the Trainer traces in the
      model (``roles.kernels``), with the traced contracted axes.
  """
  rank: int = 8
  alpha: float | None = None
  rules: Any = None
  base: str | None = None
  group_size: int = 64
  init: str = "zero"
  loftq_iters: int = 1

  def __post_init__(self):
    _check_rank(self.rank)
    if self.base not in BASES:
      raise ValueError(f"lora.base must be one of {BASES}, got {self.base!r}")
    if self.init not in INITS:
      raise ValueError(f"lora.init must be one of {INITS}, got {self.init!r}")
    if isinstance(self.rules, list):
      object.__setattr__(self, "rules", tuple(self.rules))
    if self.alpha is not None and (isinstance(self.alpha, bool)
                                   or not isinstance(self.alpha, (int, float))):
      raise ValueError(f"lora.alpha must be None or a number, got {self.alpha!r}")

  def apply(self, params: PyTree, key: Any, roles: Mapping | None = None) -> PyTree:
    """:func:`lora` of ``params`` with this config."""
    return lora(params, self.rules, rank=self.rank, alpha=self.alpha, key=key,
                base=self.base, group_size=self.group_size, roles=roles, init=self.init,
                loftq_iters=self.loftq_iters)


def trace_roles(model: Any, params: PyTree, collections: Mapping, *inputs: Any,
                **kwargs: Any) -> dict:
  """Roles of a (linen or NNX) model's params for :func:`lora` (stored leaves, e.g. a
  pre-quantized base, are dequantized for the trace)."""
  from jaxopt_dnn.model_adapter import adapt
  return adapt(model).match(
      nnx=lambda module: roles_lib.trace(module, None, *inputs),
      linen=lambda module: roles_lib.trace(lambda v, *x: module.apply(v, *x, **kwargs),
                                           {"params": materialize(params), **collections},
                                           *inputs))


__all__ = ["LoraArray", "LoraConfig", "adapters", "count", "delta", "effective", "is_lora",
           "loftq_factors", "lora", "materialize", "merge", "nbytes", "trace_roles",
           "with_adapters"]
