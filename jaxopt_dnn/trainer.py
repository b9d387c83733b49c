"""The one step builder: any Flax model, the user's loss, any optax optimizer.

A :class:`Trainer` composes the library's transforms around a user's model and loss
into ONE jitted, sharded train step::

  params ─► [QAT fake-quant: quant.qat] ─► [precision.Policy casts] ─► model ─► loss_fn
     ▲            (masks in the optimizer state: sparsity.prune_optimizer)          │
     └── optax update (masked) ◄── grads (unscaled, f32) ◄── loss (scaled, fp16) ◄──┘

Linen: ``loss_fn(apply_fn, variables, batch, rng) -> loss | (loss, aux)``, where
``apply_fn`` has ``model.apply``'s signature and already runs the transforms. NNX:
``loss_fn(model, batch, rng)`` with ``model`` the transformed module in training mode.
The user's loss never sees mutable collections (BatchNorm statistics, QAT activation
ranges) or loss scaling: the step threads them. ``aux`` values come back as metrics.

Randomness: ``rng`` is this step's key (a split of ``state.rng``). Linen: ``apply_fn``
passes ``rngs`` keyed for every stream (:func:`_linen_rngs`: ``dropout``, ``params``,
and by flax's fallback any other ``make_rng`` name), under the user's own ``rngs``.
NNX: every RNG stream the module holds is re-keyed from ``rng`` each step; call-time
``rngs`` are the loss's to pass (``model(x, rngs=nnx.Rngs(dropout=rng))``).

State is created where it lives: :meth:`Trainer.init` traces the initialisation with
``jax.eval_shape``, derives every leaf's sharding (data parallel, FSDP, regex rules or
the model's own logical-axis annotations) and runs ``jax.jit(init,
out_shardings=...)``, optimizer state included. Nothing is gathered to one device or
to the host; the step donates the state.

A loss written in the global view is correct under any sharding: a token-weighted mean
``sum(w * l) / sum(w)`` over a batch split across devices is the global ratio, because
XLA reduces both sums over the mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.errors
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxopt_dnn import _tree
from jaxopt_dnn import fold as fold_lib
from jaxopt_dnn import lora as lora_lib
from jaxopt_dnn import parallel
from jaxopt_dnn import precision as precision_lib
from jaxopt_dnn import quant as quant_lib
from jaxopt_dnn import roles as roles_lib
from jaxopt_dnn import sparsity as sparsity_lib

PyTree = Any
QUANT_STATS = "quant_stats"


# ----------------------------------------------------------------------- state


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; an ordinary pytree (checkpointable, shardable).

  Attributes:
    step: int32 scalar, number of completed optimizer steps.
    params: the model's parameters (the paths of ``model.init(...)["params"]``, or of
      ``nnx.state(model, nnx.Param)`` for NNX), unboxed, in the policy's param dtype.
    opt_state: optax state (pruning masks live here).
    rng: raw ``uint32[2]`` PRNG key data, split by every step.
    collections: the model's other state, e.g. ``{"batch_stats": ..., "quant_stats":
      ...}`` (linen collections; for NNX every non-``Param`` variable, PRNG keys as raw
      key data).
    loss_scale: ``None`` or a loss-scale pytree (:mod:`jaxopt_dnn.precision`).
  """
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  rng: jax.Array
  collections: PyTree = flax.struct.field(default_factory=dict)
  loss_scale: PyTree = None

  @classmethod
  def create(cls, params: PyTree, tx: optax.GradientTransformation, *, rng: Any = 0,
             collections: PyTree | None = None, loss_scale: PyTree = None) -> TrainState:
    """``step=0``, ``opt_state=tx.init(params)``; ``rng`` an int seed or a key."""
    if isinstance(rng, int):
      rng = jax.random.key(rng)
    if jnp.issubdtype(jnp.asarray(rng).dtype, jax.dtypes.prng_key):
      rng = jax.random.key_data(rng)
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               rng=jnp.asarray(rng, jnp.uint32),
               collections={} if collections is None else collections, loss_scale=loss_scale)

  def apply_gradients(self, grads: PyTree, tx: optax.GradientTransformation,
                      **changes) -> TrainState:
    """One optax update; ``step += 1``; other fields replaced by ``changes``."""
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state, **changes)


# --------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class PruneConfig:
  """Pruning inside the optimizer (:func:`sparsity.prune_optimizer`).

  The sparsity follows ``schedule``: ``"constant"`` (``sparsity`` from ``begin``) or
  ``"polynomial"`` (Zhu–Gupta cubic from 0 at ``begin`` to ``sparsity`` at ``end``).
  Masks are recomputed every ``update_every`` steps until ``end`` (``None``: for a
  constant schedule, only at ``begin``), then frozen.

  Attributes:
    method: ``magnitude`` | ``random`` | ``nm`` | ``channel``.
    rules: regex over key paths of the leaves to prune (``None``: the library default).
  """
  method: str = "magnitude"
  sparsity: float = 0.5
  schedule: str = "constant"
  begin: int = 0
  end: int | None = None
  update_every: int = 100
  scope: str = "layer"
  rules: Any = None
  distribution: Any = "uniform"
  n: int = 2
  m: int = 4

  def __post_init__(self):
    if self.method not in ("magnitude", "random", "nm", "channel"):
      raise ValueError(f"prune.method must be magnitude|random|nm|channel, got {self.method!r}")
    if self.schedule not in ("constant", "polynomial"):
      raise ValueError(f"prune.schedule must be constant|polynomial, got {self.schedule!r}")
    for name in ("begin", "update_every"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name == "update_every" else 0):
        raise ValueError(f"prune.{name} must be an int >= "
                         f"{1 if name == 'update_every' else 0}, got {v!r}")
    if self.end is not None and (not isinstance(self.end, int) or self.end <= self.begin):
      raise ValueError(f"prune.end must be an int > begin={self.begin}, got {self.end!r}")
    if self.schedule == "polynomial" and self.end is None:
      raise ValueError("prune.schedule='polynomial' needs prune.end (the step at which the "
                       "target sparsity is reached)")
    if not isinstance(self.sparsity, (int, float)) or not 0.0 <= float(self.sparsity) < 1.0:
      raise ValueError(f"prune.sparsity must be a float in [0, 1), got {self.sparsity!r}")

  def optimizer(self, tx: optax.GradientTransformation,
                roles: Any = None) -> optax.GradientTransformation:
    """``tx`` wrapped in :func:`sparsity.prune_optimizer` per this config (``roles``:
    the leaf roles or ``params -> roles``, which N:M needs for its contraction axes)."""
    if self.schedule == "polynomial":
      schedule = sparsity_lib.polynomial_schedule(0.0, self.sparsity, self.begin, self.end,
                                                  frequency=self.update_every)
    else:
      schedule = sparsity_lib.constant_schedule(self.sparsity, self.begin)
    until = self.begin if self.end is None else self.end
    return sparsity_lib.prune_optimizer(
        tx, schedule, method=self.method, scope=self.scope, update_every=self.update_every,
        update_until=until, rules=self.rules, distribution=self.distribution, n=self.n,
        m=self.m, roles=roles)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """Quantization: ``qat`` (fake-quant training, then int8 serving with the trained
  activation ranges), ``ptq`` (int8 serving calibrated on ``calibration_batches``) or
  ``none``. ``weight_only`` stores int ``bits`` weights and computes in float."""
  mode: str = "none"
  bits: int = 8
  weight_only: bool = False
  calibration: str = "absmax"
  calibration_batches: int = 4
  estimator: str = "ste"
  rules: Any = None

  def __post_init__(self):
    if self.mode not in ("none", "ptq", "qat"):
      raise ValueError(f"quant.mode must be none|ptq|qat, got {self.mode!r}")
    if self.bits not in (4, 8) or isinstance(self.bits, bool):
      raise ValueError(f"quant.bits must be 4 or 8, got {self.bits!r}")
    if self.calibration not in ("absmax", "percentile", "mse"):
      raise ValueError(f"quant.calibration must be absmax|percentile|mse, got "
                       f"{self.calibration!r}")
    if self.estimator not in ("ste", "int8_forward"):
      raise ValueError(f"quant.estimator must be ste|int8_forward, got {self.estimator!r}")
    if not isinstance(self.calibration_batches, int) or self.calibration_batches < 1:
      raise ValueError(f"quant.calibration_batches must be an int >= 1, got "
                       f"{self.calibration_batches!r}")


def _config(value: Any, cls: type, name: str):
  if value is None:
    return None
  if isinstance(value, cls):
    return value
  if isinstance(value, Mapping):
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - fields)
    if unknown:
      raise ValueError(f"{name}: unknown keys {unknown}; valid: {sorted(fields)}")
    return cls(**value)
  raise TypeError(f"{name} must be None, a dict or a {cls.__name__}, got {value!r}")


def _policy(value: Any) -> precision_lib.Policy | None:
  if value is None:
    return None
  policy = precision_lib.Policy.from_string(value) if isinstance(value, str) else value
  if not isinstance(policy, precision_lib.Policy):
    raise TypeError(f"precision must be None, a Policy or a spec string, got {value!r}")
  if all(d == jnp.float32 for d in (policy.param_dtype, policy.compute_dtype,
                                    policy.output_dtype)):
    return None
  return policy


def _loss_scale(value: Any) -> Any:
  if value is None:
    return None
  if isinstance(value, str):
    if value == "static":
      return precision_lib.StaticLossScale(jnp.float32(2.0 ** 15))
    if value == "dynamic":
      return precision_lib.DynamicLossScale(jnp.float32(2.0 ** 15))
    raise ValueError(f"loss_scale must be None, 'static', 'dynamic' or a loss-scale object, "
                     f"got {value!r}")
  if not all(hasattr(value, a) for a in ("scale", "unscale", "adjust")):
    raise TypeError(f"loss_scale must be None, 'static', 'dynamic' or a loss-scale object "
                    f"(scale/unscale/adjust), got {value!r}")
  return value


# ------------------------------------------------------------------- sharding


def _is_logical_rules(value: Any) -> bool:
  return (isinstance(value, (tuple, list)) and len(value) > 0 and all(
      isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str)
      and (r[1] is None or isinstance(r[1], (str, tuple))) for r in value))


def _fsdp_axis(mesh: Mesh) -> str | tuple[str, ...] | None:
  """The mesh axis FSDP shards over: ``fsdp`` if it has > 1 device, else the batch axes."""
  if mesh.shape.get("fsdp", 1) > 1:
    return "fsdp"
  axes = tuple(a for a in parallel.batch_axes(mesh) if mesh.shape[a] > 1)
  return axes[0] if len(axes) == 1 else (axes or None)


def _fsdp_shardings(params: PyTree, mesh: Mesh) -> PyTree:
  axis = _fsdp_axis(mesh)
  size = 1 if axis is None else int(np.prod([mesh.shape[a] for a in
                                             (axis if isinstance(axis, tuple) else (axis,))]))

  def one(x):
    spec = parallel.fsdp_spec(np.shape(x), size, axis) if axis else P()
    return NamedSharding(mesh, spec)
  return jax.tree.map(one, params)


def _logical_specs(boxed_params: PyTree, rules: Sequence[tuple[str, Any]], mesh: Mesh,
                   nnx_state: Any = None) -> PyTree:
  """Mesh ``PartitionSpec`` of every param from its logical-axis annotation.

  linen: ``nn.LogicallyPartitioned`` / ``nn.Partitioned`` boxes; NNX: the variables'
  ``out_sharding`` metadata. Unannotated leaves are replicated.
  """
  if nnx_state is not None:
    names = nnx.get_partition_spec(nnx_state)
    names = nnx.to_pure_dict(names)
  else:
    names = nn.get_partition_spec(boxed_params)
  rules = tuple((str(k), v) for k, v in rules)
  return jax.tree.map(lambda s: nn.logical_to_mesh_axes(tuple(s), rules)
                      if isinstance(s, P) else P(), names,
                      is_leaf=lambda s: isinstance(s, P))


def _checked(specs: PyTree, params: PyTree, mesh: Mesh) -> PyTree:
  out = []
  leaves, treedef = jax.tree.flatten(params)
  spec_leaves = treedef.flatten_up_to(specs)
  for (path, x), spec in zip(_tree.leaves_with_paths(params), spec_leaves):
    spec = parallel.check_spec(P(*spec), mesh, path, tuple(np.shape(x)))
    out.append(NamedSharding(mesh, spec))
  return jax.tree.unflatten(treedef, out)


# ------------------------------------------------------------------- helpers


def _as_host(tree: PyTree) -> PyTree:
  """Numpy copies of the leaves (typed keys as raw key data): identical in every process."""
  def one(x):
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
      return np.asarray(jax.random.key_data(x))
    return np.asarray(x)
  return jax.tree.map(one, tree)


def _keys_to_data(tree: PyTree) -> tuple[PyTree, PyTree]:
  """Typed PRNG key leaves -> raw ``uint32`` data, plus the impls to wrap them back."""
  leaves, treedef = jax.tree.flatten(tree)
  impls = [jax.random.key_impl(x) if jax.dtypes.issubdtype(getattr(x, "dtype", None),
                                                           jax.dtypes.prng_key) else None
           for x in leaves]
  data = [jax.random.key_data(x) if i is not None else x for x, i in zip(leaves, impls)]
  return jax.tree.unflatten(treedef, data), tuple(impls)


def _data_to_keys(tree: PyTree, impls: tuple) -> PyTree:
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, [x if i is None else jax.random.wrap_key_data(x, impl=i)
                                      for x, i in zip(leaves, impls)])


def _split_loss(out: Any) -> tuple[jax.Array, dict]:
  if isinstance(out, tuple):
    if len(out) != 2 or not isinstance(out[1], Mapping):
      raise TypeError("loss_fn must return a scalar loss or (loss, aux_dict), got a tuple of "
                      f"{len(out)} with {type(out[-1]).__name__} last")
    loss, aux = out
  else:
    loss, aux = out, {}
  if jnp.ndim(loss) != 0:
    raise ValueError(f"loss_fn must return a scalar loss, got shape {jnp.shape(loss)}")
  return jnp.asarray(loss, jnp.float32), dict(aux)


# ------------------------------------------------------------------- rng streams


def _linen_rngs(key: jax.Array) -> dict[str, jax.Array]:
  """The ``rngs`` of one linen forward: a key for every stream a module may draw.

  ``{"dropout": fold_in(key, 0), "params": fold_in(key, 1)}``. Any other stream a module
  asks for (``self.make_rng("noise")``) is drawn from ``"params"`` by flax's own rule
  (``Module.make_rng``: a stream that was not passed falls back to ``"params"``); flax
  folds the module path and a per-scope counter into every draw, so each call site gets
  its own key, and a fresh ``key`` per step gives fresh keys for every stream.
  """
  return {"dropout": jax.random.fold_in(key, 0), "params": jax.random.fold_in(key, 1)}


def _with_rngs(kwargs: Mapping, key: jax.Array) -> dict:
  """``kwargs`` with ``rngs`` for every stream; the caller's own ``rngs`` win per name."""
  kwargs = dict(kwargs)
  given = kwargs.pop("rngs", None)
  if given is not None and not isinstance(given, Mapping):   # a single key: flax's "params"
    given = {"params": given}
  kwargs["rngs"] = {**_linen_rngs(key), **dict(given or {})}
  return kwargs


#: fixed key of the inference forwards that draw random numbers (see ``_infer``)
_SERVE_SEED = 0


def _infer(apply: Callable, variables: PyTree, *args, **kwargs):
  """An inference forward: no ``rngs`` (flax's inference convention), unless the model
  still draws random numbers (e.g. dropout switched by a config field, not by a call
  argument: flax lm1b's ``TransformerConfig(deterministic=False)``); then every stream
  gets a fixed key (:func:`_linen_rngs` of ``key(0)``), so the forward stays a
  deterministic function of its inputs."""
  if "rngs" in kwargs:
    return apply(variables, *args, **kwargs)
  try:
    return apply(variables, *args, **kwargs)
  except flax.errors.InvalidRngError:
    return apply(variables, *args, **_with_rngs(kwargs, jax.random.key(_SERVE_SEED)))


def _cast_floating(tree: PyTree, dtype: Any) -> PyTree:
  """A model output of any pytree structure with its floating array leaves in ``dtype``
  (integer / bool leaves, ``None`` and non-array leaves unchanged)."""
  def one(x):
    if isinstance(x, jax.Array | np.ndarray) and jnp.issubdtype(x.dtype, jnp.floating):
      return x.astype(dtype)
    return x
  return jax.tree.map(one, tree)


# ----------------------------------------------------- global-view collectives


def _unbound(names: Any) -> tuple[Any, bool]:
  """``(names with the unbound axis names removed, whether any was removed)``.

  ``names``: ``None``, an axis name or a tuple of them (``BatchNorm.axis_name``). A
  name is bound when an enclosing ``shard_map`` / ``vmap`` / ``pmap`` defines it
  (``lax.axis_size`` succeeds).
  """
  if names is None:
    return None, False
  many = isinstance(names, (tuple, list))
  if not many and not isinstance(names, str):
    return names, False
  kept = []
  for n in (names if many else (names,)):
    try:
      jax.lax.axis_size(n)
      kept.append(n)
    except NameError:
      pass
  n_all = len(names) if many else 1
  if len(kept) == n_all:
    return names, False
  if not kept:
    return None, True
  return (tuple(kept) if many else kept[0]), True


def _global_view_interceptor(next_fun, args, kwargs, context):
  """Linen: a module whose ``axis_name`` is not bound runs with it unset.

  Models written for ``pmap`` reduce batch statistics across replicas, e.g. flax
  imagenet's ``BatchNorm(axis_name="batch")``: ``mean = pmean(mean_local, "batch")``.
  The Trainer's step is one ``jit`` in the global view, where the module already sees
  the whole (sharded) batch and XLA reduces over the mesh: ``mean_local`` *is* the
  cross-replica mean, and the ``pmean`` would fail (unbound axis name). Names that an
  enclosing ``shard_map`` / ``vmap`` binds are kept.
  """
  return _call_in_global_view(context.module, next_fun, *args, **kwargs)


def _call_in_global_view(mod: Any, call: Callable, *args, **kwargs):
  """``call(*args, **kwargs)`` with ``mod.axis_name`` stripped of its unbound names
  (:func:`_unbound`) meanwhile, then restored; linen and NNX modules alike."""
  old = getattr(mod, "axis_name", None)
  new, changed = _unbound(old)
  if not changed:
    return call(*args, **kwargs)
  object.__setattr__(mod, "axis_name", new)
  try:
    return call(*args, **kwargs)
  finally:
    object.__setattr__(mod, "axis_name", old)


def _global_view(fn: Callable) -> Callable:
  """``fn`` (a linen apply) run under :func:`_global_view_interceptor`."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with nn.intercept_methods(_global_view_interceptor):
      return fn(*args, **kwargs)
  return wrapped


@functools.lru_cache(maxsize=None)
def _global_view_class(cls: type) -> type:
  """NNX: a subclass of ``cls`` whose ``__call__`` unsets unbound ``axis_name``s (see
  :func:`_global_view_interceptor`) while it runs."""
  def __call__(self, *args, **kwargs):
    return _call_in_global_view(self, cls.__call__, self, *args, **kwargs)
  return type(f"GlobalView{cls.__name__}", (cls,), {"__call__": __call__})


def _nnx_global_view(module: nnx.Module) -> nnx.Module:
  """A fresh NNX module (mutated in place) whose modules with an ``axis_name`` (BatchNorm
  written for ``pmap``) drop the names that are unbound when they run."""
  for _, node in list(nnx.iter_graph(module)):
    if (isinstance(node, nnx.Module) and getattr(node, "axis_name", None) is not None
        and callable(getattr(type(node), "__call__", None))):
      node.__class__ = _global_view_class(type(node))
  return module


def _nnx_reseed(module: nnx.Module, key: jax.Array) -> nnx.Module:
  """Re-keys every RNG stream an NNX module holds from ``key`` (in place).

  Stream ``tag`` gets ``fold_in(key, crc32(tag))``; modules holding streams of the same
  tag (each ``nnx.Dropout`` forks its own) get distinct keys (``nnx.reseed`` draws one
  per stream, in graph order), and their counts restart at 0.
  """
  tags = sorted({node.tag for _, node in nnx.iter_graph(module)
                 if isinstance(node, nnx.RngStream)})
  if tags:
    nnx.reseed(module, policy="match_shape",
               **{t: jax.random.fold_in(key, zlib.crc32(t.encode())) for t in tags})
  return module


# ------------------------------------------------------------------- NNX glue


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


def nnx_apply_policy(module: nnx.Module, policy: precision_lib.Policy) -> nnx.Module:
  """Makes an NNX module (a fresh merge, mutated in place) compute in the policy's dtype.

  The top module casts its floating inputs to ``compute_dtype`` and its outputs to
  ``output_dtype``; submodules with an explicit floating ``dtype`` get
  ``compute_dtype`` (norms keep theirs: their statistics stay float32) and norm outputs
  are cast back to ``compute_dtype`` so the layers after them stay in it.
  """
  cd, od = policy.compute_dtype, policy.output_dtype
  for _, node in list(nnx.iter_graph(module)):
    if not isinstance(node, nnx.Module) or node is module:
      continue
    if isinstance(node, _NORMS):
      node.__class__ = _cast_call_class(type(node), None, cd)
    elif getattr(node, "dtype", None) is not None and jnp.issubdtype(node.dtype, jnp.floating):
      object.__setattr__(node, "dtype", cd)
  module.__class__ = _cast_call_class(type(module), cd, od)
  return module


def _nnx_stats(collections: Mapping) -> dict:
  """NNX QAT ranges as a ``quant_stats`` tree for int8_apply: every ``QuantStat`` the
  interception created (``blk/quant_input_amax`` -> op ``blk``, ``blk/quant_w_input_amax``
  -> op ``blk/w``, by :func:`jaxopt_dnn.quant.intercept.flat_stats`)."""
  from jaxopt_dnn.quant.intercept import flat_stats, stats_tree
  return stats_tree(flat_stats(dict(collections)))


# --------------------------------------------------------------------- Trainer


class Trainer:
  """Prune, quantize, cast and shard any Flax model's training in one jitted step.

  Args:
    model: a ``flax.linen.Module`` or a ``flax.nnx.Module``.
    loss_fn: linen ``loss_fn(apply_fn, variables, batch, rng)``; NNX ``loss_fn(model,
      batch, rng)``; returns ``loss`` or ``(loss, aux_dict)``.
    optimizer: any optax ``GradientTransformation``.
    prune: ``None``, a :class:`PruneConfig` or its dict.
    quant: ``None``, a :class:`QuantConfig` or its dict (``mode="qat"`` trains with
      fake-quant; serving then runs int8 ops).
    precision: ``None``, a :class:`~jaxopt_dnn.precision.Policy` or a spec string
      (``"bf16"``, ``"params=float32,compute=bfloat16,output=float32"``).
    loss_scale: ``None``, ``"static"``, ``"dynamic"`` or a loss-scale object.
    lora: ``None``, a :class:`~jaxopt_dnn.lora.LoraConfig` or its dict: the kernels get
      low-rank adapters on a frozen (optionally quantized) base and only the adapters
      are trained (``state.opt_state`` holds state for them alone).
    mesh: a ``jax.sharding.Mesh``; default: every device on one ``data`` axis (for
      ``sharding="fsdp"``: on the ``fsdp`` axis).
    sharding: ``"data_parallel"`` (replicated params) | ``"fsdp"`` (each param split
      along its largest divisible axis) | ``"replicated"`` | ``{regex: PartitionSpec}``
      | logical-axis rules ``(("embed", "fsdp"), ("mlp", "tensor"), ...)`` applied to
      the model's ``nn.with_logical_partitioning`` boxes / NNX sharding metadata.
    eval_kwargs: keyword arguments for inference (``init`` and ``serve``), e.g.
      ``{"train": False}``.
    init_kwargs: keyword arguments for ``model.init`` (default: ``eval_kwargs``).
    donate: donate the state to the step (default ``True``).
  """

  def __init__(self, model: Any, loss_fn: Callable, optimizer: optax.GradientTransformation,
               *, prune: Any = None, quant: Any = None, precision: Any = None,
               loss_scale: Any = None, mesh: Mesh | None = None,
               sharding: Any = "data_parallel", eval_kwargs: Mapping | None = None,
               init_kwargs: Mapping | None = None, donate: bool = True, lora: Any = None):
    self.is_nnx = isinstance(model, nnx.Module)
    if not self.is_nnx and not isinstance(model, nn.Module):
      raise TypeError(f"Trainer: model must be a flax.linen.Module or a flax.nnx.Module, got "
                      f"{type(model).__name__}")
    if not callable(loss_fn):
      raise TypeError(f"Trainer: loss_fn must be callable, got {loss_fn!r}")
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
      raise TypeError(f"Trainer: optimizer must be an optax GradientTransformation, got "
                      f"{type(optimizer).__name__}")
    if mesh is not None and not isinstance(mesh, Mesh):
      raise TypeError(f"Trainer: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    self.model = model
    self.loss_fn = loss_fn
    self.prune = _config(prune, PruneConfig, "prune")
    self.quant = _config(quant, QuantConfig, "quant") or QuantConfig()
    self.policy = _policy(precision)
    self.loss_scale = _loss_scale(loss_scale)
    self.eval_kwargs = dict(eval_kwargs or {})
    self.init_kwargs = dict(self.eval_kwargs if init_kwargs is None else init_kwargs)
    self.donate = donate
    self.sharding = self._check_sharding(sharding)
    if mesh is None:
      n = len(jax.devices())
      mesh = (parallel.make_mesh(data=1, fsdp=n) if sharding == "fsdp"
              else parallel.make_mesh(data=n))
    self.mesh = mesh
    self.tx = self.prune.optimizer(optimizer, roles=(  # N:M axes from the traced model
        (lambda p: self._prune_roles(p)) if self.prune.method == "nm" else None)) if self.prune else optimizer
    self._qat = self.quant.mode == "qat"
    self.lora = _config(lora, lora_lib.LoraConfig, "lora")
    if self.lora is not None and (self.prune is not None or self._qat):
      raise ValueError("Trainer: lora= trains adapters on a frozen base; it does not combine "
                       "with prune= or quant.mode='qat'")
    if self.lora is not None and not isinstance(self.sharding, (str, Mapping)):
      raise ValueError("Trainer: lora= supports sharding='data_parallel'|'fsdp'|'replicated' "
                       "or {regex: PartitionSpec} rules, not logical-axis rules")
    if self.is_nnx:
      self._setup_nnx()
    else:
      self._qat_model = (quant_lib.qat(model, self.quant.rules, bits=self.quant.bits,
                                       estimator=self.quant.estimator) if self._qat else None)
    self.state_sharding = None
    self._step = None

  @staticmethod
  def _check_sharding(sharding):
    if isinstance(sharding, str):
      if sharding not in parallel.STRATEGIES:
        raise ValueError(f"Trainer: sharding must be one of {parallel.STRATEGIES}, regex rules "
                         f"or logical-axis rules, got {sharding!r}")
      return sharding
    if isinstance(sharding, Mapping) or _is_logical_rules(sharding):
      return sharding
    raise TypeError(f"Trainer: sharding must be a strategy name, a {{regex: PartitionSpec}} "
                    f"dict or logical-axis rules ((name, mesh_axis), ...), got {sharding!r}")

  # ---------------------------------------------------------------- linen forward
  @property
  def apply_fn(self) -> Callable:
    """linen: the transformed ``model.apply`` the loss sees (QAT fake-quant, policy).

    ``trainer.apply_fn({"params": state.params, **state.collections}, *inputs,
    **trainer.eval_kwargs)`` is the simulated (fake-quant) inference forward.
    """
    if self.is_nnx:
      raise TypeError("Trainer.apply_fn is for linen models; for NNX use "
                      "trainer.module(state)")
    return self._linen_apply

  def module(self, state: TrainState, *, train: bool = False) -> nnx.Module:
    """NNX: the transformed module (QAT hooks, policy) holding ``state``'s values."""
    if not self.is_nnx:
      raise TypeError("Trainer.module is for NNX models; for linen use trainer.apply_fn")
    m = self._nnx_merge(state.params, state.collections)
    m.train() if train else m.eval()
    return m

  def _linen_apply(self, variables, *args, **kwargs):
    """``model.apply`` with the transforms (QAT fake-quant, then the policy), in the
    global view (:func:`_global_view_interceptor`). Without ``rngs``, a model that draws
    random numbers gets fixed keys (:func:`_infer`)."""
    fn = self._qat_model.apply if self._qat else self.model.apply
    if self.lora is not None:   # adapters + (dequantized) base -> ordinary kernels
      variables = {**variables, "params": lora_lib.materialize(variables["params"])}
    if self.policy is not None:
      fn = precision_lib.with_policy(fn, self.policy)
    return _infer(_global_view(fn), variables, *args, **kwargs)

  # ------------------------------------------------------------------- NNX setup
  def _setup_nnx(self):
    module = self.model
    if self._qat:
      module = quant_lib.qat(module, self.quant.rules, bits=self.quant.bits,
                             estimator=self.quant.estimator)
    self._nnx_module = module
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    self._graphdef = graphdef
    self._param_template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    self._rest_template = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), rest)
    self._impls = _keys_to_data(nnx.to_pure_dict(rest))[1]

  def _nnx_merge(self, params: PyTree, collections: PyTree, *,
                 policy: bool = True) -> nnx.Module:
    """A fresh module holding ``params`` and ``collections`` (the policy applied)."""
    use_policy = policy and self.policy is not None
    if self.lora is not None:
      params = lora_lib.materialize(params)
    if use_policy:   # norm parameters keep float32 (the policy's path exceptions)
      params = self.policy.cast_to_compute(params)
    module = _nnx_build(self._graphdef, self._param_template, self._rest_template,
                        self._impls, params, collections)
    if use_policy:
      module = nnx_apply_policy(module, self.policy)
    return _nnx_global_view(module)

  def _nnx_split(self, module: nnx.Module) -> tuple[PyTree, PyTree]:
    _, params, rest = nnx.split(module, nnx.Param, ...)
    cols, _ = _keys_to_data(nnx.to_pure_dict(rest))
    return nnx.to_pure_dict(params), cols

  # ------------------------------------------------------------------------ init
  def _init_model(self, key_data, variables, *inputs):
    """Pure model init: ``(raw key, variables or None, inputs) -> ((params, collections,
    rng), boxed variables or None)``.

    ``variables`` (linen ``{"params": ..., "batch_stats": ...}``; NNX ``{"params": ...}``)
    start from given values (e.g. a trained baseline) instead of the initialisers.
    """
    key = jax.random.wrap_key_data(key_data)
    k_params, k_drop, k_state = jax.random.split(key, 3)
    boxed = None
    if self.is_nnx:
      params, cols = self._nnx_split(self._nnx_module)
      if variables is not None:
        params = variables["params"]
    else:
      if variables is None:   # (QAT ranges: below, from the same model's forward)
        boxed = _global_view(self.model.init)({"params": k_params, "dropout": k_drop},
                                              *inputs, **self.init_kwargs)
        variables = boxed
      variables = dict(nn.meta.unbox(variables))
      params = variables.pop("params")
      cols = {k: v for k, v in variables.items() if k != QUANT_STATS}
      if self._qat:   # one range per quantized op, -1 = not seen yet: the first step sets
        # it to its batch's absmax (as NNX QuantStats start), so only the sample's shapes
        # matter (a zero sample would otherwise give zero ranges that the EMA keeps)
        upd = jax.eval_shape(lambda p, c, k, *x: _global_view(self._qat_model.apply)(
            {"params": p, **c}, *x, mutable=[QUANT_STATS],
            **_with_rngs(self.init_kwargs, k))[1], params, cols, k_drop, *inputs)
        cols[QUANT_STATS] = jax.tree.map(lambda x: jnp.full(x.shape, -1.0, jnp.float32),
                                         upd[QUANT_STATS])
    if self.policy is not None:
      params = self.policy.cast_to_param(params)
    if self.lora is not None:   # after the cast: a bf16 / quantized base keeps its dtype
      roles = lora_lib.trace_roles(self._nnx_module if self.is_nnx else self.model, params,
                                   cols, *inputs, **self.init_kwargs)
      params = self.lora.apply(params, jax.random.fold_in(k_params, 1), roles)
    return (params, cols, jax.random.key_data(k_state)), boxed

  def _init_state(self, params, cols, rng) -> TrainState:
    """The train state around initial params: ``opt_state = tx.init(params)`` (LoRA:
    ``tx.init(lora.adapters(params))``)."""
    opt = params if self.lora is None else lora_lib.adapters(params)
    return TrainState.create(opt, self.tx, rng=rng, collections=cols,
                             loss_scale=self.loss_scale).replace(params=params)

  def _param_shardings(self, abstract_params, boxed) -> PyTree:
    s = self.sharding
    if isinstance(s, str):
      if s == "fsdp":
        return _fsdp_shardings(abstract_params, self.mesh)
      return parallel.param_shardings(abstract_params, self.mesh, "replicated")
    if isinstance(s, Mapping):
      return parallel.param_shardings(abstract_params, self.mesh, "replicated", rules=s)
    if self.is_nnx:
      specs = _logical_specs(None, s, self.mesh, nnx.state(self._nnx_module, nnx.Param))
    elif boxed is None:
      raise ValueError("Trainer: logical-axis sharding rules need the model's annotations "
                       "(nn.with_logical_partitioning boxes)")
    else:
      specs = _logical_specs(boxed["params"], s, self.mesh)
    return _checked(specs, abstract_params, self.mesh)

  def init(self, key: Any, *sample_inputs: Any, variables: PyTree | None = None) -> TrainState:
    """The initial :class:`TrainState`, created directly with its shardings.

    Args:
      key: a PRNG key (``jax.random.key(0)``) or an int seed.
      *sample_inputs: model inputs, as for ``model.init`` (only shapes matter). Every
        process passes the same values.
      variables: start from these variables (linen: ``{"params": ..., <collections>}``,
        boxed or not; NNX: ``{"params": nnx pure dict}``) instead of initialising; they
        are copied (never donated) onto the state's shardings.
    """
    if isinstance(key, int):
      key = jax.random.key(key)
    if not jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
      raise TypeError(f"Trainer.init: key must be a typed PRNG key (jax.random.key) or an int, "
                      f"got {key!r}")
    key_np = np.asarray(jax.random.key_data(key))
    inputs = _as_host(sample_inputs)
    self._prune_roles = roles_lib.for_params(self.model, *inputs, **self.eval_kwargs)
    if variables is not None:
      if not isinstance(variables, Mapping) or "params" not in variables:
        raise TypeError("Trainer.init: variables must be a mapping with a 'params' entry, got "
                        f"{type(variables).__name__}")
      variables = _as_host(dict(variables))
    abstract_model, boxed = jax.eval_shape(self._init_model, key_np, variables, *inputs)
    abstract_state = jax.eval_shape(self._init_state, *abstract_model)
    if boxed is None and variables is not None and not self.is_nnx:
      boxed = variables
    param_sh = self._param_shardings(abstract_state.params, boxed)
    self.state_sharding = parallel.like_params(abstract_state, abstract_state.params, param_sh)
    if self.lora is not None:   # the moments follow the adapters' shardings
      self.state_sharding = self.state_sharding.replace(opt_state=parallel.like_params(
          abstract_state.opt_state, lora_lib.adapters(abstract_state.params),
          lora_lib.adapters(param_sh)))
    sh = self.state_sharding
    # Two programs: the model's init (params, with its RNG temporaries), then the optimizer
    # state around the donated params, so the RNG temporaries and the moments never
    # coexist: the peak stays near params + moments.
    with jax.set_mesh(self.mesh):
      if self.is_nnx and variables is None:   # the module holds its values: place them
        model_vars = _as_host(self._init_model(key_np, None, *inputs)[0])
        self._init_jit = None
      else:
        init = jax.jit(lambda k, v, *x: self._init_model(k, v, *x)[0],
                       out_shardings=(sh.params, sh.collections, sh.rng))
        model_vars = init(key_np, variables, *inputs)
        self._init_jit = (init, (key_np, variables, *inputs))
      donate = () if self._init_jit is None else (0, 1)   # host values cannot be donated
      state = jax.jit(self._init_state, out_shardings=sh, donate_argnums=donate)(*model_vars)
    self._step = None
    return state

  def lower_init(self) -> Any:
    """The lowered model init of the last :meth:`init` (linen): its
    ``.compile().as_text()`` shows that every leaf is created at its per-device shape."""
    if getattr(self, "_init_jit", None) is None:
      raise ValueError("Trainer.lower_init: call init() first (linen models)")
    init, args = self._init_jit
    with jax.set_mesh(self.mesh):
      return init.lower(*args)

  # ------------------------------------------------------------------------ step
  def _loss_and_updates(self, params, state: TrainState, batch, rng):
    """``(loss, (aux, collection updates))`` of the user's loss at ``params``."""
    if self.is_nnx:   # every stream the module holds: fresh keys from this step's rng
      module = _nnx_reseed(self._nnx_merge(params, state.collections),
                           jax.random.fold_in(rng, 2))
      module.train()
      loss, aux = _split_loss(self.loss_fn(module, batch, rng))
      return loss, (aux, self._nnx_split(module)[1])

    box: dict[str, Any] = {}
    cols = state.collections

    def apply_fn(variables, *args, **kwargs):
      kwargs = _with_rngs(kwargs, rng)   # every stream; the user's own rngs win
      if "mutable" in kwargs:        # the user manages collections explicitly
        return self._linen_apply(variables, *args, **kwargs)
      mutable = [c for c in variables if c != "params" and c in cols]
      if not mutable:
        return self._linen_apply(variables, *args, **kwargs)
      out, upd = self._linen_apply(variables, *args, mutable=mutable, **kwargs)
      box["updates"] = upd
      return out

    loss, aux = _split_loss(self.loss_fn(apply_fn, {"params": params, **cols}, batch, rng))
    return loss, (aux, dict(box.get("updates", {})))

  def _step_fn(self, state: TrainState, batch):
    key = jax.random.wrap_key_data(state.rng)
    next_key, rng = jax.random.split(key)
    # LoRA: differentiate and update the adapters only; the frozen base is a constant
    train, full = state.params, lambda t: t
    if self.lora is not None:
      train = lora_lib.adapters(state.params)
      full = functools.partial(lora_lib.with_adapters, state.params)
    fn = lambda t: self._loss_and_updates(full(t), state=state, batch=batch, rng=rng)  # noqa: E731
    ls = state.loss_scale
    if ls is None:
      (loss, (aux, upd)), grads = jax.value_and_grad(fn, has_aux=True)(train)
      updates, opt_state = self.tx.update(grads, state.opt_state, train)
      params, new_ls, finite = full(optax.apply_updates(train, updates)), None, None
    else:
      (loss, (aux, upd)), grads = precision_lib.value_and_grad(fn, has_aux=True)(ls, train)
      g = precision_lib.guarded_update(self.tx, grads, state.opt_state, train, ls)
      params, opt_state, new_ls, finite = full(g.params), g.opt_state, g.loss_scale, g.grads_finite
    cols = dict(state.collections)
    for k, v in upd.items():
      if k in cols:
        cols[k] = optax.tree_utils.tree_cast_like(v, cols[k])   # stats keep their dtype
    metrics = {"loss": loss, **aux}
    if finite is not None:
      metrics["grads_finite"] = finite.astype(jnp.float32)
      metrics["loss_scale"] = jnp.asarray(new_ls.loss_scale, jnp.float32)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                        rng=jax.random.key_data(next_key), collections=cols, loss_scale=new_ls)
    return new, metrics

  def place_batch(self, batch: PyTree) -> PyTree:
    """A host batch -> global arrays split over the mesh's batch axes.

    Single process: ``batch`` is the global batch. Several processes: each passes its
    own slice (``jax.make_array_from_process_local_data``). Leaves that already are
    ``jax.Array``s with the batch sharding pass through.
    """
    sh = parallel.batch_sharding(self.mesh)
    leaves = jax.tree.leaves(batch)
    if leaves and all(isinstance(x, jax.Array) and x.sharding == sh for x in leaves):
      return batch
    if jax.process_count() > 1:
      return parallel.process_local_batch_to_global(batch, self.mesh)
    return parallel.shard_batch(batch, self.mesh)

  def step(self, state: TrainState, batch: PyTree) -> tuple[TrainState, dict]:
    """One optimizer step: ``(state, batch) -> (state, metrics)`` (``metrics`` replicated)."""
    return self._compiled_step()(state, self.place_batch(batch))

  def _compiled_step(self) -> Callable:
    if self.state_sharding is None:
      raise ValueError("Trainer: call trainer.init(key, *sample_inputs) first (it creates "
                       "the state and its shardings)")
    if self._step is None:   # state in/out with its shardings (donated), batch split
      self._step = parallel.data_parallel_step(self._step_fn, self.mesh, self.state_sharding,
                                               donate=self.donate)
    return self._step

  @property
  def jitted_step(self) -> Callable:
    """The jitted ``(state, placed batch) -> (state, metrics)``; ``.lower(...)`` for reports
    (call it inside ``jax.set_mesh(trainer.mesh)``)."""
    return self._compiled_step().jitted

  # ----------------------------------------------------------------------- serve
  def serve(self, state: TrainState, calibration_batches: Iterable[Any] = (), *,
            fold_batchnorm: bool = False) -> tuple[Callable, PyTree]:
    """The serving function of a trained state: ``serve_fn(serve_vars, *inputs)``.

    Runs what training simulated: int8 ops (``s8 x s8 -> s32``) with the QAT ranges or,
    for ``quant.mode="ptq"``, ranges calibrated on ``calibration_batches`` (tuples of
    model inputs); otherwise the policy's compute dtype (weights stored in it). Pruned
    weights are already zero in ``state.params``. ``fold_batchnorm`` (linen) folds
    inference-mode BatchNorm into the preceding layer first (needs one calibration
    batch to trace the model).

    Returns:
      ``(serve_fn, serve_vars)``; ``serve_fn`` is jitted and returns ``output_dtype``
      (float32 by default).
    """
    if self.lora is not None:   # adapters folded into the kernels
      state = state.replace(params=lora_lib.merge(state.params))
    if self.is_nnx:
      return self._serve_nnx(state, calibration_batches)
    cols = {k: v for k, v in state.collections.items() if k != QUANT_STATS}
    variables = {"params": state.params, **cols}
    model, kw = self.model, self.eval_kwargs
    calibration_batches = list(calibration_batches)
    if fold_batchnorm and cols.get("batch_stats"):
      if not calibration_batches:
        raise ValueError("Trainer.serve(fold_batchnorm=True) needs one calibration batch to "
                         "trace the model")
      sample = calibration_batches[0]
      folded = fold_lib.batchnorm(jax.device_get(variables), model=model,
                                  sample=sample[0] if isinstance(sample, tuple) else sample,
                                  apply_kwargs=kw)
      variables, model = folded.variables, folded.model
    q = self.quant
    out_dtype = jnp.float32 if self.policy is None else self.policy.output_dtype
    if q.mode == "none":
      fwd = model.apply
      if self.policy is not None:
        fwd = precision_lib.with_policy(model.apply, self.policy)
        variables = self.policy.cast_to_compute(variables)
      fn = jax.jit(lambda v, *x: _cast_floating(_infer(_global_view(fwd), v, *x, **kw),
                                                out_dtype))
      return fn, variables
    if q.mode == "qat":
      stats = state.collections[QUANT_STATS]
    elif q.weight_only:
      stats = None
    else:
      if not calibration_batches:
        raise ValueError("Trainer.serve: quant.mode='ptq' needs calibration_batches (tuples "
                         "of model inputs)")
      stats = quant_lib.calibrate(lambda v, *x: _infer(_global_view(model.apply), v, *x, **kw),
                                  variables,
                                  calibration_batches, method=q.calibration, rules=q.rules,
                                  max_batches=q.calibration_batches)
    qvars = {**variables, "params": quant_lib.quantize_params(variables["params"], q.rules,
                                                              bits=q.bits)}
    if stats is not None:
      qvars[QUANT_STATS] = stats

    def int8(v, *x, **k):
      return quant_lib.int8_apply(_global_view(model.apply), v, None, *x, rules=q.rules,
                                  bits=q.bits, weight_only=q.weight_only, **k)

    def fn(v, *x):
      return _cast_floating(_infer(int8, v, *x, **kw), out_dtype)
    return jax.jit(fn), qvars

  def _serve_nnx(self, state: TrainState, calibration_batches):
    q = self.quant
    out_dtype = jnp.float32 if self.policy is None else self.policy.output_dtype
    if q.mode == "none":
      params = state.params if self.policy is None else self.policy.cast_to_compute(state.params)
      variables = {"params": params, "collections": state.collections}

      def fn(v, *x):
        m = self._nnx_merge(v["params"], v["collections"])
        m.eval()
        return _cast_floating(m(*x), out_dtype)
      return jax.jit(fn), variables
    # int8: the user's module (no QAT hooks) with the trained non-param state
    plain_cols = self._plain_collections(state.collections)
    if q.mode == "qat":
      stats = _nnx_stats(state.collections)
    elif q.weight_only:
      stats = None
    else:
      calib = self._nnx_plain(state.params, plain_cols)
      calib.eval()
      stats = quant_lib.calibrate(lambda m, *x: m(*x), calib, list(calibration_batches),
                                  method=q.calibration, rules=q.rules,
                                  max_batches=q.calibration_batches)
    qvars = {"params": quant_lib.quantize_params(state.params, q.rules, bits=q.bits),
             "collections": plain_cols}
    if stats is not None:
      qvars[QUANT_STATS] = stats

    def fn(v, *x):
      base = self._nnx_plain(quant_lib.dequantize_params(v["params"]), v["collections"])
      base.eval()
      out = quant_lib.int8_apply(base, v["params"], v.get(QUANT_STATS), *x, rules=q.rules,
                                 bits=q.bits, weight_only=q.weight_only)
      return _cast_floating(out, out_dtype)
    return jax.jit(fn), qvars

  def _plain_collections(self, collections: Mapping) -> dict:
    """The part of a QAT state's ``collections`` that the user's own module holds.

    The structure comes from the module itself (``nnx.split(model, nnx.Param, ...)``),
    not from names: the QAT clone adds ``QuantStat`` variables (``quant_input_amax`` for
    a ``kernel``, ``quant_<leaf>_input_amax`` for a param named otherwise, e.g. a bare
    ``self.w = nnx.Param(...)``), which the plain module does not have.
    """
    _, _, rest = nnx.split(self.model, nnx.Param, ...)
    want = traverse_util.flatten_dict(_keys_to_data(nnx.to_pure_dict(rest))[0])
    have = traverse_util.flatten_dict(dict(collections))
    missing = sorted("/".join(map(str, k)) for k in want if k not in have)
    if missing:
      raise ValueError(f"Trainer.serve: state.collections lacks the module's variables "
                       f"{missing[:5]}")
    return traverse_util.unflatten_dict({k: have[k] for k in want})

  def _nnx_plain(self, params: PyTree, collections: PyTree) -> nnx.Module:
    """The user's own module (no QAT hooks) holding ``params`` and ``collections`` (the
    structure of :meth:`_plain_collections`), in the global view."""
    graphdef, p, r = nnx.split(self.model, nnx.Param, ...)
    return _nnx_global_view(_nnx_build(graphdef, p, r, _keys_to_data(nnx.to_pure_dict(r))[1],
                                       params, collections))


def _nnx_build(graphdef, param_template, rest_template, impls, params: PyTree,
               collections: PyTree) -> nnx.Module:
  """A fresh module of ``graphdef`` holding ``params`` and ``collections`` (pure dicts
  replacing the templates' values; the templates are not modified)."""
  p = jax.tree.map(lambda x: x, param_template)
  nnx.replace_by_pure_dict(p, params)
  r = jax.tree.map(lambda x: x, rest_template)
  if collections:
    nnx.replace_by_pure_dict(r, _data_to_keys(collections, impls))
  return nnx.merge(graphdef, p, r)

