"""From a :class:`~jaxopt_dnn.app.recipe.Recipe` to ONE jitted train step and ONE serving fn.

Nothing here re-implements a transform; it only composes them::

  params ─► [QAT fake-quant: quant.qat] ─► [Policy casts: precision.with_policy] ─► model
  loss = CE  or  distill.loss(student, stop_gradient(teacher))      [loss scale for fp16]
  update = prune_optimizer(optax optimizer)  (masks live in the optimizer state)
  jit with in/out shardings from parallel.make_mesh / state_shardings

Serving: masks are already baked into the params (``prune_optimizer``), BatchNorm is
optionally folded (:mod:`jaxopt_dnn.fold`), weights are quantized to QArrays
(:mod:`jaxopt_dnn.quant`) and run through s8 x s8 -> s32 dots with calibrated
activation scales, or cast to the policy's compute dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from jaxopt_dnn import distill as distill_lib
from jaxopt_dnn import fold as fold_lib
from jaxopt_dnn.app import models as models_lib
from jaxopt_dnn import parallel
from jaxopt_dnn import precision as precision_lib
from jaxopt_dnn import quant as quant_lib
from jaxopt_dnn import sparsity as sparsity_lib
from jaxopt_dnn.app.recipe import OptimizerConfig, PruneConfig, Recipe
from jaxopt_dnn.app.train import TrainState

PyTree = Any
QUANT_STATS = "quant_stats"


def make_optimizer(cfg: OptimizerConfig, steps: int) -> optax.GradientTransformation:
  """The optax optimizer and learning-rate schedule of ``cfg`` for ``steps`` steps."""
  lr, warm = cfg.learning_rate, min(cfg.warmup_steps, max(steps - 1, 0))
  decay_steps = max(steps - warm, 1)
  body = {
      "constant": lambda: optax.constant_schedule(lr),
      "cosine": lambda: optax.cosine_decay_schedule(lr, decay_steps),
      "linear": lambda: optax.linear_schedule(lr, lr * cfg.end_factor, decay_steps),
      "exponential": lambda: optax.exponential_decay(lr, decay_steps, cfg.end_factor),
  }[cfg.schedule]()
  schedule = (optax.join_schedules([optax.linear_schedule(0.0, lr, warm), body], [warm])
              if warm else body)
  if cfg.name == "adam":
    return optax.adam(schedule)
  if cfg.name == "adamw":
    return optax.adamw(schedule, weight_decay=cfg.weight_decay)
  return optax.sgd(schedule, momentum=cfg.momentum)


def make_pruner(tx: optax.GradientTransformation, cfg: PruneConfig,
                steps: int) -> optax.GradientTransformation:
  """Wraps ``tx`` in :func:`sparsity.prune_optimizer` per ``cfg`` (identity if none)."""
  if cfg.method == "none":
    return tx
  begin, end = int(cfg.begin * steps), max(int(cfg.end * steps), int(cfg.begin * steps) + 1)
  if cfg.schedule == "polynomial":
    schedule = sparsity_lib.polynomial_schedule(0.0, cfg.sparsity, begin, end,
                                                frequency=cfg.update_every)
  else:
    schedule = sparsity_lib.constant_schedule(cfg.sparsity, begin)
  return sparsity_lib.prune_optimizer(
      tx, schedule, method=cfg.method, scope=cfg.scope, update_every=cfg.update_every,
      update_until=end, rules=cfg.rules, distribution=cfg.distribution, n=cfg.n, m=cfg.m)


def make_loss_scale(recipe: Recipe):
  kind, s = recipe.precision.loss_scale, recipe.precision.initial_scale
  if kind == "dynamic":
    return precision_lib.DynamicLossScale(jnp.float32(s))
  if kind == "static":
    return precision_lib.StaticLossScale(jnp.float32(s))
  return None


@dataclasses.dataclass
class Built:
  """What :func:`build` returns.

  Attributes:
    state: the initial :class:`TrainState`, placed with ``state_sharding``.
    train_step: ``(state, (x, y)) -> (state, {"loss", "accuracy"})``, jitted once.
    place_batch: host batch -> sharded device batch.
    model: the model (serving runs it unmodified).
    apply_fn: the training-time forward ``apply_fn(variables, x, train=...)``.
  """
  recipe: Recipe
  model: Any
  apply_fn: Callable
  tx: optax.GradientTransformation
  state: TrainState
  state_sharding: PyTree
  mesh: jax.sharding.Mesh
  train_step: Callable
  place_batch: Callable
  teacher: tuple | None = None

  def serving(self, state: TrainState, calibration_batches: Iterable[Any] = ()) -> Serving:
    return serving(self.recipe, self.model, state, calibration_batches)


def build(recipe: Recipe, sample_x: Any, *, num_classes: int = 10,
          init_variables: PyTree | None = None, teacher: tuple[Any, PyTree] | None = None,
          mesh: jax.sharding.Mesh | None = None, donate: bool = False,
          loss_fn: Callable | None = None) -> Built:
  """Composes the recipe's transforms into one train step.

  Args:
    recipe: the :class:`Recipe`.
    sample_x: an input batch (shape/dtype) used to initialise the model.
    init_variables: start from these variables (e.g. a trained baseline) instead of a
      fresh init; they are copied onto the mesh, never donated.
    teacher: ``(teacher_model, teacher_variables)`` when ``recipe.distill.teacher`` is set.
    mesh: defaults to ``parallel.make_mesh(recipe.mesh.data, recipe.mesh.fsdp)``.
    loss_fn: ``(logits, labels) -> scalar``; default softmax cross-entropy with integer
      labels (distillation recipes keep the distillation loss).
  """
  model = models_lib.get_model(recipe.model, num_classes, **dict(recipe.model_kwargs))
  if recipe.distill.teacher is not None and teacher is None:
    raise ValueError(f"recipe {recipe.name!r} distills from {recipe.distill.teacher!r}: pass "
                     "teacher=(model, variables)")
  if init_variables is None:
    init = jax.jit(model.init) if isinstance(model, nn.Module) else model.init  # one compile
    variables = init(jax.random.key(recipe.seed), sample_x)
  else:   # never donated: place() below copies everything through host memory
    variables = init_variables
  variables = dict(variables)
  params = variables.pop("params")
  collections = {k: v for k, v in variables.items() if k != QUANT_STATS}

  apply_fn = model.apply
  if recipe.quant.mode == "qat":
    if isinstance(model, models_lib.NnxModel):
      raise ValueError(f"recipe {recipe.name!r}: quant.mode='qat' through a recipe needs a linen "
                       "model; for NNX use jaxopt_dnn.quant.qat(nnx_module) directly")
    qm = quant_lib.qat(model, bits=recipe.quant.bits, estimator=recipe.quant.estimator)
    apply_fn = qm.apply
    _, stats = qm.apply({"params": params, **collections}, sample_x, mutable=[QUANT_STATS],
                        **({"train": False} if _takes_train(model) else {}))
    collections[QUANT_STATS] = stats[QUANT_STATS]
  policy = precision_lib.Policy.from_string(recipe.precision.policy)
  if not _is_fp32(policy):
    apply_fn = precision_lib.with_policy(apply_fn, policy)

  tx = make_pruner(make_optimizer(recipe.optimizer, recipe.steps), recipe.prune, recipe.steps)
  loss_scale = make_loss_scale(recipe)
  extra = {"collections": collections}
  if loss_scale is not None:
    extra["loss_scale"] = loss_scale
  state = TrainState.create(policy.cast_to_param(params), tx, rng=recipe.seed, extra=extra)

  mesh = mesh or parallel.make_mesh(recipe.mesh.data, recipe.mesh.fsdp)
  state_sharding = parallel.state_shardings(state, state.params, mesh, recipe.mesh.strategy)
  state = place(state, state_sharding)
  dcfg = recipe.distill
  user_loss = loss_fn   # (the step's own loss_fn below is the closure over params)
  teacher_vars = None if teacher is None else teacher[1]

  def step(state: TrainState, batch, teacher_vars):
    x, y = batch
    cols = state.extra["collections"]
    mutable = list(cols)

    def loss_fn(params):
      variables = {"params": params, **cols}
      if mutable:
        logits, upd = apply_fn(variables, x, train=True, mutable=mutable)
      else:
        logits, upd = apply_fn(variables, x, train=True), {}
      logits = logits.astype(jnp.float32)
      if teacher is not None:
        t_logits = jax.lax.stop_gradient(teacher[0].apply(teacher_vars, x, train=False))
        loss = distill_lib.loss(logits, t_logits, y, dcfg.temperature, dcfg.alpha)
      elif user_loss is not None:
        loss = jnp.asarray(user_loss(logits, y), jnp.float32)
      else:
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, (logits, upd)

    ls = state.extra.get("loss_scale")
    if ls is None:
      (loss, (logits, upd)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      new_params, new_ls = optax.apply_updates(state.params, updates), None
    else:
      (loss, (logits, upd)), grads = precision_lib.value_and_grad(loss_fn, has_aux=True)(
          ls, state.params)
      g = precision_lib.guarded_update(tx, grads, state.opt_state, state.params, ls)
      new_params, opt_state, new_ls = g.params, g.opt_state, g.loss_scale
    new_extra = {"collections": {**cols, **upd}}
    if new_ls is not None:
      new_extra["loss_scale"] = new_ls
    acc = jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32))
    rng, _ = jax.random.split(state.rng)
    new_state = state.replace(step=state.step + 1, params=new_params, opt_state=opt_state,
                              rng=rng, extra=new_extra)
    return new_state, {"loss": loss, "accuracy": acc}

  jitted = jax.jit(step, in_shardings=(state_sharding, parallel.batch_sharding(mesh), None),
                   out_shardings=(state_sharding, parallel.replicated(mesh)),
                   donate_argnums=(0,) if donate else ())

  def train_step(state, batch):
    with jax.set_mesh(mesh):
      return jitted(state, batch, teacher_vars)

  def place_batch(batch):
    if jax.process_count() > 1:
      return parallel.process_local_batch_to_global(batch, mesh)
    return parallel.shard_batch(batch, mesh)

  return Built(recipe, model, apply_fn, tx, state, state_sharding, mesh, train_step,
               place_batch, teacher)


def place(tree: PyTree, shardings: PyTree) -> PyTree:
  """Puts a host-identical pytree onto (possibly multi-process) shardings.

  Leaves go through host memory (``np.asarray``): ``device_put`` of an array committed
  to one local device onto a sharding spanning other processes' devices is an error,
  while the same host values, identical in every process, are accepted. Typed PRNG keys
  are placed as raw key data and re-wrapped.
  """
  def put(x, sharding):
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
      raw = jax.device_put(np.asarray(jax.random.key_data(x)), sharding)
      return jax.random.wrap_key_data(raw, impl=jax.random.key_impl(x))
    return jax.device_put(np.asarray(x), sharding)
  return jax.tree.map(put, tree, shardings)


def _is_fp32(policy: precision_lib.Policy) -> bool:
  return all(d == jnp.float32 for d in (policy.param_dtype, policy.compute_dtype,
                                        policy.output_dtype))


def _takes_train(model) -> bool:
  """Whether the model's forward takes ``train=`` (linen ``__call__`` or a wrapper's ``apply``)."""
  import inspect
  fn = getattr(type(model), "__call__", None) or getattr(model, "apply", None)
  try:
    return fn is not None and "train" in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


@dataclasses.dataclass
class Serving:
  """A serving function and the variables it runs on.

  ``fn(variables, x) -> logits`` (float32), jitted; ``variables`` hold QArray leaves
  and the calibrated ``quant_stats`` for int8 recipes. ``storage`` is what is saved to disk: ``variables`` with sparse
  leaves packed (bitmask + kept values, :func:`sparsity.pack_sparse`).
  """
  fn: Callable
  variables: PyTree
  storage: PyTree
  int8: bool


def serving(recipe: Recipe, model: Any, state: TrainState,
            calibration_batches: Iterable[Any] = ()) -> Serving:
  """Builds the serving function of a trained state (see module docstring)."""
  cols = {k: v for k, v in state.extra["collections"].items() if k != QUANT_STATS}
  variables = jax.device_get({"params": state.params, **cols})
  kwargs = {"train": False} if _takes_train(model) else {}
  if recipe.fold_batchnorm and cols.get("batch_stats"):
    sample = next(iter(calibration_batches), None)
    folded = fold_lib.batchnorm(variables, model=model, sample=sample, apply_kwargs=kwargs)
    variables, model = folded.variables, folded.model
  policy = precision_lib.Policy.from_string(recipe.precision.policy)
  q = recipe.quant
  if q.mode == "none":
    if _is_fp32(policy):
      fwd = model.apply
    else:   # serve (and store) the weights in the compute dtype; norms stay float32
      fwd = precision_lib.with_policy(model.apply, policy)
      variables = policy.cast_to_compute(variables)
    fn = jax.jit(lambda v, x: fwd(v, x, **kwargs).astype(jnp.float32))
    return Serving(fn, variables, sparsity_lib.pack_sparse(variables), False)
  # NNX models (behind models.NnxModel) are quantized as NNX modules: the hooks see
  # nnx.Linear / nnx.Conv, and their kernel paths are relative to the params.
  nnx_module = model.module(variables) if isinstance(model, models_lib.NnxModel) else None
  if q.mode == "qat":
    stats = state.extra["collections"][QUANT_STATS]
  elif q.weight_only:
    stats = None
  elif nnx_module is not None:
    stats = quant_lib.calibrate(lambda m, x: m(x), nnx_module, calibration_batches,
                                method=q.calibration, max_batches=q.calibration_batches)
  else:
    stats = quant_lib.calibrate(lambda v, x: model.apply(v, x, **kwargs), variables,
                                calibration_batches, method=q.calibration,
                                max_batches=q.calibration_batches)
  qvars = {**variables, "params": quant_lib.quantize_params(variables["params"], bits=q.bits)}
  if stats is not None:
    qvars[QUANT_STATS] = stats   # saved with the weights: the int8 path needs both

  def fn(v, x):
    if nnx_module is not None:
      out = quant_lib.int8_apply(nnx_module, v["params"], v.get(QUANT_STATS), x, bits=q.bits,
                                 weight_only=q.weight_only)
    else:
      out = quant_lib.int8_apply(model, v, None, x, bits=q.bits, weight_only=q.weight_only,
                                 **kwargs)
    return out.astype(jnp.float32)

  return Serving(jax.jit(fn), qvars, sparsity_lib.pack_sparse(qvars), not q.weight_only)
