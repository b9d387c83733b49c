"""The ``jaxopt-dnn`` command line: ``compress``, ``inspect`` and ``export``.

``jaxopt-dnn compress`` with no arguments trains a 1-D CNN baseline on MNIST-1D (generated
on the spot) and every compression variant, and prints the comparison table with error
bars (see :mod:`jaxopt_dnn.app.compress`); ``--resume DIR`` continues an interrupted run.
Errors in user input (recipe keys, paths, checkpoints) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import Any

import numpy as np


def _parse_mesh(text: str) -> dict[str, Any]:
  """``"data=4,fsdp=2"`` -> ``{"data": 4, "fsdp": 2, "strategy": "fsdp"}`` (an fsdp axis
  larger than 1 shards the parameters over it; otherwise they are replicated)."""
  out: dict[str, Any] = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    key, _, val = part.partition("=")
    if key not in ("data", "fsdp") or not val.lstrip("-").isdigit():
      raise ValueError(f"--mesh: expected data=N,fsdp=M, got {text!r}")
    out[key] = int(val)
  out["strategy"] = "fsdp" if out.get("fsdp", 1) > 1 else "data_parallel"
  return out


def _set_cpu_devices(n: int | None) -> None:
  if n:
    import jax
    jax.config.update("jax_num_cpu_devices", n)


_RUN_FLAGS = ("recipe", "model", "steps", "seed", "mesh", "dataset", "variants", "out")


def cmd_compress(args) -> int:
  import time
  t_start = time.perf_counter()
  _set_cpu_devices(args.cpu_devices)
  from jaxopt_dnn.app import compress, data, models, report
  from jaxopt_dnn.app.recipe import Recipe

  if args.resume:
    given = [f"--{k}" for k in _RUN_FLAGS if getattr(args, k) is not None]
    if given:
      raise ValueError(f"--resume continues the run in {args.resume!r} with the settings it was "
                       f"started with; drop {', '.join(given)}")
    run = compress.load_run(args.resume)
    base, dataset, out = Recipe.from_dict(run["base"]), run["dataset_spec"], args.resume
    variants = run["variants"]
  else:
    dataset = args.dataset or compress.DEFAULT_DATASET
    base = Recipe.load(args.recipe) if args.recipe else compress.default_recipe(dataset)
    changes: dict[str, Any] = {}
    if args.model:
      changes["model"] = args.model
    if args.steps is not None:
      changes["steps"] = args.steps
    if args.seed is not None:
      changes["seed"] = args.seed
    if args.mesh:
      changes["mesh"] = _parse_mesh(args.mesh)
    base = base.replace(**changes) if changes else base
    out = args.out or os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    variants = [v for v in args.variants.split(",") if v] if args.variants else None
  ds = data.load_dataset(dataset)
  loss_fn = metric = None
  if ":" in base.model:   # package.module:factory -> model, and optionally loss and metric
    _, loss_fn, metric = models.resolve_model(base.model, ds.num_classes,
                                              **dict(base.model_kwargs))
  print(f"jaxopt-dnn compress: {base.model} on {ds.name} ({len(ds.x_train)} train / "
        f"{len(ds.x_test)} test), {base.steps} steps, out={out}"
        + (" (resumed)" if args.resume else ""), flush=True)
  results = compress.compress(base, ds, out, variants=variants, progress=args.progress,
                              log=lambda s: print(s, flush=True), resume=bool(args.resume),
                              loss_fn=loss_fn, metric=metric or compress.accuracy_metric,
                              run_info={"dataset_spec": dataset})
  meta = {"dataset": ds.name, "model": base.model, "n_test": len(ds.x_test)}
  if ds.name == "mnist1d":
    meta["reference_accuracy"] = {"source": "Greydanus 2020, Scaling down deep learning "
                                  "(arXiv:2011.14439), MNIST-1D test accuracy",
                                  **data.MNIST1D_REFERENCE}
  paths = report.write_all(results, out, meta=meta)
  print()
  print(report.table(results))
  print()
  if ds.name == "mnist1d":
    ref = data.MNIST1D_REFERENCE
    print(f"Reference (Greydanus 2020, MNIST-1D, same 4000/1000 split): CNN {ref['cnn']:.0%}, "
          f"MLP {ref['mlp']:.0%}, logistic regression {ref['logistic regression']:.0%}; "
          f"this baseline {results[0].accuracy:.1%} on {results[0].n_test} test signals.")
  for note in report.NOTES:
    print(f"* {note}")
  print(f"\nwrote {paths['json']}, {paths['md']}, {paths['png']} and checkpoints in {out}/")
  print(f"total time {time.perf_counter() - t_start:.1f} s")
  return 0


def cmd_inspect(args) -> int:
  from jaxopt_dnn.app import artifacts

  print(artifacts.describe(args.checkpoint))
  return 0


def cmd_export(args) -> int:
  from jaxopt_dnn.app import artifacts

  path, outputs = artifacts.export_serving(args.checkpoint, args.out, batch=args.batch)
  print(f"exported the serving function of {args.checkpoint} to {path} "
        f"(input batch {args.batch}; output {outputs.shape} {outputs.dtype})")
  return 0


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="jaxopt-dnn", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  c = sub.add_parser("compress", help="train a baseline and every compression variant; compare")
  c.add_argument("--model", help="a zoo model (cnn1d: the mnist1d default, cnn: the digits "
                 "default, cnn_bn, mlp, resnet, transformer, nnx_cnn) or your own: "
                 "package.module:factory (a function returning a model, or (model, loss_fn) "
                 "or (model, loss_fn, metric))")
  c.add_argument("--dataset", help="mnist1d (default; generated, never downloaded) | digits | "
                 "synthetic | tfds:NAME | path.npz")
  c.add_argument("--recipe", help="base recipe file (.json / .yaml)")
  c.add_argument("--variants", help="comma-separated subset, in order (default: all)")
  c.add_argument("--steps", type=int, help="baseline training steps (default 600)")
  c.add_argument("--mesh", help="e.g. data=8 or data=4,fsdp=2")
  c.add_argument("--cpu-devices", type=int, help="virtual CPU devices (for --mesh on a CPU)")
  c.add_argument("--seed", type=int)
  c.add_argument("--out", help="output directory (default ./runs/<timestamp>)")
  c.add_argument("--progress", action="store_true", default=None, help="show progress bars")
  c.add_argument("--resume", metavar="DIR", help="continue an interrupted run in DIR: finished "
                 "variants are reused (not retrained), the others run")
  c.set_defaults(func=cmd_compress)
  i = sub.add_parser("inspect", help="sizes, sparsity and quantization of a checkpoint")
  i.add_argument("checkpoint", help="a directory written by compress (e.g. runs/X/combined/serve)")
  i.set_defaults(func=cmd_inspect)
  e = sub.add_parser("export", help="serialized StableHLO of a checkpoint's serving function")
  e.add_argument("checkpoint", help="a serve checkpoint directory written by compress")
  e.add_argument("--out", required=True, help="output file")
  e.add_argument("--batch", type=int, default=1, help="input batch size of the export")
  e.set_defaults(func=cmd_export)
  return p


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.func(args)
  except (ValueError, TypeError, FileNotFoundError, KeyError) as e:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"jaxopt-dnn {args.command}: error: {msg}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("jaxopt-dnn: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  np.set_printoptions(precision=4)
  sys.exit(main())
