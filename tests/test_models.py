import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxopt_dnn.app import models
from jaxopt_dnn._tree import leaves_with_paths

X = jnp.ones((4, 8, 8, 1), jnp.float32)


@pytest.mark.parametrize("name", models.model_names())
def test_every_registered_model_inits_and_applies(name):
  m = models.get_model(name, num_classes=7)
  v, out = jax.eval_shape(lambda x: (lambda v: (v, m.apply(v, x)))(m.init(jax.random.key(0), x)), X)
  assert out.shape == (4, 7) and out.dtype == jnp.float32
  n = sum(a.size for a in jax.tree.leaves(v["params"]))
  assert 1_000 < n < 600_000


def test_get_model_unknown_name_suggests_close_match():
  with pytest.raises(ValueError, match=r"unknown model 'resnt'.*Did you mean 'resnet'"):
    models.get_model("resnt")
  with pytest.raises(ValueError, match="num_classes"):
    models.get_model("cnn", num_classes=1)


def test_resnet_has_batchnorm_and_biasless_convs():
  v = jax.eval_shape(models.ResNet().init, jax.random.key(0), X)
  paths = [p for p, _ in leaves_with_paths(v)]
  assert "batch_stats/BasicBlock_1/BatchNorm_2/mean" in paths  # projection shortcut
  assert "params/Conv_0/kernel" in paths and "params/Conv_0/bias" not in paths
  out, upd = jax.eval_shape(lambda v: models.ResNet().apply(v, X, train=True,
                                                             mutable=["batch_stats"]), v)
  assert out.shape == (4, 10) and "batch_stats" in upd
  nobn = jax.eval_shape(models.ResNet(batch_norm=False).init, jax.random.key(0), X)
  assert "batch_stats" not in nobn and "bias" in nobn["params"]["Conv_0"]


def test_tiny_transformer_forward_is_finite_and_batch_independent():
  m = models.Transformer(num_layers=1, d_model=16, num_heads=2, mlp_dim=16)
  x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1))

  @jax.jit
  def run(x):
    v = m.init(jax.random.key(0), x)
    return m.apply(v, x), m.apply(v, x[:1])

  full, first = run(x)
  assert np.all(np.isfinite(np.asarray(full)))
  np.testing.assert_allclose(full[:1], first, rtol=1e-5, atol=1e-6)  # no mixing across examples


def test_transformer_attention_layers_are_named_and_mask_free():
  m = models.Transformer()
  v = jax.eval_shape(m.init, jax.random.key(0), X)
  paths = [p for p, _ in leaves_with_paths(v)]
  for proj in ("query", "key", "value", "out"):
    assert f"params/EncoderBlock_0/attention/{proj}/kernel" in paths
  # tokens: (8/2)^2 = 16 patches of 2*2*1 pixels
  assert v["params"]["pos_embedding"].shape == (1, 16, 32)
  with pytest.raises(ValueError, match="not divisible by patch=3"):
    models.Transformer(patch=3).init(jax.random.key(0), X)


def test_nnx_model_end_to_end_train_then_merge(digits):
  # NNX through the library's one step builder, then the trained module back.
  import jaxopt_dnn as jd
  module = models.NnxCNN(10, rngs=nnx.Rngs(0))

  def loss_fn(model, batch, rng):
    logits = model(batch[0])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

  trainer = jd.Trainer(module, loss_fn, optax.adam(3e-3))
  x, y = digits.x_train[:256], digits.y_train[:256]
  state = trainer.init(jax.random.key(0), x[:1])
  losses = []
  for i in range(20):
    state, m = trainer.step(state, (x[i % 4 * 64:(i % 4 + 1) * 64], y[i % 4 * 64:(i % 4 + 1) * 64]))
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.6 * losses[0]
  trained = trainer.module(state)
  params = nnx.state(trained, nnx.Param)
  # The linen-style face gives the same function from the pure dict.
  face = models.NnxModel(lambda rngs: models.NnxCNN(10, rngs=rngs))
  pure = {"params": nnx.to_pure_dict(params)}
  assert [p for p, _ in leaves_with_paths(pure)][0].startswith("params/convs/0/")
  np.testing.assert_allclose(jax.jit(face.apply)(pure, x[:8]), trained(x[:8]), rtol=1e-6, atol=1e-6)
  out, upd = jax.eval_shape(lambda p: face.apply(p, x[:8], mutable=["batch_stats"]), pure)
  assert upd == {} and out.shape == (8, 10)


def test_nnx_face_init_is_seeded():
  face = models.get_model("nnx_cnn")
  a = face.init(jax.random.key(1), X)
  b = face.init(jax.random.key(1), X)
  c = face.init(jax.random.key(2), X)
  chex.assert_trees_all_equal(a, b)
  assert not np.array_equal(a["params"]["head"]["kernel"], c["params"]["head"]["kernel"])
