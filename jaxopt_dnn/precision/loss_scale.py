"""Loss scaling for float16 training, and skipping non-finite steps.

float16 has a 5-bit exponent: gradients below ~6e-8 flush to zero. Loss scaling
multiplies the loss by ``S`` before differentiation and divides the gradients by ``S``
afterwards (``g = (d(S * L) / dp) / S``). :class:`DynamicLossScale` halves ``S`` on a
step with non-finite gradients (that step is skipped: params and optimizer state are
returned bit-identical) and doubles it after ``period`` finite steps. Every loss scale is
a pytree whose every field survives flatten/unflatten.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_dnn import _tree
from jaxopt_dnn.quant.qarray import is_qarray

PyTree = Any


def _register(cls, data_fields: tuple[str, ...], meta_fields: tuple[str, ...]):
  """Registers a frozen dataclass as a pytree: arrays are children, the rest aux data.

  Every field is carried (children or aux), so ``unflatten(flatten(x)) == x`` field by
  field (jmp lost ``min_loss_scale`` here). Unflatten bypasses ``__init__`` so that
  placeholder leaves (tracers, ``None``, sharding objects, zeros) are accepted: this is
  why it is not ``jax.tree_util.register_dataclass``, whose unflatten calls ``__init__``
  and so the validation (``jax.tree.map(jnp.zeros_like, scale)`` would raise "must be
  > 0"; checked on jax 0.10.2).
  """
  def flatten_with_keys(obj):
    children = [(jax.tree_util.GetAttrKey(f), getattr(obj, f)) for f in data_fields]
    return children, tuple(getattr(obj, f) for f in meta_fields)

  def unflatten(aux, children):
    obj = object.__new__(cls)
    for f, v in zip(data_fields, children):
      object.__setattr__(obj, f, v)
    for f, v in zip(meta_fields, aux):
      object.__setattr__(obj, f, v)
    return obj

  def flatten(obj):
    return [getattr(obj, f) for f in data_fields], tuple(getattr(obj, f) for f in meta_fields)

  jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
  return cls


def _scale_tree(tree: PyTree, factor: jax.Array) -> PyTree:
  return jax.tree.map(
      lambda x: x * factor.astype(x.dtype) if _tree.is_float_array(x) else x, tree,
      is_leaf=is_qarray)


def _as_scalar(x: Any, dtype):
  if isinstance(x, (int, float, np.number)) or (isinstance(x, np.ndarray) and x.ndim == 0):
    return jnp.asarray(x, dtype)
  return x


def _check_scale(x: Any, where: str) -> None:
  """A concrete loss scale must be finite and > 0 (0 gives NaN gradients, a negative one
  flips their sign). Traced values and the placeholders pytree utilities unflatten with
  are not checked."""
  if isinstance(x, bool):
    raise TypeError(f"{where} must be a number, got {x!r}")
  if isinstance(x, (int, float, np.number, np.ndarray)) or (
      isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)):
    if np.ndim(x) != 0:
      raise ValueError(f"{where} must be a scalar, got shape {np.shape(x)}")
    v = float(np.asarray(x))
    if not (np.isfinite(v) and v > 0):
      raise ValueError(f"{where} must be finite and > 0, got {v}")


@dataclasses.dataclass(frozen=True, eq=False)
class NoOpLossScale:
  """No scaling (float32 / bfloat16 training): ``scale``/``unscale`` are identities."""

  @property
  def loss_scale(self) -> jax.Array:
    return jnp.ones((), jnp.float32)

  def scale(self, tree: PyTree) -> PyTree:
    return tree

  def unscale(self, tree: PyTree) -> PyTree:
    return tree

  def adjust(self, grads_finite: jax.Array) -> NoOpLossScale:
    del grads_finite
    return self


class _ScalesByLossScale:
  """``scale(x) = S x`` and ``unscale(g) = g / S`` for a class with a ``loss_scale`` field."""

  def scale(self, tree: PyTree) -> PyTree:
    return _scale_tree(tree, self.loss_scale)

  def unscale(self, tree: PyTree) -> PyTree:
    return _scale_tree(tree, 1.0 / self.loss_scale)


@dataclasses.dataclass(frozen=True, eq=False)
class StaticLossScale(_ScalesByLossScale):
  """A fixed scale ``S``: ``scale(x) = S x``, ``unscale(g) = g / S``."""

  loss_scale: Any

  def __post_init__(self):
    _check_scale(self.loss_scale, "StaticLossScale.loss_scale")
    object.__setattr__(self, "loss_scale", _as_scalar(self.loss_scale, jnp.float32))

  def adjust(self, grads_finite: jax.Array) -> StaticLossScale:
    del grads_finite
    return self


@dataclasses.dataclass(frozen=True, eq=False)
class DynamicLossScale(_ScalesByLossScale):
  """Loss scale that adapts to overflow.

  On a step with finite gradients ``counter += 1``; when ``counter == period`` the
  scale becomes ``S * factor`` (if finite) and the counter resets. On a non-finite step
  ``S <- max(S / factor, min_loss_scale)`` and the counter resets.

  Attributes:
    loss_scale: current ``S`` (float32 scalar; a pytree child).
    period: finite steps between increases (aux data).
    factor: multiplicative change, > 1 (aux data).
    min_loss_scale: floor for ``S`` (aux data; survives flatten/unflatten).
    counter: finite steps since the last change (int32 scalar; a pytree child).
  """

  loss_scale: Any
  period: int = 2000
  factor: float = 2.0
  min_loss_scale: float = 1.0
  counter: Any = 0

  def __post_init__(self):
    _check_scale(self.loss_scale, "DynamicLossScale.loss_scale")
    if not isinstance(self.period, (int, np.integer)) or self.period < 1:
      raise ValueError(f"DynamicLossScale.period must be a positive int, got {self.period!r}")
    if not float(self.factor) > 1.0:
      raise ValueError(f"DynamicLossScale.factor must be > 1, got {self.factor!r}")
    if not float(self.min_loss_scale) > 0.0:
      raise ValueError(
          f"DynamicLossScale.min_loss_scale must be > 0, got {self.min_loss_scale!r}")
    object.__setattr__(self, "period", int(self.period))
    object.__setattr__(self, "factor", float(self.factor))
    object.__setattr__(self, "min_loss_scale", float(self.min_loss_scale))
    object.__setattr__(self, "loss_scale", _as_scalar(self.loss_scale, jnp.float32))
    object.__setattr__(self, "counter", _as_scalar(self.counter, jnp.int32))

  def adjust(self, grads_finite: jax.Array) -> DynamicLossScale:
    """The next loss scale given whether this step's gradients were all finite."""
    counter = self.counter + 1
    grow = jnp.logical_and(grads_finite, counter == self.period)
    bigger = self.loss_scale * self.factor
    bigger = jnp.where(jnp.isfinite(bigger), bigger, self.loss_scale)
    smaller = jnp.maximum(jnp.asarray(self.min_loss_scale, self.loss_scale.dtype),
                          self.loss_scale / self.factor)
    loss_scale = jnp.where(grads_finite, jnp.where(grow, bigger, self.loss_scale), smaller)
    counter = jnp.where(jnp.logical_and(grads_finite, jnp.logical_not(grow)), counter, 0)
    return dataclasses.replace(self, loss_scale=loss_scale,
                               counter=counter.astype(jnp.int32))


_register(NoOpLossScale, (), ())
_register(StaticLossScale, ("loss_scale",), ())
_register(DynamicLossScale, ("loss_scale", "counter"), ("period", "factor", "min_loss_scale"))

LossScale = NoOpLossScale | StaticLossScale | DynamicLossScale


def all_finite(tree: PyTree) -> jax.Array:
  """Scalar bool: every element of every floating leaf is finite (True if none)."""
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if _tree.is_float_array(x)]
  if not checks:
    return jnp.asarray(True)
  return jnp.all(jnp.stack(checks))


def select_tree(pred: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
  """Leafwise ``where(pred, a, b)`` for a scalar ``pred``; the result is bit-identical
  to the chosen tree."""
  s_true, s_false = jax.tree.structure(on_true), jax.tree.structure(on_false)
  if s_true != s_false:
    raise ValueError(f"select_tree: structures differ: {s_true} vs {s_false}")
  return optax.tree_utils.tree_where(pred, on_true, on_false)


def value_and_grad(loss_fn: Callable[..., Any], *, has_aux: bool = False,
                   argnums: int = 0) -> Callable[..., Any]:
  """Loss-scaled ``jax.value_and_grad``.

  Returns ``fn(loss_scale, *args, **kwargs) -> (value, grads)`` where ``grads`` are the
  *unscaled* gradients ``(d(S * L) / dp) / S`` and ``value`` is the unscaled loss (or
  ``(loss, aux)`` with ``has_aux``).
  """
  def fn(loss_scale, *args, **kwargs):
    def scaled(*a, **k):
      out = loss_fn(*a, **k)
      loss, aux = out if has_aux else (out, None)
      return loss_scale.scale(loss), (loss, aux)
    (_, (loss, aux)), grads = jax.value_and_grad(
        scaled, argnums=argnums, has_aux=True)(*args, **kwargs)
    return ((loss, aux) if has_aux else loss), loss_scale.unscale(grads)
  return fn


class GuardedUpdate(NamedTuple):
  params: PyTree
  opt_state: PyTree
  loss_scale: Any
  grads_finite: jax.Array


def guarded_update(optimizer: optax.GradientTransformation, grads: PyTree,
                   opt_state: PyTree, params: PyTree, loss_scale: Any) -> GuardedUpdate:
  """Applies ``optimizer`` only if ``grads`` are all finite; adjusts the loss scale.

  ``grads`` must already be unscaled (see :func:`value_and_grad`). On a non-finite step
  the returned ``params`` and ``opt_state`` are bit-identical to the inputs and the
  scale goes down; otherwise ``params <- params + optimizer.update(grads)``.
  """
  finite = all_finite(grads)
  updates, new_opt_state = optimizer.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  return GuardedUpdate(select_tree(finite, new_params, params),
                       select_tree(finite, new_opt_state, opt_state),
                       loss_scale.adjust(finite), finite)
