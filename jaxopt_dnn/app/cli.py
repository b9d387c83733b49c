"""The ``jaxopt-dnn`` command line: ``compress``, ``inspect`` and ``export``.

``jaxopt-dnn compress`` with no arguments trains the digits CNN baseline and every
compression variant, and prints the comparison table (see :mod:`jaxopt_dnn.app.compress`).
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


def cmd_compress(args) -> int:
  _set_cpu_devices(args.cpu_devices)
  from jaxopt_dnn.app import compress, data, report
  from jaxopt_dnn.app.recipe import Recipe

  base = Recipe.load(args.recipe) if args.recipe else Recipe()
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
  ds = data.load_dataset(args.dataset)
  out = args.out or os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
  variants = [v for v in args.variants.split(",") if v] if args.variants else None
  print(f"jaxopt-dnn compress: {base.model} on {ds.name} ({len(ds.x_train)} train / "
        f"{len(ds.x_test)} test), {base.steps} steps, out={out}", flush=True)
  results = compress.compress(base, ds, out, variants=variants, progress=args.progress,
                              log=lambda s: print(s, flush=True))
  paths = report.write_all(results, out, meta={"dataset": ds.name, "model": base.model})
  print()
  print(report.table(results))
  print()
  for note in report.NOTES:
    print(f"* {note}")
  print(f"\nwrote {paths['json']}, {paths['md']}, {paths['png']} and checkpoints in {out}/")
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
  c.add_argument("--model", help="cnn (default), cnn_bn, mlp, resnet, transformer, nnx_cnn")
  c.add_argument("--dataset", default="digits", help="digits | synthetic | tfds:NAME | path.npz")
  c.add_argument("--recipe", help="base recipe file (.json / .yaml)")
  c.add_argument("--variants", help="comma-separated subset, in order (default: all)")
  c.add_argument("--steps", type=int, help="baseline training steps (default 600)")
  c.add_argument("--mesh", help="e.g. data=8 or data=4,fsdp=2")
  c.add_argument("--cpu-devices", type=int, help="virtual CPU devices (for --mesh on a CPU)")
  c.add_argument("--seed", type=int)
  c.add_argument("--out", help="output directory (default ./runs/<timestamp>)")
  c.add_argument("--progress", action="store_true", default=None, help="show progress bars")
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
