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


def random_windows(count: int, *, lo: int = 2, hi: int = 8, seed: int = 1, batch: int = 8,
                   first: int = 1996):
  """``count`` inputs of ``lo`` to ``hi`` word pieces drawn uniformly from the vocabulary
  ids ``>= first`` (1996: past the specials, ``[unused]`` and single characters of the
  BERT uncased vocabulary), each as ``[CLS] ... [SEP]``, batched one length per batch:
  calibration rows that no text register in particular, disjoint from any evaluation
  text by construction (no sentence)."""
  import jax.numpy as jnp
  import numpy as np

  tok = P.tokenizer()
  vocab = len(tok.vocab) if hasattr(tok, "vocab") else 30522
  r = np.random.RandomState(seed)
  lens = r.randint(lo, hi + 1, count)
  out = []
  for n in np.unique(lens):
    c = int((lens == n).sum())
    ids = r.randint(first, vocab, (c, n))
    rows = np.concatenate([np.full((c, 1), tok.cls), ids, np.full((c, 1), tok.sep)],
                          1).astype(np.int32)
    for i in range(0, c, batch):
      x = jnp.asarray(rows[i:i + batch])
      out.append((x, jnp.ones_like(x)))
  return out
