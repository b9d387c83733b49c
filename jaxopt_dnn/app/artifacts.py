"""Reading serving checkpoints back: ``inspect`` reports and StableHLO ``export``.

A serving checkpoint (``<out>/<variant>/serve`` written by ``compress``) holds the
serving variables, with sparse leaves stored as ``{bits, values}`` (a
:class:`~jaxopt_dnn.sparsity.PackedArray`) and quantized ones as ``{value, scale}``
(a :class:`~jaxopt_dnn.quant.QArray`), plus the recipe in its metadata. Restoring it
needs no pickle: the recipe rebuilds the serving structure, and the stored arrays are
poured into it (packed leaves unpacked on the way).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from jaxopt_dnn import _table, checkpoint
from jaxopt_dnn.app.recipe import Recipe


def _is_packed(node: Any) -> bool:
  return isinstance(node, dict) and set(node) == {"bits", "values"}


def _nbytes(node: Any) -> int:
  return sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(node))


def load_raw(directory: str) -> tuple[dict, dict]:
  """``(stored tree as nested dicts, metadata)`` of a checkpoint directory."""
  if not os.path.exists(directory):
    raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
  if not os.path.isdir(directory):
    raise ValueError(f"{directory!r} is a file, not a checkpoint directory")
  state, meta, _ = checkpoint.restore(directory)   # CheckpointCorruptedError: "corrupted"
  if not isinstance(state, dict):
    raise checkpoint.CheckpointCorruptedError(directory, "?", "the stored state is not a tree")
  return state, meta


def _stored_recipe(directory: str, meta: dict) -> Recipe:
  """The recipe stored in a checkpoint's metadata, or a clear error naming it."""
  try:
    text = meta["recipe"]
    if not isinstance(text, str):
      raise TypeError(f"it is a {type(text).__name__}, not JSON text")
    return Recipe.from_json(text)
  except (TypeError, ValueError, KeyError) as e:
    raise ValueError(f"checkpoint {directory!r}: the stored recipe is invalid "
                     f"({' '.join(str(e).split())[:300]})") from None


# A serving model may hold at most this many parameters per stored entry (folded batch
# norm drops a few, nothing adds many): a tampered model_kwargs cannot ask for a huge model.
_MAX_PARAMS_PER_STORED = 2


def _stored_entries(tree: Any, meta: dict) -> int:
  shapes = meta.get("packed_shapes", {})
  total = 0
  for path, node in _flat_stored(tree):
    if _is_packed(node):
      shape = shapes.get(path)
      total += int(np.prod(shape)) if isinstance(shape, list) else 8 * np.size(node["bits"])
    else:
      total += int(np.size(node))
  return total


def _check_serving_meta(directory: str, tree: Any, meta: dict, recipe: Recipe) -> tuple:
  """``(input_shape, num_classes)`` checked, and the recipe's model bounded by the stored
  arrays, all before anything is built."""
  from jaxopt_dnn.app import models

  shape, k = meta.get("input_shape"), meta.get("num_classes")
  if not (isinstance(shape, list) and 1 <= len(shape) <= 4
          and all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 65536
                  for d in shape) and int(np.prod(shape)) <= 2 ** 24):
    raise ValueError(f"checkpoint {directory!r}: stored input_shape {shape!r} is invalid")
  if not (isinstance(k, int) and not isinstance(k, bool) and 2 <= k <= 2 ** 20):
    raise ValueError(f"checkpoint {directory!r}: stored num_classes {k!r} is invalid")
  stored = _stored_entries(tree, meta)
  try:
    model = models.get_model(recipe.model, k, **dict(recipe.model_kwargs))
    abstract = jax.eval_shape(model.init, jax.random.key(0),
                              jax.ShapeDtypeStruct((1, *shape), np.float32))
  except Exception as e:  # noqa: BLE001 - any model constructor/shape error
    raise ValueError(f"checkpoint {directory!r}: the stored recipe's model {recipe.model!r} "
                     f"with model_kwargs {dict(recipe.model_kwargs)} cannot be built for input "
                     f"{shape}: {' '.join(str(e).split())[:200]}") from None
  need = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract.get("params", abstract)))
  if need > _MAX_PARAMS_PER_STORED * stored + 1024:
    raise ValueError(f"checkpoint {directory!r}: the stored recipe asks for a model of {need:,} "
                     f"parameters but the checkpoint stores only {stored:,} values (tampered "
                     f"or mismatched recipe/model_kwargs)")
  return shape, k


def _describe_leaf(node: Any, shape: tuple[int, ...] | None) -> tuple[str, str, str, int, int]:
  """``(storage, shape, dtype, entries, nonzeros)`` of one stored leaf."""
  if _is_packed(node):
    vals = np.asarray(node["values"])
    size = int(np.prod(shape)) if shape is not None else int(np.asarray(node["bits"]).size * 8)
    return "bitmask+values", str(tuple(shape) if shape else "?"), str(vals.dtype), size, \
        int(np.count_nonzero(vals))
  arr = np.asarray(node)
  return "dense", str(arr.shape), str(arr.dtype), int(arr.size), int(np.count_nonzero(arr))


def describe(directory: str) -> str:
  """A report of a serving checkpoint: per-leaf storage, shape, bytes and density, the
  quantized tensors (int values + float32 scales) and the totals."""
  tree, meta = load_raw(directory)
  shapes = {k: tuple(v) for k, v in meta.get("packed_shapes", {}).items()}
  lines = [f"checkpoint: {directory}"]
  if "recipe" in meta:
    r = _stored_recipe(directory, meta)
    lines.append(f"recipe: {r.name} (model={r.model}, prune={r.prune.method}"
                 f"{'@' + str(r.prune.sparsity) if r.prune.method != 'none' else ''}, "
                 f"quant={r.quant.mode}, precision={r.precision.policy})")
  rows = []
  total_bytes = entries = nonzero = 0
  for path, node in _flat_stored(tree):
    storage, shape, dtype, size, nnz = _describe_leaf(node, shapes.get(path))
    if path.endswith("/value"):
      storage = "quantized " + storage
    nbytes = _nbytes(node)
    total_bytes += nbytes
    entries += size
    nonzero += nnz
    rows.append((path, storage, shape, dtype, f"{nbytes:,}", f"{nnz / max(size, 1):.3f}"))
  lines.append(_table.render(("path", "storage", "shape", "dtype", "bytes", "density"), rows,
                             right=(4, 5)))
  lines.append(f"entries: {entries:,}; nonzero: {nonzero:,}; array bytes: {total_bytes:,}; "
               f"bytes on disk: {checkpoint.checkpoint_bytes(directory):,}")
  return "\n".join(lines)


def _dense(node: Any, shape: tuple[int, ...], dtype) -> np.ndarray:
  """A stored leaf as a dense array of ``shape`` (unpacking ``{bits, values}``)."""
  if _is_packed(node):
    size = int(np.prod(shape))
    bits, values = np.asarray(node["bits"]), np.asarray(node["values"])
    if bits.size != -(-size // 8):
      raise ValueError(f"{bits.size} mask bytes for {size} entries")
    keep = np.unpackbits(bits, count=size).astype(bool)
    if values.ndim != 1 or values.size != int(keep.sum()):
      raise ValueError(f"the mask keeps {int(keep.sum())} entries, values has {values.shape}")
    out = np.zeros(size, values.dtype)
    out[keep] = values
    return out.reshape(shape)
  return np.asarray(node).reshape(shape).astype(dtype)


def load_serving(directory: str):
  """Rebuilds ``(serving, sample_x, recipe)`` from a serve checkpoint directory."""
  from jaxopt_dnn.app import compose  # heavy imports only when needed

  tree, meta = load_raw(directory)
  if "recipe" not in meta or "input_shape" not in meta:
    raise ValueError(f"{directory!r} is not a serving checkpoint written by compress "
                     "(no recipe/input_shape in its metadata)")
  recipe = _stored_recipe(directory, meta)
  shape, num_classes = _check_serving_meta(directory, tree, meta, recipe)
  sample = np.zeros((1, *shape), np.float32)
  template_build = compose.build(recipe.replace(init_from=None, distill={"teacher": None}),
                                 sample, num_classes=num_classes)
  template = template_build.serving(template_build.state, [sample])
  flat, treedef = jax.tree_util.tree_flatten_with_path(template.variables)
  stored = dict(_flat_stored(tree))
  leaves = []
  for p, leaf in flat:
    key = jax.tree_util.keystr(p, simple=True, separator="/")
    if key not in stored:
      raise ValueError(f"checkpoint {directory!r} has no entry {key!r} that recipe "
                       f"{recipe.name!r} needs (incompatible recipe?); it has {sorted(stored)[:8]}")
    try:
      leaves.append(_dense(stored[key], np.shape(leaf), np.asarray(leaf).dtype))
    except ValueError as e:
      raise ValueError(f"checkpoint {directory!r}: stored {key!r} does not fit the shape "
                       f"{np.shape(leaf)} that recipe {recipe.name!r} builds ({e})") from None
  variables = jax.tree.unflatten(treedef, leaves)
  return template.fn, variables, sample, recipe


def _flat_stored(tree: Any, path: str = ""):
  """``(path, node)`` for every stored leaf, packed nodes kept whole."""
  if _is_packed(tree):
    yield path, tree
  elif isinstance(tree, dict):
    for k, v in sorted(tree.items()):
      yield from _flat_stored(v, f"{path}/{k}" if path else str(k))
  elif tree is not None:
    yield path, tree


def export_serving(directory: str, out: str, *, batch: int = 1):
  """Exports the serving function (weights baked in) as serialized StableHLO."""
  from jaxopt_dnn import compile as compile_lib

  fn, variables, sample, _ = load_serving(directory)
  x = np.zeros((batch, *sample.shape[1:]), np.float32)
  served = lambda x: fn(variables, x)  # noqa: E731 - the exported closure
  compile_lib.export(served, x, path=out)
  return out, np.asarray(served(x))
