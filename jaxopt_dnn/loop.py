"""The training loop: steps, metrics, orbax checkpoints, exact resume, progress.

The loop owns no model logic. :func:`fit` runs a :class:`~jaxopt_dnn.trainer.Trainer`
over any iterable of batch pytrees; :func:`run` is the same loop over any
``train_step(state, batch) -> (state, metrics)`` and a batch source.

Exact resume: the state is a plain pytree and a checkpoint is written every
``save_every`` steps. A restored run of step ``k`` continues with the batch of step
``k``: a callable source (``step -> batch``) is asked for it directly; an iterable is
advanced past the ``k`` batches the interrupted run consumed. With a deterministic
source the resumed run ends bit-identical (on CPU) to an uninterrupted one.

Checkpoints (:mod:`jaxopt_dnn.checkpoint`): orbax ``CheckpointManager`` (keep
``max_to_keep``, async writes); a process killed mid-save leaves the previous checkpoint
restorable. Ctrl-C (``KeyboardInterrupt``) saves the current state, waits for the
write, and re-raises. Typed PRNG keys anywhere in the state (the pruning key in
``opt_state``) are saved as their key data and restored as keys of the state's own
implementation, so every Trainer option (prune, QAT, bf16, fp16 loss scaling, FSDP)
resumes exactly.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxopt_dnn import checkpoint

PyTree = Any


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Loop settings.

  Attributes:
    steps: total optimizer steps (a resumed run stops at the same total).
    batch_size: global batch size (``None``: not fixed; recorded with checkpoints so a
      resume with another batch size, which would change the data order, is refused).
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
  batch_size: int | None = 64
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
      if v is None and name == "batch_size":
        continue
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"TrainConfig.{name} must be a positive int, got {v!r}")
    if not isinstance(self.eval_every, int) or self.eval_every < 0:
      raise ValueError(f"TrainConfig.eval_every must be an int >= 0, got {self.eval_every!r}")


class FitResult(NamedTuple):
  state: PyTree
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


def run(state: PyTree, train_step: Callable, batch_fn: Callable[[int], Any],
        config: TrainConfig, *, eval_fn: Callable[[PyTree], Mapping] | None = None,
        place_batch: Callable[[Any], Any] | None = None, meta: Mapping | None = None,
        console=None) -> FitResult:
  """Runs ``config.steps`` steps of ``train_step`` (resuming from a checkpoint if any).

  Args:
    state: the initial state (a pytree with an int ``step``; also the restore target:
      its shapes, dtypes and shardings are where a checkpoint is restored to).
    train_step: ``(state, batch) -> (state, metrics)``; must advance ``state.step``
      by one. Called as-is (jit it yourself; donation is fine).
    batch_fn: ``step -> batch`` for this process (its slice on multi-host); raises
      ``StopIteration`` when the data ends.
    config: :class:`TrainConfig`.
    eval_fn: ``state -> {name: float}``, run every ``eval_every`` steps and at the end.
    place_batch: maps the host batch to device arrays; default: as-is.
    meta: JSON-able dict saved with every checkpoint; on resume the saved
      ``batch_size``/``seed`` must match ``config``.
    console: a ``rich.console.Console`` for the progress bar (tests).

  Returns:
    :class:`FitResult`; ``history`` holds the records written to ``metrics_path``.

  Raises:
    KeyboardInterrupt: after saving a checkpoint of the last completed step.
  """
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

  examples = 0
  pending: list[Mapping] = []
  t0 = t_last = time.perf_counter()
  first_step_s = 0.0
  t_first_done = t0
  done = start
  try:
    for s in range(start, config.steps):
      try:
        batch = batch_fn(s)
      except StopIteration:
        warnings.warn(f"the batches ran out after {s - start} steps (at step {s}, "
                      f"steps={config.steps}): stopping early", stacklevel=2)
        break
      n_examples = _batch_examples(batch) * jax.process_count()
      if place_batch is not None:
        batch = place_batch(batch)
      state, metrics = train_step(state, batch)
      pending.append(metrics)
      examples += n_examples
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
        rec["examples_per_s"] = examples / max(now - t_last, 1e-9)
        rec["time_s"] = now - t0
        emit(rec)
        bar.update(done, _fmt(rec))
        pending, t_last, examples = [], now, 0
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


def _batch_examples(batch: Any) -> int:
  """Leading size of the batch's first leaf (0 for a batch without array leaves)."""
  leaves = jax.tree.leaves(batch)
  return int(np.shape(leaves[0])[0]) if leaves and np.ndim(leaves[0]) else 0


def batch_source(batches: Iterable[Any] | Callable[[int], Any]) -> Callable[[int], Any]:
  """``step -> batch`` from an iterable (read in order) or a callable (random access).

  An iterable can only be read forward: asking for step ``k`` first (a resumed run)
  consumes and drops its first ``k`` batches, so a deterministic iterable replays
  exactly the batches an uninterrupted run would have seen.
  """
  if callable(batches) and not hasattr(batches, "__iter__"):
    return batches
  if not hasattr(batches, "__iter__"):
    raise TypeError(f"batches must be an iterable of batch pytrees or a callable step -> "
                    f"batch, got {type(batches).__name__}")
  it = iter(batches)
  pos = [0]

  def at(step: int):
    if step < pos[0]:
      raise ValueError(f"an iterable of batches cannot go back to step {step} (at {pos[0]})")
    if step > pos[0]:
      next(itertools.islice(it, step - pos[0] - 1, None), None)   # drop the skipped ones
      pos[0] = step
    batch = next(it)     # StopIteration ends the run
    pos[0] += 1
    return batch
  return at


def fit(trainer: Any, state: PyTree, batches: Iterable[Any] | Callable[[int], Any], *,
        steps: int, checkpoint_dir: str | None = None, eval_fn: Callable | None = None,
        eval_every: int = 0, log_every: int = 50, save_every: int = 100, max_to_keep: int = 3,
        resume: bool = True, metrics_path: str | None = None, progress: bool | None = None,
        meta: Mapping | None = None, seed: int | None = None,
        batch_size: int | None = None, return_result: bool = False) -> Any:
  """Trains ``state`` with ``trainer.step`` for ``steps`` steps over ``batches``.

  Args:
    trainer: a :class:`~jaxopt_dnn.trainer.Trainer` (its ``step`` places each batch:
      single process, the global batch; several processes, each its own slice, made
      global with ``jax.make_array_from_process_local_data``).
    state: from ``trainer.init`` (also the restore target).
    batches: any iterable of batch pytrees, or a callable ``step -> batch``.
    steps: total steps (a resumed run stops at the same total).
    checkpoint_dir: orbax directory; with ``resume`` the run continues from its newest
      checkpoint.
    eval_fn, eval_every, log_every, save_every, max_to_keep, metrics_path, progress:
      see :class:`TrainConfig`.
    meta: JSON-able dict saved with every checkpoint.
    seed, batch_size: recorded with checkpoints; a resume with other values is refused.
    return_result: return the :class:`FitResult` (history, timings) instead of the state.

  Returns:
    The final state (or the :class:`FitResult`).
  """
  if not (hasattr(trainer, "step") and callable(trainer.step)):
    raise TypeError(f"fit: trainer must be a jaxopt_dnn.Trainer, got {type(trainer).__name__}")
  config = TrainConfig(steps=steps, batch_size=batch_size, seed=0 if seed is None else seed,
                       log_every=log_every, eval_every=eval_every,
                       checkpoint_dir=None if checkpoint_dir is None else os.fspath(checkpoint_dir),
                       save_every=save_every, max_to_keep=max_to_keep, resume=resume,
                       progress=progress, metrics_path=metrics_path)
  result = run(state, trainer.step, batch_source(batches), config, eval_fn=eval_fn, meta=meta)
  return result if return_result else result.state
