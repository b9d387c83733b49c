"""Peak host memory of creating an FSDP train state (params + Adam moments).

Each measurement runs in a fresh process with 8 virtual CPU devices (on CPU, device
memory *is* host memory, so the peak RSS counts every buffer that ever existed):

* ``trainer``: ``jd.Trainer(..., sharding="fsdp").init`` (``jax.eval_shape`` ->
  shardings -> ``jax.jit(init, out_shardings=...)``);
* ``host_round_trip``: what the library did before (``compose.place``): ``model.init``
  and ``tx.init`` whole on one device, then every leaf through ``np.asarray`` and
  ``device_put`` onto the mesh.

The figure is ``(peak RSS - baseline) / 3P``, where ``P`` is the parameter bytes and the
baseline is the same program's peak with a tiny model (the runtime, the compiler and
the imports). Target: <= 1.3.

    python bench/init_memory.py [--mb 384]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys


def child(mode: str, width: int, layers: int) -> dict:
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  jax.config.update("jax_num_cpu_devices", 8)
  import flax.linen as nn
  import jax.numpy as jnp
  import numpy as np
  import optax

  import jaxopt_dnn as jd
  from jaxopt_dnn import parallel

  class Deep(nn.Module):
    @nn.compact
    def __call__(self, x):
      for _ in range(layers):
        x = nn.relu(nn.Dense(width, use_bias=False)(x))
      return x

  model, tx = Deep(), optax.adam(1e-3)
  x = np.zeros((8, width), np.float32)
  if mode == "trainer":
    trainer = jd.Trainer(model, lambda f, v, b, r: jnp.mean(f(v, b)), tx, sharding="fsdp")
    state = trainer.init(jax.random.key(0), x)
  else:
    mesh = parallel.make_mesh(data=1, fsdp=8)
    params = model.init(jax.random.key(0), x)["params"]
    whole = (params, tx.init(params))
    del params
    shard = parallel.state_shardings(whole, whole[0], mesh, "fsdp")
    state = jax.tree.map(lambda v, s: jax.device_put(np.asarray(v), s), whole, shard)
    del whole
  jax.block_until_ready(state)
  p_bytes = sum(a.nbytes for a in jax.tree.leaves(
      state.params if mode == "trainer" else state[0]))
  return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          "param_bytes": p_bytes}


def measure(mode: str, width: int, layers: int) -> dict:
  out = subprocess.run([sys.executable, __file__, "--child", mode, "--width", str(width),
                        "--layers", str(layers)], capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--mb", type=int, default=384, help="parameter megabytes of the big model")
  ap.add_argument("--child", choices=["trainer", "host_round_trip"])
  ap.add_argument("--width", type=int, default=2048)
  ap.add_argument("--layers", type=int, default=1)
  a = ap.parse_args(argv)
  if a.child:
    print(json.dumps(child(a.child, a.width, a.layers)))
    return 0
  width = 2048
  layers = max(1, round(a.mb * 2 ** 20 / (width * width * 4)))
  rows = []
  for mode in ("trainer", "host_round_trip"):
    base = measure(mode, 64, 1)
    big = measure(mode, width, layers)
    p = big["param_bytes"]
    ratio = (big["peak_rss_bytes"] - base["peak_rss_bytes"]) / (3 * p)
    rows.append((mode, p, base["peak_rss_bytes"], big["peak_rss_bytes"], ratio))
  print(f"{'init':<17} {'P (MB)':>8} {'baseline (MB)':>14} {'peak (MB)':>10} "
        f"{'(peak-base)/3P':>15}")
  for mode, p, b, pk, r in rows:
    print(f"{mode:<17} {p / 2**20:8.0f} {b / 2**20:14.0f} {pk / 2**20:10.0f} {r:15.2f}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
