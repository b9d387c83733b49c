"""Wall and CPU time of the default ``jd.auto.search`` on all-MiniLM-L6-v2, and its plans.

The issue's setting: 36 attention/MLP kernels, the 6 default candidates, GPTQ, the 32
``CALIBRATION`` sentences (4 batches of 8). Prints the progress lines, the wall time and
the process CPU time of the search (the machine is shared: the load average is printed
too), then realises the 4.5 and 6 bits/weight plans (one sequential GPTQ pass each) and
prints their min cosine on the 16 ``EVALUATION`` sentences and on 64 (those + the 48
``EVALUATION_VARIED`` texts).

    python bench/auto_speed.py
"""

from __future__ import annotations

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main() -> None:
  import jax

  import jaxopt_dnn as jd
  from jaxopt_dnn import quant
  from jaxopt_dnn.app import pretrained as P

  model, v = P.load()
  tok = P.tokenizer()
  cal = P.batches(P.CALIBRATION, tok, 8)
  print(f"load average before: {os.getloadavg()}", flush=True)
  w0, c0 = time.perf_counter(), time.process_time()
  plan = jd.auto.search(model.apply, v, cal, bits_per_weight=4.5, rules=P.KERNELS,
                        log=lambda m: print(m, flush=True))
  wall, cpu = time.perf_counter() - w0, time.process_time() - c0
  print(f"jd.auto.search (sensitivity + knapsack): wall {wall:.1f} s, process CPU "
        f"{cpu:.1f} s, load average after: {os.getloadavg()}", flush=True)
  ev = P.batches(P.EVALUATION + P.EVALUATION_VARIED, tok, 64)[0]
  f = jax.jit(model.apply)
  ref = f(v, *ev)
  for b in (4.5, 6.0):
    p = plan if b == 4.5 else jd.auto.plan_for_budget(_sens_of(plan), b)
    params = p.apply(model.apply, v, cal)
    cos = P.cosines(f({**v, "params": quant.dequantize_params(params)}, *ev), ref)
    print(f"auto @ {b:g}: {p.bits_per_weight:.3f} bits/weight, min cos 16 eval "
          f"{cos[:16].min():.4f}, min cos 64 {cos.min():.4f}, mean 64 {cos.mean():.5f}",
          flush=True)


def _sens_of(plan):
  import jaxopt_dnn as jd
  layers = list(plan.choices)
  return jd.auto.Sensitivity(layers, plan.candidates, plan.sensitivity, plan.layer_bits,
                             plan.sizes, plan.method, plan.stored)


if __name__ == "__main__":
  main()
