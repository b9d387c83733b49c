"""``jaxopt-dnn plan``: per-layer sensitivity, automatic plans and the Pareto picture.

Trains the recipe's baseline (or takes given variables), measures every layer's
sensitivity to every candidate (:func:`jaxopt_dnn.auto.sensitivity`), and compares, on
the same axes, every **uniform** setting (one candidate everywhere) with the
**automatic** plans at several bits-per-weight budgets: test accuracy and output
distortion vs bits/weight (scales counted). Writes ``plan.json``, ``plan.md`` and
``pareto.png``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_dnn import auto, quant


def _accuracy(apply_fn, variables, params, x, y, batch=512) -> float:
  fwd = jax.jit(lambda p, xb: jnp.argmax(apply_fn({**variables, "params": p}, xb), -1))
  hits = sum(int(np.sum(np.asarray(fwd(params, x[i:i + batch])) == y[i:i + batch]))
             for i in range(0, len(x), batch))
  return hits / len(x)


def _dequant(tree, like):
  return jax.tree.map(lambda q, r: quant.dequantize(q, jnp.asarray(r).dtype)
                      if quant.is_qarray(q) else jnp.asarray(q).astype(jnp.asarray(r).dtype),
                      tree, like, is_leaf=quant.is_qarray)


def evaluate(model, variables, batches, x_test, y_test, *, budgets: Sequence[float],
             candidates: Sequence[str], method: str = "rtn", eval_kwargs=None) -> dict:
  """Uniform settings and automatic plans, each realised and measured.

  Returns ``{"sensitivity": ..., "uniform": [...], "auto": [...], "plans": {budget:
  table}}``; each point holds ``bits_per_weight``, ``distortion`` (measured) and
  ``accuracy`` on ``(x_test, y_test)``.
  """
  kw = dict(eval_kwargs or {})

  def apply_fn(v, *x):
    return model.apply(v, *x, **kw)

  sens = auto.sensitivity(apply_fn, variables, batches, candidates=candidates, method=method)
  base = variables["params"]
  out: dict[str, Any] = {"float_accuracy": _accuracy(apply_fn, variables, base, x_test, y_test),
                         "uniform": [], "auto": [], "plans": {}}
  for name in sens.candidates:
    plan = sens.uniform(name)
    out["uniform"].append(_point(name, plan, apply_fn, variables, batches, x_test, y_test))
  for b in budgets:
    try:
      plan = auto.search(apply_fn, variables, batches, bits_per_weight=b, sens=sens,
                         method=method)
    except ValueError:
      continue          # below the cheapest plan
    out["auto"].append(_point(f"auto@{b:g}", plan, apply_fn, variables, batches, x_test,
                              y_test))
    out["plans"][f"{b:g}"] = str(plan)
  out["sensitivity"] = {layer: dict(v) for layer, v in sens.values.items()}
  return out


def _point(name, plan, apply_fn, variables, batches, x_test, y_test) -> dict:
  measured = plan.verify(apply_fn, variables, batches)
  realised = _dequant(plan.apply(apply_fn, variables, batches), variables["params"])
  return {"name": name, "bits_per_weight": plan.bits_per_weight, "distortion": measured,
          "predicted": plan.predicted,
          "accuracy": _accuracy(apply_fn, variables, realised, x_test, y_test),
          "choices": dict(plan.choices)}


def pareto_plot(result: dict, path: str, *, title: str = "") -> str:
  """Accuracy and distortion vs bits/weight: uniform settings as points, auto plans as a
  line, on the same axes."""
  from jaxopt_dnn.app import require
  require("matplotlib", "the Pareto plot").use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, key, label in ((axes[0], "accuracy", "test accuracy"),
                         (axes[1], "distortion", "output distortion (lower is better)")):
    u, a = result["uniform"], result["auto"]
    ax.scatter([p["bits_per_weight"] for p in u], [p[key] for p in u], marker="s",
               label="uniform", zorder=3)
    for p in u:
      ax.annotate(p["name"], (p["bits_per_weight"], p[key]), fontsize=7,
                  xytext=(3, 3), textcoords="offset points")
    ax.plot([p["bits_per_weight"] for p in a], [p[key] for p in a], "o-", label="auto plan")
    if key == "distortion":
      ax.set_yscale("log")
    else:
      ax.axhline(result["float_accuracy"], ls=":", c="gray", label="float")
    ax.set_xlabel("bits per weight (scales counted)")
    ax.set_ylabel(label)
    ax.legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write(result: dict, out: str, *, title: str = "jaxopt-dnn plan") -> dict[str, str]:
  os.makedirs(out, exist_ok=True)
  paths = {"json": os.path.join(out, "plan.json"), "md": os.path.join(out, "plan.md"),
           "png": os.path.join(out, "pareto.png")}
  with open(paths["json"], "w") as f:
    json.dump(result, f, indent=2)
  lines = [f"# {title}", "", f"float accuracy: {result['float_accuracy']:.4f}", "",
           "| setting | bits/weight | accuracy | distortion |", "|---|---:|---:|---:|"]
  for p in result["uniform"] + result["auto"]:
    lines.append(f"| {p['name']} | {p['bits_per_weight']:.3f} | {p['accuracy']:.4f} | "
                 f"{p['distortion']:.3g} |")
  for b, table in result["plans"].items():
    lines += ["", f"## plan at {b} bits/weight", "", "```", table, "```"]
  with open(paths["md"], "w") as f:
    f.write("\n".join(lines) + "\n")
  pareto_plot(result, paths["png"], title=title)
  return paths


def run(*, dataset: str = "mnist1d", model: str | None = None, steps: int = 1000,
        budgets: Sequence[float] = (4.5, 5.0, 6.0, 8.5), candidates: Sequence[str] = (
            "int4-g32", "int4", "int8", "16-bit"), method: str = "rtn", out: str,
        seed: int = 0, log=print) -> dict[str, str]:
  """The ``jaxopt-dnn plan`` job: train the zoo baseline, then :func:`evaluate` and
  :func:`write`. Returns the written paths."""
  from jaxopt_dnn.app import compose, data, train
  from jaxopt_dnn.app.recipe import Recipe

  if method not in ("rtn", "gptq", "awq"):
    raise ValueError(f"--method must be one of rtn, gptq, awq, got {method!r}")
  for b in budgets:
    if not (isinstance(b, (int, float)) and np.isfinite(b) and b > 0):
      raise ValueError(f"budgets must be positive bits per weight, got {b!r}")
  cands = [auto.Candidate.parse(c) for c in candidates]
  ds = data.load_dataset(dataset)
  name = model or ("cnn1d" if ds.x_train.ndim == 3 else "cnn")
  recipe = Recipe(model=name, steps=steps, seed=seed)
  built = compose.build(recipe, ds.x_train[:recipe.batch_size], num_classes=ds.num_classes)
  log(f"jaxopt-dnn plan: training {name} on {ds.name} for {steps} steps")
  fit = train.fit(built.state, built.train_step, ds,
                  train.TrainConfig(steps=steps, batch_size=recipe.batch_size, seed=seed,
                                    progress=False), place_batch=built.place_batch)
  variables = {"params": jax.device_get(fit.state.params),
               **jax.device_get(fit.state.collections)}
  cal = [(ds.x_train[i:i + 256],) for i in range(0, min(1024, len(ds.x_train)), 256)]
  kw = {"train": False} if compose._takes_train(built.model) else {}
  res = evaluate(built.model, variables, cal, ds.x_test, ds.y_test, budgets=budgets,
                 candidates=[c.name for c in cands], method=method, eval_kwargs=kw)
  for b, table in res["plans"].items():
    log(table)
  for p in res["uniform"] + res["auto"]:
    log(f"{p['name']:>12}: {p['bits_per_weight']:.3f} bits/weight, accuracy "
        f"{p['accuracy']:.4f}, distortion {p['distortion']:.3g}")
  return write(res, out, title=f"jaxopt-dnn plan: {name} on {ds.name} ({method})")
