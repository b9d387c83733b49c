import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_dnn import fold
from jaxopt_dnn.app import models

X = jax.random.uniform(jax.random.key(1), (32, 8, 8, 1))


def _with_stats(model, seed=0):
  """Initialised variables with non-trivial BN params and running statistics."""
  v = jax.jit(model.init)(jax.random.key(seed), X)
  rng = np.random.default_rng(seed)
  perturb = lambda a, lo, hi: jnp.asarray(rng.uniform(lo, hi, a.shape), a.dtype)
  v = jax.tree_util.tree_map_with_path(
      lambda p, a: perturb(a, 0.5, 2.0) if p[-1].key in ("scale", "var") else
      (perturb(a, -0.5, 0.5) if p[-1].key in ("mean",) or (p[-1].key == "bias" and "BatchNorm"
                                                           in str(p)) else a), v)
  return v


@pytest.fixture(scope="module")
def trained_cnn_bn(digits):
  """A BatchNorm CNN trained briefly on digits (real running statistics)."""
  m = models.CNN(features=(16, 32), dense=64, batch_norm=True)
  v = m.init(jax.random.key(0), digits.x_train[:2])
  tx = optax.adam(3e-3)
  opt = tx.init(v["params"])

  @jax.jit
  def step(v, opt, x, y):
    def lossf(p):
      logits, upd = m.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True,
                            mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd
    (_, upd), g = jax.value_and_grad(lossf, has_aux=True)(v["params"])
    u, opt = tx.update(g, opt)
    return {"params": optax.apply_updates(v["params"], u), **upd}, opt

  for i in range(30):
    sl = slice(i % 20 * 64, i % 20 * 64 + 64)
    v, opt = step(v, opt, digits.x_train[sl], digits.y_train[sl])
  return m, v


@pytest.mark.slow
def test_trained_cnn_fold_error_below_1e5(trained_cnn_bn, digits):
  m, v = trained_cnn_bn
  x = digits.x_test[:128]
  ref = m.apply(v, x)
  r = fold.batchnorm(v, model=m, sample=x)
  assert r.pairs == (("Conv_0", "BatchNorm_0"), ("Conv_1", "BatchNorm_1"))
  assert isinstance(r.model, models.CNN) and r.model.batch_norm is False
  assert "batch_stats" not in r.variables and "BatchNorm_0" not in r.variables["params"]
  err = float(jnp.max(jnp.abs(r.model.apply(r.variables, x) - ref)))
  print(f"fold CNN(trained) max|folded - unfolded| = {err:.3g} (max|logit| "
        f"{float(jnp.max(jnp.abs(ref))):.3g})")
  assert err <= 1e-5
  # the untouched input is not mutated
  assert "BatchNorm_0" in v["params"]


def test_resnet_fold_creates_biases_and_matches(digits):
  m = models.ResNet()
  v = _with_stats(m)
  x = X
  ref = jax.jit(m.apply)(v, x)
  r = fold.batchnorm(v, model=m, sample=x)
  assert len(r.pairs) == 6 and ("BasicBlock_1/Conv_2", "BasicBlock_1/BatchNorm_2") in r.pairs
  assert isinstance(r.model, models.ResNet) and not r.model.batch_norm
  assert r.variables["params"]["Conv_0"]["bias"].shape == (16,)
  err = float(jnp.max(jnp.abs(jax.jit(r.model.apply)(r.variables, x) - ref)))
  print(f"fold ResNet max|folded - unfolded| = {err:.3g}")
  assert err <= 1e-5
  # without a model: linen's numbering finds the same pairs (dict order is sorted away)
  assert sorted(fold.batchnorm(v).pairs) == sorted(r.pairs)


class _Wrapped(nn.Module):
  """A user model with no batch_norm switch: conv(no bias) -> BN -> relu -> BN(after relu)."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (3, 3), use_bias=False, name="stem")(x)
    x = nn.BatchNorm(use_running_average=not train, epsilon=1e-3, name="bn")(x)
    x = nn.relu(x)
    x = nn.BatchNorm(use_running_average=not train, name="post_relu_bn")(x)
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(10, name="head")(x)


def test_generic_model_traced_pairs_epsilon_and_folded_model():
  m = _Wrapped()
  v = _with_stats(m, seed=3)
  ref = jax.jit(m.apply)(v, X)
  r = fold.batchnorm(v, model=m, sample=X)
  # the BN after relu has no linear producer: it is not folded
  assert r.pairs == (("stem", "bn"),)
  assert isinstance(r.model, fold.FoldedModel)
  assert "post_relu_bn" in r.variables["batch_stats"]
  err = float(jnp.max(jnp.abs(jax.jit(r.model.apply)(r.variables, X) - ref)))
  assert err <= 1e-5
  # epsilon came from the traced module (1e-3); the default 1e-5 gives a different answer
  wrong = fold.batchnorm(v, pairs=[("stem", "bn")], model=None)
  out = jax.jit(fold.FoldedModel(m, ["bn"], ["stem"]).apply)(wrong.variables, X)
  assert float(jnp.max(jnp.abs(out - ref))) > 1e-4


def test_explicit_pairs_and_dense_layers():
  class DenseBN(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(6)(x.reshape(x.shape[0], -1))
      return nn.BatchNorm(use_running_average=True)(x)

  m = DenseBN()
  v = _with_stats(m, seed=5)
  r = fold.batchnorm(v, pairs=[("params/Dense_0", "BatchNorm_0")])
  ref = m.apply(v, X)
  folded = nn.Dense(6).apply({"params": r.variables["params"]["Dense_0"]}, X.reshape(32, -1))
  assert float(jnp.max(jnp.abs(folded - ref))) <= 1e-5


def test_errors_name_the_path():
  m = models.CNN(features=(4, 4), dense=8, batch_norm=True)
  v = jax.eval_shape(m.init, jax.random.key(0), X[:2])
  with pytest.raises(ValueError, match=r"no layer 'Conv_9'.*candidates: Conv_0, Conv_1"):
    fold.batchnorm(v, pairs=[("Conv_9", "BatchNorm_0")])
  with pytest.raises(ValueError, match="no BatchNorm statistics.*'BatchNorm_7'"):
    fold.batchnorm(v, pairs=[("Conv_0", "BatchNorm_7")])
  with pytest.raises(ValueError, match="'Conv_0' appears in more than one pair"):
    fold.batchnorm(v, pairs=[("Conv_0", "BatchNorm_0"), ("Conv_0", "BatchNorm_1")])
  with pytest.raises(ValueError, match=r"'Dense_0' has 8 output features .* 'BatchNorm_0'"):
    fold.batchnorm(v, pairs=[("Dense_0", "BatchNorm_0")])
  with pytest.raises(TypeError, match="each pair must be"):
    fold.batchnorm(v, pairs=["Conv_0"])
  with pytest.raises(TypeError, match="'params' collection"):
    fold.batchnorm(v["params"]["Conv_0"]["kernel"])
  with pytest.raises(ValueError, match="training mode"):
    fold.batchnorm(v, model=m, sample=X[:2], apply_kwargs={"train": True})
