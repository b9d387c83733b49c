"""Inference latency: channel-pruned model run masked (same shapes) vs shrunk (smaller shapes).

Run: ``python bench/shrink_bench.py``. Masks alone change no shape, so the masked model
costs what the dense one costs; ``sparsity.shrink_channels`` removes the pruned channels
and the model really gets smaller and faster on dense hardware. The three contenders
(dense, masked, shrunk) alternate in one process; outputs of masked and shrunk agree.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _timing import alternate, machine  # noqa: E402

from jaxopt_dnn.app import models  # noqa: E402
from jaxopt_dnn import sparsity as sp  # noqa: E402


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sparsity", type=float, default=0.5)
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--rounds", type=int, default=8)
  ap.add_argument("--reps", type=int, default=20)
  args = ap.parse_args(argv)

  model = models.CNN(features=(64, 128), dense=256)
  layers = ["Conv_0", "Conv_1", "Dense_0", "Dense_1"]
  x = np.random.default_rng(0).random((args.batch, 8, 8, 1), np.float32)
  params = model.init(jax.random.key(0), x[:1])["params"]
  masks = sp.channel_masks(params, args.sparsity, rules=[f"{n}/kernel" for n in layers[:-1]])
  masked = sp.strip(params, masks)
  small = sp.shrink_channels(params, masks, layers)
  keep = 1.0 - args.sparsity
  small_model = model.clone(features=tuple(round(f * keep) for f in model.features),
                            dense=round(model.dense * keep))
  fwd = jax.jit(lambda p, x: model.apply({"params": p}, x))
  fwd_small = jax.jit(lambda p, x: small_model.apply({"params": p}, x))
  np.testing.assert_allclose(fwd_small(small, x), fwd(masked, x), rtol=1e-4, atol=1e-4)
  med = alternate({"dense": lambda: fwd(params, x), "masked": lambda: fwd(masked, x),
                   "shrunk": lambda: fwd_small(small, x)}, rounds=args.rounds, reps=args.reps)
  n = {k: sum(np.size(v) for v in jax.tree.leaves(t))
       for k, t in (("dense", params), ("masked", params), ("shrunk", small))}
  print(f"machine: {machine()}")
  print(f"model: CNN(64, 128, dense 256), channel sparsity {args.sparsity}, batch {args.batch}")
  print(f"{'variant':<8} {'params':>9} {'median ms':>10} {'speedup':>8}")
  for k in ("dense", "masked", "shrunk"):
    print(f"{k:<8} {n[k]:>9} {med[k] * 1e3:>10.3f} {med['dense'] / med[k]:>8.2f}x")
  return {k: v * 1e3 for k, v in med.items()}


if __name__ == "__main__":
  main()
