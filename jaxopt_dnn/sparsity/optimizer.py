"""An optax transform that prunes while it optimizes: masks live in its state.

``prune_optimizer(tx, schedule)`` wraps any optax ``GradientTransformation``. Each step
it runs the inner optimizer, then returns the update

.. math::  u' = m \\odot (p + u) - p

so that ``optax.apply_updates(p, u') = m ⊙ (p + u)``: the new params are already masked
(no separate pre/post call, every checkpoint consistent). On mask-update steps
(``step % update_every == 0`` up to ``update_until``, and at ``update_until`` itself,
so the schedule's value there is always reached) the masks are
recomputed from ``p + u`` at the scheduled sparsity under ``lax.cond``; otherwise they are
carried. Masks are bool, never the weights' dtype. The inner optimizer sees unmasked
gradients; pruned entries are re-zeroed every step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_dnn.sparsity import masks as _m

PyTree = Any


class PruneState(NamedTuple):
  """State of :func:`prune_optimizer`."""

  count: jax.Array          # int32 step counter
  masks: PyTree             # bool mask tree (dense markers for unpruned leaves)
  inner_state: optax.OptState
  key: jax.Array            # PRNG key (used by method="random")


_METHODS = ("magnitude", "random", "nm", "channel")


def _mask_fn(method: str, scope: str, rules, distribution: str, n: int, m: int, axis):
  """``(params, sparsity, key, roles) -> masks`` for the chosen method."""
  if method == "magnitude":
    return lambda p, s, key, r: _m.magnitude_masks(p, s, scope=scope, rules=rules,
                                                   distribution=distribution, roles=r)
  if method == "random":
    return lambda p, s, key, r: _m.random_masks(key, p, s, scope=scope, rules=rules,
                                                distribution=distribution, roles=r)
  if method == "channel":
    return lambda p, s, key, r: _m.channel_masks(p, s, rules=rules, distribution=distribution,
                                                 roles=r)
  if method == "nm":
    def nm(p, s, key, r):
      pattern = _m.nm_masks(p, n, m, axis=axis, rules=rules, roles=r)
      # The N:M pattern is switched on once the schedule is positive.
      return jax.tree.map(lambda mk: mk | (s <= 0), pattern)
    return nm
  raise ValueError(f"method must be one of {_METHODS}, got {method!r}")


def prune_optimizer(tx: optax.GradientTransformation, schedule: Callable[[Any], Any], *,
                    method: str = "magnitude", scope: str = "layer", update_every: int = 10,
                    update_until: int | None = None, rules=None, distribution: str = "uniform",
                    n: int = 2, m: int = 4, axis: int | tuple[int, ...] | None = None,
                    roles: Any = None, seed: int = 0) -> optax.GradientTransformation:
  """Wraps ``tx`` so that its updates keep the params pruned.

  Args:
    tx: any optax optimizer (``sgd``, ``adam``, ``adamw``, ``inject_hyperparams``,
      ``chain``, ...).
    schedule: ``step -> sparsity`` (e.g. :func:`polynomial_schedule`). For
      ``method="nm"`` the N:M pattern is applied while ``schedule(step) > 0``.
    method: ``"magnitude"``, ``"random"``, ``"nm"`` or ``"channel"``.
    scope: ``"layer"`` or ``"global"`` (magnitude / random).
    update_every: recompute masks when ``step % update_every == 0``.
    update_until: last step at which masks are recomputed (always recomputed at that
      step, then frozen for fine-tuning); ``None`` recomputes for ever.
    rules: which leaves to prune (see :func:`magnitude_masks`).
    distribution: ``"uniform"``, ``"erk"`` or a ``{regex: sparsity}`` dict, whose values
      are multiplied by ``schedule(step) / max(dict values)`` (the largest one follows
      the schedule).
    n, m: N:M parameters (``n`` kept of every ``m`` consecutive weights along the
      contraction, see :func:`~jaxopt_dnn.sparsity.nm_masks`).
    axis: explicit N:M group axis (an override for every chosen leaf); by default the
      axes come from ``roles``.
    roles: ``{path: LeafRole}`` from :func:`jaxopt_dnn.roles.trace`, or a callable
      ``params -> {path: LeafRole}`` (called, on abstract values, whenever ``init`` /
      ``update`` are traced; e.g. ``lambda p: roles.trace(model.apply, {"params": p},
      x)``). With it, N:M groups follow each kernel's traced contraction, channel masks
      cover the following BatchNorm (and, by default, only kernels whose channels
      :func:`~jaxopt_dnn.sparsity.shrink_channels` can remove), and layer-scope
      magnitude / random masks rank ``nn.scan``-stacked kernels per layer slice.
      ``method="nm"`` needs ``roles`` or ``axis``.
    seed: PRNG seed for ``method="random"``.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`PruneState`; its
    ``update`` requires ``params``.
  """
  if not isinstance(update_every, (int, np.integer)) or isinstance(update_every, bool):
    raise TypeError(f"update_every must be an int >= 1, got {type(update_every).__name__}: "
                    f"{update_every!r}")
  if update_every < 1:
    raise ValueError(f"update_every must be >= 1, got {update_every}")
  if update_until is not None and (
      not isinstance(update_until, (int, np.integer)) or isinstance(update_until, bool)):
    raise TypeError(f"update_until must be None or an int, got {update_until!r}")
  if method == "nm":
    if not (isinstance(n, int) and isinstance(m, int)) or not 0 < n <= m:
      raise ValueError(f"N:M needs integers 0 < n <= m, got n={n!r}, m={m!r}")
    if axis is None and roles is None:
      raise ValueError(
          "prune_optimizer(method='nm'): the N:M groups run along each kernel's traced "
          "contraction: pass roles=jaxopt_dnn.roles.trace(apply_fn, variables, *x) (or a "
          "callable params -> roles), or an explicit axis=")
  if roles is not None and not (callable(roles) or isinstance(roles, dict)):
    raise TypeError(f"prune_optimizer: roles must be a {{path: LeafRole}} dict or a callable "
                    f"params -> dict, got {type(roles).__name__}")

  def roles_of(params):
    return roles(params) if callable(roles) else roles
  sparsity_arg = distribution if isinstance(distribution, dict) else None
  dist = "uniform" if sparsity_arg is not None else distribution
  compute = _mask_fn(method, scope, rules, dist, n, m, axis)

  def scheduled(s):
    if sparsity_arg is None:
      return s
    peak = max(sparsity_arg.values())
    return {rx: s * (v / peak if peak > 0 else 0.0) for rx, v in sparsity_arg.items()}

  def init_fn(params):
    # Which leaves get a mask, read off the traced mask computation (nothing is computed;
    # rules / shapes, e.g. N:M divisibility, are still validated): a dense start.
    r = roles_of(params)
    shape_masks = jax.eval_shape(
        lambda p: compute(p, scheduled(jnp.float32(0.0)), jax.random.key(seed), r), params)
    masks = jax.tree.map(
        lambda mk, p: (_m.dense_marker() if _m.is_dense(mk)
                       else jnp.ones(jnp.shape(p), jnp.bool_)), shape_masks, params)
    return PruneState(jnp.zeros((), jnp.int32), masks, tx.init(params), jax.random.key(seed))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("prune_optimizer needs `params` in update(grads, state, params)")
    inner_updates, inner_state = tx.update(updates, state.inner_state, params)
    candidate = optax.apply_updates(params, inner_updates)
    step = state.count
    due = (step % update_every) == 0
    if update_until is not None:
      due = (due & (step <= update_until)) | (step == update_until)
    key = jax.random.fold_in(state.key, step)
    r = roles_of(params)
    masks = jax.lax.cond(
        due, lambda: compute(candidate, scheduled(schedule(step)), key, r),
        lambda: state.masks)
    new_updates = jax.tree.map(
        lambda u, p, c, mk: u if _m.is_dense(mk) else jnp.where(mk, c, jnp.zeros((), c.dtype)) - p,
        inner_updates, params, candidate, masks)
    return new_updates, PruneState(step + 1, masks, inner_state, state.key)

  return optax.GradientTransformation(init_fn, update_fn)


def _unwrap(tree: Any) -> Any:
  """NNX variables (``OptVariable`` in an ``nnx.Optimizer`` state) -> their values."""
  try:
    from flax import nnx  # noqa: PLC0415
  except ImportError:   # pragma: no cover - flax is a dependency
    return tree
  is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  return jax.tree.map(lambda v: v.get_value() if is_var(v) else v, tree, is_leaf=is_var)


def masks_from_state(opt_state: Any) -> PyTree:
  """Returns the masks of the (first) :class:`PruneState` inside ``opt_state``.

  Works on an optax state and on ``nnx.Optimizer(...).opt_state`` (whose leaves are
  ``OptVariable``-wrapped): the masks come back as plain arrays, in the params'
  container structure, and are accepted by ``apply_masks`` / ``sparsity_report`` /
  ``pack`` against ``nnx.state(model, nnx.Param)``.
  """
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, PruneState))
           if isinstance(s, PruneState)]
  if not found:
    raise ValueError("no PruneState in this optimizer state: was it built with prune_optimizer? "
                     f"(got {type(opt_state).__name__})")
  return _unwrap(found[0].masks)
