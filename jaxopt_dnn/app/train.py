"""The app's training pieces: a classification loss for the Trainer, evaluation, and
the recipe loop over in-memory ``(x, y)`` data.

The batch of step ``s`` is a pure function of ``(seed, batch_size, s)``
(:func:`jaxopt_dnn.app.data.batch_at`), so a run restored from the checkpoint of step
``k`` replays steps ``k+1..`` on exactly the inputs the uninterrupted run saw and, on
CPU, ends bit-identical to it. The loop itself is :func:`jaxopt_dnn.loop.run`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_dnn import loop
from jaxopt_dnn.app import data as data_lib
from jaxopt_dnn.train_state import TrainState  # noqa: F401  (re-export for app code)

PyTree = Any


def classification_loss(apply_fn: Callable, variables: PyTree, batch: tuple, rng: Any,
                        **kwargs) -> tuple[jax.Array, dict]:
  """Mean softmax cross-entropy over an ``(x, y)`` batch, with accuracy as ``aux``.

  The :class:`~jaxopt_dnn.trainer.Trainer` loss for the zoo's classifiers:
  ``apply_fn(variables, x, train=True)``; ``kwargs`` go to ``apply_fn`` too.
  """
  del rng
  x, y = batch
  logits = apply_fn(variables, x, train=True, **kwargs).astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, {"accuracy": jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32))}


def classifier_eval(apply_fn: Callable, x: np.ndarray, y: np.ndarray, *,
                    batch_size: int = 512) -> Callable[[TrainState], dict]:
  """``eval_fn(state) -> {"loss", "accuracy"}`` over all of ``(x, y)`` in inference mode."""

  @jax.jit
  def sums(params, collections, xb, yb):
    logits = apply_fn({"params": params, **collections}, xb, train=False)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
    return jnp.sum(ce), jnp.sum((jnp.argmax(logits, -1) == yb).astype(jnp.float32))

  def eval_fn(state: TrainState) -> dict:
    tot_l = tot_a = 0.0
    for i in range(0, len(x), batch_size):
      l, a = sums(state.params, state.collections, x[i:i + batch_size], y[i:i + batch_size])
      tot_l += float(l)
      tot_a += float(a)
    return {"loss": tot_l / len(x), "accuracy": tot_a / len(x)}

  return eval_fn


TrainConfig = loop.TrainConfig
FitResult = loop.FitResult


def fit(state: TrainState, train_step: Callable, dataset: data_lib.Dataset | tuple,
        config: TrainConfig, *, eval_fn: Callable[[TrainState], Mapping] | None = None,
        place_batch: Callable[[Any], Any] | None = None, meta: Mapping | None = None,
        console=None) -> FitResult:
  """:func:`jaxopt_dnn.loop.run` over an in-memory ``(x, y)`` dataset.

  The batch of step ``s`` is ``data.batch_at(x, y, config.batch_size, s, config.seed)``
  (this process's slice on multi-host), a pure function of the step: resume is exact.
  ``dataset`` is a :class:`~jaxopt_dnn.app.data.Dataset` (its train split) or ``(x, y)``.
  """
  x, y = (dataset.x_train, dataset.y_train) if hasattr(dataset, "x_train") else dataset
  data_lib.steps_per_epoch(len(x), config.batch_size)  # validates sizes early
  multi = jax.process_count() > 1

  def batch_fn(s):
    batch = data_lib.batch_at(x, y, config.batch_size, s, seed=config.seed)
    return data_lib.process_slice(batch) if multi else batch

  return loop.run(state, train_step, batch_fn, config, eval_fn=eval_fn,
                  place_batch=place_batch, meta=meta, console=console)
