"""Orbax checkpoints of train states and serving variables.

``CheckpointManager`` with a ``state`` item (``StandardSave``: any pytree of arrays,
QArrays and packed leaves included) and a JSON ``meta`` item (the recipe, data order).
Orbax writes each step into ``<step>.orbax-checkpoint-tmp`` and renames it when complete,
so a process killed mid-save leaves the previous checkpoint as the latest restorable one.
Restoring onto another mesh: pass a target whose leaves are ``jax.ShapeDtypeStruct`` with
the new shardings (:func:`abstract_like`). Cloud paths (``gs://...``) are passed through.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxopt_dnn._tree import leaves_with_paths

PyTree = Any


def manager(directory, *, max_to_keep=3, save_every=None, async_save=True):
  directory = os.fspath(directory)
  return ocp.CheckpointManager(
      directory if "://" in directory else os.path.abspath(directory),  # gs://, s3://
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "meta": ocp.JsonCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, save_interval_steps=save_every or 1,
          enable_async_checkpointing=async_save, create=True))


def save_step(mngr, step, state, meta, force=False) -> bool:
  return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 meta=ocp.args.JsonSave(meta)), force=force)


def abstract_like(tree: PyTree, shardings: PyTree | None = None) -> PyTree:
  """``ShapeDtypeStruct`` target for :func:`restore`; ``shardings`` (a matching pytree of
  ``jax.sharding.Sharding``, or one for all leaves) sets where restored arrays land."""
  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        np.shape(a), np.asarray(a).dtype if not hasattr(a, "dtype") else a.dtype,
        sharding=shardings or getattr(a, "sharding", None) or default), tree)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=s),
                      tree, shardings)


def latest_step(directory) -> int | None:
  """The newest complete checkpoint step in ``directory`` (``None`` if none)."""
  if "://" not in os.fspath(directory) and not os.path.isdir(directory):
    return None
  with manager(directory) as mngr:
    return mngr.latest_step()


def _compat_errors(saved_meta, target) -> list[str]:
  saved = {p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in leaves_with_paths(
      saved_meta, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))}
  want = {p: (tuple(np.shape(a)), np.dtype(a.dtype)) for p, a in leaves_with_paths(target)}
  errs = [f"{p}: missing in checkpoint" for p in want if p not in saved]
  errs += [f"{p}: in checkpoint but not in target" for p in saved if p not in want]
  errs += [f"{p}: checkpoint {saved[p][0]} {saved[p][1]} vs target {want[p][0]} {want[p][1]}"
           for p in want if p in saved and saved[p] != want[p]]
  return errs


def restore(directory, target: PyTree | None = None, *, step: int | None = None,
            _mngr=None) -> tuple[PyTree, dict, int]:
  """Restores ``(state, meta, step)`` from a checkpoint directory.

  Args:
    directory: a directory written by :func:`fit` (or :func:`save`).
    target: a pytree like the saved state; arrays or ``jax.ShapeDtypeStruct`` with
      shardings (see :func:`abstract_like`) to restore onto another mesh. ``None``
      restores the saved tree as plain nested dicts.
    step: which step; default the latest complete one.

  Raises:
    FileNotFoundError: no checkpoint in ``directory``.
    ValueError: ``target`` does not match the checkpoint (lists differing paths).
  """
  directory = os.fspath(directory)
  mngr = _mngr or manager(directory)
  try:
    step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
      raise FileNotFoundError(f"no complete checkpoint{'' if step is None else f' for step {step}'}"
                              f" in {directory!r} (steps: {list(mngr.all_steps())})")
    if target is not None:
      saved_meta = mngr.item_metadata(step)["state"]
      errs = _compat_errors(getattr(saved_meta, "tree", saved_meta), target)
      if errs:
        raise ValueError(f"checkpoint {directory!r} step {step} does not match the target state "
                         f"(incompatible model or recipe?): " + "; ".join(errs[:12])
                         + (f"; ... {len(errs) - 12} more" if len(errs) > 12 else ""))
      target = abstract_like(target) if not all(
          isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(target)) else target
    out = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return out["state"], dict(out["meta"] or {}), step
  finally:
    if _mngr is None:
      mngr.close()


def checkpoint_bytes(directory, step: int | None = None) -> int:
  """Bytes on disk of one checkpoint step (default: the latest complete one)."""
  directory = os.fspath(directory)
  step = latest_step(directory) if step is None else step
  root = os.path.join(directory, str(step))
  if step is None or not os.path.isdir(root):
    raise FileNotFoundError(f"no checkpoint for step {step} in {directory!r}")
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


def save(directory, step: int, state: PyTree, meta: Mapping | None = None) -> None:
  """Writes one checkpoint synchronously (same layout as :func:`fit`)."""
  with manager(directory, max_to_keep=None, async_save=False) as mngr:
    save_step(mngr, step, state, dict(meta or {}), force=True)
    mngr.wait_until_finished()
