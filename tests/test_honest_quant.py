"""Quantization is honest on third-party models: every projection int8, coverage == census."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo_thirdparty as zoo
from jaxopt_dnn import quant

# tied logits quantized per vocabulary row (axis 0: the attend contraction runs over embed)
WITH_EMB = [quant.QuantRule(r"embed\w*/embedding", granularity=0), quant.QuantRule("kernel|w_")]
EXPECTED = {"linen_lm": 12, "linen_resnet": 7, "linen_user_einsum": 3, "nnx_gemma": 14,
            "nnx_mha": 6}


def _linen(name, rules=None):
  model, inputs = zoo.LINEN[name]()
  v = nn.unbox(model.init(jax.random.key(0), *inputs))
  stats = quant.calibrate(model.apply, v, [inputs], rules=rules)
  qv = {**v, "params": quant.quantize_params(v["params"], rules)}
  return model, inputs, v, stats, qv


def _nnx(name, rules=None):
  model, inputs = zoo.NNX[name]()
  stats = quant.calibrate(lambda m, *b: m(*b), model, [inputs], rules=rules)
  qp = quant.quantize_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), rules)
  return model, inputs, stats, qp


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_projection_int8_and_coverage_agrees_with_census(name):
  if name in zoo.LINEN:
    model, inputs, _, stats, qv = _linen(name)
  else:
    model, inputs, stats, qv = _nnx(name)
  serve = jax.jit(lambda q, *a: quant.int8_apply(model, q, stats, *a, strict=True))
  census = quant.int8_dot_census(serve, qv, *inputs)
  cov = quant.coverage(model, qv, *inputs, calibration=stats)
  assert census.lowered.count("s8", "s8", "s32") == EXPECTED[name] == cov.int8_ops
  assert not cov.float_contractions()
  for path, rows in cov.by_path().items():       # every quantized kernel: int8 contractions only
    assert rows and all(r.int8 for r in rows), (path, rows)
  assert "s8 x s8 -> s32" in str(cov)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["linen_lm", "nnx_gemma"])
def test_tied_logits_quantized_and_qat_matches_serving(name):
  """Tied Embed.attend logits run int8; QAT (frozen ranges) and int8 serving agree to one
  output quantization step, embedding lookup included (QAT fake-quantizes the table too)."""
  if name in zoo.LINEN:
    model, inputs, v, stats, qv = _linen(name, WITH_EMB)
    fq = jax.jit(quant.qat(model, WITH_EMB).apply)({**v, "quant_stats": stats}, *inputs)
  else:
    model, inputs, stats, qv = _nnx(name, WITH_EMB)
    qnet = quant.qat(model, WITH_EMB)
    for owner_path, leaf, amax in _nnx_stats(stats):
      getattr(_get(qnet, owner_path), leaf)[...] = amax
    qnet.eval()
    fq = qnet(*inputs)
  serve = jax.jit(lambda q, *a: quant.int8_apply(model, q, stats, *a, rules=WITH_EMB,
                                                 strict=True))
  y8 = serve(qv, *inputs)
  cov = quant.coverage(model, qv, *inputs, calibration=stats, rules=WITH_EMB)
  emb = [p for p in cov.weights if p.endswith("embedding")]
  assert len(emb) == 1
  assert [r.signature for r in cov.by_path()[emb[0]] if r.primitive == "dot_general"] == \
      ["s8 x s8 -> s32"]
  assert cov.int8_ops == EXPECTED[name] + 1
  step = float(jnp.max(jnp.abs(fq))) / 127
  assert float(jnp.max(jnp.abs(y8 - fq))) <= step


def _nnx_stats(stats):
  for op, amax in quant.stats.flat_stats(stats).items():
    owner, _, leaf = op.rpartition("/")
    if leaf == "embedding":
      yield owner, "quant_embedding_input_amax", amax
    else:
      yield op, "quant_input_amax", amax


def _get(module, path):
  for part in path.split("/") if path else []:
    module = module[int(part)] if part.isdigit() else getattr(module, part)
  return module


def test_float_consumed_quantized_weight_warns_and_strict_raises():
  """A per-embed-channel table cannot feed an int8 attend (its scale varies along the
  contraction): int8_apply says so and coverage shows the float dot."""
  rules = [quant.QuantRule(r"embed/embedding", granularity=-1), quant.QuantRule("kernel")]
  model, inputs, _, stats, qv = _linen("linen_lm", rules)
  with pytest.warns(RuntimeWarning, match="embed/embedding.*contracted axis"):
    quant.int8_apply(model, qv, stats, *inputs, rules=rules)
  with pytest.raises(ValueError, match="embed/embedding"):
    quant.int8_apply(model, qv, stats, *inputs, rules=rules, strict=True)
  cov = quant.coverage(model, qv, *inputs, calibration=stats, rules=rules)
  bad = cov.float_contractions()
  assert [r.path for r in bad] == ["params/embed/embedding"]
  assert bad[0].signature == "f32 x f32 -> f32"


def test_act_bits_4_integer_path_clips_like_fake_quant():
  """Bug (b): the integer path clipped activations to ±127 whatever act_bits said."""
  rules = [quant.QuantRule("kernel", act_bits=4)]
  model, (x,) = zoo.linen_user_einsum()
  model = nn.Dense(8)
  v = model.init(jax.random.key(0), x)
  stats = quant.calibrate(model.apply, v, [x], rules=rules)
  qv = {"params": quant.quantize_params(v["params"], rules)}
  big = 3.0 * x                                   # beyond the calibrated range: clipping matters
  y8 = quant.int8_apply(model, qv, stats, big, rules=rules)
  fq = quant.qat(model, rules).apply({**v, "quant_stats": stats}, big)
  np.testing.assert_allclose(y8, fq, rtol=1e-5, atol=1e-5)


def test_nnx_qat_ranges_feed_int8_apply():
  model, inputs = zoo.nnx_mha()
  qnet = quant.qat(model)
  qnet.train()
  qnet(*inputs)
  qnet.eval()
  stats = nnx.state(qnet, quant.QuantStat)
  qp = quant.quantize_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  y8 = quant.int8_apply(model, qp, stats, *inputs, strict=True)
  fq = qnet(*inputs)
  assert float(jnp.max(jnp.abs(y8 - fq))) <= float(jnp.max(jnp.abs(fq))) / 127


@pytest.mark.slow
def test_init_stats_with_batchnorm_collections():
  model, (x,) = zoo.linen_resnet()
  v = model.init(jax.random.key(0), x)
  qm = quant.qat(model)
  stats = qm.init_stats(v, x)            # params + batch_stats
  assert set(quant.stats.flat_stats(stats)) == {
      "stem", "block_0/conv1", "block_0/conv2", "block_1/conv1", "block_1/conv2",
      "block_1/proj", "head"}
  out, upd = qm.apply({**v, "quant_stats": stats}, x, train=True,
                      mutable=["batch_stats", "quant_stats"])
  assert set(upd) == {"batch_stats", "quant_stats"} and out.shape == (2, 10)
