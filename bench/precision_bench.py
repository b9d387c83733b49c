"""Step time of fp32 vs our bf16 policy vs jmp's bf16 policy on the same model.

All three contenders train the same Flax CNN with the same optimizer and data in one
process; the timed rounds alternate between them (fp32, ours, jmp, fp32, ...) so that
load from other processes hits all three alike. Reported: the median seconds per step
over rounds and the ratio to fp32 (> 1 means faster than fp32).

On CPU, XLA runs bf16 dots/convs by converting to f32, so bf16 is usually *not* faster
there; the speedup appears on GPUs/TPUs with bf16 matrix units.

Usage::

  python bench/precision_bench.py                      # small CNN, CPU friendly
  python bench/precision_bench.py --size large --batch 256 --image 32   # GPU/TPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_dnn import _hlo, models
from jaxopt_dnn import precision as mp

SIZES = {"small": ((32, 64), 128), "medium": ((64, 128, 128), 256),
         "large": ((128, 256, 256, 256), 512)}


def make_step(model, opt, cast_in, cast_out, apply_fn=None):
  """A jitted train step; ``cast_in(params, x)`` -> compute-dtype args, ``cast_out`` on logits."""
  apply_fn = apply_fn or model.apply

  def loss_fn(params, x, y):
    p, xc = cast_in(params, x)
    logits = cast_out(apply_fn({"params": p}, xc))
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(params, opt_state, x, y):
    loss, g = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--size", choices=sorted(SIZES), default="small")
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--image", type=int, default=16, help="square input side (channels: 3)")
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--steps", type=int, default=10, help="steps per contender per round")
  a = ap.parse_args(argv)

  try:
    import jmp
  except ImportError:
    print("jmp is not installed (pip install jmp, or the 'bench' extra): skipping the "
          "jmp contender comparison.")
    return 0

  features, dense = SIZES[a.size]
  model = models.CNN(features=features, dense=dense, num_classes=10)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(size=(a.batch, a.image, a.image, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=(a.batch,)), jnp.int32)
  params0 = model.init(jax.random.key(0), x[:1])["params"]
  opt = optax.adam(1e-3)

  ours = mp.Policy.from_string("params=float32,compute=bfloat16,output=float32")
  ours_apply = mp.with_policy(model.apply, ours)
  theirs = jmp.get_policy("params=float32,compute=bfloat16,output=float32")
  ident = lambda p, x: (p, x)  # noqa: E731
  contenders = {
      "fp32": make_step(model, opt, ident, lambda t: t),
      "ours bf16": make_step(model, opt, ident, lambda t: t, apply_fn=ours_apply),
      "jmp bf16": make_step(model, opt,
                            lambda p, x: (theirs.cast_to_compute(p), theirs.cast_to_compute(x)),
                            theirs.cast_to_output),
  }
  states = {k: (jax.tree.map(jnp.copy, params0), opt.init(params0)) for k in contenders}

  census = {k: _hlo.census_from_hlo(f.lower(*states[k], x, y).as_text(dialect="hlo"))
            for k, f in contenders.items()}

  def run(name, n):
    p, o = states[name]
    for _ in range(n):
      p, o, loss = contenders[name](p, o, x, y)
    loss.block_until_ready()
    states[name] = (p, o)

  for name in contenders:  # compile + warm up
    run(name, 2)
  times = {k: [] for k in contenders}
  for _ in range(a.rounds):
    for name in contenders:
      t0 = time.perf_counter()
      run(name, a.steps)
      times[name].append((time.perf_counter() - t0) / a.steps)

  dev = jax.devices()[0]
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params0))
  print(f"device: {dev.platform} ({dev.device_kind}), jax {jax.__version__}, jmp "
        f"{getattr(jmp, '__version__', '?')}")
  print(f"model: CNN features={features} dense={dense} ({n_params:,} params), batch "
        f"{a.batch}x{a.image}x{a.image}x3, adam; {a.rounds} alternating rounds x "
        f"{a.steps} steps")
  base = statistics.median(times["fp32"])
  print(f"{'contender':<12} {'median ms/step':>15} {'min ms/step':>12} {'speed vs fp32':>14} "
        f"{'bf16 dots+convs (lowered)':>26}")
  for name, ts in times.items():
    med = statistics.median(ts)
    c = census[name]
    print(f"{name:<12} {med * 1e3:>15.2f} {min(ts) * 1e3:>12.2f} {base / med:>13.2f}x "
          f"{c.count('bf16', 'bf16'):>15} of {c.total}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
