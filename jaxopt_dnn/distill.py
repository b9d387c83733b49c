"""Knowledge distillation loss (Hinton, Vinyals & Dean, 2015, arXiv:1503.02531).

The student is trained on a mix of the teacher's softened distribution and the hard
labels:

  L = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)

with student logits ``s``, teacher logits ``t``, temperature ``T`` and labels ``y``.

Why ``T^2``: the gradient of the soft term with respect to a student logit is
``(p_s - p_t) / T`` (``p = softmax(. / T)``). For large ``T``,
``p_s - p_t ~= (s - t - mean(s - t)) / (K T)`` over ``K`` classes, so the gradient
shrinks like ``1 / T^2``. Multiplying by ``T^2`` keeps the soft term's gradient
magnitude roughly independent of ``T``, so changing the temperature does not silently
re-weight it against the hard-label term (the paper, section 2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.special import xlogy


def _check_scalar(name, value, lo, hi, lo_open):
  if isinstance(value, jax.core.Tracer):
    return
  v = float(np.asarray(value))
  bad = (v <= lo if lo_open else v < lo) or v > hi or not np.isfinite(v)
  if bad:
    bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
    raise ValueError(f"distill.loss: {name} must be in {bound}, got {value!r}")


def kl_divergence(student_logits: jax.Array, teacher_logits: jax.Array,
                  temperature: float = 1.0) -> jax.Array:
  """Per-example ``KL(softmax(t / T) || softmax(s / T))``, shape ``logits.shape[:-1]``.

  Computed in float32 (at least) from log-softmaxes; teacher probabilities of exactly
  zero contribute zero (``xlogy``).
  """
  dt = jnp.promote_types(student_logits.dtype, jnp.float32)
  s = student_logits.astype(dt) / temperature
  t = teacher_logits.astype(dt) / temperature
  log_ps = jax.nn.log_softmax(s, axis=-1)
  log_pt = jax.nn.log_softmax(t, axis=-1)
  pt = jnp.exp(log_pt)
  return jnp.sum(xlogy(pt, pt) - pt * log_ps, axis=-1)


def loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
         temperature: float = 4.0, alpha: float = 0.9) -> jax.Array:
  """Mean distillation loss over the batch (see the module docstring).

  ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, labels)``

  Args:
    student_logits: ``(..., K)`` student logits (gradients flow into these).
    teacher_logits: ``(..., K)`` teacher logits (treated as constants:
      ``stop_gradient``).
    labels: ``(...)`` integer class labels, or ``(..., K)`` probabilities.
    temperature: ``T > 0``; ``T = 1`` is the plain softmax.
    alpha: weight of the soft term, in ``[0, 1]``.

  Returns:
    A float32 scalar.
  """
  s_shape, t_shape = np.shape(student_logits), np.shape(teacher_logits)
  if s_shape != t_shape or len(s_shape) < 1:
    raise ValueError(f"distill.loss: student logits {s_shape} and teacher logits {t_shape} "
                     "must have the same shape (..., num_classes)")
  l_shape = np.shape(labels)
  if l_shape not in (s_shape[:-1], s_shape):
    raise ValueError(f"distill.loss: labels of shape {l_shape} fit neither integer labels "
                     f"{s_shape[:-1]} nor probabilities {s_shape}")
  _check_scalar("temperature", temperature, 0.0, np.inf, True)
  _check_scalar("alpha", alpha, 0.0, 1.0, False)
  if l_shape != s_shape:
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
      raise TypeError(f"distill.loss: labels of shape {l_shape} must be integer class labels, "
                      f"got dtype {jnp.result_type(labels)}")
    if not isinstance(labels, jax.core.Tracer) and np.size(labels):
      lab = np.asarray(labels)
      k = s_shape[-1]
      if lab.min() < 0 or lab.max() >= k:
        bad = lab.max() if lab.max() >= k else lab.min()
        raise ValueError(f"distill.loss: label {int(bad)} is out of range for {k} classes "
                         f"(labels must be in [0, {k - 1}])")
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  soft = kl_divergence(student_logits, teacher_logits, temperature)
  s32 = student_logits.astype(jnp.promote_types(student_logits.dtype, jnp.float32))
  if l_shape == s_shape:
    hard = optax.softmax_cross_entropy(s32, labels.astype(s32.dtype))
  else:
    hard = optax.softmax_cross_entropy_with_integer_labels(s32, labels)
  t2 = jnp.square(jnp.asarray(temperature, s32.dtype))
  return jnp.mean(alpha * t2 * soft + (1.0 - alpha) * hard)
