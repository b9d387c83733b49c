"""Sparsity schedules: plain ``step -> sparsity`` callables.

They take a Python int or a traced integer step and return a float32 scalar, so they
compose with optax's schedule combinators (``optax.join_schedules``) and run under
``jit``. Before ``begin`` every schedule returns 0 (no pruning).
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from jaxopt_dnn.sparsity.masks import _check_sparsity

Schedule = Callable[[int], "jnp.ndarray"]


def constant_schedule(sparsity: float, begin: int = 0) -> Schedule:
  """``s(t) = sparsity`` for ``t >= begin``, else 0."""
  _check_sparsity(sparsity, "constant_schedule")
  if begin < 0:
    raise ValueError(f"begin must be >= 0, got {begin}")

  def schedule(step):
    return jnp.where(jnp.asarray(step) >= begin, jnp.float32(sparsity), jnp.float32(0.0))

  return schedule


def polynomial_schedule(initial: float, final: float, begin: int, end: int, power: float = 3.0,
                        frequency: int = 1) -> Schedule:
  """Gradual pruning of Zhu & Gupta (2017), "To prune, or not to prune".

  .. math::
     s_t = s_f + (s_i - s_f) \\left(1 - \\frac{\\tau - t_0}{t_1 - t_0}\\right)^{p},
     \\qquad \\tau = t_0 + \\left\\lfloor \\frac{\\min(t, t_1) - t_0}{\\Delta t} \\right\\rfloor \\Delta t

  for ``t >= t_0`` (``begin``), with ``t_1 = end`` and ``Δt = frequency``; it reaches
  ``final`` at ``end`` (and stays there), and is 0 before ``begin``.
  """
  _check_sparsity(initial, "polynomial_schedule(initial)")
  _check_sparsity(final, "polynomial_schedule(final)")
  if not 0 <= begin < end:
    raise ValueError(f"polynomial_schedule needs 0 <= begin < end, got begin={begin}, end={end}")
  if frequency < 1:
    raise ValueError(f"frequency must be >= 1, got {frequency}")
  if power <= 0:
    raise ValueError(f"power must be > 0, got {power}")

  def schedule(step):
    t = jnp.minimum(jnp.asarray(step, jnp.int32), end)
    tau = begin + ((t - begin) // frequency) * frequency
    frac = jnp.clip((tau - begin) / (end - begin), 0.0, 1.0).astype(jnp.float32)
    frac = jnp.where(t >= end, jnp.float32(1.0), frac)
    s = final + (initial - final) * (1.0 - frac) ** power
    return jnp.where(jnp.asarray(step) >= begin, s.astype(jnp.float32), jnp.float32(0.0))

  return schedule
