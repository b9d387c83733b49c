"""The ``jaxopt-dnn`` command line: ``compress``, ``inspect``, ``export`` and ``plan``.

``jaxopt-dnn compress`` with no arguments trains a 1-D CNN baseline on MNIST-1D (generated
on the spot) and every compression variant, and prints the comparison table with error
bars (see :mod:`jaxopt_dnn.app.compress`); ``--resume DIR`` continues an interrupted run.
Errors in user input (arguments, recipe files, datasets, paths, checkpoints, a missing
optional extra) print one line on stderr and exit 2, before anything is written to
``--out``; ``--debug`` shows the traceback instead. Any other exception is a bug and
propagates with its traceback.
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
    key, val = key.strip(), val.strip()
    if key not in ("data", "fsdp") or not val.lstrip("-").isdigit():
      raise ValueError(f"--mesh: expected data=N,fsdp=M, got {text!r}")
    if key in out:
      raise ValueError(f"--mesh: axis {key!r} given twice in {text!r}")
    n = int(val)
    if n < 1 and not (key == "data" and n == -1):
      raise ValueError(f"--mesh: {key} must be a positive int (data may be -1: all remaining "
                       f"devices), got {key}={val} in {text!r}")
    out[key] = n
  if not out:
    raise ValueError(f"--mesh: expected data=N,fsdp=M, got {text!r}")
  out["strategy"] = "fsdp" if out.get("fsdp", 1) > 1 else "data_parallel"
  return out


def _set_cpu_devices(n: int | None) -> None:
  if n is not None:
    if n < 1:
      raise ValueError(f"--cpu-devices must be >= 1, got {n}")
    import jax
    try:
      jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:   # already initialized (in-process use): fine if it matches
      if jax.device_count() != n:
        raise ValueError(f"--cpu-devices {n}: JAX is already initialized with "
                         f"{jax.device_count()} devices") from None


def _check_out_dir(out: str) -> None:
  """``--out`` must be a new or empty directory that can be created and written."""
  if not out.strip():
    raise ValueError(f"--out must be a directory path, got {out!r}")
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--out {out!r} exists and is not a directory")
  if os.path.isdir(out) and os.listdir(out):
    raise ValueError(f"output directory {out!r} is not empty; choose a new --out (results and "
                     "checkpoints of different runs are never mixed)")
  _check_writable_parent(out, "--out")


def _check_writable_parent(path: str, flag: str) -> None:
  """The nearest existing ancestor of ``path`` is a writable directory."""
  probe = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise ValueError(f"{flag} {path!r}: {probe!r} is a file, not a directory")
  target = path if os.path.isdir(path) else probe
  if not os.access(target, os.W_OK | os.X_OK):
    raise ValueError(f"{flag} {path!r}: {target!r} is not writable")


def _check_run(base, ds) -> None:
  """Checks that need the devices and the data: the mesh fits the devices, the batch
  splits over it, and the data holds a batch (all before anything is written)."""
  from jaxopt_dnn import parallel

  mesh = parallel.make_mesh(base.mesh.data, base.mesh.fsdp)
  n = mesh.shape["data"] * mesh.shape["fsdp"]
  if base.batch_size % n:
    raise ValueError(f"batch_size={base.batch_size} is not divisible by the {n} devices of the "
                     f"mesh (data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")
  if len(ds.x_train) < base.batch_size:
    raise ValueError(f"dataset {ds.name!r} has {len(ds.x_train)} training examples, fewer than "
                     f"batch_size={base.batch_size}")
  if ":" in base.model:   # the user's own factory: its own code reports its errors
    return
  import jax

  from jaxopt_dnn.app import models
  try:   # shapes only: a model that does not fit the data fails here, allocating nothing
    model = models.get_model(base.model, ds.num_classes, **dict(base.model_kwargs))
    params = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, *ds.x_train.shape[1:]), np.float32))
  except (TypeError, ValueError) as e:
    raise ValueError(f"model {base.model!r} with model_kwargs {dict(base.model_kwargs)} cannot "
                     f"be built for {ds.name!r} inputs {ds.x_train.shape[1:]}: "
                     f"{' '.join(str(e).split())[:240]}") from None
  n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
  if n > _MAX_PARAMS:
    raise ValueError(f"model {base.model!r} with model_kwargs {dict(base.model_kwargs)} has "
                     f"{n:,} parameters, more than compress handles ({_MAX_PARAMS:,})")


_MAX_PARAMS = 500_000_000   # ~2 GB of float32 weights, ~8 GB with Adam state and gradients


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
    out = args.out if args.out is not None else os.path.join(
        "runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    _check_out_dir(out)
    variants = [v for v in args.variants.split(",") if v] if args.variants else None
    compress.check_variants(base, variants or (), compress.default_variants(base), "--variants")
    if ":" not in base.model:
      models.get_model(base.model)  # an unknown --model fails here, with the valid names
  ds = data.load_dataset(dataset)
  _check_run(base, ds)
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

  if args.batch < 1:
    raise ValueError(f"--batch must be >= 1, got {args.batch}")
  if args.batch > 1 << 20:
    raise ValueError(f"--batch must be <= {1 << 20}, got {args.batch}")
  if not args.out.strip():
    raise ValueError(f"--out must be a file path, got {args.out!r}")
  if os.path.isdir(args.out):
    raise ValueError(f"--out {args.out!r} is a directory; give a file name")
  _check_writable_parent(args.out, "--out")

  path, outputs = artifacts.export_serving(args.checkpoint, args.out, batch=args.batch)
  print(f"exported the serving function of {args.checkpoint} to {path} "
        f"(input batch {args.batch}; output {outputs.shape} {outputs.dtype})")
  return 0


def _floats(text: str, flag: str) -> list[float]:
  try:
    return [float(t) for t in text.split(",") if t.strip()]
  except ValueError:
    raise ValueError(f"{flag}: expected comma-separated numbers, got {text!r}") from None


def cmd_plan(args) -> int:
  from jaxopt_dnn import auto
  from jaxopt_dnn.app import plan

  budgets = _floats(args.budgets, "--budgets")
  if not budgets or any(not (b > 0) or b != b or b == float("inf") for b in budgets):
    raise ValueError(f"--budgets must be positive bits per weight, got {args.budgets!r}")
  candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
  for c in candidates:
    auto.Candidate.parse(c)          # a bad name fails here, before anything is written
  if args.steps < 1:
    raise ValueError(f"--steps must be >= 1, got {args.steps}")
  out = args.out or os.path.join("runs", "plan-" + datetime.datetime.now().strftime(
      "%Y%m%d-%H%M%S"))
  _check_out_dir(out)
  paths = plan.run(dataset=args.dataset, model=args.model, steps=args.steps, budgets=budgets,
                   candidates=candidates, method=args.method, out=out,
                   log=lambda s: print(s, flush=True))
  print("wrote " + ", ".join(paths.values()))
  return 0


class _Parser(argparse.ArgumentParser):
  """argparse whose usage errors are one line on stderr (exit 2), like every user error."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(prog="jaxopt-dnn", description=__doc__,
              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
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
  from jaxopt_dnn.app import compress
  from jaxopt_dnn.app.recipe import Recipe
  c.add_argument("--steps", type=int, help="baseline training steps (default: "
                 f"{compress.default_recipe(compress.DEFAULT_DATASET).steps} on "
                 f"{compress.DEFAULT_DATASET}, {Recipe().steps} on the other datasets; a "
                 "--recipe file's own)")
  c.add_argument("--mesh", help="e.g. data=8 or data=4,fsdp=2")
  c.add_argument("--cpu-devices", type=int, help="virtual CPU devices (for --mesh on a CPU)")
  c.add_argument("--seed", type=int)
  c.add_argument("--out", help="output directory (default ./runs/<timestamp>)")
  c.add_argument("--progress", action="store_true", default=None, help="show progress bars")
  c.add_argument("--resume", metavar="DIR", help="continue an interrupted run in DIR: finished "
                 "variants are reused (not retrained), the others run")
  c.set_defaults(func=cmd_compress)
  c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                 help="show tracebacks of user errors")
  i = sub.add_parser("inspect", help="sizes, sparsity and quantization of a checkpoint")
  i.add_argument("checkpoint", help="a directory written by compress (e.g. runs/X/combined/serve)")
  i.set_defaults(func=cmd_inspect)
  i.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                 help="show tracebacks of user errors")
  e = sub.add_parser("export", help="serialized StableHLO of a checkpoint's serving function")
  e.add_argument("checkpoint", help="a serve checkpoint directory written by compress")
  e.add_argument("--out", required=True, help="output file")
  e.add_argument("--batch", type=int, default=1, help="input batch size of the export")
  e.set_defaults(func=cmd_export)
  e.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                 help="show tracebacks of user errors")
  pl = sub.add_parser("plan", help="per-layer sensitivity and automatic plans under bit "
                      "budgets vs uniform settings (table + Pareto plot)")
  pl.add_argument("--dataset", default="mnist1d", help="as for compress (default mnist1d)")
  pl.add_argument("--model", help="a zoo model (default: cnn1d for mnist1d, cnn for images)")
  pl.add_argument("--steps", type=int, default=1000, help="baseline training steps")
  pl.add_argument("--budgets", default="4.5,5,6,8.5",
                  help="bits per weight (scales counted), comma-separated")
  pl.add_argument("--candidates", default="int4-g32,int4,int8,16-bit",
                  help="per-layer choices: int4-gN (group size N; -fp8 for 8-bit scales), "
                  "int4, int8, 16-bit; +2:4 or +50%% adds one-shot pruning")
  pl.add_argument("--method", default="rtn", choices=["rtn", "gptq", "awq"],
                  help="how candidates are realised")
  pl.add_argument("--out", help="output directory (default ./runs/plan-<timestamp>)")
  pl.set_defaults(func=cmd_plan)
  pl.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                  help="show tracebacks of user errors")
  return p


def _user_errors() -> tuple[type[BaseException], ...]:
  """Exception types that mean bad user input (not a bug in jaxopt-dnn)."""
  errors: list[type[BaseException]] = [ValueError, TypeError, KeyError, OSError, ImportError,
                                       EOFError]
  try:
    import yaml
    errors.append(yaml.YAMLError)
  except ImportError:
    pass
  import zipfile
  errors.append(zipfile.BadZipFile)
  return tuple(errors)


def _one_line(e: BaseException) -> str:
  msg = e.args[0] if isinstance(e, KeyError) and e.args else e
  if isinstance(e, OSError) and e.filename is not None and e.strerror:
    msg = f"{e.filename}: {e.strerror}"
  elif isinstance(e, ImportError) and not isinstance(msg, str):
    msg = str(e)
  text = " ".join(str(msg).split()) or type(e).__name__
  if isinstance(e, (ImportError,)) and "pip install" not in text:
    text += " (an optional dependency is missing)"
  return text if len(text) <= 600 else text[:597] + "..."


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.func(args)
  except _user_errors() as e:
    if getattr(args, "debug", False):
      raise
    print(f"jaxopt-dnn {args.command}: error: {_one_line(e)}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("jaxopt-dnn: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  np.set_printoptions(precision=4)
  sys.exit(main())
