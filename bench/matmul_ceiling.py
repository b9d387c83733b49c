"""Matmul ceilings: an n x n x n product in fp32, bf16 and int8 (s8 x s8 -> s32).

Run: ``python bench/matmul_ceiling.py --n 4096`` (GPU/TPU) or a smaller ``--n`` on a
CPU. Prints the median time and the achieved rate, so the other benchmarks can be read
against what the hardware does at best. The int8 path is checked in the compiled HLO
(``s8 x s8`` dot, or the backend's int8 GEMM custom-call).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _timing import alternate, machine  # noqa: E402

from jaxopt_dnn._hlo import dot_census  # noqa: E402


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--n", type=int, default=1024)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--reps", type=int, default=5)
  args = ap.parse_args(argv)
  n = args.n
  rng = np.random.default_rng(0)
  a32 = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
  b32 = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
  a8 = jnp.asarray(rng.integers(-127, 128, (n, n)), jnp.int8)
  b8 = jnp.asarray(rng.integers(-127, 128, (n, n)), jnp.int8)
  f32 = jax.jit(lambda a, b: a @ b)
  i8 = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.int32))
  census = dot_census(i8, a8, b8)
  a16, b16 = a32.astype(jnp.bfloat16), b32.astype(jnp.bfloat16)
  bf16 = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  med = alternate({"fp32": lambda: f32(a32, b32), "bf16": lambda: bf16(a16, b16),
                   "int8": lambda: i8(a8, b8)}, rounds=args.rounds, reps=args.reps)
  ops = 2 * n ** 3
  print(f"machine: {machine()}")
  print(f"{n}x{n}x{n} matmul; int8 HLO: {dict(census.dots)}")
  print(f"{'dtype':<6} {'median ms':>10} {'T(FL)OP/s':>10} {'vs fp32':>8}")
  for k, v in med.items():
    print(f"{k:<6} {v * 1e3:>10.2f} {ops / v / 1e12:>10.3f} {med['fp32'] / v:>7.2f}x")
  return {k: v * 1e3 for k, v in med.items()}


if __name__ == "__main__":
  main()
