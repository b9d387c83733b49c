"""The MiniLM setup the PTQ / auto bench scripts share: the pretrained encoder, its
calibration batches, one evaluation batch of every held-out sentence, and the float
reference embeddings of that batch."""

from __future__ import annotations

import jax

from jaxopt_dnn.app import pretrained as P


def setup(calibration=P.CALIBRATION, evaluation=P.EVALUATION + P.EVALUATION_VARIED, *,
          cal_batch: int = 8):
  """``(model, variables, calibration batches, evaluation batch, jitted apply, reference)``:
  ``calibration`` texts in batches of ``cal_batch``; all ``evaluation`` texts in one batch;
  ``reference = apply(variables, *evaluation batch)`` of the float model."""
  model, v = P.load()
  tok = P.tokenizer()
  cal = P.batches(calibration, tok, cal_batch)
  ev = P.batches(evaluation, tok, len(evaluation))[0]
  f = jax.jit(model.apply)
  return model, v, cal, ev, f, f(v, *ev)


def short_windows(texts, count: int, *, lo: int = 2, hi: int = 8, seed: int = 0,
                  batch: int = 8):
  """``count`` random windows of ``lo`` to ``hi`` word pieces of the token stream of
  ``texts`` (crossing sentence boundaries), each as ``[CLS] ... [SEP]``, batched so that
  every batch holds one length (no padding rows in the Hessians): more short inputs for
  a one-shot calibration than the sentences themselves give."""
  import jax.numpy as jnp
  import numpy as np

  tok = P.tokenizer()
  stream = np.concatenate([tok.encode(s)[1:-1] for s in texts])
  r = np.random.RandomState(seed)
  lens = r.randint(lo, hi + 1, count)
  out = []
  for n in np.unique(lens):
    rows = []
    for _ in range(int((lens == n).sum())):
      s0 = r.randint(0, len(stream) - n)
      rows.append([tok.cls, *stream[s0:s0 + n], tok.sep])
    rows = np.asarray(rows, np.int32)
    for i in range(0, len(rows), batch):
      ids = jnp.asarray(rows[i:i + batch])
      out.append((ids, jnp.ones_like(ids)))
  return out
