"""Side-by-side timing helpers: alternate contenders in one process, report medians."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import jax


def alternate(contenders: dict[str, Callable[[], object]], *, rounds: int = 10,
              reps: int = 20, warmup: int = 3) -> dict[str, float]:
  """Median seconds per call of each contender, measured in alternating blocks.

  Each round runs every contender ``reps`` times back to back (blocking on the result
  each call) and records the per-call times; contenders take turns every round so that
  machine noise hits them alike.
  """
  times = alternate_samples(contenders, rounds=rounds, reps=reps, warmup=warmup)
  return {k: statistics.median(v) for k, v in times.items()}


def alternate_samples(contenders: dict[str, Callable[[], object]], *, rounds: int = 10,
                      reps: int = 20, warmup: int = 3) -> dict[str, list[float]]:
  """Like :func:`alternate`, but every per-call time (seconds) of every contender."""
  for fn in contenders.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  times: dict[str, list[float]] = {k: [] for k in contenders}
  for r in range(rounds):
    order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
    for name in order:
      fn = contenders[name]
      for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times[name].append(time.perf_counter() - t)
  return times


def machine() -> str:
  return (f"{platform.processor() or platform.machine()}, jax {jax.__version__}, "
          f"backend {jax.default_backend()}, {jax.device_count()} device(s)")
