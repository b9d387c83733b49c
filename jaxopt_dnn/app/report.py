"""The comparison table of ``jaxopt-dnn compress``: text, Markdown, JSON and a plot."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxopt_dnn import _table

COLUMNS = (
    # key, header, format
    ("name", "variant", "{}"),
    ("accuracy", "test acc % [95% CI]", "{:.2f}"),
    ("delta", "vs base (pts)", "{:+.2f}"),
    ("train_time_s", "train s", "{:.1f}"),
    ("step_time_ms", "step ms", "{:.2f}"),
    ("latency_ms", "latency ms/batch (min-max)", "{:.2f}"),
    ("latency_ratio", "lat x", "{:.2f}"),
    ("served", "served", "{}"),
    ("params", "params", "{:,}"),
    ("nonzeros", "nonzeros", "{:,}"),
    ("disk_bytes", "disk bytes", "{:,}"),
    ("disk_ratio", "disk x", "{:.3f}"),
    ("array_bytes", "array bytes", "{:,}"),
    ("array_ratio", "array x", "{:.3f}"),
    ("flops_per_example", "MFLOPs/example", "{:.2f}"),
    ("int8_dots", "int8 dots", "{}"),
)

# Columns of what training costs: a variant that trains nothing (PTQ) shows a dash.
TRAIN_COLUMNS = ("train_time_s", "step_time_ms")
DASH = "\u2013"


def rows(results: Sequence[Any]) -> list[dict]:
  """Result objects (or dicts) -> display rows; ``disk x`` and ``lat x`` are relative to
  the first row (the baseline)."""
  out = [r.row() if hasattr(r, "row") else dict(r) for r in results]
  base = out[0]["disk_bytes"] if out else 1
  base_arr = out[0].get("array_bytes") if out else None
  base_lat = out[0].get("latency_ms") if out else None
  for r in out:
    r["disk_ratio"] = r["disk_bytes"] / base
    arr = r.get("array_bytes")
    r["array_ratio"] = arr / base_arr if arr is not None and base_arr else None
    lat = r.get("latency_ms")
    r["latency_ratio"] = lat / base_lat if lat is not None and base_lat else None
  return out


def _pct(row: dict) -> bool:
  return row.get("metric", "accuracy") == "accuracy"


def _cell(row: dict, key: str, fmt: str) -> str:
  v = row.get(key)
  if v is None:
    return DASH if key in TRAIN_COLUMNS or key == "delta" else "n/a"
  if key == "accuracy":
    scale = 100 if _pct(row) else 1
    text = fmt.format(v * scale)
    ci = row.get("accuracy_ci")
    if ci:
      text += f" [{ci[0] * scale:.1f}, {ci[1] * scale:.1f}]"
    return text
  if key == "delta":
    if row.get("delta_ci") is None:
      return DASH
    if row.get("delta_ci") == [0.0, 0.0] and v == 0:
      return "ref"
    scale = 100 if _pct(row) else 1
    return fmt.format(v * scale) + (" *" if row.get("differs") else "")
  if key == "latency_ms":
    text = fmt.format(v)
    if row.get("latency_min_ms") is not None:
      text += f" ({row['latency_min_ms']:.2f}-{row['latency_max_ms']:.2f})"
    return text
  if key == "flops_per_example":
    v = v / 1e6
  return fmt.format(v)


def table(results: Sequence[Any]) -> str:
  """A fixed-width text table, one row per variant."""
  return _table.render([h for _, h, _ in COLUMNS],
                       [[_cell(r, k, f) for k, _, f in COLUMNS] for r in rows(results)],
                       right=range(1, len(COLUMNS)))


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
    "test acc: the serving function's accuracy on the test split, with a 95% percentile-"
    "bootstrap interval over the test examples (2000 resamples). `vs base`: accuracy minus "
    "the baseline's, in points; `*` marks a variant whose difference from the baseline is "
    "beyond the interval: the 95% interval of a paired bootstrap of the difference (the "
    "same resampled test examples for both) excludes 0.",
    "latency: serving one test batch, all variants timed in alternating rounds (forward, then "
    "reverse order; each round's value is the median of its calls): the median over rounds "
    "and the min-max over rounds; `lat x` is relative to the first row.",
    "int8 variants run real s8 x s8 -> s32 dots/convs; `int8 dots` counts the integer ones "
    "in the compiled HLO (XLA may widen a tiny s8 conv to s32).",
    "disk bytes: the files of the orbax checkpoint of the serving variables, sparse leaves "
    "packed as bitmask + kept values; `disk x` is relative to the first row. array bytes: "
    "the bytes of its arrays alone (values, scales, bitmasks), without orbax's metadata "
    "files, which dominate the disk bytes of a small model.",
    "MFLOPs/example: XLA's cost of the whole serving program (every device's partition, "
    "with the batch sharded as in training) divided by the batch: the same on any mesh.",
    "Masks give no speedup on dense CPUs: a `masked` model's latency and FLOPs equal the "
    "dense one's. Channel pruning is served `shrunk` (sparsity.shrink_channels removes the "
    "pruned channels, so the layers are smaller): that, int8, and a smaller distilled "
    "student are what can run faster.",
    "train s / step ms: wall time of the variant's training and mean of its steady-state "
    "steps (first, compiling step excluded); \u2013: the variant trains nothing (PTQ).",
)


def plot(results: Sequence[Any], path: str) -> str:
  """Accuracy (with its 95% interval as an error bar) vs size on disk, one labelled point
  per variant (PNG)."""
  from jaxopt_dnn.app import require
  require("matplotlib", "the report's plot").use("Agg")
  import matplotlib.pyplot as plt

  rs = rows(results)
  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
  placed: list[tuple[float, float]] = []
  for r in rs:
    scale = 100 if _pct(r) else 1
    xy = (r["disk_bytes"] / 1024, r["accuracy"] * scale)
    ci = r.get("accuracy_ci")
    yerr = None if not ci else [[xy[1] - ci[0] * scale], [ci[1] * scale - xy[1]]]
    ax.errorbar(*xy, yerr=yerr, fmt="o", ms=6, capsize=3,
                mfc="none" if r.get("differs") else None)
    # Points that (nearly) coincide get their labels stacked instead of overprinted.
    near = sum(1 for px, py in placed
               if abs(np.log(xy[0] / px)) < 0.15 and abs(xy[1] - py) < 0.05 * scale)
    placed.append(xy)
    ax.annotate(r["name"] + (" *" if r.get("differs") else ""), xy, textcoords="offset points",
                xytext=(5, 4 - 11 * near), fontsize=8)
  ax.set_xscale("log")
  ax.set_xlabel("size on disk (KiB, log scale)")
  metric = rs[0].get("metric", "accuracy") if rs else "accuracy"
  ax.set_ylabel(f"test {metric}" + (" (%)" if metric == "accuracy" else "")
                + ", 95% bootstrap interval")
  ax.set_title(f"{metric} vs size on disk (* : differs from the baseline)")
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
    json.dump({**(meta or {}), "intervals": "95% percentile bootstrap over test examples "
               "(2000 resamples); delta_ci: paired bootstrap of the difference to the "
               "baseline; differs: delta_ci excludes 0", "results": [
        {**r, "recipe": getattr(res, "recipe", None)} for r, res in zip(rows(results), results)]},
        f, indent=2)
  with open(paths["md"], "w") as f:
    f.write(markdown(results, notes=NOTES))
  plot(results, paths["png"])
  return paths
