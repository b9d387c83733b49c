"""Group-wise int8 weights in the real s8 x s8 -> s32 dot_general (issue 19)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_dnn import quant
from jaxopt_dnn.quant import ops


def _fq_rows(x, axis):
  """Per-row (per token) symmetric int8 fake quant of ``x`` over ``axis``."""
  s = ops.dynamic_scale(x, (axis,))
  return jnp.clip(jnp.round(x / s), -127, 127) * s


@pytest.mark.slow
@pytest.mark.parametrize("k", [96, 100])   # 100: last group partial (zero padded)
@pytest.mark.parametrize("dynamic", [True, False])
def test_grouped_int8_dot_equals_fake_quant(k, dynamic):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 5, k)), jnp.float32)
  # input channels of very different magnitude: per-group scales matter
  w = jnp.asarray(rng.standard_normal((k, 8)) * np.logspace(-2, 1, k)[:, None], jnp.float32)
  qw = quant.quantize(w, axis=-1, group_size=32, group_axis=0)
  assert qw.group_size == 32 and qw.scale.shape[0] == -(-k // 32)
  dn = (((2,), (0,)), ((), ()))
  sx = None if dynamic else quant.fake.scale_from_absmax(jnp.max(jnp.abs(x)), 8)
  f = jax.jit(lambda x, qw: ops.int8_dot_general(x, qw, sx, dn))
  got = f(x, qw)
  xq = _fq_rows(x, 2) if dynamic else quant.fake.fake_quant_with(x, sx, bits=8)
  ref = jax.lax.dot_general(xq, quant.dequantize(qw), dn, precision="highest")
  assert got.shape == (2, 5, 8)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref))))
  # closer to the float product than per-channel int8 weights
  exact = x @ w
  per_chan = ops.int8_dot_general(x, quant.quantize(w, axis=-1), sx, dn)
  assert float(jnp.max(jnp.abs(got - exact))) < float(jnp.max(jnp.abs(per_chan - exact)))
  census = quant.int8_dot_census(f, x, qw)
  assert census.lowered.int8 == 1 and census.lowered.float == 0


def test_grouped_batched_dot_general():
  """A batch dim on both operands and the group axis not the first weight axis."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((3, 4, 64)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 6, 64)), jnp.float32)
  qw = quant.quantize(w, axis=(0, 1), group_size=16, group_axis=2)
  dn = (((2,), (2,)), ((0,), (0,)))
  got = ops.int8_dot_general(x, qw, None, dn)
  ref = jax.lax.dot_general(_fq_rows(x, 2), quant.dequantize(qw), dn, precision="highest")
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref))))


def test_scale_varying_along_two_contracted_axes_raises():
  rng = np.random.default_rng(2)
  w = jnp.asarray(rng.standard_normal((4, 32, 8)), jnp.float32)
  qw = quant.quantize(w, axis=(0, 2), group_size=8, group_axis=1)   # varies along 0 and 1
  x = jnp.asarray(rng.standard_normal((5, 4, 32)), jnp.float32)
  with pytest.raises(ValueError, match="ONE contracted axis"):
    ops.int8_dot_general(x, qw, None, (((1, 2), (0, 1)), ((), ())))


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="b")(nn.relu(nn.Dense(16, name="a")(x)))


def test_int8_apply_serves_grouped_weights_as_int8():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((6, 64)), jnp.float32)
  net = _Net()
  v = net.init(jax.random.key(0), x)
  qp = quant.quantize_params(v["params"], group_size=16)   # "a": (64, 16) -> 4 groups
  assert qp["a"]["kernel"].group_size == 16
  f = jax.jit(lambda qp, x: quant.int8_apply(net, {"params": qp}, "dynamic", x, strict=True))
  got = f(qp, x)
  ref = net.apply({"params": quant.dequantize_params(qp)}, x)
  rel = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
  assert rel < 0.03
  assert quant.int8_dot_census(f, qp, x).lowered.int8 == 2
  cov = quant.coverage(lambda vv, x: net.apply(vv, x), {"params": qp}, x, calibration="dynamic")
  assert cov.int8_ops == 2 and cov.unattributed_int8 == 0, str(cov)
  assert cov.float_contractions() == [], str(cov)
