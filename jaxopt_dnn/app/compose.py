"""From a :class:`~jaxopt_dnn.app.recipe.Recipe` to a :class:`~jaxopt_dnn.trainer.Trainer`.

The app's recipes are one client of the library's Trainer: the recipe names a zoo
model, the loss is the classification cross-entropy (or ``distill.loss`` against a
frozen teacher), the optimizer and its pruning wrapper come from the recipe's sections,
and the Trainer does the rest (QAT, precision policy, loss scaling, sharding, serving).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxopt_dnn import distill as distill_lib
from jaxopt_dnn.app import models as models_lib
from jaxopt_dnn import parallel
from jaxopt_dnn import precision as precision_lib
from jaxopt_dnn import roles as roles_lib
from jaxopt_dnn import sparsity as sparsity_lib
from jaxopt_dnn.app.recipe import OptimizerConfig, PruneConfig, Recipe
from jaxopt_dnn.app import train as train_lib
from jaxopt_dnn.train_state import TrainState
from jaxopt_dnn.trainer import Trainer
from flax import nnx

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
                steps: int, roles: Any = None) -> optax.GradientTransformation:
  """Wraps ``tx`` in :func:`sparsity.prune_optimizer` per ``cfg`` (identity if none);
  ``roles`` (leaf roles or ``params -> roles``) give N:M its contraction axes."""
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
      update_until=end, rules=cfg.rules, distribution=cfg.distribution, n=cfg.n, m=cfg.m,
      roles=roles)


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
    trainer: the :class:`~jaxopt_dnn.trainer.Trainer` of the recipe.
    state: the initial :class:`TrainState`, placed with ``state_sharding``.
    train_step: ``(state, (x, y)) -> (state, {"loss", "accuracy"})``, jitted once.
    place_batch: host batch -> sharded device batch.
    model: the zoo model (linen, or the :class:`~jaxopt_dnn.app.models.NnxModel` face).
  """
  recipe: Recipe
  model: Any
  trainer: Trainer
  state: TrainState
  teacher: tuple | None = None

  @property
  def tx(self) -> optax.GradientTransformation:
    return self.trainer.tx

  @property
  def mesh(self) -> jax.sharding.Mesh:
    return self.trainer.mesh

  @property
  def state_sharding(self) -> PyTree:
    return self.trainer.state_sharding

  @property
  def train_step(self) -> Callable:
    return self.trainer.step

  @property
  def place_batch(self) -> Callable:
    return self.trainer.place_batch

  def serving(self, state: TrainState, calibration_batches: Iterable[Any] = ()) -> Serving:
    """The serving function of a trained state (see :meth:`Trainer.serve`)."""
    batches = [b if isinstance(b, tuple) else (b,) for b in calibration_batches]
    fn, variables = self.trainer.serve(state, batches,
                                       fold_batchnorm=self.recipe.fold_batchnorm)
    return Serving(fn, variables, sparsity_lib.pack_sparse(variables),
                   self.recipe.quant.mode != "none" and not self.recipe.quant.weight_only)


def classification_or_distill_loss(recipe: Recipe, teacher: tuple[Any, PyTree] | None):
  """The recipe's Trainer loss: cross-entropy, or Hinton distillation from ``teacher``."""
  if teacher is None:
    return train_lib.classification_loss
  t_model, t_vars = teacher
  dcfg = recipe.distill

  def loss(apply_fn, variables, batch, rng):
    del rng
    x, y = batch
    logits = apply_fn(variables, x, train=True).astype(jnp.float32)
    t_logits = jax.lax.stop_gradient(t_model.apply(t_vars, x, train=False))
    acc = jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32))
    return distill_lib.loss(logits, t_logits, y, dcfg.temperature, dcfg.alpha), {"accuracy": acc}
  return loss


def logits_loss(loss_fn: Callable) -> Callable:
  """A ``(logits, labels) -> scalar`` loss as a Trainer loss (accuracy as ``aux``)."""
  def loss(apply_fn, variables, batch, rng):
    del rng
    x, y = batch
    logits = apply_fn(variables, x, train=True).astype(jnp.float32)
    acc = jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32))
    return jnp.asarray(loss_fn(logits, y), jnp.float32), {"accuracy": acc}
  return loss


def build(recipe: Recipe, sample_x: Any, *, num_classes: int = 10,
          init_variables: PyTree | None = None, teacher: tuple[Any, PyTree] | None = None,
          mesh: jax.sharding.Mesh | None = None, donate: bool = False,
          loss_fn: Callable | None = None) -> Built:
  """The recipe's :class:`~jaxopt_dnn.trainer.Trainer` and initial state.

  Args:
    recipe: the :class:`Recipe`.
    sample_x: an input batch (shape/dtype) used to initialise the model.
    init_variables: start from these variables (e.g. a trained baseline) instead of a
      fresh init; they are copied onto the mesh, never donated.
    teacher: ``(teacher_model, teacher_variables)`` when ``recipe.distill.teacher`` is set.
    mesh: defaults to ``parallel.make_mesh(recipe.mesh.data, recipe.mesh.fsdp)``.
    loss_fn: ``(logits, labels) -> scalar``, the training loss of a user model
      (default: cross-entropy; distillation recipes keep the distillation loss).
  """
  model = models_lib.get_model(recipe.model, num_classes, **dict(recipe.model_kwargs))
  if recipe.distill.teacher is not None and teacher is None:
    raise ValueError(f"recipe {recipe.name!r} distills from {recipe.distill.teacher!r}: pass "
                     "teacher=(model, variables)")
  if isinstance(model, models_lib.NnxModel):
    module = (model.module(init_variables) if init_variables is not None
              else model.factory(nnx.Rngs(recipe.seed)))
  else:
    module = model
  q = recipe.quant
  quant = None if q.mode == "none" else dict(
      mode=q.mode, bits=q.bits, weight_only=q.weight_only, calibration=q.calibration,
      calibration_batches=q.calibration_batches, estimator=q.estimator)
  loss = (logits_loss(loss_fn) if loss_fn is not None and teacher is None
          else classification_or_distill_loss(recipe, teacher))
  if module is not model:   # NNX: the same loss, with the module as the forward
    linen_style = loss

    def loss(module, batch, rng):
      return linen_style(lambda _, x, train=True: module(x), None, batch, rng)
  eval_kw = {"train": False} if module is model and _takes_train(model) else {}
  prune_roles = (roles_lib.for_params(module, sample_x, **eval_kw)
                 if recipe.prune.method == "nm" else None)
  trainer = Trainer(
      module, loss,
      make_pruner(make_optimizer(recipe.optimizer, recipe.steps), recipe.prune, recipe.steps,
                  prune_roles),
      quant=quant, precision=recipe.precision.policy, loss_scale=make_loss_scale(recipe),
      mesh=mesh or parallel.make_mesh(recipe.mesh.data, recipe.mesh.fsdp),
      sharding=recipe.mesh.strategy, eval_kwargs=None if module is not model else
      ({"train": False} if _takes_train(model) else {}), donate=donate)
  linen_init = None if module is not model else init_variables
  state = trainer.init(jax.random.key(recipe.seed), sample_x, variables=linen_init)
  return Built(recipe, model, trainer, state, teacher)


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
  and the calibrated ``quant_stats`` for int8 recipes. ``storage`` is what is saved to
  disk: ``variables`` with sparse leaves packed (bitmask + kept values,
  :func:`sparsity.pack_sparse`).
  """
  fn: Callable
  variables: PyTree
  storage: PyTree
  int8: bool
