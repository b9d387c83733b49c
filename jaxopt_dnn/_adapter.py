"""Linen / NNX glue of the Trainer: rng streams, the global view, NNX state translation.

* rng streams: :func:`linen_rngs` / :func:`with_rngs` key every stream a linen module
  may draw; :func:`infer` is an inference forward (no rngs unless the model still
  draws); :func:`nnx_reseed` re-keys an NNX module's streams each step;
* the global view: :func:`linen_global_view` / :func:`nnx_global_view` run models written
  for ``pmap`` (``BatchNorm(axis_name="batch")``) inside one ``jit`` over the mesh;
* NNX state: :func:`nnx_build` merges pure-dict params and collections into a fresh
  module; :func:`keys_to_data` / :func:`data_to_keys` carry typed PRNG keys as raw data
  through the train state; :func:`nnx_stats` reads QAT ranges out of NNX collections.

The Trainer and its model halves (:mod:`jaxopt_dnn.train_model`) are its only clients;
the quantization and sparsity transforms keep their own interception (``quant.qat``,
``quant.serve``) and never import this module.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PyTree = Any


def as_host(tree: PyTree) -> PyTree:
  """Numpy copies of the leaves (typed keys as raw key data): identical in every process."""
  def one(x):
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
      return np.asarray(jax.random.key_data(x))
    return np.asarray(x)
  return jax.tree.map(one, tree)


def keys_to_data(tree: PyTree) -> tuple[PyTree, PyTree]:
  """Typed PRNG key leaves -> raw ``uint32`` data, plus the impls to wrap them back."""
  leaves, treedef = jax.tree.flatten(tree)
  impls = [jax.random.key_impl(x) if jax.dtypes.issubdtype(getattr(x, "dtype", None),
                                                           jax.dtypes.prng_key) else None
           for x in leaves]
  data = [jax.random.key_data(x) if i is not None else x for x, i in zip(leaves, impls)]
  return jax.tree.unflatten(treedef, data), tuple(impls)


def data_to_keys(tree: PyTree, impls: tuple) -> PyTree:
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, [x if i is None else jax.random.wrap_key_data(x, impl=i)
                                      for x, i in zip(leaves, impls)])

# ------------------------------------------------------------------- rng streams

def linen_rngs(key: jax.Array) -> dict[str, jax.Array]:
  """The ``rngs`` of one linen forward: a key for every stream a module may draw.

  ``{"dropout": fold_in(key, 0), "params": fold_in(key, 1)}``. Any other stream a module
  asks for (``self.make_rng("noise")``) is drawn from ``"params"`` by flax's own rule
  (``Module.make_rng``: a stream that was not passed falls back to ``"params"``); flax
  folds the module path and a per-scope counter into every draw, so each call site gets
  its own key, and a fresh ``key`` per step gives fresh keys for every stream.
  """
  return {"dropout": jax.random.fold_in(key, 0), "params": jax.random.fold_in(key, 1)}


def with_rngs(kwargs: Mapping, key: jax.Array) -> dict:
  """``kwargs`` with ``rngs`` for every stream; the caller's own ``rngs`` win per name."""
  kwargs = dict(kwargs)
  given = kwargs.pop("rngs", None)
  if given is not None and not isinstance(given, Mapping):   # a single key: flax's "params"
    given = {"params": given}
  kwargs["rngs"] = {**linen_rngs(key), **dict(given or {})}
  return kwargs


#: fixed key of the inference forwards that draw random numbers (see ``infer``)
SERVE_SEED = 0


def infer(apply: Callable, variables: PyTree, *args, **kwargs):
  """An inference forward: no ``rngs`` (flax's inference convention), unless the model
  still draws random numbers (e.g. dropout switched by a config field, not by a call
  argument: flax lm1b's ``TransformerConfig(deterministic=False)``); then every stream
  gets a fixed key (:func:`linen_rngs` of ``key(0)``), so the forward stays a
  deterministic function of its inputs."""
  if "rngs" in kwargs:
    return apply(variables, *args, **kwargs)
  try:
    return apply(variables, *args, **kwargs)
  except flax.errors.InvalidRngError:
    return apply(variables, *args, **with_rngs(kwargs, jax.random.key(SERVE_SEED)))


def cast_floating(tree: PyTree, dtype: Any) -> PyTree:
  """A model output of any pytree structure with its floating array leaves in ``dtype``
  (integer / bool leaves, ``None`` and non-array leaves unchanged)."""
  def one(x):
    if isinstance(x, jax.Array | np.ndarray) and jnp.issubdtype(x.dtype, jnp.floating):
      return x.astype(dtype)
    return x
  return jax.tree.map(one, tree)

# ----------------------------------------------------- global-view collectives


def _unbound(names: Any) -> tuple[Any, bool]:
  """``(names with the unbound axis names removed, whether any was removed)``.

  ``names``: ``None``, an axis name or a tuple of them (``BatchNorm.axis_name``). A
  name is bound when an enclosing ``shard_map`` / ``vmap`` / ``pmap`` defines it
  (``lax.axis_size`` succeeds).
  """
  if names is None:
    return None, False
  many = isinstance(names, (tuple, list))
  if not many and not isinstance(names, str):
    return names, False
  kept = []
  for n in (names if many else (names,)):
    try:
      jax.lax.axis_size(n)
      kept.append(n)
    except NameError:
      pass
  n_all = len(names) if many else 1
  if len(kept) == n_all:
    return names, False
  if not kept:
    return None, True
  return (tuple(kept) if many else kept[0]), True


def _global_view_interceptor(next_fun, args, kwargs, context):
  """Linen: a module whose ``axis_name`` is not bound runs with it unset.

  Models written for ``pmap`` reduce batch statistics across replicas, e.g. flax
  imagenet's ``BatchNorm(axis_name="batch")``: ``mean = pmean(mean_local, "batch")``.
  The Trainer's step is one ``jit`` in the global view, where the module already sees
  the whole (sharded) batch and XLA reduces over the mesh: ``mean_local`` *is* the
  cross-replica mean, and the ``pmean`` would fail (unbound axis name). Names that an
  enclosing ``shard_map`` / ``vmap`` binds are kept.
  """
  return call_in_global_view(context.module, next_fun, *args, **kwargs)


def call_in_global_view(mod: Any, call: Callable, *args, **kwargs):
  """``call(*args, **kwargs)`` with ``mod.axis_name`` stripped of its unbound names
  (:func:`_unbound`) meanwhile, then restored; linen and NNX modules alike."""
  old = getattr(mod, "axis_name", None)
  new, changed = _unbound(old)
  if not changed:
    return call(*args, **kwargs)
  object.__setattr__(mod, "axis_name", new)
  try:
    return call(*args, **kwargs)
  finally:
    object.__setattr__(mod, "axis_name", old)


def linen_global_view(fn: Callable) -> Callable:
  """``fn`` (a linen apply) run under :func:`_global_view_interceptor`."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with nn.intercept_methods(_global_view_interceptor):
      return fn(*args, **kwargs)
  return wrapped


@functools.lru_cache(maxsize=None)
def _global_view_class(cls: type) -> type:
  """NNX: a subclass of ``cls`` whose ``__call__`` unsets unbound ``axis_name``s (see
  :func:`_global_view_interceptor`) while it runs."""
  def __call__(self, *args, **kwargs):
    return call_in_global_view(self, cls.__call__, self, *args, **kwargs)
  return type(f"GlobalView{cls.__name__}", (cls,), {"__call__": __call__})


def nnx_global_view(module: nnx.Module) -> nnx.Module:
  """A fresh NNX module (mutated in place) whose modules with an ``axis_name`` (BatchNorm
  written for ``pmap``) drop the names that are unbound when they run."""
  for _, node in list(nnx.iter_graph(module)):
    if (isinstance(node, nnx.Module) and getattr(node, "axis_name", None) is not None
        and callable(getattr(type(node), "__call__", None))):
      node.__class__ = _global_view_class(type(node))
  return module


def nnx_reseed(module: nnx.Module, key: jax.Array) -> nnx.Module:
  """Re-keys every RNG stream an NNX module holds from ``key`` (in place).

  Stream ``tag`` gets ``fold_in(key, crc32(tag))``; modules holding streams of the same
  tag (each ``nnx.Dropout`` forks its own) get distinct keys (``nnx.reseed`` draws one
  per stream, in graph order), and their counts restart at 0.
  """
  tags = sorted({node.tag for _, node in nnx.iter_graph(module)
                 if isinstance(node, nnx.RngStream)})
  if tags:
    nnx.reseed(module, policy="match_shape",
               **{t: jax.random.fold_in(key, zlib.crc32(t.encode())) for t in tags})
  return module

def nnx_stats(collections: Mapping) -> dict:
  """NNX QAT ranges as a ``quant_stats`` tree for int8_apply: every ``QuantStat`` the
  interception created (``blk/quant_input_amax`` -> op ``blk``, ``blk/quant_w_input_amax``
  -> op ``blk/w``, by :func:`jaxopt_dnn.quant.stats.flat_stats`)."""
  from jaxopt_dnn.quant.stats import flat_stats, stats_tree
  return stats_tree(flat_stats(dict(collections)))

def nnx_build(graphdef, param_template, rest_template, impls, params: PyTree,
               collections: PyTree) -> nnx.Module:
  """A fresh module of ``graphdef`` holding ``params`` and ``collections`` (pure dicts
  replacing the templates' values; the templates are not modified)."""
  p = jax.tree.map(lambda x: x, param_template)
  nnx.replace_by_pure_dict(p, params)
  r = jax.tree.map(lambda x: x, rest_template)
  if collections:
    nnx.replace_by_pure_dict(r, data_to_keys(collections, impls))
  return nnx.merge(graphdef, p, r)
