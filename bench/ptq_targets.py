"""W8A8 and one-shot sparsity of all-MiniLM-L6-v2 on 16 and 64 held-out texts.

Quality = min over sentences of cos(fp32, compressed embedding), on the 16 ``EVALUATION``
sentences and on 64 (those + the 48 ``EVALUATION_VARIED`` texts: questions, chat,
instructions, code, numbers); calibration: the 32 ``CALIBRATION`` sentences. Rows:

* W8A8 through ``int8_apply`` (every projection s8 x s8 -> s32, int8 per-channel
  weights): static per-tensor absmax scales vs per-token dynamic scales
  (``calibration="dynamic"``), each without and with ``smooth``; the jitted latency of
  static vs dynamic on the 64 texts (alternating rounds, medians);
* SparseGPT 2:4 and 50% unstructured, with float targets (the default) and without
  (the SparseGPT paper's targets).

    python bench/ptq_targets.py [--skip-w8a8] [--skip-sparse]
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
    print(f"| {name} | {cos[:16].min():.4f} | {cos.min():.4f} | {np.sort(cos)[1]:.4f} | "
          f"{cos.mean():.5f} | {extra} |", flush=True)

  print(f"load average at start: {os.getloadavg()}")
  print("| setting | min cos (16 eval) | min cos (64) | 2nd lowest (64) | mean cos (64) | note |")
  print("|---|---:|---:|---:|---:|---|")
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
    for kw, name in ((dict(n=2, m=4), "2:4"), (dict(sparsity=0.5), "50% unstructured")):
      for ft in (True, False):
        t = time.perf_counter()
        p, _ = sparsity.oneshot(model.apply, v, cal, method="sparsegpt", rules=R,
                                float_targets=ft, **kw)
        row(f"SparseGPT {name}, float_targets={ft}", f({**v, "params": p}, *ev),
            f"{time.perf_counter() - t:.0f} s")
  print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
  main()
