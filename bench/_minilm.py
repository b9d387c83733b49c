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
