"""The training loop: steps, eval, metrics, orbax checkpoints, exact resume, progress.

The loop owns no model logic. It calls a user ``train_step(state, batch) -> (state,
metrics)`` (typically one ``jax.jit``-ed function built by :mod:`jaxopt_dnn.app.recipe` or
:func:`classifier_step`) and an optional ``eval_fn(state) -> {name: float}``.

Exact resume: the state is a plain pytree (:class:`TrainState`: step, params,
opt_state, rng, extra collections) and the batch of step ``s`` is a pure function of
``(seed, batch_size, s)`` (:func:`jaxopt_dnn.app.data.batch_at`). A run restored from the
checkpoint of step ``k`` therefore replays steps ``k+1..`` on exactly the inputs the
uninterrupted run saw, and on CPU ends bit-identical to it.

Checkpoints (:mod:`jaxopt_dnn.checkpoint`): orbax ``CheckpointManager`` (save every
``save_every`` steps, keep ``max_to_keep``, async writes); a process killed mid-save
leaves the previous checkpoint restorable. Ctrl-C (``KeyboardInterrupt``) saves the
current state, waits for the write, and re-raises.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_dnn import checkpoint
from jaxopt_dnn.app import data as data_lib

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; an ordinary pytree (checkpointable, shardable).

  Attributes:
    step: int32 scalar, number of completed optimizer steps.
    params: model parameters (any pytree: masks, QArrays, ... pass through).
    opt_state: optax state (pruning masks, loss scales live here).
    rng: raw ``uint32[2]`` PRNG key data (``jax.random.key_data``), split by the step.
    extra: other model collections, e.g. ``{"batch_stats": ...}``.
  """
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  rng: jax.Array
  extra: PyTree = flax.struct.field(default_factory=dict)

  @classmethod
  def create(cls, params: PyTree, tx: optax.GradientTransformation, *, rng: Any = 0,
             extra: PyTree | None = None) -> TrainState:
    """``step=0``, ``opt_state=tx.init(params)``; ``rng`` an int seed or a key."""
    if isinstance(rng, int):
      rng = jax.random.key(rng)
    if jnp.issubdtype(jnp.asarray(rng).dtype, jax.dtypes.prng_key):
      rng = jax.random.key_data(rng)
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               rng=jnp.asarray(rng, jnp.uint32), extra={} if extra is None else extra)

  def apply_gradients(self, grads: PyTree, tx: optax.GradientTransformation,
                      **changes) -> TrainState:
    """One optax update; ``step += 1``; other fields replaced by ``changes``."""
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state, **changes)


def classifier_step(apply_fn: Callable, tx: optax.GradientTransformation, *,
                    jit: bool = True, donate: bool = False) -> Callable:
  """A standard softmax-cross-entropy train step over ``(x, y)`` batches.

  ``apply_fn(variables, x, train=True, mutable=[...])`` as in linen; a
  ``batch_stats`` collection in ``state.extra`` is updated. ``state.rng`` is split
  every step (the sub-key is passed as the ``dropout`` rng only if the model asks).

  Args:
    donate: donate the input state's buffers (saves memory; the state passed to
      :func:`fit` is then consumed by its first step).

  Returns:
    ``train_step(state, (x, y)) -> (state, {"loss", "accuracy"})``.
  """

  def step(state: TrainState, batch):
    x, y = batch
    rng, _ = jax.random.split(state.rng)
    mutable = [k for k in state.extra]

    def loss_fn(params):
      variables = {"params": params, **state.extra}
      if mutable:
        logits, upd = apply_fn(variables, x, train=True, mutable=mutable)
      else:
        logits, upd = apply_fn(variables, x, train=True), {}
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, (logits, upd)

    (loss, (logits, upd)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    acc = jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32))
    state = state.apply_gradients(grads, tx, rng=rng, extra={**state.extra, **upd})
    return state, {"loss": loss, "accuracy": acc}

  if not jit:
    return step
  return jax.jit(step, donate_argnums=0 if donate else ())


def classifier_eval(apply_fn: Callable, x: np.ndarray, y: np.ndarray, *,
                    batch_size: int = 512) -> Callable[[TrainState], dict]:
  """``eval_fn(state) -> {"loss", "accuracy"}`` over all of ``(x, y)`` in inference mode."""

  @jax.jit
  def sums(params, extra, xb, yb):
    logits = apply_fn({"params": params, **extra}, xb, train=False)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
    return jnp.sum(ce), jnp.sum((jnp.argmax(logits, -1) == yb).astype(jnp.float32))

  def eval_fn(state: TrainState) -> dict:
    tot_l = tot_a = 0.0
    for i in range(0, len(x), batch_size):
      l, a = sums(state.params, state.extra, x[i:i + batch_size], y[i:i + batch_size])
      tot_l += float(l)
      tot_a += float(a)
    return {"loss": tot_l / len(x), "accuracy": tot_a / len(x)}

  return eval_fn


# ------------------------------------------------------------------------ loop


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Loop settings.

  Attributes:
    steps: total optimizer steps (a resumed run stops at the same total).
    batch_size: global batch size (each process loads its slice).
    seed: data-order seed (batch of step ``s`` = ``data.batch_at(..., s, seed)``).
    log_every: train metrics are averaged over the steps since the last record and
      logged every this many steps, at step 1 and at the last step. (A resumed run
      logs the same records as an uninterrupted one when it resumes at a multiple
      of ``log_every``.)
    eval_every: run ``eval_fn`` every this many steps; 0: only at the end.
    checkpoint_dir: orbax directory; ``None`` disables checkpoints and resume.
    save_every / max_to_keep / async_checkpoints: ``CheckpointManager`` options.
    resume: continue from the latest checkpoint in ``checkpoint_dir``.
    progress: rich progress bar; ``None``: only when stderr is a terminal.
    metrics_path: JSONL file, one record per log/eval line.
  """
  steps: int
  batch_size: int = 64
  seed: int = 0
  log_every: int = 50
  eval_every: int = 0
  checkpoint_dir: str | None = None
  save_every: int = 100
  max_to_keep: int = 3
  async_checkpoints: bool = True
  resume: bool = True
  progress: bool | None = None
  metrics_path: str | None = None

  def __post_init__(self):
    for name in ("steps", "batch_size", "log_every", "save_every", "max_to_keep"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"TrainConfig.{name} must be a positive int, got {v!r}")
    if not isinstance(self.eval_every, int) or self.eval_every < 0:
      raise ValueError(f"TrainConfig.eval_every must be an int >= 0, got {self.eval_every!r}")


class FitResult(NamedTuple):
  state: TrainState
  history: list[dict]
  resumed_from: int | None
  wall_time_s: float
  first_step_s: float
  step_time_s: float


class _Progress:
  """A rich progress bar with loss / accuracy / throughput, or nothing."""

  def __init__(self, enabled: bool | None, total: int, start: int, console=None):
    self.bar = None
    if enabled is False:
      return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeRemainingColumn)
    console = console or Console(stderr=True)
    if enabled is None and not console.is_terminal:
      return
    self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                        console=console, transient=False)
    self.task = self.bar.add_task("train", total=total, completed=start, info="")
    self.bar.start()

  def update(self, step, info=None):
    if self.bar is not None:
      kw = {"info": info} if info is not None else {}
      self.bar.update(self.task, completed=step, **kw)

  def close(self):
    if self.bar is not None:
      self.bar.stop()


def _fmt(rec: Mapping) -> str:
  parts = [f"{k}={v:.4g}" for k, v in rec.items() if k in ("loss", "accuracy")]
  if "examples_per_s" in rec:
    parts.append(f"{rec['examples_per_s']:.0f} ex/s")
  return " ".join(parts)


def _truncate_jsonl(path: str, last_step: int) -> None:
  """Drops records logged after ``last_step`` (they will be replayed)."""
  if not os.path.exists(path):
    return
  keep = [rec for rec in checkpoint.read_jsonl(path) if rec.get("step", 0) <= last_step]
  with open(path, "w") as f:
    f.writelines(json.dumps(rec) + "\n" for rec in keep)


def fit(state: TrainState, train_step: Callable, dataset: data_lib.Dataset | tuple,
        config: TrainConfig, *, eval_fn: Callable[[TrainState], Mapping] | None = None,
        place_batch: Callable[[Any], Any] | None = None, meta: Mapping | None = None,
        console=None) -> FitResult:
  """Runs ``config.steps`` steps of ``train_step`` (resuming from a checkpoint if any).

  Args:
    state: the initial :class:`TrainState` (also the restore target: its shapes,
      dtypes and shardings are where a checkpoint is restored to).
    train_step: ``(state, (x, y)) -> (state, metrics)``; must advance ``state.step``
      by one. Called as-is (jit it yourself; donation is fine).
    dataset: a :class:`~jaxopt_dnn.app.data.Dataset` (its train split) or ``(x, y)``.
    config: :class:`TrainConfig`.
    eval_fn: ``state -> {name: float}``, run every ``eval_every`` steps and at the end.
    place_batch: maps the host batch (this process's slice) to device arrays, e.g.
      a sharded ``jax.make_array_from_process_local_data``; default: as-is.
    meta: JSON-able dict saved with every checkpoint (e.g. the recipe); on resume the
      saved ``batch_size``/``seed`` must match ``config``.
    console: a ``rich.console.Console`` for the progress bar (tests).

  Returns:
    :class:`FitResult`; ``history`` holds the records written to ``metrics_path``.

  Raises:
    KeyboardInterrupt: after saving a checkpoint of the last completed step.
  """
  x, y = (dataset.x_train, dataset.y_train) if hasattr(dataset, "x_train") else dataset
  data_lib.steps_per_epoch(len(x), config.batch_size)  # validates sizes early
  meta = {"batch_size": config.batch_size, "seed": config.seed, **dict(meta or {})}
  mngr = None
  resumed_from = None
  history: list[dict] = []
  if config.checkpoint_dir is not None:
    mngr = checkpoint.manager(config.checkpoint_dir, max_to_keep=config.max_to_keep,
                    save_every=config.save_every, async_save=config.async_checkpoints)
    restored = None
    if config.resume and mngr.latest_step() is not None:
      # The newest step that reads back intact; damaged newer ones are reported, moved aside.
      restored = checkpoint.restore_latest_intact(config.checkpoint_dir, state, mngr=mngr,
                                                  quarantine=True)
    if restored is not None:
      state, saved_meta, resumed_from = restored
      for k in ("batch_size", "seed"):
        if saved_meta.get(k, meta[k]) != meta[k]:
          mngr.close()
          raise ValueError(f"cannot resume from {config.checkpoint_dir!r}: it was written with "
                           f"{k}={saved_meta[k]!r}, this run has {k}={meta[k]!r} (the data "
                           "order would differ; use a fresh checkpoint_dir or resume=False)")
      if config.metrics_path:
        _truncate_jsonl(config.metrics_path, resumed_from)
    elif config.resume and config.metrics_path and mngr.latest_step() is None \
        and os.path.exists(config.metrics_path):
      _truncate_jsonl(config.metrics_path, 0)   # every step was damaged: all are replayed
  start = int(state.step)
  bar = _Progress(config.progress, config.steps, start, console)
  log = open(config.metrics_path, "a") if config.metrics_path else None

  def emit(rec):
    history.append(rec)
    if log is not None:
      log.write(json.dumps(rec) + "\n")
      log.flush()

  multi = jax.process_count() > 1
  pending: list[Mapping] = []
  t0 = t_last = time.perf_counter()
  first_step_s = 0.0
  t_first_done = t0
  last_log = start
  done = start
  try:
    for s in range(start, config.steps):
      batch = data_lib.batch_at(x, y, config.batch_size, s, seed=config.seed)
      if multi:
        batch = data_lib.process_slice(batch)
      if place_batch is not None:
        batch = place_batch(batch)
      state, metrics = train_step(state, batch)
      pending.append(metrics)
      done = s + 1
      if s == start:
        if int(state.step) != done:
          raise ValueError(f"train_step must advance state.step by one: expected {done}, "
                           f"got {int(state.step)}")
        t_first_done = time.perf_counter()
        first_step_s = t_first_done - t0
      if done % config.log_every == 0 or done == config.steps or done == 1:
        vals = jax.device_get(pending)
        now = time.perf_counter()
        rec = {"step": done, "split": "train"}
        for k in vals[0]:
          rec[k] = float(np.mean([v[k] for v in vals]))
        rec["examples_per_s"] = config.batch_size * (done - last_log) / max(now - t_last, 1e-9)
        rec["time_s"] = now - t0
        emit(rec)
        bar.update(done, _fmt(rec))
        pending, t_last, last_log = [], now, done
      else:
        bar.update(done)
      if eval_fn is not None and config.eval_every and done % config.eval_every == 0 \
          and done != config.steps:
        emit({"step": done, "split": "eval", **{k: float(v) for k, v in eval_fn(state).items()}})
      if mngr is not None:
        checkpoint.save_step(mngr, done, state, {**meta, "step": done})
    jax.block_until_ready(state)
    t_end = time.perf_counter()
    if eval_fn is not None:
      emit({"step": done, "split": "eval", **{k: float(v) for k, v in eval_fn(state).items()}})
    if mngr is not None:
      mngr.wait_until_finished()
      if done > 0 and done not in mngr.all_steps():
        checkpoint.save_step(mngr, done, state, {**meta, "step": done}, force=True)
  except KeyboardInterrupt:
    alive = not any(getattr(a, "is_deleted", lambda: False)() for a in jax.tree.leaves(state))
    if mngr is not None and alive and int(state.step) > start:
      mngr.wait_until_finished()
      if int(state.step) not in mngr.all_steps():
        checkpoint.save_step(mngr, int(state.step), state, {**meta, "step": int(state.step)}, force=True)
      print(f"interrupted: checkpoint of step {int(state.step)} in {config.checkpoint_dir}",
            file=sys.stderr)
    raise
  finally:
    bar.close()
    if log is not None:
      log.close()
    if mngr is not None:
      mngr.wait_until_finished()
      if sys.exc_info()[0] is not None:
        mngr.close()

  mngr is not None and mngr.close()
  n = done - start
  step_time = (t_end - t_first_done) / (n - 1) if n > 1 else first_step_s
  return FitResult(state, history, resumed_from, t_end - t0, first_step_s, step_time)
