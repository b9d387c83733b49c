"""decode.generate on other people's decoders (tiny configs, random weights) and on our
Llama: greedy == naive full-recompute argmax loop, right-padded batches, quantized
weights and KV caches (with their HLO census and bytes)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import thirdparty as tp
from jaxopt_dnn import decode, quant
from jaxopt_dnn.app import decoder as D

PROMPTS = np.array([[5, 9, 3, 7, 2, 8], [4, 6, 11, 0, 0, 0]], np.int32)
LENS = np.array([6, 3])
N = 5


def _check(model, variables, prompts=PROMPTS, lens=LENS, n=N, rows=False):
  got = np.asarray(decode.generate(model, variables, prompts, n, lengths=lens))
  want = decode.naive_greedy(model, variables, prompts, n, lengths=lens)
  np.testing.assert_array_equal(got, want)
  if not rows:
    return got
  # each row alone (no padding, batch 1) gives the same tokens: per-row positions are right
  for b in range(len(lens)):
    one = decode.generate(model, variables, prompts[b:b + 1, :lens[b]], n)
    np.testing.assert_array_equal(np.asarray(one)[0], got[b])
  return got


@pytest.mark.slow
def test_flax_lm1b_linen_decode_convention():
  m = tp.lm1b()
  cfg = m.TransformerConfig(vocab_size=40, output_vocab_size=40, emb_dim=16, num_heads=2,
                            num_layers=2, qkv_dim=16, mlp_dim=32, max_len=32,
                            deterministic=True, decode=True, dropout_rate=0.0,
                            attention_dropout_rate=0.0)
  model = m.TransformerLM(cfg)
  params = model.clone(config=cfg.replace(decode=False)).init(
      jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
  # lm1b predicts x_t from (0, x_<t): prompts start with its 0 (BOS)
  prompts = np.array([[0, 5, 9, 3, 7], [0, 4, 6, 0, 0]], np.int32)
  got = _check(model, {"params": params}, prompts, np.array([5, 3]), 6)
  assert (got != 0).all()     # lm1b's non-decode path masks token 0: none was generated
  with pytest.raises(ValueError, match="cache_dtype"):
    decode.generate(model, {"params": params}, prompts, 2, cache_dtype="int8")


@pytest.mark.slow
def test_flax_gemma_nnx_explicit_cache():
  g = tp.gemma()
  cfg = g.TransformerConfig(
      num_layers=2, num_embed=48, embed_dim=16, hidden_dim=32, num_heads=2, head_dim=8,
      num_kv_heads=1, final_logit_softcap=None, use_post_attn_norm=False,
      use_post_ffw_norm=False, attention_types=(g.modules.AttentionType.GLOBAL,) * 2)
  model = g.Transformer(cfg, rngs=nnx.Rngs(0))
  _check(model, None)
  # the model's state passed explicitly (e.g. edited params) is what runs
  assert np.array_equal(decode.generate(model, nnx.state(model), PROMPTS, 3, lengths=LENS),
                        decode.generate(model, None, PROMPTS, 3, lengths=LENS))


def test_tunix_llama3_nnx_explicit_cache():
  t = tp.tunix_llama3()
  cfg = t.ModelConfig(num_layers=2, vocab_size=48, embed_dim=16, hidden_dim=32, num_heads=2,
                      head_dim=8, num_kv_heads=1, rope_theta=10000, norm_eps=1e-6)
  model = t.Llama3(cfg, rngs=nnx.Rngs(0))
  _check(model, None)


# --------------------------------------------------------------------------- our Llama
CFG = D.tiny_config(vocab=96, dim=128, n_heads=2, n_kv_heads=1, hidden=128)  # head_dim 64


@pytest.fixture(scope="module")
def llama():
  module = D.Llama(CFG)
  params = module.init(jax.random.key(1), jnp.ones((1, 4), jnp.int32))["params"]
  # larger random weights so that the tiny model's distributions are not flat
  params = jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 else x, params)
  return D.LlamaDecoder(module), {"params": params}


@pytest.mark.slow
def test_llama_greedy_equals_naive(llama):
  _check(*llama, rows=True)


@pytest.mark.slow
def test_sampling_top_k_and_errors(llama):
  dec, v = llama
  a = decode.generate(dec, v, PROMPTS, 6, lengths=LENS, temperature=1.0, top_k=1,
                      key=jax.random.key(3))
  np.testing.assert_array_equal(a, decode.generate(dec, v, PROMPTS, 6, lengths=LENS))
  s = [decode.generate(dec, v, PROMPTS, 8, lengths=LENS, temperature=1.0, top_k=4,
                       key=jax.random.key(k)) for k in (0, 0, 1)]
  np.testing.assert_array_equal(s[0], s[1])           # same key, same sample
  assert not np.array_equal(s[0], s[2])               # another key, another sample
  with pytest.raises(ValueError, match="PRNG key"):
    decode.generate(dec, v, PROMPTS, 2, temperature=0.5)
  with pytest.raises(ValueError, match="lengths"):
    decode.generate(dec, v, PROMPTS, 2, lengths=[7, 1])
  with pytest.raises(ValueError, match="max_new_tokens"):
    decode.generate(dec, v, PROMPTS, 0)
  with pytest.raises(ValueError, match="cache_dtype"):
    decode.generate(dec, v, PROMPTS, 2, cache_dtype="int4")
  with pytest.raises(TypeError, match="adapter protocol"):
    decode.generate(object(), v, PROMPTS, 2)


def _step_census(dec, v, cache_dtype=None):
  gen = decode.Generator(dec, cache_dtype=cache_dtype)
  cache = gen.init_cache(v, 1, 8)
  state = (cache, jnp.zeros((1, 8), jnp.int32), jnp.array([2]), jnp.int32(1),
           jnp.zeros((1, CFG.vocab)), jax.random.key(0))
  c = quant.int8_dot_census(gen.step, v, state)   # .lowered: asked for; .compiled: XLA's
  return c, cache


def test_kv_cache_int8_fp8_bytes_and_accuracy(llama):
  dec, v = llama
  f32 = decode.kv.nbytes(dec.init_cache(v, 2, 64, None))
  i8 = decode.kv.nbytes(dec.init_cache(v, 2, 64, "int8"))
  f8 = decode.kv.nbytes(dec.init_cache(v, 2, 64, "float8_e4m3fn"))
  assert i8 == f8 and i8 / f32 == pytest.approx((64 + 4) / (4 * 64)) and i8 / f32 <= 0.27
  toks = np.asarray(jax.random.randint(jax.random.key(2), (2, 24), 0, CFG.vocab))
  ref = decode.logits(dec, v, toks)
  kl = {dt: decode.kl_divergence(ref, decode.logits(dec, v, toks, cache_dtype=dt))
        for dt in ("int8", "float8_e4m3fn")}
  # e4m3 keeps 3 mantissa bits (relative step 1/16) against int8's 1/127 of the row max
  assert 0 < kl["int8"] <= 0.01 and kl["int8"] < kl["float8_e4m3fn"] <= 0.3, kl
  census, cache = _step_census(dec, v, "int8")
  assert {x.dtype for x in jax.tree.leaves(cache)} == {jnp.dtype("int8"), jnp.dtype("float32")}
  # attention runs on dequantized keys/values: float dots only, asked for and compiled
  assert census.lowered.float == census.lowered.total and census.compiled.integer == 0


@pytest.mark.slow
def test_weight_only_and_w8a8_census(llama):
  dec, v = llama
  base, _ = _step_census(dec, v)
  assert base.lowered.count("f32", "f32") == base.lowered.total > 0
  bf = {"params": jax.tree.map(lambda x: x.astype(jnp.bfloat16), v["params"])}
  bdec = D.LlamaDecoder(D.Llama(CFG.__class__(**{**CFG.__dict__, "dtype": jnp.bfloat16})))
  bc = _step_census(bdec, bf)[0]
  assert bc.lowered.count("bf16", "bf16") >= 7 * CFG.n_layers
  if jax.default_backend() == "cpu":   # XLA:CPU computes bf16 dots in f32
    assert bc.compiled.count("bf16", "bf16") == 0
  for bits, g in ((8, None), (4, 64)):
    qv = {"params": quant.quantize_params(v["params"], D.KERNELS, bits=bits, group_size=g)}
    c, _ = _step_census(dec, qv)
    # weight-only: dequantized in the step, float dots only
    assert c.lowered.integer == 0 and c.lowered.float == c.lowered.total
    assert c.compiled.integer == 0
    ppl = decode.perplexity(dec, qv, np.arange(20) % CFG.vocab)
    assert np.isfinite(ppl)
  rules = [quant.QuantRule(D.KERNELS)]
  qv = {"params": quant.quantize_params(v["params"], rules)}
  toks = np.asarray(jax.random.randint(jax.random.key(5), (2, 12), 0, CFG.vocab))
  stats = quant.calibrate(lambda vv, x: dec.module.apply(vv, x)[0], v, [(toks,)], rules=rules)
  w8 = decode.int8_serving(dec, stats, rules)
  c, _ = _step_census(w8, qv)
  assert c.lowered.int8 == 7 * CFG.n_layers        # q k v o gate up down per layer
  assert c.lowered.float == c.lowered.total - c.lowered.int8   # attention, tied logits
  assert c.compiled.integer == 7 * CFG.n_layers     # (XLA:CPU widens s8 to s32)
  out = decode.generate(w8, qv, PROMPTS, 4, lengths=LENS)
  assert out.shape == (2, 4)
  kl = decode.kl_divergence(decode.logits(dec, v, toks), decode.logits(w8, qv, toks))
  assert kl < 0.05


@pytest.mark.slow
def test_gptq_plan_composes(llama):
  dec, v = llama
  toks = np.asarray(jax.random.randint(jax.random.key(7), (4, 16), 0, CFG.vocab))
  apply = lambda vv, x: dec.module.apply(vv, x)[0]  # noqa: E731
  qp = quant.gptq(apply, v, [(toks,)], bits=4, group_size=64, rules=D.KERNELS)
  assert quant.is_qarray(qp["layers_0"]["attn"]["q"]["kernel"])
  out = decode.generate(dec, {"params": qp}, PROMPTS, 4, lengths=LENS)
  np.testing.assert_array_equal(out, decode.naive_greedy(dec, {"params": qp}, PROMPTS, 4,
                                                         lengths=LENS))


def test_eval_metrics():
  a = np.array([[1, 2, 3, 4], [1, 2, 3, 4]])
  b = np.array([[1, 2, 9, 4], [1, 2, 3, 4]])
  assert decode.token_agreement(a, b) == {"agreement": 7 / 8, "prefix": 3.0}
  lg = [np.random.default_rng(0).normal(size=(5, 7))]
  assert decode.kl_divergence(lg, lg) == pytest.approx(0.0, abs=1e-12)
  with pytest.raises(ValueError, match="at least 2"):
    decode.perplexity(None, None, [1])


def test_teacher_forced_agreement(llama):
  dec, v = llama
  prompts = np.asarray(jax.random.randint(jax.random.key(3), (3, 6), 0, CFG.vocab))
  gen = np.asarray(decode.generate(dec, v, prompts, 10))
  seqs = np.concatenate([prompts, gen], axis=1)
  ref = decode.logits(dec, v, seqs)
  # the reference against itself agrees everywhere, and its argmax IS its greedy tokens
  assert decode.teacher_forced_agreement(dec, v, seqs, reference_logits=ref, start=5) == 1.0
  np.testing.assert_array_equal(np.stack([r[5:-1].argmax(-1) for r in ref]), gen)
  # a perturbed model: agreement is the argmax match rate on the generated positions
  noisy = jax.tree.map(lambda x: x + 0.5 * jax.random.normal(jax.random.key(4), x.shape), v)
  q = decode.logits(dec, noisy, seqs)
  want = np.mean([r[5:-1].argmax(-1) == x[5:-1].argmax(-1) for r, x in zip(ref, q)])
  got = decode.teacher_forced_agreement(dec, noisy, seqs, reference_logits=ref, start=5)
  assert got == pytest.approx(want) and got < 1.0
  with pytest.raises(ValueError, match="start"):
    decode.teacher_forced_agreement(dec, v, seqs, reference_logits=ref, start=15)
  with pytest.raises(ValueError, match="reference logits"):
    decode.teacher_forced_agreement(dec, v, seqs, reference_logits=ref[:2])


def test_int8_cache_rotates_outlier_channels_away():
  """The int8 slot stores ``x R`` (R orthonormal): a constant outlier channel (as in real
  post-RoPE keys) no longer sets every token's step, so the round trip's RMS error is at
  least 2x below per-token int8 of ``x`` itself; float8 stays unrotated."""
  for d in (64, 48):   # Hadamard, and the seeded orthogonal fallback
    r = np.asarray(decode.kv.rotation(d))
    np.testing.assert_allclose(r @ r.T, np.eye(d), atol=1e-5)
  x = jax.random.normal(jax.random.key(0), (2, 8, 3, 64)) + jnp.zeros(64).at[5].set(8.0)
  slot = decode.kv.write(decode.kv.init(2, 8, 3, 64, "int8"), x, 0)
  q, scale = decode.kv.quantize(x, "int8")
  rms = lambda e: float(jnp.sqrt(jnp.mean(jnp.square(e))))  # noqa: E731
  assert rms(decode.kv.read(slot, jnp.float32) - x) <= 0.5 * rms(q * scale - x)
  f8 = decode.kv.write(decode.kv.init(2, 8, 3, 64, "float8_e4m3fn"), x, 0)
  q8, s8 = decode.kv.quantize(x, "float8_e4m3fn")
  np.testing.assert_array_equal(decode.kv.read(f8, jnp.float32), q8.astype(jnp.float32) * s8)
