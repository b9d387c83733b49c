"""Data-parallel train-step time on 1/2/4/8 devices (same global batch), one process.

Run: ``python bench/parallel_bench.py``. On a CPU the devices are virtual
(``jax_num_cpu_devices=8``) and share the same cores, so this is a correctness-and-
overhead figure (what sharding and the gradient all-reduce cost), not a speedup claim;
on a TPU/GPU host the same script measures real scaling. The steps are built by
``jaxopt_dnn.app.compose.build`` (``mesh.data = n``) and alternate in one process.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

if __name__ == "__main__":   # 8 virtual CPU devices (only affects the CPU platform)
  jax.config.update("jax_num_cpu_devices", 8)

sys.path.insert(0, os.path.dirname(__file__))
from _timing import alternate, machine  # noqa: E402

from jaxopt_dnn.app import compose, data  # noqa: E402
from jaxopt_dnn.app.recipe import Recipe  # noqa: E402


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--strategy", default="data_parallel", choices=("data_parallel", "fsdp"))
  ap.add_argument("--rounds", type=int, default=6)
  ap.add_argument("--reps", type=int, default=10)
  args = ap.parse_args(argv)
  ds = data.load_digits()
  x, y = ds.x_train[:args.batch], ds.y_train[:args.batch]
  sizes = [n for n in (1, 2, 4, 8) if n <= jax.device_count()]
  runners, states = {}, {}
  for n in sizes:
    mesh = {"data": 1, "fsdp": n} if args.strategy == "fsdp" else {"data": n}
    built = compose.build(Recipe(batch_size=args.batch, mesh=mesh), x)
    batch = built.place_batch((x, y))
    states[n] = built.state

    def run(n=n, built=built, batch=batch):
      states[n], metrics = built.train_step(states[n], batch)
      return metrics
    runners[f"{n} device(s)"] = run
  med = alternate(runners, rounds=args.rounds, reps=args.reps)
  base = med[f"{sizes[0]} device(s)"]
  print(f"machine: {machine()}")
  print(f"digits CNN, global batch {args.batch}, strategy {args.strategy}")
  print(f"{'devices':<12} {'median step ms':>15} {'vs 1 device':>12}")
  for k, v in med.items():
    print(f"{k:<12} {v * 1e3:>15.2f} {v / base:>11.2f}x")
  return {k: v * 1e3 for k, v in med.items()}


if __name__ == "__main__":
  main()
