"""Input Hessians of every weight contraction, captured by the one jaxpr interpreter.

GPTQ (and SparseGPT) minimize ``||X W - X W'||_F^2`` per kernel, whose Hessian in
``W'`` is ``H = 2 X^T X``. Here ``X`` (``(T, K)``) holds the rows the kernel really
multiplies, in the kernel's own flattened layout: with ``c_1 < ... < c_n`` the kernel
leaf's contracted axes and ``f_1 < ... < f_m`` its free (output) axes, the kernel is
read as the matrix

    W2 = reshape(transpose(w, (c_1..c_n, f_1..f_m)), (K, N))   K = prod_i w.shape[c_i]

(:func:`jaxopt_dnn.quant.layout.kernel_matrix`; for ``Dense`` ``(K, N)``,
``DenseGeneral``, an ``Einsum`` ``"BTD,DNH->BTNH"`` kernel and a HWIO conv kernel the
contracted axes already lead, so ``W2`` is ``kernel_2d(w, n)``), and the output of
the contraction is ``X W2`` up to a reshape:

* ``dot_general``: ``X`` is the activation with its contracted axes moved last, in the
  order of the kernel axes they pair with, flattened to ``(T, K)``;
* ``conv_general_dilated``: ``X`` is the im2col patch matrix
  (:func:`jax.lax.conv_general_dilated_patches`, whose features run ``(C, spatial...)``),
  reordered to the kernel's own ``(spatial..., C)`` (HWIO: ``(H, W, I)``) order; same
  strides, padding and dilations; ``feature_group_count = batch_group_count = 1``.

:class:`Gram` is an interpreter mode (:mod:`jaxopt_dnn.quant.hooks`): the model, unmodified
(a linen ``apply`` or an NNX module: :class:`Forward` is the one place that tells them
apart), is traced once, re-evaluated with the chosen leaves as weights, and every
contraction that consumes one adds ``X^T X`` (float32) to that leaf's Gram while the
forward itself runs in float. :meth:`HessianCapture.hessians` is one jitted forward per
batch shape returning every Gram at once; :meth:`HessianCapture.round_hessians` runs
eagerly and stops as soon as the wanted kernels were seen (the sequential solvers:
earlier rounds already compressed).

A kernel consumed by several contractions gets the sum of their Grams (the Hessian of
the summed errors). Kernels consumed inside a ``scan`` body (``nn.scan`` layer stacks),
through a reshape, or as the batch operand of a batched dot raise a ``ValueError`` naming
the leaf.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from jaxopt_dnn import _tree
from jaxopt_dnn.model_adapter import adapt
from jaxopt_dnn.quant import hooks
from jaxopt_dnn.quant.layout import OpInfo
from jaxopt_dnn.quant.qarray import dequantize, is_qarray


class _Stop(Exception):
  """Raised inside an eager evaluation once every wanted kernel was seen."""


# --------------------------------------------------------------------------- rows of X
@dataclasses.dataclass(frozen=True)
class Layout:
  """How a kernel leaf is contracted: ``perm`` = its contracted axes (ascending) then its
  free axes (ascending); the first ``n_in`` entries of ``perm`` are contracted."""

  n_in: int
  perm: tuple[int, ...]


def _layout(contracted: Iterable[int], ndim: int) -> Layout:
  c = sorted(contracted)
  return Layout(len(c), tuple(c) + tuple(a for a in range(ndim) if a not in c))


def dot_rows(x: jax.Array, dn, wpos: int, axes: tuple[int, ...], ndim: int, where: str):
  """``(X, Layout)`` of a ``dot_general`` whose operand ``wpos`` is a view of a kernel
  leaf (``axes[v]``: the leaf axis of view axis ``v``); ``X`` (float32) has the row
  axes first, then the contracted axes in the kernel's order (:func:`gram` flattens)."""
  (lc, rc), (lb, rb) = dn
  wc, xc = (rc, lc) if wpos == 1 else (lc, rc)
  if (rb if wpos == 1 else lb):
    raise ValueError(f"{where}: the kernel is a batch operand of a batched dot_general "
                     f"(dimension_numbers {dn}); one Hessian per kernel needs a plain "
                     "contraction")
  lay = _layout((axes[a] for a in wc), ndim)
  pairs = sorted(zip((axes[a] for a in wc), xc))          # by leaf axis
  xb = list(lb if wpos == 1 else rb)
  free = [a for a in range(x.ndim) if a not in xc and a not in xb]
  if xb:
    raise ValueError(f"{where}: batched dot_general with a kernel operand "
                     f"(dimension_numbers {dn})")
  return jnp.transpose(x, free + [a for _, a in pairs]).astype(jnp.float32), lay


def conv_rows(x: jax.Array, p: dict, axes: tuple[int, ...], ndim: int, rhs_shape,
              where: str):
  """``(X, Layout)`` of a ``conv_general_dilated`` whose rhs is a view of a kernel leaf:
  im2col patches, row axes first, then the kernel's contracted axes in its order."""
  if p.get("feature_group_count", 1) != 1 or p.get("batch_group_count", 1) != 1:
    raise ValueError(f"{where}: conv with feature_group_count="
                     f"{p.get('feature_group_count', 1)}, batch_group_count="
                     f"{p.get('batch_group_count', 1)}; only ungrouped convs (1, 1) have "
                     "one (K, N) Hessian")
  dn = p["dimension_numbers"]
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  spatial = tuple(rhs_shape[a] for a in rhs_spec[2:])
  patches = lax.conv_general_dilated_patches(
      x, spatial, p["window_strides"], p["padding"], lhs_dilation=p["lhs_dilation"],
      rhs_dilation=p["rhs_dilation"], dimension_numbers=dn,
      precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  # features of the patches: (C, s_1..s_d), i.e. view axes (rhs_spec[1], rhs_spec[2:]...)
  view_in = (rhs_spec[1],) + tuple(rhs_spec[2:])
  leaf_in = [axes[a] for a in view_in]
  lay = _layout(leaf_in, ndim)
  c = x.shape[lhs_spec[1]]
  feat = out_spec[1]
  y = jnp.moveaxis(patches, feat, -1)
  y = y.reshape(y.shape[:-1] + (c,) + spatial)
  order = np.argsort(leaf_in)                                  # leaf order of the features
  nb = y.ndim - len(view_in)
  y = jnp.transpose(y, tuple(range(nb)) + tuple(nb + int(i) for i in order))
  return y.astype(jnp.float32), lay


def gram(x: jax.Array, n_in: int) -> jax.Array:
  """``X^T X`` (``(K, K)`` float32, highest precision) of ``x`` = (row axes..., ``n_in``
  contracted axes): every row axis is contracted, so rows sharded over a mesh give a
  replicated sum (XLA's all-reduce of the per-device ``X_d^T X_d``)."""
  rows = tuple(range(x.ndim - n_in))
  sh = getattr(jax.typeof(x), "sharding", None)
  out = None
  if isinstance(sh, jax.sharding.NamedSharding) and not sh.mesh.empty \
      and any(s is not None for s in sh.spec):
    out = jax.sharding.NamedSharding(sh.mesh, jax.P())
  g = lax.dot_general(x, x, ((rows, rows), ((), ())), precision=lax.Precision.HIGHEST,
                      preferred_element_type=jnp.float32, out_sharding=out)
  k = math.prod(x.shape[x.ndim - n_in:])
  return g.reshape((k, k))


# --------------------------------------------------------------------------- channels
@dataclasses.dataclass(frozen=True)
class Channels:
  """The input channels of one kernel's contraction, the axis a per-input-channel scale
  ``s`` (SmoothQuant, AWQ) runs along: ``y = (x / s) (diag(s) W)``.

  ``c`` channels; ``row_chan[k]`` (``(K,)`` int) is the channel of row ``k`` of the
  kernel matrix ``W2`` (:func:`~jaxopt_dnn.quant.layout.kernel_matrix`), so ``diag(s)
  W`` is ``W2 * s[row_chan][:, None]``. A ``dot_general``'s channels are its contracted
  activation axes, flattened in the activation's own axis order (``K`` of them); a
  conv's are the activation's feature axis only (``C`` of them, shared by every window
  position of the HWIO kernel's ``(H, W, I)`` rows). ``trailing``: those activation
  axes are the activation's last ones (then a producer's output channels can absorb
  ``1 / s``).
  """

  c: int
  row_chan: np.ndarray
  trailing: bool

  def __eq__(self, other):
    return (isinstance(other, Channels) and self.c == other.c
            and self.trailing == other.trailing
            and np.array_equal(self.row_chan, other.row_chan))

  def __hash__(self):
    return hash((self.c, self.trailing, self.row_chan.tobytes()))


def _dot_channels(x_shape, dn, wpos, axes) -> Channels:
  (lc, rc), _ = dn
  wc, xc = (rc, lc) if wpos == 1 else (lc, rc)
  ko = [a for _, a in sorted(zip((axes[a] for a in wc), xc))]   # x axes in kernel order
  xo = sorted(ko)
  dims = [x_shape[a] for a in xo]
  idx = np.arange(math.prod(dims)).reshape(dims)
  row_chan = np.transpose(idx, [xo.index(a) for a in ko]).reshape(-1)
  nd = len(x_shape)
  return Channels(int(idx.size), row_chan, xo == list(range(nd - len(xo), nd)))


def _conv_channels(x_shape, p, axes, w_shape) -> Channels:
  dn = p["dimension_numbers"]
  feat = dn.lhs_spec[1]
  c = x_shape[feat]
  contracted = sorted(axes[a] for a in (dn.rhs_spec[1],) + tuple(dn.rhs_spec[2:]))
  in_axis = contracted.index(axes[dn.rhs_spec[1]])
  dims = [w_shape[a] for a in contracted]
  shape = [1] * len(dims)
  shape[in_axis] = c
  row_chan = np.broadcast_to(np.arange(c).reshape(shape), dims).reshape(-1)
  return Channels(int(c), np.ascontiguousarray(row_chan), feat == len(x_shape) - 1)


# --------------------------------------------------------------------------- the modes
class Gram(hooks.Mode):
  """Float forward; adds ``X^T X`` of every contraction consuming a :class:`hooks.Weight`
  to ``grams[leaf path]`` (``Weight.op`` is the leaf path here).

  ``wanted``: compute Grams only for these leaves (``None``: all); ``stop_after``:
  ``{leaf: number of uses}``: raise :class:`_Stop` once every one was reached (eager).
  ``layouts`` / ``channels`` / ``order`` / ``rounds``: each leaf's :class:`Layout` and
  :class:`Channels`, the leaves in order of first use, and the round (index of its
  distinct activation operand) of each. Subclasses record other statistics of the same
  rows ``X`` by overriding :meth:`accumulate`.
  """

  def __init__(self, where: str, wanted=None, stop_after=None):
    super().__init__()
    self.where, self.wanted, self.stop_after = where, wanted, stop_after
    self.grams: dict[str, jax.Array] = {}
    self.layouts: dict[str, Layout] = {}
    self.channels: dict[str, Channels] = {}
    self.uses: dict[str, int] = {}
    self.order: list[str] = []
    self.rounds: dict[str, int] = {}
    self._inputs: list[Any] = []     # activation operands (alive: their ids name rounds)
    self._cache: dict[tuple, jax.Array] = {}

  def fork(self):
    return _InScan(self.where)

  def _round(self, x) -> int:
    for i, y in enumerate(self._inputs):
      if y is x:
        return i
    self._inputs.append(x)
    return len(self._inputs) - 1

  def on_weight(self, eqn, invals, wpos):
    w = invals[wpos]
    x = invals[1 - wpos]
    args = [w.val if i == wpos else v for i, v in enumerate(invals)]
    path = w.op
    if self.wanted is not None and path not in self.wanted:
      return hooks.bind(eqn, args)
    where = f"{self.where}: kernel {path!r}"
    name = eqn.primitive.name
    if w.axes is None:
      raise ValueError(f"{where} reaches a {name} through a reshape/broadcast; its rows of "
                       "X cannot be laid out in the kernel's own order")
    ndim = len(w.axes)
    if name == "conv_general_dilated":
      key = None
      x2, lay = conv_rows(x, eqn.params, w.axes, ndim, np.shape(w.val), where)
      chan = _conv_channels(np.shape(x), eqn.params, w.axes, np.shape(w.val))
    else:
      dn = eqn.params["dimension_numbers"]
      key = (id(x), wpos, tuple(w.axes), str(dn))
      x2, lay = dot_rows(x, dn, wpos, w.axes, ndim, where)
      chan = _dot_channels(np.shape(x), dn, wpos, w.axes)
    if path in self.layouts and self.layouts[path] != lay:
      raise ValueError(f"{where} is contracted along different axes by two ops "
                       f"({self.layouts[path]} vs {lay})")
    if path not in self.layouts:
      self.layouts[path] = lay
      self.channels[path] = chan
      self.order.append(path)
      self.rounds[path] = self._round(x)
    elif self.channels[path] != chan:
      self.channels[path] = None       # two uses with different input channels
    self.accumulate(path, x, x2, lay, key)
    self.uses[path] = self.uses.get(path, 0) + 1
    self.records.append(hooks.Record(path, name, False, "hessian capture (float)"))
    out = hooks.bind(eqn, args)
    if self.stop_after is not None and all(
        self.uses.get(p, 0) >= n for p, n in self.stop_after.items()):
      raise _Stop
    return out

  def accumulate(self, path: str, x, x2: jax.Array, lay: Layout, key) -> None:
    """Adds ``X^T X`` of the rows ``x2`` (row axes, then ``lay.n_in`` contracted axes)
    to ``grams[path]`` (one Gram per distinct activation and dot layout)."""
    g = self._cache.get(key) if key is not None else None
    if g is None:
      g = gram(x2, lay.n_in)
      if key is not None:
        self._cache[key] = g
        self._inputs.append(x)     # keep x alive: its id stays unique
    self.grams[path] = g if path not in self.grams else self.grams[path] + g


@dataclasses.dataclass
class ChannelStats:
  """Per-input-channel statistics of one kernel's activation (float32, see
  :class:`Channels`): ``amax[c] = max |X[t, k]|`` and ``abs_sum[c] = sum |X[t, k]|`` over
  every row ``t`` and every kernel row ``k`` of channel ``c`` (``count[c]`` entries);
  ``sample``: up to ``max_sample`` rows of ``X`` (``(T', K)``, kernel row order) or
  None."""

  amax: jax.Array
  abs_sum: jax.Array
  count: jax.Array
  sample: jax.Array | None

  @property
  def mean_abs(self) -> jax.Array:
    """``mean |x|`` per channel (AWQ's activation scale)."""
    return self.abs_sum / jnp.maximum(self.count, 1.0)


class Stats(Gram):
  """Float forward; records :class:`ChannelStats` (instead of Grams) of the wanted
  kernels' rows ``X``, and with ``max_sample`` a bounded random sample of the rows
  (eager only: the sample is drawn with NumPy), with ``keep_rows`` every row."""

  def __init__(self, where: str, wanted=None, stop_after=None, *, max_sample: int = 0,
               keep_rows: bool = False, seed: int = 0):
    super().__init__(where, wanted, stop_after)
    self.max_sample, self.keep_rows = max_sample, keep_rows
    self.rng = np.random.default_rng(seed)
    self.acc: dict[str, list] = {}
    self.samples: dict[str, list[np.ndarray]] = {}
    self.rows: dict[str, list[jax.Array]] = {}

  def accumulate(self, path, x, x2, lay, key):
    chan = self.channels.get(path)
    k = x2.shape[-1] if lay.n_in == 1 else math.prod(x2.shape[x2.ndim - lay.n_in:])
    flat = x2.reshape((-1, k))
    if self.keep_rows:
      self.rows.setdefault(path, []).append(flat)
    if chan is None:
      return
    a = jnp.abs(flat)
    rc = jnp.asarray(chan.row_chan)
    amax = jnp.zeros((chan.c,), jnp.float32).at[rc].max(jnp.max(a, axis=0))
    asum = jnp.zeros((chan.c,), jnp.float32).at[rc].add(jnp.sum(a, axis=0))
    cnt = np.bincount(chan.row_chan, minlength=chan.c).astype(np.float32) * flat.shape[0]
    prev = self.acc.get(path)
    if prev is not None:
      amax, asum, cnt = jnp.maximum(prev[0], amax), prev[1] + asum, prev[2] + cnt
    self.acc[path] = [amax, asum, cnt]
    if self.max_sample:
      rows = flat.shape[0]
      take = np.sort(self.rng.choice(rows, min(rows, self.max_sample), replace=False))
      self.samples.setdefault(path, []).append(np.asarray(flat)[take])

  def result(self, path: str) -> ChannelStats | None:
    if path not in self.acc:
      return None
    amax, asum, cnt = self.acc[path]
    sample = None
    if self.samples.get(path):
      allr = np.concatenate(self.samples[path])
      if allr.shape[0] > self.max_sample:
        allr = allr[np.sort(self.rng.choice(allr.shape[0], self.max_sample, replace=False))]
      sample = _one_device(jnp.asarray(allr))
    return ChannelStats(_one_device(amax), _one_device(asum), jnp.asarray(cnt), sample)


class Moments(Gram):
  """:class:`Gram` that also sums the rows: ``sums[path] = sum_t X_t`` (``(K,)``, kernel
  row order) and ``counts[path]`` (number of rows), for centred Hessians."""

  def __init__(self, where: str, wanted=None, stop_after=None):
    super().__init__(where, wanted, stop_after)
    self.sums: dict[str, jax.Array] = {}
    self.counts: dict[str, int] = {}

  def accumulate(self, path, x, x2, lay, key):
    super().accumulate(path, x, x2, lay, key)
    k = math.prod(x2.shape[x2.ndim - lay.n_in:])
    flat = x2.reshape((-1, k)).astype(jnp.float32)
    s = jnp.sum(flat, axis=0)
    self.sums[path] = s if path not in self.sums else self.sums[path] + s
    self.counts[path] = self.counts.get(path, 0) + flat.shape[0]


class _InScan(hooks.Mode):
  """The mode of a ``scan`` body: a kernel consumed there has no single Gram."""

  def __init__(self, where):
    super().__init__()
    self.where = where

  def on_weight(self, eqn, invals, wpos):
    raise ValueError(
        f"{self.where}: kernel {invals[wpos].op!r} is consumed inside a scan body "
        "(nn.scan / nnx.scan / lax.scan); its Hessian would mix the iterations. Build the "
        "model unrolled (e.g. scan=False) to calibrate it, or quantize it round-to-nearest "
        "(quantize_params)")


# --------------------------------------------------------------------------- producers
@dataclasses.dataclass(frozen=True)
class Producer:
  """Where a round's activation ``x`` comes from, for folding ``1 / s`` into it.

  ``x = f(z)`` with ``f`` positively homogeneous per channel (dtype casts, ``relu``,
  reshapes that keep the trailing channel block), and ``z`` either ``u * a + b``
  (``kind="layernorm"``: ``a`` a view of a per-channel scale leaf, e.g. a LayerNorm's
  ``scale``) or ``contraction(v, W) + b`` (``kind="dense"`` / ``"conv"``); ``b``: zero or
  more per-channel bias leaves. Dividing the trailing ``c`` entries of every leaf in
  ``leaves`` (``a`` or ``W``, and the ``b``) by ``s`` turns ``x`` into ``x / s``.
  ``path``: the producer's op name (the leaves' module).
  """

  kind: str
  path: str
  leaves: tuple[str, ...]


_PASS = ("convert_element_type", "copy", "copy_p", "reduce_precision", "sharding_constraint",
         "mesh_cast", "reshard")
_VIEW = _PASS + ("reshape", "broadcast_in_dim", "squeeze", "expand_dims")


class _Trace:
  """Provenance of the values of one (abstract) evaluation: ``prov[id(out)] = (eqn,
  invals)`` for every noted equation (the values are kept alive, so ids stay unique),
  ``ids[id(leaf value)] = path`` for the params leaves that entered as plain arrays."""

  def __init__(self):
    self.prov: dict[int, tuple] = {}
    self.ids: dict[int, str] = {}
    self._keep: list = []

  def note(self, eqn, invals, out):
    outs = out if eqn.primitive.multiple_results else [out]
    for o in outs:
      self.prov[id(o)] = (eqn, invals)
    self._keep.append((invals, outs))

  def leaf(self, v, depth: int = 16) -> str | None:
    """The params leaf that ``v`` is a view of (casts, reshapes, broadcasts), or None."""
    for _ in range(depth):
      if isinstance(v, hooks.Weight):
        return v.op
      p = self.ids.get(id(v))
      if p is not None:
        return p
      rec = self.prov.get(id(v))
      if rec is None or rec[0].primitive.name not in _VIEW or not rec[1]:
        return None
      v = rec[1][0]
    return None

  def factor(self, v, depth: int = 4) -> str | None:
    """A leaf ``p`` with ``v = view(p) * ...`` (a product chain), or None."""
    p = self.leaf(v)
    if p is not None or depth == 0:
      return p
    rec = self.prov.get(id(v))
    if rec is None:
      return None
    eqn, ins = rec
    if eqn.primitive.name in _PASS:
      return self.factor(ins[0], depth - 1)
    if eqn.primitive.name == "mul":
      for a in ins:
        p = self.factor(a, depth - 1)
        if p is not None:
          return p
    return None

  def producer(self, x, c: int) -> Producer | None:
    """The :class:`Producer` of activation ``x`` whose trailing ``c`` entries are its
    channels, or None (a model input, a residual sum, a non-homogeneous activation...)."""
    v, biases = x, []
    for _ in range(64):
      rec = self.prov.get(id(v))
      if rec is None:
        return None
      eqn, ins = rec
      name = eqn.primitive.name
      if name in _PASS:
        v = ins[0]
      elif name == "reshape":
        if not _keeps_block(np.shape(ins[0]), c):
          return None
        v = ins[0]
      elif name in ("custom_jvp_call", "pjit", "jit") and _is_relu(eqn):
        v = ins[0]          # relu(z / s) = relu(z) / s for s > 0
      elif name == "max" and len(ins) == 2 and any(_is_zero(a) for a in ins):
        v = ins[1] if _is_zero(ins[0]) else ins[0]
      elif name == "add" and len(ins) == 2:
        bias = [i for i, a in enumerate(ins) if self.leaf(a) is not None]
        if len(bias) != 1:
          return None
        biases.append(self.leaf(ins[bias[0]]))
        v = ins[1 - bias[0]]
      elif name == "mul" and len(ins) == 2:
        for a in ins:
          p = self.factor(a)
          if p is not None:
            return Producer("layernorm", p.rsplit("/", 1)[0] if "/" in p else "",
                            (p, *biases))
        return None
      elif name in ("dot_general", "conv_general_dilated"):
        for a in ins[:2]:
          p = self.leaf(a)
          if p is not None:
            return Producer("dense" if name == "dot_general" else "conv", hooks.op_name(p),
                            (p, *biases))
        return None
      else:
        return None
    return None


def _is_relu(eqn, depth: int = 4) -> bool:
  """Whether a call equation computes ``max(x, 0)`` (``jax.nn.relu``: a custom_jvp around
  a jit around one ``max`` with a zero literal)."""
  sub = eqn.params.get("call_jaxpr", eqn.params.get("jaxpr"))
  sub = getattr(sub, "jaxpr", sub)
  if sub is None or depth == 0 or len(sub.eqns) != 1 or len(sub.invars) != 1:
    return False
  e = sub.eqns[0]
  if e.primitive.name == "max":
    return any(isinstance(v, jcore.Literal) and np.all(np.asarray(v.val) == 0)
               for v in e.invars)
  return e.primitive.name in ("custom_jvp_call", "pjit", "jit") and _is_relu(e, depth - 1)


def _is_zero(a) -> bool:
  if isinstance(a, (hooks.Weight, jax.core.Tracer)):
    return False
  try:
    return bool(np.all(np.asarray(a) == 0))
  except (TypeError, ValueError):
    return False


def _keeps_block(shape, c: int) -> bool:
  """Whether ``shape`` has trailing axes of product ``c`` (the channel block survives a
  reshape to a shape whose trailing block is ``c``)."""
  n = 1
  for d in reversed(shape):
    n *= d
    if n == c:
      return True
    if n > c:
      return False
  return c == 1


def trailing_ok(shape, c: int) -> bool:
  """Whether a leaf of ``shape`` has trailing axes of product ``c`` (it can absorb a
  per-channel ``1 / s`` on its last ``c`` entries)."""
  return len(shape) > 0 and _keeps_block(shape, c)


class _Discover(Gram):
  """:class:`Gram` with every equation's provenance noted (:class:`_Trace`)."""

  def __init__(self, where, trace: _Trace):
    super().__init__(where)
    self.trace = trace
    self.note = trace.note


# --------------------------------------------------------------------------- the model
class Forward:
  """``call(leaves, args)`` = the model's forward with the params leaves ``leaves``
  (listed as ``paths``), through :func:`jaxopt_dnn.model_adapter.adapt`.

  ``apply_fn(variables, *inputs)`` with linen variables (``{"params": ..., ...}``), or
  ``apply_fn(module, *inputs)`` with ``variables`` an ``nnx.Module`` (its ``nnx.Param``
  leaves, paths as in ``nnx.to_pure_dict``; the other state is closed over).
  """

  def __init__(self, apply_fn: Callable, variables: Any, where: str):
    model = adapt(apply_fn, variables)
    sp = model.split(is_qarray, where=where)
    self.params, self.paths = model.params, sp.paths
    leaves, rest = sp.leaves, sp.rest

    def call(lv, args):
      return sp.call(lv, rest, *args)
    self.leaves = dict(zip(self.paths, leaves))
    self.call = call

  def float_leaves(self, params: dict[str, Any] | None = None) -> list:
    """The leaves (``params``: ``{path: value}`` overrides), QArrays dequantized."""
    src = self.leaves if params is None else {**self.leaves, **params}
    return [dequantize(src[p]) if is_qarray(src[p]) else src[p] for p in self.paths]


def _evaluate(fwd: Forward, leaves: list, args: tuple, chosen: set, mode,
              cache: dict | None = None) -> None:
  """Traces ``fwd.call(leaves, args)`` and evaluates it with the ``chosen`` leaves as
  :class:`hooks.Weight` values routed through ``mode`` (``cache``: jaxprs by the
  inputs' types, for eager re-evaluations)."""
  key = None
  if cache is not None:
    flat, tdef = jax.tree.flatten((leaves, args))
    key = (tdef, tuple(jax.typeof(a) for a in flat))
  closed = cache.get(key) if key is not None else None
  if closed is None:
    closed = jax.make_jaxpr(fwd.call)(leaves, args)
    if key is not None:
      cache[key] = closed
  ins = []
  for p, x in zip(fwd.paths, leaves):
    ins.append(hooks.Weight(p, None, x, axes=tuple(range(np.ndim(x)))) if p in chosen else x)
  trace = getattr(mode, "trace", None)
  if trace is not None:
    trace.ids.update({id(x): p for p, x in zip(fwd.paths, ins)
                      if not isinstance(x, hooks.Weight)})
  hooks.evaluate(closed.jaxpr, closed.consts, ins + list(jax.tree.leaves(args)), mode)


# --------------------------------------------------------------------------- driver
class HessianCapture:
  """Input Hessians of the chosen kernels of a linen or NNX model (see module doc).

  Args:
    apply_fn, variables: as for :class:`Forward`.
    batches: iterable of model inputs (a tuple is splatted); materialised once.
    select: ``select(path, leaf) -> bool``: which float leaves to capture.
    require_ops: raise ``ValueError`` (naming ``where``) when no chosen kernel is
      consumed by a contraction on the batches.

  Attributes:
    ops: :class:`~jaxopt_dnn.quant.layout.OpInfo` of every chosen kernel that a
      contraction consumed, in order of first use (``perm`` set when its contracted
      axes do not lead); ``params``: the params tree (NNX: the pure dict); ``leaves``:
      ``{path: leaf}``.
  """

  def __init__(self, apply_fn: Callable, variables: Any, batches: Iterable[Any],
               select: Callable[[str, Any], bool], *, max_batches: int | None = None,
               where: str = "capture", require_ops: bool = False):
    self.where = where
    self.fwd = Forward(apply_fn, variables, where)
    self.params, self.leaves = self.fwd.params, self.fwd.leaves
    bl = []
    for i, b in enumerate(batches):
      if max_batches is not None and i >= max_batches:
        break
      bl.append(tuple(b) if isinstance(b, tuple) else (b,))
    if not bl:
      raise ValueError(f"{where}: the batches iterator is empty; pass at least one batch")
    self.batches = bl
    self.chosen = {p for p, x in self.leaves.items()
                   if _tree.is_float_array(x) and not is_qarray(x) and select(p, x)}
    self._jit = jax.jit(self._grams)
    self._jaxprs: dict = {}
    self.ops = self._discover()
    if require_ops and not self.ops:
      raise ValueError(f"{where}: no kernel chosen by the rules was consumed by a "
                       "contraction (dot_general / conv_general_dilated) on the "
                       "calibration batches")

  def _grams(self, leaves, args):
    mode = Gram(self.where)
    _evaluate(self.fwd, leaves, args, self.chosen, mode)
    return mode.grams

  def _discover(self) -> list[OpInfo]:
    trace = _Trace()
    mode = _Discover(self.where, trace)
    leaves = self.fwd.float_leaves()
    producers: dict[int, Producer | None] = {}

    def run(lv, a):
      _evaluate(self.fwd, lv, a, self.chosen, mode)
      for p in mode.order:     # while the traced values are alive
        r = mode.rounds[p]
        if r not in producers:
          ch = mode.channels[p]
          producers[r] = None if ch is None or not ch.trailing else \
              trace.producer(mode._inputs[r], ch.c)   # noqa: SLF001
      return 0

    jax.eval_shape(run, leaves, self.batches[0])
    self._uses = dict(mode.uses)
    self.channels: dict[str, Channels | None] = dict(mode.channels)
    self.producers: dict[int, Producer | None] = {}
    rnd, out = {}, []
    for p in mode.order:
      r = rnd.setdefault(mode.rounds[p], len(rnd))
      self.producers[r] = producers[mode.rounds[p]]
      lay = mode.layouts[p]
      perm = None if lay.perm == tuple(range(len(lay.perm))) else lay.perm
      out.append(OpInfo(hooks.op_name(p), p, tuple(np.shape(self.leaves[p])), lay.n_in, r,
                        perm=perm))
    return out

  def rounds(self) -> list[list[OpInfo]]:
    out: dict[int, list[OpInfo]] = {}
    for o in self.ops:
      out.setdefault(o.round, []).append(o)
    return [out[k] for k in sorted(out)]

  def hessians(self, params: dict[str, Any] | None = None) -> dict[str, jax.Array]:
    """``{kernel path: 2 sum_batches X^T X}`` of every captured kernel (one jitted
    forward per batch shape; ``params``: ``{path: value}`` overrides, QArrays run
    dequantized)."""
    leaves = self.fwd.float_leaves(params)
    total: dict[str, jax.Array] = {}
    for args in self.batches:
      for p, g in self._jit(leaves, args).items():
        total[p] = g if p not in total else total[p] + g
    return {o.kernel: _one_device(2.0 * total[o.kernel]) for o in self.ops}

  def round_hessians(self, params: dict[str, Any] | None, ops: list[OpInfo]
                     ) -> dict[str, jax.Array]:
    """Hessians of ``ops`` only, with ``params`` overrides (the earlier rounds already
    compressed): an eager forward per batch that stops once they were all seen."""
    leaves = self.fwd.float_leaves(params)
    want = {o.kernel for o in ops}
    total: dict[str, jax.Array] = {}
    for args in self.batches:
      mode = Gram(self.where, wanted=want, stop_after={p: self._uses[p] for p in want})
      try:
        _evaluate(self.fwd, leaves, args, want, mode, self._jaxprs)
      except _Stop:
        pass
      for p, g in mode.grams.items():
        total[p] = g if p not in total else total[p] + g
    missing = sorted(want - set(total))
    if missing:
      raise ValueError(f"{self.where}: kernels {missing} did not run on the calibration "
                       "batches")
    return {p: _one_device(2.0 * total[p]) for p in sorted(want)}


  def round_moments(self, params: dict[str, Any] | None, ops: list[OpInfo]
                    ) -> dict[str, tuple[jax.Array, jax.Array, int]]:
    """``{kernel path: (2 sum X^T X, sum_t X_t, number of rows)}`` of ``ops`` over every
    batch, with ``params`` overrides (eager, as :meth:`round_hessians`)."""
    want, modes = self._eager(params, ops, lambda w, st: Moments(self.where, w, st))
    out = {}
    for p in sorted(want):
      got = [m for m in modes if p in m.grams]
      if not got:
        raise ValueError(f"{self.where}: kernel {p!r} did not run on the calibration "
                         "batches")
      out[p] = (_one_device(2.0 * sum(m.grams[p] for m in got)),
                _one_device(sum(m.sums[p] for m in got)), sum(m.counts[p] for m in got))
    return out

  def _eager(self, params, ops, make_mode):
    """Runs ``make_mode(want, stop_after)`` eagerly on every batch (stopping once the
    kernels of ``ops`` were all seen); returns the modes."""
    leaves = self.fwd.float_leaves(params)
    want = {o.kernel for o in ops}
    modes = []
    for args in self.batches:
      mode = make_mode(want, {p: self._uses[p] for p in want})
      try:
        _evaluate(self.fwd, leaves, args, want, mode, self._jaxprs)
      except _Stop:
        pass
      modes.append(mode)
    return want, modes

  def channel_stats(self, params: dict[str, Any] | None, ops: list[OpInfo], *,
                    max_sample: int = 0) -> dict[str, ChannelStats]:
    """``{kernel path: ChannelStats}`` of ``ops`` over every batch (``params``:
    ``{path: value}`` overrides): per-input-channel ``max |x|`` and ``mean |x|``
    (:class:`Channels`), and up to ``max_sample`` rows of ``X`` (drawn uniformly from
    each batch, then from their union). Kernels whose uses disagree on the channels
    are left out."""
    acc = Stats(self.where, max_sample=max_sample)
    acc.channels = {p: c for p, c in self.channels.items() if c is not None}

    def make(want, stop):
      m = Stats(self.where, want, stop, max_sample=max_sample)
      m.accumulate = lambda path, x, x2, lay, key: acc.accumulate(path, x, x2, lay, key)
      return m

    want, _ = self._eager(params, ops, make)
    missing = sorted(p for p in want if p not in acc.acc and self.channels.get(p) is not None)
    if missing:
      raise ValueError(f"{self.where}: kernels {missing} did not run on the calibration "
                       "batches")
    return {p: acc.result(p) for p in sorted(want) if p in acc.acc}

  def rows(self, params: dict[str, Any] | None, ops: list[OpInfo]
           ) -> dict[str, list[jax.Array]]:
    """``{kernel path: [X_b]}``: the rows ``X`` (``(T_b, K)`` float32, kernel row order)
    each kernel of ``ops`` multiplies on every batch ``b`` (every use of the kernel,
    concatenated), with ``params`` overrides (e.g. the earlier rounds compressed)."""
    want, modes = self._eager(params, ops,
                              lambda w, st: Stats(self.where, w, st, keep_rows=True))
    out = {}
    for p in sorted(want):
      got = [jnp.concatenate(m.rows[p]) if len(m.rows.get(p, ())) > 1 else m.rows[p][0]
             for m in modes if m.rows.get(p)]
      if not got:
        raise ValueError(f"{self.where}: kernel {p!r} did not run on the calibration "
                         "batches")
      out[p] = got
    return out

  def output(self, params: dict[str, Any] | None = None, batch: int = 0):
    """The model's (float) output on calibration batch ``batch``, with ``params``
    overrides (jitted)."""
    if not hasattr(self, "_out"):
      self._out = jax.jit(self.fwd.call)
    return self._out(self.fwd.float_leaves(params), self.batches[batch])


def _one_device(h: jax.Array) -> jax.Array:
  """The solvers run on one device: the (all-reduced, replicated) sum brought there."""
  return jax.device_put(h, jax.devices()[0])
