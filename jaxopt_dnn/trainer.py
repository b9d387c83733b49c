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

What differs between linen and NNX lives in :mod:`jaxopt_dnn.train_model`
(:class:`~jaxopt_dnn.train_model.LinenTrainModel` /
:class:`~jaxopt_dnn.train_model.NnxTrainModel`, picked once through
:mod:`jaxopt_dnn.model_adapter`); this module never tests the model's kind.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxopt_dnn import _adapter as adapter
from jaxopt_dnn import lora as lora_lib
from jaxopt_dnn import model_adapter
from jaxopt_dnn import parallel
from jaxopt_dnn import precision as precision_lib
from jaxopt_dnn import roles as roles_lib
from jaxopt_dnn.train_model import QUANT_STATS  # noqa: F401  (the collection's name, as before)
from jaxopt_dnn.train_model import LinenTrainModel, NnxTrainModel
from jaxopt_dnn.train_state import (PruneConfig, QuantConfig, TrainState, config_from,
                                    loss_scale_from, policy_from)

if TYPE_CHECKING:
  from flax import nnx

PyTree = Any


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
    if not model_adapter.is_module(model):
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
    self.prune = config_from(prune, PruneConfig, "prune")
    self.quant = config_from(quant, QuantConfig, "quant") or QuantConfig()
    self.policy = policy_from(precision)
    self.loss_scale = loss_scale_from(loss_scale)
    self.eval_kwargs = dict(eval_kwargs or {})
    self.init_kwargs = dict(self.eval_kwargs if init_kwargs is None else init_kwargs)
    self.donate = donate
    self.sharding = self._check_sharding(sharding)
    if mesh is None:
      n = len(jax.devices())
      mesh = (parallel.make_mesh(data=1, fsdp=n) if sharding == "fsdp"
              else parallel.make_mesh(data=n))
    self.mesh = mesh
    nm_roles = (lambda p: self._prune_roles(p)) if self.prune and self.prune.method == "nm" \
        else None   # N:M axes from the traced model
    self.tx = self.prune.optimizer(optimizer, roles=nm_roles) if self.prune else optimizer
    self._qat = self.quant.mode == "qat"
    self.lora = config_from(lora, lora_lib.LoraConfig, "lora")
    if self.lora is not None and (self.prune is not None or self._qat):
      raise ValueError("Trainer: lora= trains adapters on a frozen base; it does not combine "
                       "with prune= or quant.mode='qat'")
    if self.lora is not None and not isinstance(self.sharding, (str, Mapping)):
      raise ValueError("Trainer: lora= supports sharding='data_parallel'|'fsdp'|'replicated' "
                       "or {regex: PartitionSpec} rules, not logical-axis rules")
    # the linen or NNX half of the model handling, chosen once (train_model.py)
    cfg = dict(quant=self.quant, policy=self.policy, lora=self.lora)
    self._model = model_adapter.adapt(model).match(
        linen=functools.partial(LinenTrainModel, **cfg),
        nnx=functools.partial(NnxTrainModel, **cfg))
    self.state_sharding = None
    self._step = None

  @staticmethod
  def _check_sharding(sharding):
    if isinstance(sharding, str):
      if sharding not in parallel.STRATEGIES:
        raise ValueError(f"Trainer: sharding must be one of {parallel.STRATEGIES}, regex rules "
                         f"or logical-axis rules, got {sharding!r}")
      return sharding
    if isinstance(sharding, Mapping) or parallel.is_logical_rules(sharding):
      return sharding
    raise TypeError(f"Trainer: sharding must be a strategy name, a {{regex: PartitionSpec}} "
                    f"dict or logical-axis rules ((name, mesh_axis), ...), got {sharding!r}")

  # ------------------------------------------------------------ model forwards
  @property
  def apply_fn(self) -> Callable:
    """linen: the transformed ``model.apply`` the loss sees (QAT fake-quant, policy).

    ``trainer.apply_fn({"params": state.params, **state.collections}, *inputs,
    **trainer.eval_kwargs)`` is the simulated (fake-quant) inference forward.
    """
    return self._model.apply_fn

  def module(self, state: TrainState, *, train: bool = False) -> nnx.Module:
    """NNX: the transformed module (QAT hooks, policy) holding ``state``'s values."""
    return self._model.module(state, train=train)

  # ------------------------------------------------------------------------ init
  def _init_model(self, key_data, variables, *inputs):
    """Pure model init: ``(raw key, variables or None, inputs) -> ((params, collections,
    rng), boxed variables or None)``.

    ``variables`` (linen ``{"params": ..., "batch_stats": ...}``; NNX ``{"params": ...}``)
    start from given values (e.g. a trained baseline) instead of the initialisers.
    """
    key = jax.random.wrap_key_data(key_data)
    k_params, k_drop, k_state = jax.random.split(key, 3)
    params, cols, boxed = self._model.init_variables(k_params, k_drop, variables, inputs,
                                                     self.init_kwargs)
    if self.policy is not None:
      params = self.policy.cast_to_param(params)
    if self.lora is not None:   # after the cast: a bf16 / quantized base keeps its dtype
      roles = lora_lib.trace_roles(self.model, params, cols, *inputs,   # (no QAT with lora)
                                   **self.init_kwargs)
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
        return parallel.fsdp_shardings(abstract_params, self.mesh)
      return parallel.param_shardings(abstract_params, self.mesh, "replicated")
    if isinstance(s, Mapping):
      return parallel.param_shardings(abstract_params, self.mesh, "replicated", rules=s)
    specs = self._model.logical_specs(boxed, s, self.mesh)
    return parallel.checked_shardings(specs, abstract_params, self.mesh)

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
    inputs = adapter.as_host(sample_inputs)
    self._prune_roles = roles_lib.for_params(self.model, *inputs, **self.eval_kwargs)
    if variables is not None:
      if not isinstance(variables, Mapping) or "params" not in variables:
        raise TypeError("Trainer.init: variables must be a mapping with a 'params' entry, got "
                        f"{type(variables).__name__}")
      variables = adapter.as_host(dict(variables))
    abstract_model, boxed = jax.eval_shape(self._init_model, key_np, variables, *inputs)
    abstract_state = jax.eval_shape(self._init_state, *abstract_model)
    if boxed is None and variables is not None:   # linen: the given variables' boxes
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
      if self._model.holds_values and variables is None:   # NNX: place the module's values
        model_vars = adapter.as_host(self._init_model(key_np, None, *inputs)[0])
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
    out, updates = self._model.loss(self.loss_fn, params, state.collections, batch, rng)
    loss, aux = _split_loss(out)
    return loss, (aux, updates)

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
    return self._model.serve(state, calibration_batches, eval_kwargs=self.eval_kwargs,
                             fold_batchnorm=fold_batchnorm)
