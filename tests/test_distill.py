import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxopt_dnn import distill


def _np_loss(s, t, y, T, alpha):
  """float64 numpy reference of Hinton et al. (2015), eq. for the combined objective."""
  s, t = s.astype(np.float64), t.astype(np.float64)

  def softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)

  pt, ps = softmax(t / T), softmax(s / T)
  kl = np.sum(pt * (np.log(pt) - np.log(ps)), -1)
  ce = -np.log(softmax(s)[np.arange(len(y)), y])
  return np.mean(alpha * T**2 * kl + (1 - alpha) * ce)


@given(T=st.floats(0.5, 20.0), alpha=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_matches_numpy_reference(T, alpha, seed):
  rng = np.random.default_rng(seed)
  s = rng.normal(0, 3, (16, 10)).astype(np.float32)
  t = rng.normal(0, 3, (16, 10)).astype(np.float32)
  y = rng.integers(0, 10, 16)
  got = distill.loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), T, alpha)
  np.testing.assert_allclose(float(got), _np_loss(s, t, y, T, alpha), rtol=2e-5, atol=2e-6)


def test_limits_alpha_zero_is_cross_entropy_and_identical_logits_have_zero_kl():
  rng = np.random.default_rng(0)
  s = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 5, 8))
  ce = -jnp.mean(jax.nn.log_softmax(s)[jnp.arange(8), y])
  np.testing.assert_allclose(distill.loss(s, s * 7, y, 3.0, 0.0), ce, rtol=1e-6)
  assert abs(float(distill.loss(s, s, y, 3.0, 1.0))) < 1e-6
  # soft labels (probabilities) give the same CE as the matching integer labels
  np.testing.assert_allclose(distill.loss(s, s, jax.nn.one_hot(y, 5), 3.0, 0.0), ce, rtol=1e-6)


def test_t_squared_keeps_soft_gradient_magnitude_independent_of_temperature():
  rng = np.random.default_rng(1)
  s = jnp.asarray(rng.normal(0, 2, (32, 10)), jnp.float32)
  t = jnp.asarray(rng.normal(0, 2, (32, 10)), jnp.float32)
  y = jnp.zeros(32, jnp.int32)
  norm = lambda T: float(jnp.linalg.norm(jax.grad(distill.loss)(s, t, y, T, 1.0)))
  g = {T: norm(T) for T in (8.0, 16.0, 32.0, 64.0)}
  # with T^2: nearly constant (converges to ||s - t - mean|| / (K N))
  assert max(g.values()) / min(g.values()) < 1.05
  # without it, the soft gradient would fall like 1/T^2: 4096/64 = 64x over this range
  raw = {T: g[T] / T**2 for T in g}
  assert raw[8.0] / raw[64.0] > 60
  # the large-T limit derived in the module docstring
  d = (s - t) - jnp.mean(s - t, -1, keepdims=True)
  np.testing.assert_allclose(g[64.0], float(jnp.linalg.norm(d / (10 * 32))), rtol=0.02)


def test_no_gradient_into_teacher_and_jit_with_traced_temperature():
  s = jnp.ones((2, 3)) * jnp.array([1.0, 2.0, 3.0])
  t = jnp.zeros((2, 3))
  y = jnp.array([0, 1])
  assert float(jnp.abs(jax.grad(distill.loss, argnums=1)(s, t, y, 2.0, 0.5)).max()) == 0.0
  f = jax.jit(distill.loss)
  np.testing.assert_allclose(f(s, t, y, 2.0, 0.5), distill.loss(s, t, y, 2.0, 0.5), rtol=1e-6)


def test_bad_inputs():
  s, y = jnp.zeros((4, 3)), jnp.zeros(4, jnp.int32)
  with pytest.raises(ValueError, match="same shape"):
    distill.loss(s, jnp.zeros((4, 5)), y)
  with pytest.raises(ValueError, match="labels of shape"):
    distill.loss(s, s, jnp.zeros(5, jnp.int32))
  with pytest.raises(ValueError, match=r"temperature must be in \(0.0, inf\], got 0"):
    distill.loss(s, s, y, 0)
  with pytest.raises(ValueError, match="alpha must be in"):
    distill.loss(s, s, y, 2.0, 1.5)
