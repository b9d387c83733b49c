"""The comparison table of ``jaxopt-dnn compress``: text, Markdown, JSON and a plot."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

COLUMNS = (
    # key, header, format
    ("name", "variant", "{}"),
    ("accuracy", "test acc %", "{:.2f}"),
    ("train_time_s", "train s", "{:.1f}"),
    ("step_time_ms", "step ms", "{:.2f}"),
    ("latency_ms", "latency ms/batch", "{:.2f}"),
    ("params", "params", "{:,}"),
    ("nonzeros", "nonzeros", "{:,}"),
    ("disk_bytes", "disk bytes", "{:,}"),
    ("disk_ratio", "disk x", "{:.3f}"),
    ("flops_per_example", "MFLOPs/example", "{:.2f}"),
    ("int8_dots", "int8 dots", "{}"),
)


def rows(results: Sequence[Any]) -> list[dict]:
  """Result objects (or dicts) -> display rows; ``disk x`` is relative to the first."""
  out = [r.row() if hasattr(r, "row") else dict(r) for r in results]
  base = out[0]["disk_bytes"] if out else 1
  for r in out:
    r["disk_ratio"] = r["disk_bytes"] / base
  return out


def _cell(row: dict, key: str, fmt: str) -> str:
  v = row.get(key)
  if v is None:
    return "n/a"
  if key == "accuracy":
    v = v * 100
  if key == "flops_per_example":
    v = v / 1e6
  return fmt.format(v)


def table(results: Sequence[Any]) -> str:
  """A fixed-width text table, one row per variant."""
  rs = rows(results)
  cells = [[h for _, h, _ in COLUMNS]] + [[_cell(r, k, f) for k, _, f in COLUMNS] for r in rs]
  widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
  lines = []
  for j, c in enumerate(cells):
    lines.append("  ".join(x.ljust(w) if i == 0 else x.rjust(w)
                           for i, (x, w) in enumerate(zip(c, widths))))
    if j == 0:
      lines.append("  ".join("-" * w for w in widths))
  return "\n".join(lines)


def markdown(results: Sequence[Any], *, title: str = "jaxopt-dnn compress",
             notes: Sequence[str] = ()) -> str:
  rs = rows(results)
  head = "| " + " | ".join(h for _, h, _ in COLUMNS) + " |"
  sep = "|" + "|".join(" --- " if i == 0 else " ---: " for i in range(len(COLUMNS))) + "|"
  body = ["| " + " | ".join(_cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in rs]
  text = [f"# {title}", "", head, sep, *body, ""]
  text += [f"- {n}" for n in notes]
  return "\n".join(text) + "\n"


NOTES = (
    "accuracy: of the serving function on the test split (int8 variants run real "
    "s8 x s8 -> s32 dots/convs; `int8 dots` counts the integer ones in the compiled HLO, "
    "where XLA may widen a tiny s8 conv to s32).",
    "disk bytes: the orbax checkpoint of the serving variables, sparse leaves packed as "
    "bitmask + kept values; `disk x` is relative to the first row.",
    "Masks give no speedup on dense CPUs: a pruned model's latency and FLOPs equal the "
    "dense one's. The wins are size on disk, int8, and smaller (distilled/shrunk) models.",
    "step ms: mean of the steady-state train steps (first, compiling step "
    "excluded); latency: median of 20 calls on one test batch.",
)


def plot(results: Sequence[Any], path: str) -> str:
  """Accuracy vs size on disk, one labelled point per variant (PNG)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rs = rows(results)
  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
  placed: list[tuple[float, float]] = []
  for r in rs:
    xy = (r["disk_bytes"] / 1024, r["accuracy"] * 100)
    ax.scatter(*xy, s=40)
    # Points that (nearly) coincide get their labels stacked instead of overprinted.
    near = sum(1 for px, py in placed
               if abs(np.log(xy[0] / px)) < 0.15 and abs(xy[1] - py) < 0.05)
    placed.append(xy)
    ax.annotate(r["name"], xy, textcoords="offset points", xytext=(5, 4 - 11 * near),
                fontsize=8)
  ax.set_xscale("log")
  ax.set_xlabel("size on disk (KiB, log scale)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("accuracy vs size on disk")
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def write_all(results: Sequence[Any], out: str, *, meta: dict | None = None) -> dict[str, str]:
  """Writes ``results.json``, ``results.md`` and ``accuracy_vs_size.png`` into ``out``."""
  os.makedirs(out, exist_ok=True)
  paths = {"json": os.path.join(out, "results.json"), "md": os.path.join(out, "results.md"),
           "png": os.path.join(out, "accuracy_vs_size.png")}
  with open(paths["json"], "w") as f:
    json.dump({**(meta or {}), "results": [
        {**r, "recipe": getattr(res, "recipe", None)} for r, res in zip(rows(results), results)]},
        f, indent=2)
  with open(paths["md"], "w") as f:
    f.write(markdown(results, notes=NOTES))
  plot(results, paths["png"])
  return paths
