"""One process of the loopback multi-host test (and the training code both sides share).

Run as ``python _multihost_worker.py --process-id I --num-processes 2 --port P --out F``:
each process owns 4 CPU devices, joins the coordinator on 127.0.0.1, builds an 8-device
``data`` mesh spanning both processes, and trains the digits CNN on a fixed batch
sequence with ``jd.Trainer`` (FSDP parameters sharded across both processes, state
initialised by ``jax.jit(init, out_shardings=...)``), feeding only its process-local half
of every batch through ``parallel.process_local_batch_to_global``. Process 0 writes the final params to ``F``.
"""

from __future__ import annotations

import argparse
import os
import sys

STEPS = 20
BATCH = 64


def batches(num: int = STEPS):
  """The fixed global batch sequence (numpy), identical in every process."""
  from jaxopt_dnn.app import data
  ds = data.load_digits()
  it = data.infinite_batches(ds.x_train, ds.y_train, BATCH, seed=3)
  return [next(it) for _ in range(num)]


def init_params():
  """Fixed initial params of the CNN, ``{keystr: np.ndarray}``, drawn with numpy.

  (Shapes come from ``jax.eval_shape``; drawing in numpy avoids compiling Flax's
  initializers, which costs several seconds per process on a loaded 2-core machine.)
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxopt_dnn.app import models
  shapes = jax.eval_shape(models.CNN(features=(8, 16), dense=32).init,
                          jax.random.key(0), jnp.ones((1, 8, 8, 1)))["params"]
  rng = np.random.default_rng(0)

  def draw(s):
    fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 1
    scale = 1.0 / np.sqrt(fan_in) if len(s.shape) > 1 else 0.01
    return (rng.standard_normal(s.shape) * scale).astype(np.float32)

  return jax.tree.map(draw, shapes)


def train(mesh, feed, sharding="fsdp"):
  """Trains from fixed init through ``jd.Trainer`` (FSDP over the whole mesh);
  ``feed(global_batch) -> placed batch``. Returns the params, gathered to every host."""
  import jax
  import numpy as np
  import optax
  from jax.experimental import multihost_utils

  import jaxopt_dnn as jd
  from jaxopt_dnn.app import models, train as app_train

  model = models.CNN(features=(8, 16), dense=32)
  trainer = jd.Trainer(model, app_train.classification_loss, optax.sgd(0.1, momentum=0.9),
                       mesh=mesh, sharding=sharding, eval_kwargs={"train": False})
  state = trainer.init(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32),
                       variables={"params": init_params()})
  for b in batches():
    state, _ = trainer.step(state, feed(b))
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(state.params, tiled=True)
  return jax.device_get(state.params)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--process-id", type=int, required=True)
  ap.add_argument("--num-processes", type=int, required=True)
  ap.add_argument("--port", type=int, required=True)
  ap.add_argument("--out", required=True)
  ap.add_argument("--local-devices", type=int, default=4)
  a = ap.parse_args(argv)

  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  jax.config.update("jax_num_cpu_devices", a.local_devices)  # before any array exists

  from jaxopt_dnn import parallel
  parallel.initialize_distributed(f"127.0.0.1:{a.port}", a.num_processes, a.process_id,
                                  cpu_collectives="gloo", initialization_timeout=60)
  import numpy as np

  assert jax.process_count() == a.num_processes, jax.process_count()
  assert jax.local_device_count() == a.local_devices
  mesh = parallel.make_mesh(data=-1)
  pid, n = a.process_id, a.num_processes

  def feed(batch):
    half = len(batch[0]) // n  # this process's contiguous block of the global batch
    local = tuple(np.asarray(t[pid * half:(pid + 1) * half]) for t in batch)
    g = parallel.process_local_batch_to_global(local, mesh)
    # The local block must land at rows [pid*half, (pid+1)*half) of the global batch.
    rows = sorted({s.index[0].start or 0 for s in g[0].addressable_shards})
    assert rows[0] == pid * half and rows[-1] < (pid + 1) * half, rows
    return g

  params = train(mesh, feed)
  flat = {jax.tree_util.keystr(k): np.asarray(jax.device_get(v))
          for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  if pid == 0:
    np.savez(a.out, **flat)
  jax.distributed.shutdown()
  print(f"process {pid} done", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
