"""jaxopt_dnn.quant on models someone else wrote (BERT-style linen encoder, NNX), int8
ops on general shapes, and every bad-input case."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxopt_dnn import quant
from jaxopt_dnn.app import models
from jaxopt_dnn.quant import ops


class Layer(nn.Module):
  d: int = 32
  heads: int = 4

  @nn.compact
  def __call__(self, h):
    b, t, _ = h.shape
    split = lambda z: z.reshape(b, t, self.heads, self.d // self.heads)  # noqa: E731
    q, k, v = (split(nn.Dense(self.d, name=n)(h)) for n in ("query", "key", "value"))
    att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(self.d // self.heads))
    ctx = jnp.einsum("bhqk,bkhd->bqhd", att, v)
    h = nn.LayerNorm()(h + nn.DenseGeneral(self.d, axis=(-2, -1), name="out")(ctx))
    ff = nn.gelu(nn.Einsum((self.d, 64), "btd,df->btf", name="intermediate")(h))
    return nn.LayerNorm()(h + nn.Dense(self.d, name="output")(ff))


class Encoder(nn.Module):
  vocab: int = 50
  d: int = 32

  @nn.compact
  def __call__(self, ids):
    h = nn.Embed(self.vocab, self.d, name="word_embeddings")(ids)
    h = h + self.param("position_embeddings", nn.initializers.normal(0.02), (16, self.d))
    for i in range(2):
      h = Layer(self.d, name=f"layer_{i}")(h)
    return nn.Dense(3, name="classifier")(h[:, 0])


RULES = [quant.QuantRule("embeddings", skip=True), quant.QuantRule("kernel")]


def _pretrained_like(shapes, seed=0):
  """Random "pretrained" weights for an abstract param tree, drawn in numpy (compiling
  the model's initializers costs seconds): LayerNorm scale 1, biases 0, embeddings
  N(0, 0.02), kernels N(0, 1/fan_in) with fan_in = all but the last axis."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return jnp.ones(s.shape, s.dtype)
    if "bias" in name:
      return jnp.zeros(s.shape, s.dtype)
    std = 0.02 if "embedding" in name else 1.0 / np.sqrt(np.prod(s.shape[:-1]))
    return jnp.asarray(rng.normal(0.0, std, s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


@pytest.fixture(scope="module")
def bert():
  model = Encoder()
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 50, (4, 16)), jnp.int32)
  params = _pretrained_like(jax.eval_shape(model.init, jax.random.key(0), ids)["params"])
  return model, params, ids


@pytest.mark.slow
def test_bert_encoder_quantized_with_rules_and_served_int8(bert):
  model, params, ids = bert
  text = quant.explain(params, RULES, print_fn=None)
  assert "word_embeddings/embedding" in text and "float (skip)" in text
  assert "layer_0/query/kernel" in text and "int8 per-channel a8" in text
  qp = quant.quantize_params(params, RULES)
  assert not quant.is_qarray(qp["word_embeddings"]["embedding"])
  n_q = sum(quant.is_qarray(x) for x in jax.tree.leaves(qp, is_leaf=quant.is_qarray))
  assert n_q == 2 * 6 + 1            # query/key/value/out/intermediate/output x2 + classifier
  stats = quant.calibrate(model.apply, {"params": params}, [ids, ids[::-1]], rules=RULES)
  assert set(stats["layer_1"]) >= {"query", "key", "value", "out", "intermediate", "output"}
  serve = jax.jit(lambda qv, x: quant.int8_apply(model, qv, stats, x, rules=RULES))
  y8 = serve({"params": qp}, ids)
  y32 = jax.jit(model.apply)({"params": params}, ids)
  fq = jax.jit(quant.qat(model, RULES).apply)({"params": params, "quant_stats": stats}, ids)
  assert float(jnp.max(jnp.abs(y8 - fq))) <= float(jnp.max(jnp.abs(fq))) / 127
  assert float(jnp.max(jnp.abs(y8 - y32))) < 0.1 * float(jnp.max(jnp.abs(y32)))
  census = quant.int8_dot_census(serve, {"params": qp}, ids)
  assert census.lowered.count("s8", "s8", "s32") == n_q
  assert census.lowered.float == 4   # only the 2 attention einsums per layer stay float


@pytest.mark.slow
def test_bert_qat_gradients_flow_to_kernels(bert):
  model, params, ids = bert
  qm = quant.qat(model, RULES)
  stats = qm.init_stats(params, ids)

  def loss(p):
    y, _ = qm.apply({"params": p, "quant_stats": stats}, ids, mutable=["quant_stats"])
    return jnp.sum(y ** 2)

  g = jax.jit(jax.grad(loss))(params)
  assert float(jnp.abs(g["layer_0"]["query"]["kernel"]).sum()) > 0
  assert float(jnp.abs(g["layer_1"]["intermediate"]["kernel"]).sum()) > 0


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.fc = nnx.Linear(8 * 64, 10, rngs=rngs)

  def __call__(self, x):
    return self.fc(nnx.relu(self.conv(x)).reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def nnx_net():
  """One NnxNet for the module (eager NNX init compiles every initializer); tests
  quantize clones of it, so it is never mutated."""
  return NnxNet(nnx.Rngs(0))


@pytest.mark.slow
def test_nnx_qat_stats_live_outside_params_and_optimizer(nnx_net):
  x = jax.random.uniform(jax.random.key(0), (16, 8, 8, 1))
  y = jnp.arange(16) % 10
  net = nnx_net
  qnet = quant.qat(net)
  assert type(qnet.fc).__name__ == "QuantizedLinear" and type(net.fc) is nnx.Linear
  opt = nnx.Optimizer(qnet, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, x, y):
    def loss(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    l, g = nnx.value_and_grad(loss)(model)
    opt.update(model, g)
    return l

  losses = [float(step(qnet, opt, x, y)) for _ in range(12)]
  assert losses[-1] < losses[0]
  stats = nnx.state(qnet, quant.QuantStat)
  leaves = jax.tree.leaves(stats)
  assert len(leaves) == 2 and all(v.dtype == jnp.float32 and float(v) > 0 for v in leaves)
  opt_vars = jax.tree.leaves(nnx.state(opt), is_leaf=lambda z: isinstance(z, nnx.Variable))
  assert opt_vars and not any(isinstance(v, quant.QuantStat) for v in opt_vars)
  qnet.eval()
  before = float(qnet.conv.quant_input_amax[...])
  nnx.jit(lambda m, x: m(x))(qnet, x * 5.0)
  assert float(qnet.conv.quant_input_amax[...]) == before        # frozen in eval mode
  # fake-quant forward equals a manual W8A8 computation for the Linear
  h = nnx.jit(lambda m, x: nnx.relu(m.conv(x)).reshape(16, -1))(qnet, x)
  s_x = quant.fake.scale_from_absmax(qnet.fc.quant_input_amax[...], 8)
  ref = (quant.fake_quant(h, scale=s_x) @ quant.fake_quant(qnet.fc.kernel[...], axis=-1)
         + qnet.fc.bias[...])
  np.testing.assert_allclose(qnet.fc(h), ref, rtol=1e-5, atol=1e-5)


def test_nnx_calibrate(nnx_net):
  net = nnx_net
  x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))
  stats = quant.calibrate(lambda m, b: m(b), net, [x, 2 * x])
  np.testing.assert_allclose(stats["conv"]["input_amax"], 2 * jnp.max(x), rtol=1e-6)
  assert stats["fc"]["input_amax"].dtype == jnp.float32


def test_nnx_int8_serving_census_and_fake_quant_agreement(nnx_net):
  x = jax.random.uniform(jax.random.key(2), (8, 8, 8, 1))
  stats = quant.calibrate(lambda m, b: m(b), nnx_net, [x, x[::-1]])
  qp = quant.quantize_params(nnx.to_pure_dict(nnx.state(nnx_net, nnx.Param)))
  assert quant.is_qarray(qp["fc"]["kernel"]) and quant.is_qarray(qp["conv"]["kernel"])
  serve = jax.jit(lambda qp, x: quant.int8_apply(nnx_net, qp, stats, x))
  y8 = serve(qp, x)
  census = quant.int8_dot_census(serve, qp, x)
  assert census.lowered.count("s8", "s8", "s32") == 2        # the conv and the linear
  assert census.lowered.float == 0 and census.compiled.float == 0
  assert type(nnx_net.fc) is nnx.Linear                        # the user's module untouched
  # the fake-quant (QAT, ranges frozen at the calibration) model computes the same thing
  qnet = quant.qat(nnx_net)
  for name in ("conv", "fc"):
    getattr(qnet, name).quant_input_amax[...] = stats[name]["input_amax"]
  qnet.eval()
  fq = nnx.jit(lambda m, x: m(x))(qnet, x)
  step = float(jnp.max(jnp.abs(fq))) / 127
  assert 0 < float(jnp.max(jnp.abs(y8 - fq))) <= step
  w_only = jax.jit(lambda qp, x: quant.int8_apply(nnx_net, qp, None, x, weight_only=True))
  assert quant.int8_dot_census(w_only, qp, x).lowered.int8 == 0
  np.testing.assert_allclose(w_only(qp, x), nnx_net(x), atol=0.05 * float(jnp.max(jnp.abs(fq))))
  with pytest.raises(ValueError, match="no QArray"):
    quant.int8_apply(nnx_net, nnx.to_pure_dict(nnx.state(nnx_net, nnx.Param)), stats, x)


def test_int8_dot_general_and_einsum_general_shapes():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 5, 6)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 6, 4, 2)), jnp.float32)
  qw = quant.quantize(w, axis=(0, 2, 3))              # scale per (batch, out...) channel
  sx = quant.fake.scale_from_absmax(jnp.max(jnp.abs(x)), 8)
  dn = (((2,), (1,)), ((0,), (0,)))
  got = ops.int8_dot_general(x, qw, sx, dn)
  ref = jax.lax.dot_general(quant.fake_quant(x, scale=sx), quant.dequantize(qw), dn)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  w2 = jnp.asarray(rng.standard_normal((6, 4, 2)), jnp.float32)
  qw2 = quant.quantize(w2, axis=-1)
  got = ops.int8_einsum("bsd,dnh->bnsh", x, qw2, sx)
  ref = jnp.einsum("bsd,dnh->bnsh", quant.fake_quant(x, scale=sx), quant.dequantize(qw2))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="contracted axis"):
    ops.int8_dot_general(x[0], quant.quantize(w[0], axis=0), sx, (((1,), (0,)), ((), ())))


def test_int8_conv_falls_back_with_a_warning(monkeypatch):
  x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3))
  qw = quant.quantize(jax.random.normal(jax.random.key(1), (3, 3, 3, 4)), axis=-1)
  sx = quant.fake.scale_from_absmax(jnp.max(x), 8)
  def conv(x, qw, sx):   # traced under a fresh jit each time: one compile, no eager ops
    return ops.int8_conv(x, qw, sx, (1, 1), "SAME",
                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    fast = jax.jit(lambda *a: conv(*a))(x, qw, sx)
  monkeypatch.setattr(ops, "int8_conv_supported", lambda backend=None: False)
  with pytest.warns(RuntimeWarning, match="no int8 convolution"):
    slow = jax.jit(lambda *a: conv(*a))(x, qw, sx)
  np.testing.assert_allclose(fast, slow, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------- bad input
def test_bad_bits():
  x = jnp.ones((4, 4))
  for bad in (3, 16, 0, True):
    with pytest.raises(ValueError, match="bits"):
      quant.quantize(x, bits=bad)
  with pytest.raises(ValueError, match="bits"):
    quant.QuantRule("kernel", bits=2)
  with pytest.raises(ValueError, match="bits"):
    quant.quantize_params({"w": x}, bits=6)


def test_integer_and_boolean_leaves_are_rejected_with_path():
  tree = {"dense": {"kernel": jnp.ones((3, 3)), "step": jnp.ones((3, 3), jnp.int32),
                    "mask": jnp.ones((3, 3), bool)}}
  with pytest.raises(TypeError, match="dense/step.*int32"):
    quant.quantize_params(tree, ["step"])
  with pytest.raises(TypeError, match="dense/mask.*bool"):
    quant.quantize_params(tree, ["mask"])
  out = quant.quantize_params(tree)                    # default skips non-float leaves
  assert quant.is_qarray(out["dense"]["kernel"]) and out["dense"]["step"].dtype == jnp.int32


def test_axis_out_of_range_names_the_leaf():
  with pytest.raises(ValueError, match="axis 2 out of range"):
    quant.quantize(jnp.ones((3, 3)), axis=2)
  with pytest.raises(ValueError, match="enc/kernel: axis 3 out of range"):
    quant.quantize_params({"enc": {"kernel": jnp.ones((3, 3))}},
                          [quant.QuantRule("kernel", granularity=3)])


def test_nan_weights_name_the_leaf():
  w = np.ones((4, 4), np.float32)
  w[1, 2] = np.nan
  with pytest.raises(ValueError, match=r"layer/kernel: contains NaN/inf .*\(1, 2\)"):
    quant.quantize_params({"layer": {"kernel": jnp.asarray(w)}})
  with pytest.raises(ValueError, match="NaN/inf"):
    quant.fake_quant(jnp.asarray([1.0, np.inf]))


@pytest.fixture(scope="module")
def mlp():
  model = models.MLP(features=(8,))
  x = jnp.ones((2, 4))
  return model, x, jax.jit(model.init)(jax.random.key(0), x)


def test_calibration_bad_batches(mlp):
  model, x, variables = mlp
  with pytest.raises(ValueError, match="empty"):
    quant.calibrate(model.apply, variables, iter([]))
  bad = np.ones((2, 4), np.float32)
  bad[0, 0] = np.nan
  with pytest.raises(ValueError, match="batch 1 has NaN/inf"):
    quant.calibrate(model.apply, variables, [x, jnp.asarray(bad)])
  with pytest.raises(ValueError, match="method"):
    quant.calibrate(model.apply, variables, [x], method="minmax")


def test_rule_matching_nothing_is_an_error_listing_paths():
  params = {"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
  with pytest.raises(ValueError, match=r"match no leaf.*Dense_0/kernel"):
    quant.explain(params, ["kernel", "attention"], print_fn=None)


def test_qarray_fed_to_float_code_is_a_type_error(mlp):
  model, x, variables = mlp
  params = variables["params"]
  qp = quant.quantize_params(params)
  with pytest.raises(TypeError, match="Dense_0/kernel.*dequantize"):
    model.apply({"params": qp}, x)
  with pytest.raises(TypeError, match="float array is expected"):
    _ = qp["Dense_1"]["kernel"] * 2.0
  with pytest.raises(ValueError, match="no QArray"):
    quant.int8_apply(model, {"params": params}, {}, x)
  asym = quant.quantize_params(params, [quant.QuantRule("kernel", symmetric=False)])
  stats = quant.calibrate(model.apply, {"params": params}, [x])
  with pytest.raises(ValueError, match="symmetric"):
    quant.int8_apply(model, {"params": asym}, stats, x)
  with pytest.raises(ValueError, match="no calibrated activation range"):
    quant.int8_apply(model, {"params": qp}, {"Dense_0": stats["Dense_0"]}, x)
