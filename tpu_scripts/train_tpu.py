"""Multi-host training entry point: the same command on every worker of a TPU slice.

Every process runs this program (``tpu_scripts/launch.sh`` starts it with
``gcloud compute tpus tpu-vm ssh --worker=all``). It

1. starts JAX's multi-process runtime (:func:`jaxopt_dnn.parallel.initialize_distributed`):
   on a Cloud TPU VM the cluster (coordinator, process count, process id) is
   auto-detected from the TPU metadata, so no flag is needed; elsewhere pass
   ``--coordinator host:port --num-processes N --process-id I`` (for CPU runs add
   ``--cpu-devices K``: K virtual CPU devices per process, gloo collectives);
2. builds one ``(data, fsdp, tensor)`` mesh over all devices of all processes
   (``jax.devices()``), ``data = D / fsdp``;
3. trains data-parallel (or FSDP with ``--fsdp``): the global batch of
   step ``s`` is the same pure function of ``(seed, s)`` in every process
   (``data.batch_at``); process ``i`` keeps rows ``[i B/P, (i+1) B/P)``
   (``data.process_slice``) and ``parallel.process_local_batch_to_global`` assembles the
   global ``jax.Array`` split over ``data x fsdp``;
4. checkpoints the train state with orbax into ``--out`` (a local path or ``gs://``;
   every process takes part in each save; a rerun resumes from the latest step);
5. builds the recipe's serving function (int8 / pruned / bf16 as the recipe says) on the
   all-gathered weights, evaluates it on the test split and prints the final accuracy
   from process 0; every process prints one ``RESULT {json}`` line (the tests check
   that all processes agree).

What is trained is a :class:`jaxopt_dnn.app.recipe.Recipe` (``--recipe FILE``, default the
dense digits CNN baseline), composed into one jitted, sharded train step by
:func:`jaxopt_dnn.app.compose.build`; explicit flags (``--steps``, ``--lr``...) override it.

Run locally as two processes of 4 CPU devices each (what the tests do)::

  python tpu_scripts/train_tpu.py --coordinator 127.0.0.1:12345 --num-processes 2 \
      --process-id 0 --cpu-devices 4 --out /tmp/run &
  python tpu_scripts/train_tpu.py --coordinator 127.0.0.1:12345 --num-processes 2 \
      --process-id 1 --cpu-devices 4 --out /tmp/run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  g = ap.add_argument_group("distributed runtime")
  g.add_argument("--coordinator", default=None,
                 help="host:port of process 0 (default: auto-detect, e.g. on a Cloud TPU VM)")
  g.add_argument("--num-processes", type=int, default=None)
  g.add_argument("--process-id", type=int, default=None)
  g.add_argument("--no-distributed", action="store_true",
                 help="single process, do not call jax.distributed.initialize")
  g.add_argument("--cpu-devices", type=int, default=None,
                 help="run on CPU with this many virtual devices per process (gloo "
                      "collectives across processes)")
  g.add_argument("--init-timeout", type=int, default=300,
                 help="seconds to wait for all processes to join")
  t = ap.add_argument_group("training (flags given explicitly override the recipe)")
  t.add_argument("--recipe", default=None,
                 help="recipe file (.json/.yaml, see jaxopt_dnn.app.recipe.Recipe); default: "
                      "the dense digits CNN baseline")
  t.add_argument("--steps", type=int, default=None, help="default 600")
  t.add_argument("--batch-size", type=int, default=None, help="global batch size, default 64")
  t.add_argument("--lr", type=float, default=None, help="learning rate, default 1e-3")
  t.add_argument("--seed", type=int, default=None)
  t.add_argument("--features", default=None, help="CNN conv widths, e.g. 32,64")
  t.add_argument("--dense", type=int, default=None, help="CNN hidden dense width")
  t.add_argument("--fsdp", type=int, default=None,
                 help="size of the fsdp mesh axis (>1: FSDP sharding; 1: data parallel)")
  t.add_argument("--out", required=True,
                 help="checkpoint directory: a local path or gs://bucket/path")
  t.add_argument("--save-every", type=int, default=100)
  t.add_argument("--log-every", type=int, default=50)
  t.add_argument("--metrics", default=None,
                 help="local JSONL file for the train records (process 0)")
  a = ap.parse_args(argv)
  explicit = [a.coordinator, a.num_processes, a.process_id]
  if any(v is not None for v in explicit) and any(v is None for v in explicit):
    ap.error("--coordinator, --num-processes and --process-id go together")
  if a.no_distributed and a.coordinator is not None:
    ap.error("--no-distributed and --coordinator are exclusive")
  if a.cpu_devices is not None and a.cpu_devices < 1:
    ap.error(f"--cpu-devices must be >= 1, got {a.cpu_devices}")
  if a.features is not None:
    try:
      a.features = tuple(int(f) for f in a.features.split(","))
    except ValueError:
      ap.error(f"--features must be comma-separated ints, got {a.features!r}")
  return a


def make_recipe(a: argparse.Namespace):
  """The run's :class:`~jaxopt_dnn.app.recipe.Recipe`: ``--recipe`` (or the baseline), with
  the explicitly given flags applied on top."""
  from jaxopt_dnn.app.recipe import Recipe

  r = Recipe.load(a.recipe) if a.recipe else Recipe(name="tpu-baseline")
  top = {k: v for k, v in (("steps", a.steps), ("batch_size", a.batch_size),
                           ("seed", a.seed)) if v is not None}
  kwargs = dict(r.model_kwargs)
  if a.features is not None:
    kwargs["features"] = a.features
  if a.dense is not None:
    kwargs["dense"] = a.dense
  if kwargs != dict(r.model_kwargs):
    top["model_kwargs"] = kwargs
  if a.lr is not None:
    top["optimizer"] = {"learning_rate": a.lr}
  if a.fsdp is not None:
    top["mesh"] = {"fsdp": a.fsdp, "strategy": "fsdp" if a.fsdp > 1 else "data_parallel"}
  return r.replace(**top) if top else r


def start_runtime(a: argparse.Namespace) -> None:
  """Configures devices and joins the cluster; must run before any JAX array exists."""
  import jax

  if a.cpu_devices is not None:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", a.cpu_devices)
  if a.no_distributed:
    return
  from jaxopt_dnn import parallel
  gloo = "gloo" if a.cpu_devices is not None else None
  if a.coordinator is not None:
    parallel.initialize_distributed(a.coordinator, a.num_processes, a.process_id,
                                    cpu_collectives=gloo,
                                    initialization_timeout=a.init_timeout)
    return
  try:  # Cloud TPU VM, SLURM, ...: JAX finds the coordinator itself.
    parallel.initialize_distributed(cpu_collectives=gloo,
                                    initialization_timeout=a.init_timeout)
  except ValueError as e:  # no cluster detected: a plain single-process run
    print(f"train_tpu: no cluster detected ({e}); running as a single process",
          file=sys.stderr)


def gather_to_host(tree: Any) -> Any:
  """Every leaf as a full numpy array on every process (FSDP shards are all-gathered)."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, jax.device_get(tree))
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def run(a: argparse.Namespace, *, console=None) -> dict:
  """Trains the recipe, checkpoints, serves and evaluates; returns this process's result.

  Assumes :func:`start_runtime` already ran (or a single-process JAX). The mesh spans
  every device of every process: ``fsdp`` from the recipe, ``data`` the rest.
  """
  import jax
  import numpy as np

  from jaxopt_dnn import parallel
  from jaxopt_dnn.app import compose, data, train

  recipe = make_recipe(a)
  pid, nproc, n_dev = jax.process_index(), jax.process_count(), jax.device_count()
  if recipe.batch_size % n_dev:
    raise ValueError(f"batch size {recipe.batch_size} is not divisible by the {n_dev} "
                     "devices of the mesh (every device gets the same number of examples)")
  if recipe.steps < 1:
    raise ValueError(f"train_tpu trains: the recipe needs steps >= 1, got {recipe.steps}")
  mesh = parallel.make_mesh(data=-1, fsdp=recipe.mesh.fsdp)
  ds = data.load_digits(seed=recipe.seed)
  # Same seed -> same init in every process; build() places it onto the global mesh.
  built = compose.build(recipe, ds.x_train[:1], num_classes=ds.num_classes, mesh=mesh)
  config = train.TrainConfig(
      steps=recipe.steps, batch_size=recipe.batch_size, seed=recipe.seed,
      log_every=a.log_every, checkpoint_dir=a.out, save_every=a.save_every,
      progress=False, metrics_path=a.metrics if pid == 0 else None)
  # fit() loads the global batch of each step and keeps this process's rows
  # (data.process_slice); place_batch assembles the global array over data x fsdp.
  res = train.fit(built.state, built.train_step, ds, config, place_batch=built.place_batch,
                  meta={"recipe": recipe.to_json(indent=None)}, console=console)

  # Serving runs on each host on full (all-gathered) weights: int8 / pruned / bf16 as the
  # recipe says.
  state = res.state.replace(params=gather_to_host(res.state.params),
                            collections=gather_to_host(res.state.collections))
  calib = [ds.x_train[i:i + recipe.batch_size]
           for i in range(0, recipe.quant.calibration_batches * recipe.batch_size,
                          recipe.batch_size)]
  served = built.serving(state, calib)
  logits = np.asarray(served.fn(served.variables, ds.x_test))
  accuracy = float(np.mean(logits.argmax(-1) == ds.y_test))
  checksum = float(sum(np.abs(x).astype(np.float64).sum()
                       for x in jax.tree.leaves(state.params)))
  train_acc = [h["accuracy"] for h in res.history if h.get("split") == "train"]
  return {"process": pid, "processes": nproc, "devices": n_dev, "mesh": dict(mesh.shape),
          "recipe": recipe.name, "steps": int(res.state.step),
          "resumed_from": res.resumed_from, "test_accuracy": accuracy,
          "last_train_accuracy": train_acc[-1] if train_acc else None,
          "param_abs_sum": checksum, "train_s": res.wall_time_s,
          "step_ms": res.step_time_s * 1e3, "out": a.out}


def main(argv: Sequence[str] | None = None) -> int:
  a = parse_args(argv)
  start_runtime(a)
  import jax

  result = run(a)
  print("RESULT " + json.dumps(result), flush=True)
  if result["process"] == 0:
    print(f"final test accuracy {result['test_accuracy']:.4f} after {result['steps']} steps "
          f"on {result['devices']} devices in {result['processes']} process(es); "
          f"checkpoints in {a.out}", flush=True)
  if jax.distributed.is_initialized():
    jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  sys.exit(main())
