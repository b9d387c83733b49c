"""Capture the inputs of a model's contractions, one group of layers at a time.

The post-training solvers (GPTQ, AWQ, SmoothQuant, Wanda, SparseGPT) need, for every
kernel they compress, statistics of the activations ``X`` (shape ``(T, K)``: ``T``
tokens/rows, ``K`` the kernel's contracted size) that the kernel multiplies:

* ``H = 2 X^T X`` (GPTQ / SparseGPT Hessian of ``||X W - X W'||^2``), float32;
* ``sq[j] = sum_t X[t, j]^2`` (Wanda's ``||X_j||^2``, the diagonal of ``H / 2``);
* ``amax[j] = max_t |X[t, j]|`` and ``mean_abs[j]`` (SmoothQuant / AWQ);
* a bounded sample of rows of ``X`` (AWQ's output-error search).

:class:`Capture` runs an *unmodified* model (linen via ``nn.intercept_methods`` around
``Dense`` / ``DenseGeneral``; NNX by giving ``nnx.Linear`` / ``nnx.LinearGeneral``
instances of a clone a recording subclass) and records the input of the chosen ops.
Ops that consume the *same* input tensor (q/k/v projections) form one *round*; rounds
are in execution order. The sequential solvers capture round ``r`` with the params of
rounds ``< r`` already compressed, so each layer is fitted to the inputs it will really
see; the forward pass stops (eagerly) right after the round's input was seen, and only
that round's statistics are alive at a time.

Under data parallelism (a batch sharded over a mesh axis), ``X^T X`` is computed per
device and summed with ``psum`` inside ``jax.shard_map``; the result equals the one
device sum up to float summation order.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxopt_dnn import _tree
from jaxopt_dnn.quant.qarray import dequantize, is_qarray

_LINEN = (nn.Dense, nn.DenseGeneral)
_NNX = (nnx.Linear, nnx.LinearGeneral)


class _Stop(Exception):
  """Raised inside the forward pass once the wanted round's input was recorded."""


@dataclasses.dataclass(frozen=True)
class OpInfo:
  """One captured contraction.

  Attributes:
    op: module path (``encoder/layer_0/query``).
    kernel: the kernel's path in the params tree (``encoder/layer_0/query/kernel``).
    shape: kernel shape; the first ``n_in`` axes are contracted with the input's last
      ``n_in`` axes (``Dense``: ``(K, N)``, ``n_in = 1``).
    n_in: number of contracted (input) kernel axes.
    round: index of the group of ops that share one input tensor.
    perm: ``None`` when the contracted axes are the leading ``n_in`` axes; else the
      kernel's contracted axes then its free axes (ascending each), the order in
      which :func:`kernel_matrix` reads it (``Embed.attend``'s ``(vocab, embed)``
      table: ``(1, 0)``).
  """

  op: str
  kernel: str
  shape: tuple[int, ...]
  n_in: int
  round: int
  perm: tuple[int, ...] | None = None

  @property
  def tshape(self) -> tuple[int, ...]:
    """The kernel's shape with its contracted axes first (``shape`` permuted)."""
    return self.shape if self.perm is None else tuple(self.shape[a] for a in self.perm)

  @property
  def k(self) -> int:
    return math.prod(self.tshape[:self.n_in])

  @property
  def n(self) -> int:
    return math.prod(self.tshape[self.n_in:])


@dataclasses.dataclass
class Stats:
  """Activation statistics of one round's input (float32, ``K`` = contracted size)."""

  hessian: jax.Array | None     # (K, K) = 2 X^T X (sum over rows, not averaged)
  sq: jax.Array                 # (K,) sum of squares per input channel
  amax: jax.Array               # (K,) max |x|
  abs_sum: jax.Array            # (K,) sum |x|
  rows: int                     # T
  sample: jax.Array | None      # (<= max_sample, K) rows of X

  @property
  def mean_abs(self) -> jax.Array:
    return self.abs_sum / max(self.rows, 1)


# --------------------------------------------------------------------------- statistics
def _data_axes(x: jax.Array):
  """Mesh and axis name(s) sharding ``x``'s leading axis, or ``(None, None)``."""
  if isinstance(x, jax.core.Tracer):
    sh = getattr(jax.typeof(x), "sharding", None)
  else:
    sh = getattr(x, "sharding", None)
  if not isinstance(sh, jax.sharding.NamedSharding) or not sh.spec or sh.spec[0] is None:
    return None, None
  if getattr(sh.mesh, "empty", False):
    return None, None
  return sh.mesh, sh.spec[0]


@functools.partial(jax.jit, static_argnums=(1,))
def _gram(x2: jax.Array, _: Any = None) -> jax.Array:
  x2 = x2.astype(jnp.float32)
  return x2.T @ x2


@functools.lru_cache(maxsize=None)
def _sharded_gram(mesh, axes):
  def local(xs):
    xs = xs.reshape((-1, xs.shape[-1])).astype(jnp.float32)
    return jax.lax.psum(xs.T @ xs, axes)

  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=jax.P(axes), out_specs=jax.P()))


def gram(x: jax.Array) -> jax.Array:
  """``X^T X`` (float32) of ``x`` flattened to ``(T, K)``; ``psum`` over data shards.

  When ``x``'s leading (batch) axis is sharded over mesh axes, each device computes its
  own ``X_d^T X_d`` and they are summed with ``jax.lax.psum`` inside ``jax.shard_map``.
  """
  mesh, axes = _data_axes(x)
  if mesh is not None and x.shape[0] % math.prod(
      mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))) == 0:
    return _sharded_gram(mesh, axes)(x)
  return _gram(x.reshape((-1, x.shape[-1])))


@jax.jit
def _vec_stats(x):
  a = jnp.abs(x.astype(jnp.float32))
  red = tuple(range(x.ndim - 1))
  return jnp.sum(a * a, red), jnp.max(a, red), jnp.sum(a, red)


class _Acc:
  def __init__(self, hessian: bool, max_sample: int, seed: int = 0):
    self.hessian, self.max_sample = hessian, max_sample
    self.h = self.sq = self.amax = self.abs_sum = None
    self.rows = 0
    self.samples: list[np.ndarray] = []
    self.rng = np.random.default_rng(seed)

  def add(self, x2: jax.Array) -> None:
    if self.hessian:
      h = gram(x2)
      self.h = h if self.h is None else self.h + h
    sq, amax, s = _vec_stats(x2)
    if self.sq is None:
      self.sq, self.amax, self.abs_sum = sq, amax, s
    else:
      self.sq, self.amax, self.abs_sum = self.sq + sq, jnp.maximum(self.amax, amax), self.abs_sum + s
    rows = math.prod(x2.shape[:-1])
    self.rows += rows
    if self.max_sample:
      take = min(rows, self.max_sample)
      idx = np.sort(self.rng.choice(rows, take, replace=False))
      flat = np.asarray(jax.device_get(x2), np.float32).reshape((rows, x2.shape[-1]))
      self.samples.append(flat[idx])

  def result(self) -> Stats:
    sample = None
    if self.samples:
      allr = np.concatenate(self.samples)
      if allr.shape[0] > self.max_sample:
        allr = allr[np.sort(self.rng.choice(allr.shape[0], self.max_sample, replace=False))]
      sample = jnp.asarray(allr)
    # the solvers run on one device: bring the (all-reduced, replicated) sums there
    dev = jax.devices()[0]
    put = lambda a: None if a is None else jax.device_put(a, dev)  # noqa: E731
    return Stats(put(None if self.h is None else 2.0 * self.h), put(self.sq), put(self.amax),
                 put(self.abs_sum), self.rows, sample)


# --------------------------------------------------------------------------- model runners
def _flat_input(x: jax.Array, n_in: int) -> jax.Array:
  """``(..., k1..kn) -> (..., K)``: leading (batch, sharded) axes are kept."""
  k = math.prod(x.shape[x.ndim - n_in:])
  return x.reshape(x.shape[:x.ndim - n_in] + (k,)) if n_in != 1 else x


def _linen_ops(mod, ndim: int) -> int | None:
  """Number of contracted input axes of a supported linen op (``None``: unsupported,
  e.g. ``DenseGeneral`` with ``batch_dims`` or contracting non-trailing axes)."""
  if isinstance(mod, nn.Dense):
    return 1
  if isinstance(mod, nn.DenseGeneral):
    axis = mod.axis if isinstance(mod.axis, tuple) else (mod.axis,)
    axis = tuple(sorted(a % ndim for a in axis))
    if mod.batch_dims or axis != tuple(range(ndim - len(axis), ndim)):
      return None
    return len(axis)
  return None


class Capture:
  """Records the inputs of the chosen contractions of a linen or NNX model.

  Args:
    apply_fn: ``apply_fn(variables, *inputs)`` (linen) or ``apply_fn(module, *inputs)``
      (NNX, ``variables`` is then the ``nnx.Module``).
    variables: linen variables (``{"params": ..., ...}``) or an ``nnx.Module``.
    batches: iterable of model inputs (a tuple is splatted); materialised once.
    select: ``select(kernel_path, leaf) -> bool``: which ops to capture.
  """

  def __init__(self, apply_fn: Callable, variables: Any, batches: Iterable[Any],
               select: Callable[[str, Any], bool], *, max_batches: int | None = None,
               where: str = "capture"):
    self.apply_fn = apply_fn
    self.where = where
    self.nnx = isinstance(variables, nnx.Module)
    if self.nnx:
      self.module = variables
      self.params = nnx.to_pure_dict(nnx.state(variables, nnx.Param))
      self.variables = None
    else:
      if not isinstance(variables, dict) or "params" not in variables:
        raise TypeError(f"{where}: variables must be a dict with a 'params' collection "
                        f"(linen) or an nnx.Module, got {type(variables).__name__}")
      self.variables = variables
      self.params = variables["params"]
    bl = []
    for i, b in enumerate(batches):
      if max_batches is not None and i >= max_batches:
        break
      bl.append(b if isinstance(b, tuple) else (b,))
    if not bl:
      raise ValueError(f"{where}: the batches iterator is empty; pass at least one batch")
    self.batches = bl
    self.leaves = dict(_tree.leaves_with_paths(self.params, is_leaf=is_qarray))
    self._stacked: dict[str, int] = {}   # kernel path -> leading layer axes (scan stacks)
    self.ops = self._discover(select)

  # ------------------------------------------------------------------ forward with a hook
  def _run(self, params, args, hook, out_hook=None) -> None:
    """Runs the model on float ``params`` with ``hook(op, n_in, x)`` before each op (and
    ``out_hook(path, kind, y)`` after each linen LayerNorm / Dense, for discovery)."""
    if self.nnx:
      m = nnx.clone(self.module)
      nnx.update(m, params)
      for path, node in list(nnx.iter_graph(m)):
        if isinstance(node, _NNX):
          op = "/".join(str(p) for p in path)
          n_in = 1 if isinstance(node, nnx.Linear) else len(node.axis)
          n_out = 1 if isinstance(node, nnx.Linear) else len(node.out_features)
          if node.kernel.ndim != n_in + n_out:
            self._check_stacked(op, None, stacked=node.kernel.ndim - n_in - n_out)
          node.__class__ = _nnx_recorder(type(node))
          node.capture_hook = functools.partial(hook, op, n_in)
      self.apply_fn(m, *args)
      return

    def icpt(next_fun, a, kw, ctx):
      mod = ctx.module
      if ctx.method_name == "__call__" and isinstance(mod, _LINEN):
        info = _linen_ops(mod, jnp.ndim(a[0]))
        if info is not None:
          op = "/".join(mod.path)
          self._check_stacked(op, mod.get_variable("params", "kernel"))
          hook(op, info, a[0])
      y = next_fun(*a, **kw)
      if out_hook is not None and ctx.method_name == "__call__":
        if isinstance(mod, nn.LayerNorm) and mod.use_scale and mod.use_bias:
          out_hook("/".join(mod.path), "layernorm", y)
        elif isinstance(mod, nn.Dense):
          out_hook("/".join(mod.path), "dense", y)
      return y

    with nn.intercept_methods(icpt):
      self.apply_fn({**self.variables, "params": params}, *args)

  def _check_stacked(self, op: str, kernel: Any, stacked: int | None = None) -> None:
    """Records when the kernel leaf of ``op`` is a layer stack (``nn.scan`` /
    ``nnx.scan``: ``(layers, ...)``) while its layer consumes one slice: the captured
    inputs would be per-iteration values of the scan body, not one layer's; the
    error is raised by :meth:`_discover` if ``op`` is selected."""
    kp = f"{op}/kernel" if op else "kernel"
    leaf = self.leaves.get(kp)
    if leaf is None:
      return
    if stacked is None:
      if kernel is None or np.ndim(leaf) == np.ndim(kernel):
        return
      stacked = np.ndim(leaf) - np.ndim(kernel)
    self._stacked[kp] = stacked

  def _stacked_error(self, kp: str, leaf: Any) -> ValueError:
    stacked = self._stacked[kp]
    return ValueError(
        f"{self.where}: kernel {kp!r} of shape {tuple(np.shape(leaf))} is a stack of "
        f"layers (scanned with nn.scan / nnx.scan over its {stacked} leading axis/axes) "
        f"and its layer consumes one slice; {self.where} needs one Hessian per layer, "
        "which a scan body cannot hand out. Build the model unrolled (e.g. scan=False) "
        "to calibrate it, or quantize the stack with quantize_params (RTN, per-layer "
        "scales: QuantRule(..., granularity=(0, -1))) and serve it with int8_apply")

  def _discover(self, select) -> list[OpInfo]:
    seen: list[tuple[str, int, Any]] = []
    outs: list[tuple[str, str, Any]] = []

    def hook(op, n_in, x):
      if all(op != s[0] for s in seen):
        seen.append((op, n_in, x))

    self._run(self.float_params(self.params), self.batches[0], hook,
              out_hook=lambda p, k, y: outs.append((p, k, y)))
    # producer of each op's input: a LayerNorm / Dense whose output object it received
    self.producers = {}
    for op, _, x in seen:
      for p, kind, y in outs:
        if y is x:
          self.producers[op] = (kind, p)
    ops, rnd, last_x = [], -1, None
    for op, n_in, x in seen:
      kp = f"{op}/kernel" if op else "kernel"
      leaf = self.leaves.get(kp)
      if leaf is None or not select(kp, leaf):
        continue
      if kp in self._stacked:
        raise self._stacked_error(kp, leaf)
      if last_x is None or x is not last_x:
        rnd += 1
        last_x = x
      ops.append(OpInfo(op, kp, tuple(np.shape(leaf)), n_in, rnd))
    return ops

  # ------------------------------------------------------------------ public
  @staticmethod
  def float_params(params):
    return jax.tree.map(lambda x: dequantize(x) if is_qarray(x) else x, params,
                        is_leaf=is_qarray)

  def rounds(self) -> list[list[OpInfo]]:
    out: dict[int, list[OpInfo]] = {}
    for o in self.ops:
      out.setdefault(o.round, []).append(o)
    return [out[k] for k in sorted(out)]

  def stats(self, params, ops: list[OpInfo], *, hessian: bool = True,
            max_sample: int = 0) -> Stats:
    """Statistics of the (shared) input of ``ops`` over every batch, with ``params``."""
    want = ops[0].op
    n_in = ops[0].n_in
    acc = _Acc(hessian, max_sample)
    fparams = self.float_params(params)

    def hook(op, _n, x):
      if op == want:
        acc.add(_flat_input(x, n_in))
        raise _Stop

    for args in self.batches:
      try:
        self._run(fparams, args, hook)
      except _Stop:
        pass
    if acc.rows == 0:
      raise ValueError(f"{self.where}: op {want!r} did not run on the calibration batches")
    return acc.result()

  def outputs(self, params, op: OpInfo) -> list[jax.Array]:
    """The op's inputs ``X`` (flattened ``(T, K)``) for every batch (for tests/AWQ)."""
    got = []

    def hook(o, _n, x):
      if o == op.op:
        x = _flat_input(x, op.n_in)
        got.append(x.reshape((-1, x.shape[-1])))
        raise _Stop

    fparams = self.float_params(params)
    for args in self.batches:
      try:
        self._run(fparams, args, hook)
      except _Stop:
        pass
    return got


@functools.lru_cache(maxsize=None)
def _nnx_recorder(cls):
  def __call__(self, x, *args, **kwargs):
    self.capture_hook(x)
    return cls.__call__(self, x, *args, **kwargs)

  return type(f"Captured{cls.__name__}", (cls,), {"__call__": __call__})


def set_leaves(tree: Any, new: dict[str, Any]) -> Any:
  """Returns ``tree`` with the leaves at the given paths replaced (QArrays are leaves)."""
  return _tree.map_with_path_str(lambda p, x: new.get(p, x), tree, is_leaf=is_qarray)


def kernel_2d(w: jax.Array, n_in: int) -> jax.Array:
  """Kernel ``(k1..kn, out...) -> (K, N)`` float32."""
  k = math.prod(w.shape[:n_in])
  return jnp.asarray(w, jnp.float32).reshape((k, -1))


def kernel_matrix(w: jax.Array, o: OpInfo) -> jax.Array:
  """The ``(K, N)`` float32 matrix of kernel ``w`` as ``o`` contracts it: contracted axes
  first (``o.perm``), then :func:`kernel_2d`."""
  w = jnp.asarray(w)
  return kernel_2d(w if o.perm is None else jnp.transpose(w, o.perm), o.n_in)


def from_matrix(w2: jax.Array, o: OpInfo) -> jax.Array:
  """Inverse of :func:`kernel_matrix`: ``(K, N)`` -> the kernel's own shape."""
  w = w2.reshape(o.tshape)
  return w if o.perm is None else jnp.transpose(w, np.argsort(o.perm))


def run_sequential(where: str, apply_fn, variables, batches, select, layer, *,
                   sequential: bool = True, max_batches: int | None = None,
                   as_float: Callable[[Any], Any] = lambda r: r, hessian: bool = True,
                   max_sample: int = 0):
  """Shared driver of the one-shot solvers.

  For each round of ops (in execution order): capture the statistics of the round's
  input (with the already-solved earlier rounds installed when ``sequential``), call
  ``layer(op, float kernel, stats)`` for each op of the round, and install
  ``as_float(result)`` (a float kernel or a ``QArray``) into the params used by later
  rounds. Only one round's statistics are alive at a time.

  Returns:
    ``(capture, {kernel path: result})``.
  """
  cap = Capture(apply_fn, variables, batches, select, max_batches=max_batches, where=where)
  if not cap.ops:
    raise ValueError(f"{where}: no Dense/DenseGeneral (nnx.Linear/LinearGeneral) kernel "
                     "was chosen by the rules and ran on the calibration batches")
  out: dict[str, Any] = {}
  cur = cap.params
  for ops in cap.rounds():
    st = cap.stats(cur if sequential else cap.params, ops, hessian=hessian,
                   max_sample=max_sample)
    for o in ops:
      out[o.kernel] = layer(o, cap.leaves[o.kernel], st)
    del st
    if sequential:
      cur = set_leaves(cur, {o.kernel: as_float(out[o.kernel]) for o in ops})
  return cap, out
