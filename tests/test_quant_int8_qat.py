"""QAT with estimator="int8_forward": real s8 dots forward, original-operand gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_dnn import _hlo, quant
from jaxopt_dnn.app import models


class OneDense(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(5, use_bias=False)(x)


def test_forward_is_int8_and_gradient_uses_original_operands():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(16, 12)), jnp.float32)
  model = OneDense()
  params = model.init(jax.random.key(0), x)["params"]
  qm = quant.qat(model, estimator="int8_forward")
  stats = qm.init_stats(params, x)

  def out(p):
    return qm.apply({"params": p, "quant_stats": stats}, x)

  y = out(params)
  # forward = the int8 serving computation with the same (frozen) activation range
  serve = quant.int8_apply(model, {"params": quant.quantize_params(params)}, stats, x)
  np.testing.assert_allclose(y, serve, rtol=1e-6, atol=1e-6)
  # ... within one quantization step of the float model
  step = float(jnp.abs(model.apply({"params": params}, x)).max()) / 127
  assert float(jnp.abs(y - model.apply({"params": params}, x)).max()) < 2 * step
  # gradient: dL/dW = x^T g with g = dL/dy at the int8 output (no fake-quant W, no mask)
  g = jax.grad(lambda p: jnp.sum(out(p) ** 2))(params)["Dense_0"]["kernel"]
  np.testing.assert_allclose(g, x.T @ (2 * y), rtol=1e-5, atol=1e-5)
  # the jitted gradient runs an s8 x s8 dot forward and float dots backward
  census = _hlo.dot_census(jax.grad(lambda p: jnp.sum(out(p) ** 2)), params)
  assert census.count("s8", "s8") >= 1 and census.float >= 1


def test_bad_estimator_and_asymmetric_rule():
  with pytest.raises(ValueError, match="estimator"):
    quant.qat(OneDense(), estimator="fast")
  rules = [quant.QuantRule(".*", symmetric=False)]
  qm = quant.qat(OneDense(), rules, estimator="int8_forward")
  x = jnp.ones((2, 4))
  params = OneDense().init(jax.random.key(0), x)["params"]
  with pytest.raises(ValueError, match="asymmetric"):
    qm.init_stats(params, x)


@pytest.mark.slow
def test_int8_forward_qat_trains_the_digits_cnn(digits):
  model = models.CNN(features=(16, 32), dense=64)
  x0 = digits.x_train[:64]
  params = model.init(jax.random.key(0), x0)["params"]
  qm = quant.qat(model, estimator="int8_forward")
  stats = qm.init_stats(params, x0)
  tx = optax.adam(2e-3)
  opt = tx.init(params)

  @jax.jit
  def step(p, s, o, x, y):
    def loss(p):
      logits, upd = qm.apply({"params": p, "quant_stats": s}, x, mutable=["quant_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd
    (l, upd), g = jax.value_and_grad(loss, has_aux=True)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), upd["quant_stats"], o

  for i in range(300):
    j = (i * 64) % (len(digits.x_train) - 64)
    params, stats, opt = step(params, stats, opt, digits.x_train[j:j + 64],
                              digits.y_train[j:j + 64])
  serve = jax.jit(lambda p, s, x: quant.int8_apply(model, {"params": quant.quantize_params(p)},
                                                   s, x))
  acc = float(jnp.mean(jnp.argmax(serve(params, stats, digits.x_test), -1) == digits.y_test))
  print(f"int8-forward QAT, int8 serving accuracy: {acc:.4f}")
  assert acc > 0.95
