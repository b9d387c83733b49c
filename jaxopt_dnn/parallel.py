"""Sharded data parallelism over a device mesh, from one CPU to a multi-host pod.

The mesh has three named axes, as in MaxText: ``data`` (pure data parallelism),
``fsdp`` (data parallelism with parameters, gradients and optimizer state sharded) and
``tensor`` (for user rules). A global batch of ``B`` examples is split over
``data x fsdp``: each device sees ``B / (data * fsdp)`` of them.

Sharding rules turn a params pytree into a pytree of ``NamedSharding``:

* ``replicated`` / ``data_parallel``: every param on every device (``P()``).
* ``fsdp``: each param split along its largest axis whose size divides by the ``fsdp``
  size (ties: the later axis), else replicated.
* user rules ``{path_regex: PartitionSpec}`` (first match wins) take precedence.

Anything shaped like the params (optimizer moments, pruning masks, quantized leaves)
follows its param's sharding: see :func:`like_params`.

Two forms of the data-parallel step: :func:`data_parallel_step` jits a global-view
step with in/out shardings and donation (XLA inserts the gradient all-reduce), and
:func:`shard_map_train_step` runs per device through ``jax.shard_map`` with an explicit
``pmean`` of gradients (what ``pmap`` data parallelism is in today's JAX).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxopt_dnn import _tree

PyTree = Any
P = PartitionSpec
AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
STRATEGIES = ("replicated", "data_parallel", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *,
              axis_type: str = "auto", devices: Sequence[Any] | None = None) -> Mesh:
  """A ``(data, fsdp, tensor)`` mesh; one size may be ``-1`` (use the remaining devices).

  Args:
    data, fsdp, tensor: axis sizes; their product must not exceed the device count (a
      smaller mesh uses the first devices).
    axis_type: ``"auto"`` (XLA's sharding propagation inserts the collectives: works with
      unmodified Flax models, including FSDP) or ``"explicit"`` (sharding-in-types: every
      op must have an unambiguous output sharding; plain data parallelism works with
      unmodified Flax models, FSDP needs models that pass ``out_sharding``). Always
      passed to ``jax.make_mesh`` on purpose (its default is Explicit).
    devices: defaults to ``jax.devices()`` (all processes' devices on multi-host).
  """
  types = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}
  if axis_type not in types:
    raise ValueError(f"axis_type must be 'auto' or 'explicit', got {axis_type!r}")
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, tensor]
  for name, s in zip(AXES, sizes):
    if not isinstance(s, (int, np.integer)) or (s < 1 and s != -1):
      raise ValueError(f"mesh axis {name!r} must be a positive int or -1, got {s!r}")
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got data={data}, fsdp={fsdp}, "
                     f"tensor={tensor}")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if len(devices) % known:
      raise ValueError(f"cannot fill a -1 axis: {len(devices)} devices are not divisible "
                       f"by the other axes' product {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  n = math.prod(sizes)
  if n > len(devices):
    raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs {n} "
                     f"devices but only {len(devices)} are available")
  return jax.make_mesh(tuple(sizes), AXES, axis_types=(types[axis_type],) * 3,
                       devices=devices[:n])


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes the batch dimension is split over (``data`` and ``fsdp`` if present)."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over ``data x fsdp``; other dims replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_spec(spec: Any, mesh: Mesh, path: str, shape: tuple[int, ...]) -> PartitionSpec:
  if not isinstance(spec, PartitionSpec):
    raise TypeError(f"{path}: sharding rule value must be a PartitionSpec, got {spec!r}")
  if len(spec) > len(shape):
    raise ValueError(f"{path}: {spec} has {len(spec)} entries but the leaf has shape {shape}")
  for dim, entry in enumerate(spec):
    names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
    for name in names:
      if name not in mesh.axis_names:
        raise ValueError(f"{path}: {spec} names mesh axis {name!r}, which is not in the "
                         f"mesh axes {tuple(mesh.axis_names)}")
    size = math.prod(mesh.shape[n] for n in names)
    if shape[dim] % size:
      raise ValueError(f"{path}: dimension {dim} of shape {shape} is not divisible by the "
                       f"{size} devices of {spec}")
  return spec


def fsdp_spec(shape: Sequence[int], fsdp_size: int, axis: str = "fsdp") -> PartitionSpec:
  """``P`` splitting the largest axis divisible by ``fsdp_size`` (ties: later axis)."""
  if fsdp_size <= 1 or not shape:
    return P()
  best = None
  for d, s in enumerate(shape):
    if s % fsdp_size == 0 and s >= fsdp_size and (best is None or s >= shape[best]):
      best = d
  if best is None:
    return P()
  return P(*([None] * best + [axis]))


def param_shardings(params: PyTree, mesh: Mesh, strategy: str = "data_parallel",
                    rules: Mapping[str, PartitionSpec] | None = None) -> PyTree:
  """A ``NamedSharding`` for every leaf of ``params``.

  Args:
    params: pytree of arrays (or ``jax.ShapeDtypeStruct``).
    mesh: from :func:`make_mesh`.
    strategy: ``"replicated"``, ``"data_parallel"`` or ``"fsdp"``.
    rules: optional ``{path_regex: PartitionSpec}``; the first matching rule wins over
      the strategy. A rule that matches no leaf, a spec naming a missing mesh axis, or a
      dimension not divisible by its axes is a ``ValueError`` naming the leaf.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
  fsdp_size = mesh.shape.get("fsdp", 1)
  leaves, treedef = jax.tree.flatten(params)
  chosen = (_tree.select(params, dict(rules), argname="sharding rules")
            if rules else [(p, x, None) for p, x in _tree.leaves_with_paths(params)])
  out = []
  for (path, _, rule), leaf in zip(chosen, leaves):
    shape = tuple(np.shape(leaf))
    if rule is not None:
      spec = check_spec(rule, mesh, path, shape)
    elif strategy == "fsdp":
      spec = fsdp_spec(shape, fsdp_size)
    else:
      spec = P()
    out.append(NamedSharding(mesh, spec))
  return jax.tree.unflatten(treedef, out)


def _follow(sharding: NamedSharding, param_shape: tuple[int, ...], leaf: Any) -> NamedSharding:
  """Sharding for ``leaf``, which belongs to a param of ``param_shape``.

  Same shape -> the param's sharding. Same rank -> dimension by dimension: a size-1
  dimension (a per-channel scale's reduced axis) is unsharded, an equal one keeps its
  mesh axes, another size (e.g. int4 values packed two per byte along axis 0) keeps
  them if divisible by their device count. Anything else (scalars, other ranks) is
  replicated.
  """
  shape = tuple(np.shape(leaf))
  if shape == param_shape:
    return sharding
  mesh = sharding.mesh
  if len(shape) != len(param_shape):
    return NamedSharding(mesh, P())
  spec = tuple(sharding.spec) + (None,) * (len(param_shape) - len(sharding.spec))
  out = []
  for s, p, e in zip(shape, param_shape, spec):
    names = () if e is None else (e if isinstance(e, tuple) else (e,))
    n = math.prod(mesh.shape[a] for a in names)
    out.append(e if s == p or (s != 1 and s % n == 0) else None)
  while out and out[-1] is None:
    out.pop()
  return NamedSharding(mesh, P(*out))


def _prefix_match(pdef: Any, node: Any) -> bool:
  """True if ``pdef`` (a treedef) is a prefix of ``node``'s structure."""
  if pdef.num_nodes == 1 and pdef.num_leaves == 1:
    return True  # a param position: any sub-pytree may stand there
  kids, ndef = jax.tree.flatten(node, is_leaf=lambda x: x is not node)
  if ndef.num_nodes == 1 and ndef.num_leaves == 1:  # node is a leaf
    return False
  if ndef.node_data() != pdef.node_data():
    return False
  pkids = pdef.children()
  return len(pkids) == len(kids) and all(_prefix_match(k, c) for k, c in zip(pkids, kids))


def like_params(tree: PyTree, params: PyTree, shardings: PyTree) -> PyTree:
  """Shardings for ``tree`` (optimizer state, masks, quantized params) from the params'.

  Every sub-pytree of ``tree`` that has the params' structure (as a prefix: a param's
  place may hold a sub-pytree, e.g. a ``QArray`` of value + scale) gets, leaf by leaf,
  its param's sharding (equal shape -> same sharding; same rank with size-1 axes, e.g.
  a per-channel scale -> the spec with those axes ``None``; else replicated). Leaves
  outside such sub-pytrees (step counts, loss scales, other scalars) are replicated.
  """
  p_leaves, p_def = jax.tree.flatten(params)
  s_leaves = p_def.flatten_up_to(shardings)
  if not s_leaves:
    raise ValueError("like_params: params has no leaves")
  mesh = s_leaves[0].mesh
  shapes = [tuple(np.shape(x)) for x in p_leaves]
  single = p_def.num_nodes == 1  # params is one array: same-shape leaves follow it

  def matches(node):
    return not single and _prefix_match(p_def, node)

  def assign(node):
    if matches(node):
      subs = p_def.flatten_up_to(node)
      return p_def.unflatten([
          jax.tree.map(lambda x, s=s, shp=shp: _follow(s, shp, x), sub)
          for sub, s, shp in zip(subs, s_leaves, shapes)])
    if single:
      return _follow(s_leaves[0], shapes[0], node) if np.ndim(node) else replicated(mesh)
    return replicated(mesh)

  return jax.tree.map(assign, tree, is_leaf=matches)


def state_shardings(state: PyTree, params: PyTree, mesh: Mesh,
                    strategy: str = "data_parallel",
                    rules: Mapping[str, PartitionSpec] | None = None) -> PyTree:
  """Shardings for a whole train state: its params-shaped parts follow the rule."""
  return like_params(state, params, param_shardings(params, mesh, strategy, rules))


def _leading_check(batch: PyTree, n: int, what: str, mesh: Mesh) -> None:
  sizes = " x ".join(f"{a}={mesh.shape[a]}" for a in batch_axes(mesh))
  for path, x in _tree.leaves_with_paths(batch):
    shape = np.shape(x)
    if not shape:
      raise ValueError(f"batch leaf {path!r} is a scalar; every leaf needs a batch dimension")
    if shape[0] % n:
      raise ValueError(f"batch leaf {path!r}: {what} size {shape[0]} is not divisible by "
                       f"the {n} devices of the batch axes ({sizes})")


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
  """Places a host batch (global view, single host) split over ``data x fsdp``."""
  n = math.prod(mesh.shape[a] for a in batch_axes(mesh))
  _leading_check(batch, n, "batch", mesh)
  return jax.device_put(batch, batch_sharding(mesh))


def process_local_batch_to_global(batch: PyTree, mesh: Mesh) -> PyTree:
  """Builds global batch arrays from each process's local slice (multi-host).

  Every process calls this with its own ``B / process_count`` examples; the result is
  a global array of ``B`` examples split over ``data x fsdp`` (process ``i``'s rows
  are the ``i``-th block when the mesh's batch axes are laid out process-major, as
  :func:`make_mesh` does).
  """
  sharding = batch_sharding(mesh)
  n = math.prod(mesh.shape[a] for a in batch_axes(mesh))
  per_proc = max(1, n // jax.process_count())  # batch shards held by one process
  _leading_check(batch, per_proc, "process-local batch", mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def data_parallel_step(step_fn: Callable[[PyTree, PyTree], tuple[PyTree, PyTree]],
                       mesh: Mesh, state_sharding: PyTree,
                       in_batch_sharding: NamedSharding | None = None, *,
                       donate: bool = True) -> Callable[[PyTree, PyTree], tuple[PyTree, PyTree]]:
  """Jits ``step_fn(state, batch) -> (state, aux)`` for the mesh.

  ``state`` comes in and goes out with ``state_sharding`` (donated when ``donate``), the
  batch is split over ``data x fsdp`` and ``aux`` (metrics) is replicated. The step is
  written in the global view: a mean over the batch is a mean over all devices, and XLA
  inserts the gradient all-reduce (and, for FSDP, the parameter all-gathers and gradient
  reduce-scatters).
  """
  bsh = batch_sharding(mesh) if in_batch_sharding is None else in_batch_sharding
  jitted = jax.jit(step_fn, in_shardings=(state_sharding, bsh),
                   out_shardings=(state_sharding, replicated(mesh)),
                   donate_argnums=(0,) if donate else ())

  def step(state, batch):
    with jax.set_mesh(mesh):
      return jitted(state, batch)
  step.jitted = jitted
  return step


def shard_map_train_step(loss_fn: Callable[[PyTree, PyTree], Any],
                         optimizer: optax.GradientTransformation, mesh: Mesh, *,
                         donate: bool = True) -> Callable[..., Any]:
  """Per-device data parallelism: ``step(params, opt_state, batch) -> (params, opt_state, loss)``.

  Inside ``jax.shard_map`` each device sees ``B / n`` examples. ``loss_fn(params,
  batch_d)`` returns either

  * a mean over its examples: the global loss is ``pmean_d(loss_d)`` and the gradient
    ``pmean_d(g_d)`` (exact when every device holds equally many examples), or
  * a weighted pair ``(sum_d, weight_d)``, e.g. ``(sum(w * l), sum(w))`` for a
    token-weighted LM loss on padded batches: the global loss is
    ``psum(sum_d) / psum(weight_d)`` and the gradient ``psum(grad sum_d) /
    psum(weight_d)``, exactly the single-device ratio whatever the padding per device.

  Then every device applies the same update to its replica. Params and optimizer state
  are replicated.
  """
  axes = batch_axes(mesh)

  def per_device(params, opt_state, batch):
    # Mark the replica as device-varying *outside* the differentiated function: the
    # gradient is then this device's own g_d (differentiating the invariant params
    # directly would make shard_map insert an implicit psum).
    local = jax.lax.pcast(params, axes, to="varying")
    (num, den), grads = jax.value_and_grad(lambda p: _as_pair(loss_fn(p, batch)),
                                           has_aux=True)(local)
    if den is None:
      grads, loss = jax.lax.pmean(grads, axes), jax.lax.pmean(num, axes)
    else:
      total = jax.lax.psum(den, axes)
      grads = jax.tree.map(lambda g: g / total, jax.lax.psum(grads, axes))
      loss = jax.lax.psum(num, axes) / total
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(axes)),
                         out_specs=(P(), P(), P()))
  return jax.jit(mapped, donate_argnums=(0, 1) if donate else ())


def _as_pair(out: Any) -> tuple[jax.Array, jax.Array | None]:
  if isinstance(out, tuple):
    if len(out) != 2:
      raise ValueError(f"shard_map_train_step: loss_fn must return a mean or a (sum, weight) "
                       f"pair, got a tuple of {len(out)}")
    return out
  return out, None


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None, *,
                           local_device_ids: Sequence[int] | None = None,
                           cpu_collectives: str | None = None,
                           initialization_timeout: int = 300) -> None:
  """Starts JAX's multi-process runtime (``jax.distributed.initialize``).

  With no coordinator, JAX auto-detects the cluster (Cloud TPU pods, SLURM, ...). With
  ``coordinator_address="host:port"``, ``num_processes`` and ``process_id`` are
  required. ``cpu_collectives="gloo"`` selects CPU cross-process collectives (for
  multi-process CPU runs). Must run before anything starts the XLA backend (creating an
  array, ``jax.devices()``...): otherwise a ``RuntimeError`` says so.
  """
  if coordinator_address is not None and (num_processes is None or process_id is None):
    raise ValueError("with coordinator_address, num_processes and process_id are required; "
                     f"got num_processes={num_processes!r}, process_id={process_id!r}")
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"process_id {process_id} out of range for num_processes={num_processes}")
  if jax.distributed.is_initialized():
    raise RuntimeError("initialize_distributed: jax.distributed is already initialized")
  if cpu_collectives is not None:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids,
                               initialization_timeout=initialization_timeout)
  except RuntimeError as e:
    if "before any JAX" in str(e) or "must be called before" in str(e):
      raise RuntimeError(
          "initialize_distributed must be called before the XLA backend starts: arrays "
          "or devices already exist in this process. Call it first thing in the program, "
          "before creating any jax.Array or calling jax.devices().") from e
    raise


# ------------------------------------------------------------------- sharding


def is_logical_rules(value: Any) -> bool:
  return (isinstance(value, (tuple, list)) and len(value) > 0 and all(
      isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str)
      and (r[1] is None or isinstance(r[1], (str, tuple))) for r in value))


def fsdp_axis(mesh: Mesh) -> str | tuple[str, ...] | None:
  """The mesh axis FSDP shards over: ``fsdp`` if it has > 1 device, else the batch axes."""
  if mesh.shape.get("fsdp", 1) > 1:
    return "fsdp"
  axes = tuple(a for a in batch_axes(mesh) if mesh.shape[a] > 1)
  return axes[0] if len(axes) == 1 else (axes or None)


def fsdp_shardings(params: PyTree, mesh: Mesh) -> PyTree:
  axis = fsdp_axis(mesh)
  size = 1 if axis is None else int(np.prod([mesh.shape[a] for a in
                                             (axis if isinstance(axis, tuple) else (axis,))]))

  def one(x):
    spec = fsdp_spec(np.shape(x), size, axis) if axis else P()
    return NamedSharding(mesh, spec)
  return jax.tree.map(one, params)


def logical_specs(boxed_params: PyTree, rules: Sequence[tuple[str, Any]], mesh: Mesh,
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


def checked_shardings(specs: PyTree, params: PyTree, mesh: Mesh) -> PyTree:
  out = []
  leaves, treedef = jax.tree.flatten(params)
  spec_leaves = treedef.flatten_up_to(specs)
  for (path, x), spec in zip(_tree.leaves_with_paths(params), spec_leaves):
    spec = check_spec(P(*spec), mesh, path, tuple(np.shape(x)))
    out.append(NamedSharding(mesh, spec))
  return jax.tree.unflatten(treedef, out)
