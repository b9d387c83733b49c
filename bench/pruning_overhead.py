"""Train-step time of prune_optimizer(adam) vs plain optax adam on the digits CNN.

Run: ``python bench/pruning_overhead.py``. Both steps are jitted with the same model and
batch; they alternate in one process and the medians are compared. The wrapped step
recomputes masks every ``--update-every`` steps under ``lax.cond`` (those steps are
included in the samples; the median reflects the common step).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import optax

sys.path.insert(0, os.path.dirname(__file__))
from _timing import alternate, machine  # noqa: E402

from jaxopt_dnn.app import data, models  # noqa: E402
from jaxopt_dnn import sparsity as sp  # noqa: E402


def make_step(model, tx):
  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  return step


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--update-every", type=int, default=25)
  ap.add_argument("--rounds", type=int, default=10)
  ap.add_argument("--reps", type=int, default=25)
  args = ap.parse_args(argv)

  ds = data.load_digits()
  model = models.CNN()
  x, y = ds.x_train[:args.batch], ds.y_train[:args.batch]
  params = model.init(jax.random.key(0), x[:1])["params"]
  plain_tx = optax.adam(1e-3)
  pruned_tx = sp.prune_optimizer(optax.adam(1e-3), sp.constant_schedule(0.9),
                                 update_every=args.update_every)
  state = {"plain": (params, plain_tx.init(params)), "pruned": (params, pruned_tx.init(params))}
  steps = {"plain": make_step(model, plain_tx), "pruned": make_step(model, pruned_tx)}

  def runner(name):
    def run():
      state[name] = steps[name](*state[name], x, y)
      return state[name]
    return run

  med = alternate({k: runner(k) for k in steps}, rounds=args.rounds, reps=args.reps)
  ratio = med["pruned"] / med["plain"]
  print(f"machine: {machine()}")
  print(f"model: digits CNN, {sum(v.size for v in jax.tree.leaves(params))} params, batch {args.batch}")
  print(f"{'optimizer':<34} {'median step ms':>15} {'ratio':>7}")
  print(f"{'optax.adam':<34} {med['plain'] * 1e3:>15.3f} {1.0:>7.3f}")
  print(f"{'prune_optimizer(adam, every ' + str(args.update_every) + ')':<34} "
        f"{med['pruned'] * 1e3:>15.3f} {ratio:>7.3f}")
  return {"plain_ms": med["plain"] * 1e3, "pruned_ms": med["pruned"] * 1e3, "ratio": ratio}


if __name__ == "__main__":
  main()
