"""Dtype policies over pytrees: what is stored, computed and returned in which dtype.

A :class:`Policy` names three dtypes, as in jmp: parameters are *stored* in
``param_dtype`` (the float32 master weights), the forward/backward pass *computes* in
``compute_dtype`` and the model *returns* ``output_dtype``. Casts touch **floating
leaves only**: integer leaves, PRNG keys and quantized ``QArray`` leaves (their int8
values *and* their scales) pass through unchanged. Per-path exceptions are
``(regex, dtype)`` pairs over the key path (first match wins); the default keeps
normalization parameters and every statistics collection (``batch_stats``,
``quant_stats``) in float32: a bf16 running statistic stalls (``1.003 * 0.99 + 0.013``
rounds back to ``1.0`` in bf16).

Casting the inputs is not enough to set the compute dtype: a Flax layer built with an
explicit ``dtype=jnp.float32`` promotes its bf16 inputs back to float32. :func:`with_policy`
therefore also overrides the ``dtype`` attribute of every module for the duration of
the call (linen: an ``nn.intercept_methods`` interceptor; NNX: a clone whose modules'
``dtype`` is set), and :func:`compute_census` / :meth:`Policy.report` read the lowered
HLO to list any dot or convolution still computed in another dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxopt_dnn import _tree, model_adapter
from jaxopt_dnn.quant.qarray import is_qarray

PyTree = Any

_DTYPE_NAMES = {
    "float32": np.dtype(jnp.float32), "f32": np.dtype(jnp.float32),
    "fp32": np.dtype(jnp.float32), "float": np.dtype(jnp.float32),
    "single": np.dtype(jnp.float32), "full": np.dtype(jnp.float32),
    "bfloat16": np.dtype(jnp.bfloat16), "bf16": np.dtype(jnp.bfloat16),
    "float16": np.dtype(jnp.float16), "f16": np.dtype(jnp.float16),
    "fp16": np.dtype(jnp.float16), "half": np.dtype(jnp.float16),
    "float64": np.dtype(jnp.float64), "f64": np.dtype(jnp.float64),
    "fp64": np.dtype(jnp.float64), "double": np.dtype(jnp.float64),
}
_KEYS = {"params": "param_dtype", "param": "param_dtype", "p": "param_dtype",
         "compute": "compute_dtype", "c": "compute_dtype",
         "output": "output_dtype", "out": "output_dtype", "o": "output_dtype"}
_SHORT = {"fp32": ("float32", "float32", "float32"),
          "bf16": ("float32", "bfloat16", "float32"),
          "fp16": ("float32", "float16", "float32")}

#: Default per-path exceptions: normalization scales/biases and statistics stay float32.
DEFAULT_EXCEPTIONS: tuple[tuple[str, Any], ...] = (
    (r"(?i)norm", np.dtype(jnp.float32)),
    (r"(?i)batch_stats", np.dtype(jnp.float32)),
    (r"(?i)(quant_stats|input_amax)", np.dtype(jnp.float32)),
)


def as_dtype(value: Any, what: str = "dtype") -> np.dtype:
  """A floating ``np.dtype`` from a name (``"bf16"``, ``"float32"``...) or a dtype."""
  if isinstance(value, str):
    key = value.strip().lower()
    if key not in _DTYPE_NAMES:
      raise ValueError(f"{what}: unknown dtype name {value!r}; known names: "
                       + ", ".join(sorted(_DTYPE_NAMES)))
    return _DTYPE_NAMES[key]
  try:
    dt = np.dtype(value)
  except TypeError:
    raise TypeError(f"{what}: {value!r} is not a dtype") from None
  if not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(f"{what}: {dt} is not a floating dtype")
  return dt


def _cast_leaf(x: Any, dtype: np.dtype) -> Any:
  if is_qarray(x) or not _tree.is_float_array(x) or x.dtype == dtype:
    return x
  return x.astype(dtype)


@dataclasses.dataclass(frozen=True)
class Policy:
  """Storage, compute and output dtypes, with per-path exceptions.

  Attributes:
    param_dtype: dtype parameters are stored and updated in (master weights).
    compute_dtype: dtype of the forward/backward math.
    output_dtype: dtype the wrapped function returns (the logits / softmax dtype).
    exceptions: ``((regex, dtype), ...)`` applied by :meth:`cast_to_compute` and
      :meth:`cast_to_param` to leaves whose key path matches (first match wins). A
      mapping ``{regex: dtype}`` is accepted and stored as pairs.
  """

  param_dtype: Any = jnp.float32
  compute_dtype: Any = jnp.float32
  output_dtype: Any = jnp.float32
  exceptions: Any = DEFAULT_EXCEPTIONS

  def __post_init__(self):
    for f in ("param_dtype", "compute_dtype", "output_dtype"):
      object.__setattr__(self, f, as_dtype(getattr(self, f), f))
    exc = self.exceptions
    exc = tuple(exc.items()) if isinstance(exc, Mapping) else tuple(exc or ())
    pairs = []
    for i, pair in enumerate(exc):
      if not (isinstance(pair, tuple) and len(pair) == 2):
        raise TypeError(f"exceptions[{i}]: expected (regex, dtype), got {pair!r}")
      rx, dt = pair
      if not isinstance(rx, str):
        raise TypeError(f"exceptions[{i}]: regex must be a string, got {rx!r}")
      try:
        re.compile(rx)
      except re.error as e:
        raise ValueError(f"exceptions[{i}]: invalid regex {rx!r}: {e}") from None
      pairs.append((rx, as_dtype(dt, f"exceptions[{rx!r}]")))
    object.__setattr__(self, "exceptions", tuple(pairs))

  @classmethod
  def from_string(cls, spec: str, **kwargs: Any) -> Policy:
    """Parses ``"params=float32,compute=bfloat16,output=float32"`` or a short name.

    Short names: ``"fp32"``, ``"bf16"`` (f32 params, bf16 compute, f32 output) and
    ``"fp16"`` (f32 params, f16 compute, f32 output). Unnamed fields default to float32.
    """
    if not isinstance(spec, str):
      raise TypeError(f"policy spec must be a string, got {spec!r}")
    s = spec.strip().lower()
    if s in _SHORT:
      return cls(*_SHORT[s], **kwargs)
    fields: dict[str, np.dtype] = {}
    for part in filter(None, (p.strip() for p in s.split(","))):
      if "=" not in part:
        raise ValueError(f"policy spec {spec!r}: expected key=dtype, got {part!r}; short "
                         f"names are {sorted(_SHORT)}")
      key, val = (t.strip() for t in part.split("=", 1))
      if key not in _KEYS:
        raise ValueError(f"policy spec {spec!r}: unknown key {key!r}; use params, "
                         "compute, output")
      fields[_KEYS[key]] = as_dtype(val, f"policy spec {spec!r}: {key}")
    if not fields:
      raise ValueError(f"empty policy spec {spec!r}")
    return cls(**fields, **kwargs)

  def _exception_dtypes(self, tree: PyTree) -> list[np.dtype | None]:
    paths = [p for p, _ in _tree.leaves_with_paths(tree, is_leaf=is_qarray)]
    idx = _tree.first_match([rx for rx, _ in self.exceptions], paths,
                            argname="Policy.exceptions", require_all=False)
    return [None if i < 0 else self.exceptions[i][1] for i in idx]

  def _cast(self, tree: PyTree, dtype: np.dtype, exceptions: bool) -> PyTree:
    leaves, treedef = jax.tree.flatten(tree, is_leaf=is_qarray)
    overrides = (self._exception_dtypes(tree) if exceptions and self.exceptions
                 else [None] * len(leaves))
    out = [_cast_leaf(x, dtype if o is None else o) for x, o in zip(leaves, overrides)]
    return jax.tree.unflatten(treedef, out)

  def cast_to_compute(self, tree: PyTree, *, exceptions: bool = True) -> PyTree:
    """Floating leaves -> ``compute_dtype`` (exception paths -> their own dtype)."""
    return self._cast(tree, self.compute_dtype, exceptions)

  def cast_to_param(self, tree: PyTree, *, exceptions: bool = True) -> PyTree:
    """Floating leaves -> ``param_dtype`` (exception paths -> their own dtype)."""
    return self._cast(tree, self.param_dtype, exceptions)

  def cast_to_output(self, tree: PyTree) -> PyTree:
    """Floating leaves -> ``output_dtype`` (no path exceptions)."""
    return self._cast(tree, self.output_dtype, False)

  def report(self, tree: PyTree, fn: Callable[..., Any] | None = None, *args: Any,
             **kwargs: Any) -> str:
    """One line per leaf: path, stored dtype -> compute dtype, and the rule that won.

    With ``fn`` (and its arguments), also lowers ``fn(*args, **kwargs)`` and appends the
    dots/convs it really computes by dtype, flagging every one whose operands are not in
    ``compute_dtype`` (:func:`compute_census`): the casts above are an intention, the
    lowered HLO is what runs.
    """
    rows = []
    items = _tree.leaves_with_paths(tree, is_leaf=is_qarray)
    for (path, x), o in zip(items, self._exception_dtypes(tree)):
      if is_qarray(x) or not _tree.is_float_array(x):
        rows.append(f"{path}: {getattr(x, 'dtype', type(x).__name__)} (untouched)")
        continue
      rule = next((rx for rx, _ in self.exceptions if re.search(rx, path)), None)
      target = self.compute_dtype if o is None else o
      rows.append(f"{path}: {x.dtype} -> {target}" + (f"  [exception {rule!r}]" if rule else ""))
    if fn is not None:
      rows.append(compute_census(fn, *args, policy=self, **kwargs).summary())
    return "\n".join(rows)

  def __str__(self) -> str:
    return (f"params={self.param_dtype.name},compute={self.compute_dtype.name},"
            f"output={self.output_dtype.name}")


@dataclasses.dataclass(frozen=True)
class ComputeCensus:
  """Dots/convs of a lowered program by operand dtype, against a policy's compute dtype.

  Attributes:
    compute_dtype: the dtype every dot/conv should compute in (HLO short name, ``bf16``).
    ops: ``{"dot bf16 x bf16 -> bf16": 3, "conv f32 x f32 -> f32": 1, ...}``.
    off_policy: the entries of ``ops`` whose operands are floating but not in
      ``compute_dtype`` (integer ops are not a precision matter).
  """

  compute_dtype: str
  ops: dict[str, int]
  off_policy: dict[str, int]

  @property
  def ok(self) -> bool:
    return not self.off_policy

  def summary(self) -> str:
    total = sum(self.ops.values())
    if self.ok:
      return f"compute: all {total} dot/conv op(s) in {self.compute_dtype} (lowered HLO)"
    bad = ", ".join(f"{k}: {v}" for k, v in sorted(self.off_policy.items()))
    return (f"compute: {sum(self.off_policy.values())} of {total} dot/conv op(s) NOT in "
            f"{self.compute_dtype} under this policy (lowered HLO): {bad}")


_HLO_NAMES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "float64": "f64"}


def compute_census(fn: Callable[..., Any], *args: Any, policy: Policy | str,
                   **kwargs: Any) -> ComputeCensus:
  """Lowers ``fn(*args, **kwargs)`` (nothing runs) and checks every dot/conv's dtypes.

  Read off the lowered (pre-optimization) HLO: what the program asks XLA to compute.
  """
  from jaxopt_dnn import _hlo   # noqa: PLC0415 - keep the policy module light to import

  if isinstance(policy, str):
    policy = Policy.from_string(policy)
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  census = _hlo.census_from_hlo(jitted.lower(*args, **kwargs).as_text(dialect="hlo"))
  want = _HLO_NAMES.get(policy.compute_dtype.name, policy.compute_dtype.name)
  ops, off = {}, {}
  floats = set(_HLO_NAMES.values())
  for kind, table in (("dot", census.dots), ("conv", census.convs)):
    for sig, c in table.items():
      ops[f"{kind} {sig}"] = c
      a, rest = sig.split(" x ")
      b = rest.split(" -> ")[0]
      if (a in floats or b in floats) and (a != want or b != want):
        off[f"{kind} {sig}"] = c
  return ComputeCensus(want, ops, off)


def _norm_output_interceptor(dtype: np.dtype):
  """Linen interceptor: casts the floating outputs of ``*Norm*`` modules to ``dtype``.

  Normalization parameters stay float32, so a linen norm layer promotes its bf16 input
  to float32; without this cast every following layer would compute in float32 too.
  """
  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and "norm" in type(context.module).__name__.lower():
      out = jax.tree.map(lambda x: _cast_leaf(x, dtype), out, is_leaf=is_qarray)
    return out
  return interceptor


def _overridable(value: Any) -> bool:
  try:
    return value is not None and jnp.issubdtype(np.dtype(value), jnp.floating)
  except TypeError:
    return False


def _dtype_interceptor(dtype: np.dtype):
  """Linen interceptor: a module's floating ``dtype`` attribute reads ``dtype`` while any
  of its methods runs (submodules built inside inherit it), then is restored."""
  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    old = getattr(mod, "dtype", None)
    if not _overridable(old) or np.dtype(old) == dtype:
      return next_fun(*args, **kwargs)
    object.__setattr__(mod, "dtype", dtype)
    try:
      return next_fun(*args, **kwargs)
    finally:
      object.__setattr__(mod, "dtype", old)
  return interceptor


def _nnx_call(apply_fn, policy: Policy, model, args, kwargs):
  """NNX: runs ``apply_fn`` on a clone with compute-dtype params and module dtypes; the
  updated non-parameter state (BatchNorm statistics, RNG counts) is written back to
  ``model`` in the parameter dtype."""
  gd, params, rest = nnx.split(model, nnx.Param, ...)
  clone = nnx.merge(gd, policy.cast_to_compute(params), rest)
  out = apply_fn(nnx_apply_policy(clone, policy), *args, **kwargs)
  _, _, new_rest = nnx.split(clone, nnx.Param, ...)
  nnx.update(model, policy.cast_to_param(new_rest))
  return out


def with_policy(apply_fn: Callable[..., Any], policy: Policy | str, *,
                norm_outputs_in_compute: bool = True,
                override_module_dtype: bool = True) -> Callable[..., Any]:
  """Wraps ``apply_fn(variables, *args, **kwargs)`` (e.g. a Flax ``model.apply``), or
  ``apply_fn(module, *args, **kwargs)`` for an NNX module.

  The wrapper casts ``variables`` with :meth:`Policy.cast_to_compute` (path exceptions
  apply; statistics collections stay float32), floating positional/keyword inputs to
  ``compute_dtype``, and the result to ``output_dtype``. With ``mutable=...`` the
  returned ``(out, state)`` has ``state`` cast back with :meth:`Policy.cast_to_param`.
  With ``override_module_dtype`` (default) every module whose ``dtype`` attribute is a
  floating dtype (``dtype=jnp.float32`` set explicitly, as most Flax code does) computes
  in ``compute_dtype`` instead: linen through an interceptor, NNX on a clone prepared by
  :func:`nnx_apply_policy` (the original module keeps its attributes; its non-parameter
  state is updated). With ``norm_outputs_in_compute`` (linen) outputs of
  normalization modules are cast back to ``compute_dtype``. Gradients flow through the
  casts, so ``grad`` of a loss of the wrapper w.r.t. float32 params is float32. Check
  the result with :func:`compute_census` (or ``Policy.report(tree, fn, *args)``).
  """
  if isinstance(policy, str):
    policy = Policy.from_string(policy)
  if not isinstance(policy, Policy):
    raise TypeError(f"policy must be a Policy or a spec string, got {policy!r}")

  @functools.wraps(apply_fn)
  def wrapped(variables, *args, **kwargs):
    args = policy.cast_to_compute(args, exceptions=False)
    kwargs = {k: policy.cast_to_compute(v, exceptions=False) for k, v in kwargs.items()}

    def on_nnx(module):   # (done, output) / (False, the module left as it is)
      if override_module_dtype:
        return True, policy.cast_to_output(_nnx_call(apply_fn, policy, module, args, kwargs))
      return False, module

    done, variables = model_adapter.adapt(apply_fn, variables).match(
        nnx=on_nnx, linen=lambda _: (False, policy.cast_to_compute(variables)))
    if done:
      return variables
    icpts = []
    if override_module_dtype:
      icpts.append(_dtype_interceptor(policy.compute_dtype))
    if norm_outputs_in_compute:
      icpts.append(_norm_output_interceptor(policy.compute_dtype))
    with contextlib.ExitStack() as stack:
      for icpt in icpts:
        stack.enter_context(nn.intercept_methods(icpt))
      out = apply_fn(variables, *args, **kwargs)
    if kwargs.get("mutable", False) and isinstance(out, tuple) and len(out) == 2:
      return policy.cast_to_output(out[0]), policy.cast_to_param(out[1])
    return policy.cast_to_output(out)

  return wrapped


# ------------------------------------------------------------------- NNX


_NORMS = (nnx.BatchNorm, nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm)


@functools.lru_cache(maxsize=None)
def _cast_call_class(cls: type, in_dtype: Any, out_dtype: Any) -> type:
  """A subclass of ``cls`` whose ``__call__`` casts floating inputs / outputs."""
  def cast(tree, dt):
    if dt is None:
      return tree
    return jax.tree.map(lambda x: x.astype(dt) if isinstance(x, jax.Array | np.ndarray)
                        and jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

  def __call__(self, *args, **kwargs):
    out = cls.__call__(self, *cast(args, in_dtype), **cast(kwargs, in_dtype))
    return cast(out, out_dtype)
  return type(f"Policy{cls.__name__}", (cls,), {"__call__": __call__})


def nnx_apply_policy(module: nnx.Module, policy: Policy) -> nnx.Module:
  """Makes an NNX module (a fresh merge, mutated in place) compute in the policy's dtype.

  The top module casts its floating inputs to ``compute_dtype`` and its outputs to
  ``output_dtype``; submodules with an explicit floating ``dtype`` get
  ``compute_dtype`` (norms keep theirs: their statistics stay float32) and norm outputs
  are cast back to ``compute_dtype`` so the layers after them stay in it.
  """
  cd, od = policy.compute_dtype, policy.output_dtype
  for node in model_adapter.modules(module).values():
    if node is module:
      continue
    if isinstance(node, _NORMS):
      node.__class__ = _cast_call_class(type(node), None, cd)
    elif _overridable(getattr(node, "dtype", None)):
      object.__setattr__(node, "dtype", cd)
  module.__class__ = _cast_call_class(type(module), cd, od)
  return module
