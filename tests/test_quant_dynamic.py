"""Per-token dynamic activation scales in the s8 x s8 -> s32 ops and int8_apply."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_dnn import quant
from jaxopt_dnn.quant import ops


def _fq_rows(x, axes):
  """Float reference: each row fake-quantized with its own absmax / 127."""
  s = jnp.max(jnp.abs(x), axis=axes, keepdims=True) / 127
  return jnp.clip(jnp.round(x / s), -127, 127) * s


def test_dynamic_dot_general_scales_each_row_inside_the_jitted_op():
  rng = np.random.default_rng(0)
  # rows of very different magnitude: one per-tensor scale would crush the small ones
  x = jnp.asarray(rng.standard_normal((3, 5, 6)) * np.logspace(-3, 1, 5)[None, :, None],
                  jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 6, 4, 2)), jnp.float32)
  qw = quant.quantize(w, axis=(0, 2, 3))
  dn = (((2,), (1,)), ((0,), (0,)))
  f = jax.jit(lambda x, qw: ops.int8_dot_general(x, qw, None, dn))
  got = f(x, qw)
  ref = jax.lax.dot_general(_fq_rows(x, 2), quant.dequantize(qw), dn)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  # the smallest rows keep their relative accuracy (a per-tensor scale rounds them to 0)
  exact = jax.lax.dot_general(x, quant.dequantize(qw), dn)
  small = np.abs(np.asarray(exact[:, 0]))
  assert np.max(np.abs(np.asarray(got[:, 0] - exact[:, 0]))) < 0.05 * small.max()
  sx = quant.fake.scale_from_absmax(jnp.max(jnp.abs(x)), 8)
  static = ops.int8_dot_general(x, qw, sx, dn)
  assert np.max(np.abs(np.asarray(static[:, 0]))) == 0.0
  # one s8 x s8 -> s32 dot, the row maxima computed in the same program
  census = quant.int8_dot_census(f, x, qw)
  assert census.lowered.int8 == 1 and census.lowered.float == 0
  hlo = jax.jit(f).lower(x, qw).as_text()
  assert "reduce" in hlo and "maximum" in hlo


def test_dynamic_einsum_and_conv():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((3, 5, 6)) * np.logspace(-2, 1, 5)[None, :, None],
                  jnp.float32)
  w2 = jnp.asarray(rng.standard_normal((6, 4, 2)), jnp.float32)
  qw2 = quant.quantize(w2, axis=-1)
  got = ops.int8_einsum("bsd,dnh->bnsh", x, qw2, None)
  ref = jnp.einsum("bsd,dnh->bnsh", _fq_rows(x, 2), quant.dequantize(qw2))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="explicit"):
    ops.int8_einsum("...d,dnh->...nh", x, qw2, None)
  # conv: one scale per example (an output pixel mixes input pixels)
  xi = jax.random.uniform(jax.random.key(0), (2, 6, 6, 3)) * jnp.array([1e-3, 1.0])[:, None,
                                                                                    None, None]
  qk = quant.quantize(jax.random.normal(jax.random.key(1), (3, 3, 3, 4)), axis=-1)
  got = ops.int8_conv(xi, qk, None, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  ref = jax.lax.conv_general_dilated(_fq_rows(xi, (1, 2, 3)), quant.dequantize(qk), (1, 1),
                                     "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="b")(nn.relu(nn.Dense(16, name="a")(x)))


def test_int8_apply_dynamic_needs_no_calibration_and_tracks_each_row():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((8, 12)) * np.logspace(-2, 1, 8)[:, None], jnp.float32)
  net = _Net()
  v = net.init(jax.random.key(0), x)
  qp = quant.quantize_params(v["params"])
  f = jax.jit(lambda qp, x: quant.int8_apply(net, {"params": qp}, "dynamic", x))
  got = f(qp, x)
  float_w = net.apply({"params": quant.dequantize_params(qp)}, x)
  assert quant.int8_dot_census(f, qp, x).lowered.int8 == 2
  stats = quant.calibrate(net.apply, v, [(x,)])
  static = quant.int8_apply(net, {"params": qp}, stats, x)
  err = lambda y: np.abs(np.asarray(y - float_w)).max(1) / np.abs(np.asarray(float_w)).max(1)  # noqa: E731
  assert err(got).max() < 0.03 and err(got)[0] < 0.2 * err(static)[0]
  with pytest.raises(ValueError, match="dynamic"):
    quant.int8_apply(net, {"params": qp}, "per-token", x)
