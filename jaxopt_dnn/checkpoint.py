"""Orbax checkpoints of train states and serving variables.

``CheckpointManager`` with a ``state`` item (``StandardSave``: any pytree of arrays,
QArrays and packed leaves included) and a JSON ``meta`` item (the recipe, data order).
Orbax writes each step into ``<step>.orbax-checkpoint-tmp`` and renames it when complete,
so a process killed mid-save leaves the previous checkpoint as the latest restorable one.
Restoring onto another mesh: pass a target whose leaves are ``jax.ShapeDtypeStruct`` with
the new shardings (:func:`abstract_like`). Cloud paths (``gs://...``) are passed through.

Integrity. :func:`save_step` also writes ``<directory>/checksums/<step>.json``: the
sha256 of every saved array's host bytes (with its shape and dtype) and of the metadata,
written (atomically, by process 0) before the orbax save of that step starts, so every
finalized step has one. :func:`restore` verifies the restored arrays and metadata
against it, and turns any failure to read a step (truncated or overwritten data files,
deleted manifests, garbage metadata, a missing item, a junk step directory) into one
:class:`CheckpointCorruptedError` line naming the step. :func:`restore_latest_intact`
walks the steps newest to oldest, warns about each damaged one (one line) and returns
the newest intact step; ``train.fit`` resume calls it. A step without a checksum file
(written by an older version) is restored unverified, with a warning.

Multi-process: a leaf is checksummed only where process 0 can read all of it (fully
addressable, or fully replicated: a local replica is hashed); leaves sharded across
processes are covered by orbax/tensorstore's own reads only. On restore, each process
verifies the leaves it can read whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

from jaxopt_dnn._tree import leaves_with_paths

PyTree = Any


CHECKSUMS = "checksums"   # <directory>/checksums/<step>.json


class CheckpointCorruptedError(ValueError):
  """A checkpoint step that cannot be read back intact (``directory``, ``step``, ``reason``)."""

  def __init__(self, directory, step, reason: str):
    self.directory, self.step, self.reason = os.fspath(directory), step, reason
    super().__init__(f"checkpoint {self.directory!r} step {step} is corrupted: {reason}")


def _one_line(e: BaseException, limit: int = 240) -> str:
  text = " ".join(str(e).split()) or "(no message)"
  text = f"{type(e).__name__}: {text}"
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_no_symlinked_steps(directory: str) -> None:
  """Orbax deletes old steps with rmtree, which fails mid-training on a symlink."""
  if "://" in directory or not os.path.isdir(directory):
    return
  for name in os.listdir(directory):
    full = os.path.join(directory, name)
    if name.split(".")[0].isdigit() and os.path.islink(full):
      raise ValueError(f"checkpoint directory {directory!r}: step {name} is a symbolic link (to "
                       f"{os.readlink(full)!r}); checkpoint steps must be real directories "
                       "(replace the link by a copy, or remove it)")


def manager(directory, *, max_to_keep=3, save_every=None, async_save=True):
  directory = os.fspath(directory)
  _check_no_symlinked_steps(directory)
  return ocp.CheckpointManager(
      directory if "://" in directory else os.path.abspath(directory),  # gs://, s3://
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "meta": ocp.JsonCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, save_interval_steps=save_every or 1,
          enable_async_checkpointing=async_save, create=True))


def _is_key(x) -> bool:
  return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def unwrap_keys(tree: PyTree) -> PyTree:
  """``tree`` with every typed PRNG key leaf replaced by its raw key data.

  Arrays go through ``optax.tree_utils.tree_unwrap_random_key_data``; an abstract key
  leaf (``jax.ShapeDtypeStruct`` of a key dtype) becomes the ``ShapeDtypeStruct`` of its
  data (``shape + impl_shape``, ``uint32``, the same sharding: the trailing key-data
  axes are unsharded).
  """
  def abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct) and _is_key(x):
      data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
      return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)
    return x
  return jax.tree.map(abstract, optax.tree_utils.tree_unwrap_random_key_data(tree))


def _key_impl(x):
  """The PRNG implementation of a key array or of an abstract key leaf."""
  if isinstance(x, jax.ShapeDtypeStruct):
    out = []
    jax.eval_shape(lambda k: (out.append(jax.random.key_impl(k)), k)[1],
                   jax.ShapeDtypeStruct(x.shape, x.dtype))
    return out[0]
  return jax.random.key_impl(x)


def _rewrap_keys(restored: PyTree, target: PyTree) -> PyTree:
  """Wraps the key data of ``restored`` back into typed keys where ``target`` has keys.

  (A step written before keys were unwrapped on save holds orbax's own key record: orbax
  restores those leaves as typed keys already.)
  """
  def wrap(t, r):
    return jax.random.wrap_key_data(r, impl=_key_impl(t)) if _is_key(t) and not _is_key(r) \
        else r
  return jax.tree.map(wrap, target, restored)


def save_step(mngr, step, state, meta, force=False) -> bool:
  """Saves one step (async if the manager is) after writing its checksum file.

  Typed PRNG keys are saved as their key data (:func:`unwrap_keys`).
  """
  if not force and not mngr.should_save(step):
    return False
  state = unwrap_keys(state)
  if step not in mngr.all_steps():
    write_checksums(mngr.directory, step, state, meta)
  return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 meta=ocp.args.JsonSave(meta)), force=force)


# ------------------------------------------------------------------------ integrity


def _host_value(x) -> np.ndarray | None:
  """All of a leaf's values on this host, or ``None`` where this process cannot see them."""
  if isinstance(x, jax.Array):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if not x.is_fully_addressable:
      if not x.sharding.is_fully_replicated:
        return None
      x = x.addressable_data(0)
  return np.asarray(jax.device_get(x))


def _digest(a: np.ndarray) -> str:
  h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
  h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def _meta_digest(meta: Mapping) -> str:
  return hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()


def _raw_leaves(tree):
  """``(path, leaf)`` with plain ``keystr`` paths (a restored nested dict and the original
  pytree render the same)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(jax.tree_util.keystr(p, simple=True, separator="/"), x) for p, x in flat]


def checksums(state: PyTree, meta: Mapping | None = None) -> dict:
  """``{"arrays": {path: {"sha256", "shape", "dtype"}}, "meta": sha256}`` of a state."""
  arrays = {}
  for path, x in _raw_leaves(state):
    a = _host_value(x)
    if a is not None:
      arrays[path] = {"sha256": _digest(a), "shape": list(a.shape), "dtype": a.dtype.str}
  return {"version": 1, "arrays": arrays, "meta": _meta_digest(dict(meta or {}))}


def _checksum_path(directory, step):
  from etils import epath
  return epath.Path(os.fspath(directory)) / CHECKSUMS / f"{int(step)}.json"


def write_checksums(directory, step: int, state: PyTree, meta: Mapping | None = None) -> None:
  """Writes ``<directory>/checksums/<step>.json`` (process 0, atomic rename); removes the
  files of steps that no longer exist."""
  sums = checksums(state, meta)   # every process: replicated reads are collective-free
  if jax.process_index() != 0:
    return
  path = _checksum_path(directory, step)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp"
  tmp.write_text(json.dumps(sums))
  tmp.replace(path)
  root = path.parent.parent
  for f in path.parent.glob("*.json"):
    s = f.name[:-len(".json")]
    if s.isdigit() and int(s) < int(step) and not (root / s).exists():
      f.unlink(missing_ok=True)


def verify(directory, step: int, state: PyTree, meta: Mapping | None = None) -> bool:
  """Checks a restored ``(state, meta)`` against the step's checksum file.

  Returns ``False`` when the step has no checksum file (nothing to verify), ``True``
  when everything this process can read matches.

  Raises:
    CheckpointCorruptedError: an array or the metadata differs from what was saved, a
      saved array is missing, or the checksum file itself is unreadable.
  """
  path = _checksum_path(directory, step)
  if not path.exists():
    return False
  try:
    want = json.loads(path.read_text())
    arrays, meta_sum = dict(want["arrays"]), want["meta"]
  except Exception as e:  # noqa: BLE001 - any damage to the file is reported the same way
    raise CheckpointCorruptedError(directory, step, f"checksum file {os.fspath(path)!r} is "
                                   f"unreadable ({_one_line(e, 120)})") from None
  got = dict(_raw_leaves(state))
  for p, rec in arrays.items():
    if p not in got:
      raise CheckpointCorruptedError(directory, step, f"saved array {p!r} is missing")
    a = _host_value(got[p])
    if a is None:
      continue
    if list(a.shape) != list(rec["shape"]) or a.dtype.str != rec["dtype"]:
      raise CheckpointCorruptedError(directory, step, f"array {p!r} restored as {a.shape} "
                                     f"{a.dtype}, saved as {tuple(rec['shape'])} {rec['dtype']}")
    if _digest(a) != rec["sha256"]:
      raise CheckpointCorruptedError(directory, step, f"array {p!r} does not match its "
                                     "checksum (data files overwritten or damaged)")
  if meta is not None and _meta_digest(dict(meta)) != meta_sum:
    raise CheckpointCorruptedError(directory, step, "metadata does not match its checksum")
  return True


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
  """Differences between the saved tree's metadata and ``target`` (keys unwrapped)."""
  target = unwrap_keys(target)
  saved = {p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in leaves_with_paths(
      saved_meta, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))}
  want = {p: (tuple(np.shape(a)), np.dtype(a.dtype)) for p, a in leaves_with_paths(target)}
  errs = [f"{p}: missing in checkpoint" for p in want if p not in saved]
  errs += [f"{p}: in checkpoint but not in target" for p in saved if p not in want]
  errs += [f"{p}: checkpoint {saved[p][0]} {saved[p][1]} vs target {want[p][0]} {want[p][1]}"
           for p in want if p in saved and saved[p] != want[p]]
  return errs


def _is_failed_read_report(exc) -> bool:
  text = str(exc)
  return (isinstance(exc, RuntimeError) and "Event loop is closed" in text) or \
      text.startswith("Encountered error while reading array index")


def _filter_failed_read_reports() -> None:
  """A failed orbax read leaves tensorstore futures and coroutines behind whose later
  reports ("Event loop is closed", "Encountered error while reading array index" with a
  kilobyte of tensorstore spec) would follow the one-line error as stray tracebacks. They
  are filtered out of ``sys.unraisablehook`` and ``sys.excepthook`` (installed once);
  anything else still goes to the previous hooks."""
  if not getattr(sys.unraisablehook, "_jaxopt_dnn_filter", False):
    prev_unraisable = sys.unraisablehook

    def unraisable(u):
      if not _is_failed_read_report(u.exc_value):
        prev_unraisable(u)

    unraisable._jaxopt_dnn_filter = True
    sys.unraisablehook = unraisable
  if not getattr(sys.excepthook, "_jaxopt_dnn_filter", False):
    prev_except = sys.excepthook

    def excepthook(typ, value, tb):
      if not _is_failed_read_report(value):
        prev_except(typ, value, tb)

    excepthook._jaxopt_dnn_filter = True
    sys.excepthook = excepthook


def _collect_failed_reads() -> None:
  import gc

  _filter_failed_read_reports()
  gc.collect()


def restore(directory, target: PyTree | None = None, *, step: int | None = None,
            _mngr=None) -> tuple[PyTree, dict, int]:
  """Restores ``(state, meta, step)`` from a checkpoint directory.

  Args:
    directory: a directory written by :func:`fit` (or :func:`save`).
    target: a pytree like the saved state; arrays or ``jax.ShapeDtypeStruct`` with
      shardings (see :func:`abstract_like`) to restore onto another mesh; its typed
      PRNG key leaves come back as typed keys of the same implementation. ``None``
      restores the saved tree as plain nested dicts (keys as raw key data).
    step: which step; default the latest complete one.

  Raises:
    FileNotFoundError: no checkpoint in ``directory``.
    CheckpointCorruptedError: the step cannot be read back intact (a ValueError).
    ValueError: ``target`` does not match the checkpoint (lists differing paths).
  """
  directory = os.fspath(directory)
  _filter_failed_read_reports()
  mngr = _mngr or manager(directory)
  try:
    step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
      raise FileNotFoundError(f"no complete checkpoint{'' if step is None else f' for step {step}'}"
                              f" in {directory!r} (steps: {list(mngr.all_steps())})")
    if target is not None:
      try:
        saved_meta = mngr.item_metadata(step)["state"]
        if saved_meta is None:
          raise ValueError("no state item")
      except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds
        _collect_failed_reads()
        raise CheckpointCorruptedError(directory, step, _one_line(e)) from None
      errs = _compat_errors(getattr(saved_meta, "tree", saved_meta), target)
      if errs:
        raise ValueError(f"checkpoint {directory!r} step {step} does not match the target state "
                         f"(incompatible model or recipe?): " + "; ".join(errs[:12])
                         + (f"; ... {len(errs) - 12} more" if len(errs) > 12 else ""))
      target = abstract_like(target) if not all(
          isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(target)) else target
    try:
      out = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(None if target is None else unwrap_keys(target)),
          meta=ocp.args.JsonRestore()))
      state, meta = out["state"], out["meta"]
      if target is not None:
        state = _rewrap_keys(state, target)
      if not isinstance(meta, dict):
        raise ValueError(f"metadata is {type(meta).__name__}, not a JSON object")
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds
      _collect_failed_reads()
      raise CheckpointCorruptedError(directory, step, _one_line(e)) from None
    if not verify(directory, step, state, meta):
      _warn(f"warning: checkpoint {directory!r} step {step} has no checksum file; restored "
            "unverified")
    return state, dict(meta), step
  finally:
    if _mngr is None:
      mngr.close()


def _warn(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _quarantine(mngr, directory: str, step: int, log: Callable[[str], None]) -> None:
  """Moves a damaged step out of orbax's way (``corrupted-<step>-<time>``; deleted on
  remote storage), so that the resumed run can write that step number again."""
  src = os.path.join(directory, str(step))
  try:
    if "://" not in directory and os.path.lexists(src):
      dst = os.path.join(directory, f"corrupted-{step}-{int(time.time())}")
      os.rename(src, dst)
      log(f"warning: moved the damaged step {step} to {dst}")
    else:
      mngr.delete(step)
  except Exception as e:  # noqa: BLE001
    log(f"warning: could not move the damaged step {step} aside: {_one_line(e)}")
  cs = _checksum_path(directory, step)
  if cs.exists():
    cs.unlink()
  mngr.reload()


def restore_latest_intact(directory, target: PyTree | None = None, *, mngr=None,
                          quarantine: bool = False,
                          log: Callable[[str], None] | None = None
                          ) -> tuple[PyTree, dict, int] | None:
  """Restores the newest step that reads back intact, falling back past damaged ones.

  Each damaged step is reported with one ``log`` line (default: stderr) naming it.

  Args:
    directory: a checkpoint directory.
    target: as for :func:`restore`.
    mngr: an open :func:`manager` of ``directory`` (default: one is opened and closed).
    quarantine: move damaged steps newer than the restored one aside (so that the
      resumed run can save those step numbers again); for training resume.
    log: where the one-line warnings go.

  Returns:
    ``(state, meta, step)``, or ``None`` if every step is damaged (each was reported)
    or there is no step at all.

  Raises:
    ValueError: ``target`` does not match an intact step (a different model/recipe;
      not a sign of damage, so there is no fallback).
  """
  directory = os.fspath(directory)
  log = log or _warn
  own = mngr is None
  mngr = mngr or manager(directory)
  try:
    for step in sorted(mngr.all_steps(), reverse=True):
      try:
        return restore(directory, target, step=step, _mngr=mngr)
      except CheckpointCorruptedError as e:
        log(f"warning: {e}; falling back to an earlier step")
        if quarantine:
          _quarantine(mngr, directory, step, log)
    return None
  finally:
    if own:
      mngr.close()


def read_jsonl(path, *, repair: bool = False, log: Callable[[str], None] | None = None
               ) -> list[dict]:
  """Records of a JSONL file; a partial last line (a write cut short by a kill) is
  dropped with a warning (and cut from the file with ``repair=True``).

  Raises:
    ValueError: a line other than the last is not a JSON object (names file and line).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    raw = f.read()
  cut = len(raw) if raw.endswith(b"\n") else raw.rfind(b"\n") + 1
  body, tail = raw[:cut], raw[cut:]
  out = []
  for i, ln in enumerate(body.split(b"\n")):
    if not ln.strip():
      continue
    try:
      rec = json.loads(ln)
    except ValueError as e:
      raise ValueError(f"{path}: line {i + 1} is not a JSON record ({e})") from None
    if not isinstance(rec, dict):
      raise ValueError(f"{path}: line {i + 1} is not a JSON object: {ln[:80]!r}")
    out.append(rec)
  if tail.strip():
    try:
      rec = json.loads(tail)
      if not isinstance(rec, dict):
        raise ValueError("not a JSON object")
      out.append(rec)   # a complete record that only lacks its newline
    except ValueError:
      (log or _warn)(f"warning: {path}: dropped a partial last line ({len(tail)} bytes)")
      if repair:
        with open(path, "r+b") as f:
          f.truncate(len(body))
  return out


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
