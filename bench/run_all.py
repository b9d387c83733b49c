"""Runs every benchmark and writes ``bench/RESULTS.md`` (machine description + tables).

Run: ``python bench/run_all.py`` (CPU, <= 10 minutes) or ``python bench/run_all.py
--device gpu`` on a GPU host, which uses larger sizes, adds the 4096^3 matmul ceilings
and writes ``bench/RESULTS_GPU.md``. Each benchmark runs in its own process (clean
device configuration) and prints side-by-side ratios measured with alternating runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def benches(device: str, out_dir: str) -> list[tuple[str, list[str]]]:
  gpu = device == "gpu"
  py = [sys.executable]
  return [
      ("Pruning: prune_optimizer(adam) vs optax.adam train step",
       py + [f"{HERE}/pruning_overhead.py"]),
      ("Pruning: channel-shrunk vs masked inference latency", py + [f"{HERE}/shrink_bench.py"]),
      ("Quantization: our QAT step vs qwix QtProvider; int8 vs fp32 serving",
       py + [f"{HERE}/quant_bench.py", "--rounds", "21"]),
      ("Precision: fp32 vs our bf16 policy vs jmp bf16 (CNN)",
       py + [f"{HERE}/precision_bench.py"] + (["--size", "large"] if gpu else [])),
      ("Precision: fp32 vs our bf16 policy vs jmp bf16 (ResNet)",
       py + [f"{HERE}/precision_bench.py", "--model", "resnet"]
       + (["--size", "large"] if gpu else [])),
      ("Parallel: data-parallel step time on 1/2/4/8 devices",
       py + [f"{HERE}/parallel_bench.py"]),
      ("Matmul ceilings (fp32, bf16, int8)",
       py + [f"{HERE}/matmul_ceiling.py", "--n", "4096" if gpu else "1024"]),
      ("End to end: jaxopt-dnn compress (defaults)",
       py + ["-m", "jaxopt_dnn.app.cli", "compress", "--out", os.path.join(out_dir, "compress")]),
  ]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  ap.add_argument("--out", help="RESULTS file (default bench/RESULTS.md or RESULTS_GPU.md)")
  ap.add_argument("--only", help="comma-separated substrings of section titles to run")
  args = ap.parse_args(argv)
  out = args.out or os.path.join(HERE, "RESULTS.md" if args.device == "cpu" else "RESULTS_GPU.md")
  import jax
  env = dict(os.environ)
  if args.device == "cpu":
    env["JAX_PLATFORMS"] = "cpu"
  lines = ["# Benchmark results", "",
           f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
           f"- CPU: {_cpu_model()}, {os.cpu_count()} cores",
           f"- JAX {jax.__version__}, requested device: {args.device}",
           f"- command: `python bench/run_all.py{' --device gpu' if args.device == 'gpu' else ''}`",
           "", "Every figure is a median over alternating runs in one process; ratios are "
           "side by side on the same model and batch. On a CPU, masks, bf16 and int8 are not "
           "expected to speed anything up; read each table's notes.", ""]
  t0 = time.time()
  with tempfile.TemporaryDirectory() as tmp:
    for title, cmd in benches(args.device, tmp):
      if args.only and not any(s in title for s in args.only.split(",")):
        continue
      t = time.time()
      proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(HERE))
      text = proc.stdout.strip() or proc.stderr.strip()[-2000:]
      status = "" if proc.returncode == 0 else f" (exit code {proc.returncode})"
      print(f"[{time.time() - t:6.1f} s] {title}{status}", flush=True)
      lines += [f"## {title}{status}", "", "```", text, "```", ""]
  lines.append(f"Total wall time: {time.time() - t0:.0f} s.")
  with open(out, "w") as f:
    f.write("\n".join(lines) + "\n")
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
