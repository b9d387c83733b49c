"""W8A8 and one-shot sparsity of all-MiniLM-L6-v2 on 16 and 64 held-out texts.

Quality = min over sentences of cos(fp32, compressed embedding), on the 16 ``EVALUATION``
sentences and on 64 (those + the 48 ``EVALUATION_VARIED`` texts: questions, chat,
instructions, code, numbers); calibration: the 32 ``CALIBRATION`` sentences. Rows:

* W8A8 through ``int8_apply`` (every projection s8 x s8 -> s32, int8 per-channel
  weights): static per-tensor absmax scales vs per-token dynamic scales
  (``calibration="dynamic"``), each without and with ``smooth``; the jitted latency of
  static vs dynamic on the 64 texts (alternating rounds, medians);
* SparseGPT 2:4 and 50% unstructured, calibrated on the 32 sentences alone (with the
  previous defaults ``damp=0.1``, the paper's ``nm_select="score"``, no refit, and with
  the library defaults) and on those + ``--short`` random short windows (2 to 8 word pieces)
  of their token stream (``_minilm.short_windows``; never the evaluation texts) +
  ``--random`` windows of random vocabulary ids (``_minilm.random_windows``), with
  oneshot's ``refit`` (``--refit``), ``damp=--damp`` (2:4: ``--damp-nm``) and 2:4
  ``nm_select=--nm-select``.

The 64 are also reported split as validation (the 16 + the first 24 varied texts, on
which the SparseGPT calibration was chosen) and held-out (the last 24 varied texts).

    python bench/ptq_targets.py [--skip-w8a8] [--skip-sparse] [--short 256]
        [--random 256] [--nm-select obs|score] [--damp-nm 0.3] [--damp 0.3] [--[no-]refit]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--skip-w8a8", action="store_true")
  ap.add_argument("--skip-sparse", action="store_true")
  ap.add_argument("--rounds", type=int, default=7, help="latency rounds per variant")
  ap.add_argument("--short", type=int, default=256,
                  help="SparseGPT rows: random short windows (2 to 8 word pieces) of the "
                  "calibration token stream added to the 32 sentences (0: none)")
  ap.add_argument("--nm-select", choices=("score", "obs"), default="obs",
                  help="SparseGPT 2:4 group mask choice (oneshot's nm_select)")
  ap.add_argument("--random", type=int, default=256,
                  help="SparseGPT rows: random-vocabulary windows (2 to 8 word pieces, "
                  "_minilm.random_windows) added to the calibration (0: none)")
  ap.add_argument("--damp-nm", type=float, default=0.3,
                  help="SparseGPT 2:4 row (new calibration): oneshot's damp")
  ap.add_argument("--damp", type=float, default=0.3,
                  help="SparseGPT 50%% row (new calibration): oneshot's damp")
  ap.add_argument("--refit", action=argparse.BooleanOptionalAction, default=True,
                  help="SparseGPT rows: oneshot's refit (CG re-fit of the kept weights)")
  a = ap.parse_args()

  import jax
  import numpy as np

  from jaxopt_dnn import quant, sparsity
  from jaxopt_dnn.app import pretrained as P
  import _minilm  # noqa: E402  (bench/)

  model, v, cal, ev, f, ref = _minilm.setup()
  R = P.KERNELS

  def row(name, out, extra=""):
    cos = P.cosines(out, ref)
    print(f"| {name} | {cos[:16].min():.4f} | {cos[:40].min():.4f} | {cos[40:].min():.4f} | "
          f"{cos.min():.4f} | {cos.mean():.5f} | {extra} |", flush=True)

  print(f"load average at start: {os.getloadavg()}")
  print("| setting | min cos (16 eval) | min cos (validation 40) | min cos (held-out 24) "
        "| min cos (64) | mean cos (64) | note |")
  print("|---|---:|---:|---:|---:|---:|---|")
  if not a.skip_w8a8:
    folds = {r"(.*)/dense$": r"\1/self/value"}
    sv = quant.smooth(model.apply, v, cal, alpha=0.5, rules=R, folds=folds)
    progs = {}
    for sname, vv in (("", v), ("smooth(0.5) + ", sv)):
      qv = {**vv, "params": quant.quantize_params(vv["params"], R)}
      stats = quant.calibrate(model.apply, vv, cal, rules=R)
      for kind, calib in (("static absmax", stats), ("per-token dynamic", "dynamic")):
        fn = jax.jit(lambda qv, ids, mask, calib=calib: quant.int8_apply(
            model, qv, calib, ids, mask, rules=R))
        census = quant.int8_dot_census(fn, qv, *ev).lowered
        row(f"W8A8 {sname}{kind}", fn(qv, *ev),
            f"{census.int8} s8 x s8 -> s32 dots, {census.float} float")
        if not sname:
          progs[kind] = (fn, qv)
    # latency: alternating rounds, each a median of 5 calls
    times = {k: [] for k in progs}
    for _ in range(a.rounds):
      for k, (fn, qv) in progs.items():
        ts = []
        for _ in range(5):
          t = time.perf_counter()
          jax.block_until_ready(fn(qv, *ev))
          ts.append(time.perf_counter() - t)
        times[k].append(np.median(ts))
    med = {k: 1e3 * float(np.median(t)) for k, t in times.items()}
    print(f"\nW8A8 latency on the 64 texts (CPU, jitted, median of {a.rounds} alternating "
          f"rounds x 5 calls; load average {os.getloadavg()[0]:.1f}): "
          + ", ".join(f"{k} {m:.1f} ms" for k, m in med.items())
          + f"; dynamic / static = {med['per-token dynamic'] / med['static absmax']:.3f}\n")
  if not a.skip_sparse:
    aug = cal + _minilm.short_windows(P.CALIBRATION, a.short)
    if a.random:
      aug = aug + _minilm.random_windows(a.random)
    for kw, name in ((dict(n=2, m=4), "2:4"), (dict(sparsity=0.5), "50% unstructured")):
      sel = dict(nm_select=a.nm_select) if "n" in kw else {}
      sel.update(refit=a.refit, damp=a.damp_nm if "n" in kw else a.damp)
      label = (f"32 sentences + {a.short} short windows"
               + (f" + {a.random} random-vocabulary windows" if a.random else "")
               + "".join(f", {k}={v!r}" for k, v in sel.items()))
      paper = dict(damp=0.1, refit=False, **(dict(nm_select="score") if "n" in kw else {}))
      for label, batches, extra in (
          ("32 sentences, the previous defaults (damp=0.1, score, no refit)", cal, paper),
          ("32 sentences (library defaults)", cal, {}), (label, aug, sel)):
        t = time.perf_counter()
        p, _ = sparsity.oneshot(model.apply, v, batches, method="sparsegpt", rules=R,
                                **kw, **extra)
        row(f"SparseGPT {name}, {label}", f({**v, "params": p}, *ev),
            f"{time.perf_counter() - t:.0f} s")
  print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
  main()
