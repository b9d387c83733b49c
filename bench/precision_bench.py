"""Step time of fp32 vs our bf16 policy vs jmp's bf16 policy on the same model.

jmp casts *every* float param to the compute dtype; our default policy keeps
normalization parameters in float32 and casts the norm outputs back to bf16, so on a
BatchNorm model the two bf16 programs differ slightly.

All three contenders train the same Flax CNN with the same optimizer and data in one
process; the timed rounds alternate between them (fp32, ours, jmp, fp32, ...) so that
load from other processes hits all three alike. Reported: the median seconds per step
over rounds and the ratio to fp32 (> 1 means faster than fp32).

On CPU, XLA runs bf16 dots/convs by converting to f32, so bf16 is usually *not* faster
there; the speedup appears on GPUs/TPUs with bf16 matrix units.

Usage::

  python bench/precision_bench.py                      # small CNN, CPU friendly
  python bench/precision_bench.py --model resnet --size large --batch 256 --image 32  # GPU
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

from jaxopt_dnn import _hlo
from jaxopt_dnn.app import models
from jaxopt_dnn import precision as mp

SIZES = {  # model -> size -> constructor kwargs
    "cnn": {"small": dict(features=(32, 64), dense=128),
            "medium": dict(features=(64, 128, 128), dense=256),
            "large": dict(features=(128, 256, 256, 256), dense=512)},
    "resnet": {"small": dict(stage_sizes=(1, 1), features=(32, 64)),
               "medium": dict(stage_sizes=(2, 2, 2), features=(64, 128, 256)),
               "large": dict(stage_sizes=(2, 2, 2, 2), features=(64, 128, 256, 512))},  # ResNet-18
}


def make_step(apply_fn, opt, cast_in, cast_out, has_bn: bool):
  """A jitted train step; ``cast_in(params, x)`` -> compute-dtype args, ``cast_out`` on logits.

  With BatchNorm the running statistics are carried in float32 in every contender.
  """

  def loss_fn(params, stats, x, y):
    p, xc = cast_in(params, x)
    if has_bn:
      logits, new = apply_fn({"params": p, "batch_stats": stats}, xc, train=True,
                             mutable=["batch_stats"])
      stats = jax.tree.map(lambda t: t.astype(jnp.float32), new["batch_stats"])
    else:
      logits = apply_fn({"params": p}, xc)
    loss = optax.softmax_cross_entropy_with_integer_labels(cast_out(logits), y).mean()
    return loss, stats

  def step(params, stats, opt_state, x, y):
    (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y)
    updates, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1, 2))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", choices=sorted(SIZES), default="cnn")
  ap.add_argument("--size", choices=("small", "medium", "large"), default="small")
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

  kwargs = SIZES[a.model][a.size]
  model = models.get_model(a.model, num_classes=10, **kwargs)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(size=(a.batch, a.image, a.image, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=(a.batch,)), jnp.int32)
  variables = jax.jit(model.init)(jax.random.key(0), x[:1])
  params0, stats0 = variables["params"], variables.get("batch_stats", {})
  has_bn = bool(stats0)
  opt = optax.adam(1e-3)

  ours = mp.Policy.from_string("params=float32,compute=bfloat16,output=float32")
  ours_apply = mp.with_policy(model.apply, ours)
  theirs = jmp.get_policy("params=float32,compute=bfloat16,output=float32")
  ident = lambda p, x: (p, x)  # noqa: E731
  contenders = {
      "fp32": make_step(model.apply, opt, ident, lambda t: t, has_bn),
      "ours bf16": make_step(ours_apply, opt, ident, lambda t: t, has_bn),
      "jmp bf16": make_step(model.apply, opt,
                            lambda p, x: (theirs.cast_to_compute(p), theirs.cast_to_compute(x)),
                            theirs.cast_to_output, has_bn),
  }
  states = {k: jax.tree.map(jnp.copy, (params0, stats0, opt.init(params0)))
            for k in contenders}

  census = {k: _hlo.census_from_hlo(f.lower(*states[k], x, y).as_text(dialect="hlo"))
            for k, f in contenders.items()}

  def run(name, n):
    p, st, o = states[name]
    for _ in range(n):
      p, st, o, loss = contenders[name](p, st, o, x, y)
    loss.block_until_ready()
    states[name] = (p, st, o)

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
  print(f"model: {a.model} {kwargs} ({n_params:,} params), batch "
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
