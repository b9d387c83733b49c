"""Side-by-side latency: contenders alternate in one process, so noise hits them alike.

One timer for the benchmarks (``bench/``) and the app's comparison table. A *round* runs
each contender back to back (``reps`` calls, or as many as fit in ``round_budget_s``,
at least one; each call blocks on its result); rounds alternate forward and reverse
order. :func:`alternate_samples` returns every per-call time; :func:`alternate` the
median per call; :func:`alternating_latency` the median of the round medians with their
min-max, in milliseconds.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import jax


def alternate_rounds(contenders: dict[str, Callable[[], object]], *, rounds: int = 10,
                     reps: int = 20, warmup: int = 3, round_budget_s: float | None = None
                     ) -> dict[str, list[list[float]]]:
  """``{name: [[seconds per call] per round]}`` (``warmup`` untimed calls first)."""
  if rounds < 1 or reps < 1:
    raise ValueError(f"rounds and reps must be >= 1, got rounds={rounds}, reps={reps}")
  for fn in contenders.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  out: dict[str, list[list[float]]] = {k: [] for k in contenders}
  for r in range(rounds):
    order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
    for name in order:
      fn, times = contenders[name], []
      start = time.perf_counter()
      while len(times) < reps and (round_budget_s is None or not times
                                   or time.perf_counter() - start < round_budget_s):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
      out[name].append(times)
  return out


def alternate_samples(contenders: dict[str, Callable[[], object]], **kwargs
                      ) -> dict[str, list[float]]:
  """Every per-call time (seconds) of every contender, rounds concatenated."""
  return {k: [t for rnd in v for t in rnd]
          for k, v in alternate_rounds(contenders, **kwargs).items()}


def alternate(contenders: dict[str, Callable[[], object]], **kwargs) -> dict[str, float]:
  """Median seconds per call of each contender over all alternating rounds."""
  return {k: statistics.median(v) for k, v in alternate_samples(contenders, **kwargs).items()}


def alternating_latency(fns: dict[str, Callable[[], object]], *, rounds: int = 9,
                        reps: int = 10, warmup: int = 1, round_budget_s: float | None = 0.08
                        ) -> dict[str, tuple[float, float, float]]:
  """``{name: (median, min, max)}`` milliseconds per call: the median of each round's
  calls, then the median and range of those round medians."""
  per_round = alternate_rounds(fns, rounds=rounds, reps=reps, warmup=warmup,
                               round_budget_s=round_budget_s)
  meds = {k: [statistics.median(r) * 1e3 for r in v] for k, v in per_round.items()}
  return {k: (statistics.median(v), min(v), max(v)) for k, v in meds.items()}


def machine() -> str:
  """One line: processor, jax version, backend and device count."""
  return (f"{platform.processor() or platform.machine()}, jax {jax.__version__}, "
          f"backend {jax.default_backend()}, {jax.device_count()} device(s)")
