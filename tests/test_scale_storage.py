"""8-bit (fp8) group scales under one float32 super scale per tensor."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxopt_dnn as jd
from jaxopt_dnn import quant
from jaxopt_dnn.quant import fake
from jaxopt_dnn.quant.gptq import gptq_solve, to_qarray
from jaxopt_dnn.quant.qarray import full_scale, round_scale

FP8 = "float8_e4m3fn"


def _kernel(k=256, n=48, seed=0):
  rng = np.random.default_rng(seed)
  # rows of very different magnitude: the scales span ~3 decades
  return (rng.standard_t(4, (k, n)) * np.exp(rng.normal(0, 1.2, (k, 1)))).astype(np.float32)


def test_round_scale_fp8_is_relative_to_a_power_of_two_super_scale():
  s = jnp.asarray(np.exp(np.random.default_rng(0).uniform(-9, 2, 500)), jnp.float32)
  stored, sup = round_scale(s, FP8)
  assert stored.dtype == jnp.float8_e4m3fn and sup.shape == () and sup.dtype == jnp.float32
  assert float(np.log2(sup)) == int(np.log2(sup))                      # a power of two
  assert float(jnp.max(stored.astype(jnp.float32))) <= 448
  eff = stored.astype(jnp.float32) * sup
  rel = np.abs(np.asarray(eff) / np.asarray(s) - 1)
  normal = np.asarray(s) >= float(jnp.max(s)) / 2 ** 14     # fp8 normal range below the max
  assert normal.mean() > 0.8 and rel[normal].max() <= 1 / 16 + 1e-6    # 3 mantissa bits
  # with qmax: never so far down that the largest code clips by more than half a step
  up = round_scale(s, FP8, qmax=127)
  eff_up = np.asarray(up[0].astype(jnp.float32) * up[1])
  assert np.all(eff_up * 127.5 >= np.asarray(s) * 127)
  # smaller scales are subnormal: absolute error within half a subnormal step
  assert np.all(np.abs(np.asarray(eff - s)[~normal]) <= 2.0 ** -10 * float(sup))
  assert np.all(np.asarray(eff) > 0)                                     # never flushes to 0
  # 16-bit and float32 storage need no super scale
  assert round_scale(s, "bfloat16")[1] is None and round_scale(s)[1] is None
  with pytest.raises(TypeError, match="float dtype"):
    round_scale(s, "int8")


@pytest.mark.slow
@pytest.mark.parametrize("bits,g", [(4, 32), (4, 16), (8, None)])
def test_quantize_with_fp8_scales_costs_8_bits_per_group_and_keeps_the_bound(bits, g):
  w = jnp.asarray(_kernel())
  kw = dict(bits=bits, axis=-1, group_size=g, group_axis=-2, scale_dtype=FP8, name="w")
  q = fake.quantize(w, **kw)
  assert q.scale.dtype == jnp.float8_e4m3fn and q.super_scale is not None
  deq = quant.dequantize(q)
  # same numerics as fake_quant, bit for bit
  np.testing.assert_array_equal(np.asarray(deq), np.asarray(fake.fake_quant(w, **kw)))
  # |w - deq| <= scale / 2 for the stored (rounded) scale
  assert np.all(np.abs(np.asarray(w - deq)) <= np.asarray(full_scale(q)) / 2 * (1 + 1e-6))
  per_weight = jd.auto.stored_bits(q) / w.size
  groups = w.shape[0] // g if g else 1
  assert per_weight == pytest.approx(bits + 8 * groups / w.shape[0] + 32 / w.size)
  # close to the float32-scale quantization (fp8 scales move by <= 1/16)
  ref = quant.dequantize(fake.quantize(w, **{**kw, "scale_dtype": None}))
  err, err_ref = (float(jnp.mean((w - d) ** 2)) for d in (deq, ref))
  assert err <= 1.35 * err_ref


def test_qarray_with_super_scale_is_a_pytree_and_survives_jit():
  q = fake.quantize(jnp.asarray(_kernel()), bits=4, axis=-1, group_size=32, scale_dtype=FP8)
  leaves, tdef = jax.tree.flatten(q)
  assert len(leaves) == 3                                   # value, scale, super_scale
  q2 = jax.tree.unflatten(tdef, leaves)
  out = jax.jit(quant.dequantize)(q2)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(quant.dequantize(q)))
  assert q.with_name("k").super_scale is q.super_scale


@pytest.mark.slow
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_fp8_scales_are_stored_exactly(act_order):
  w = _kernel(128, 32, seed=1)
  x = np.random.default_rng(2).normal(size=(512, 128)).astype(np.float32)
  h = jnp.asarray(2 * x.T @ x)
  codes, scales = gptq_solve(jnp.asarray(w), h, bits=4, group_size=32, act_order=act_order,
                             scale_dtype=jnp.float8_e4m3fn, clip=0.8)
  q = to_qarray(codes, scales, w.shape, 1, bits=4, group_size=32, scale_dtype=FP8)
  assert q.scale.dtype == jnp.float8_e4m3fn
  direct = np.asarray(codes, np.float32) * np.repeat(np.asarray(scales), 32, axis=0)
  np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), direct)
  # GPTQ with 8-bit scales stays close to GPTQ with 16-bit ones on the layer's loss
  codes16, scales16 = gptq_solve(jnp.asarray(w), h, bits=4, group_size=32,
                                 act_order=act_order, scale_dtype=jnp.bfloat16, clip=0.8)
  d16 = np.asarray(codes16, np.float32) * np.repeat(np.asarray(scales16), 32, axis=0)
  loss = lambda d: float(np.sum((x @ (w - d)) ** 2))   # noqa: E731
  assert loss(direct) <= 1.3 * loss(d16)


def test_int8_serving_uses_the_super_scale():
  w = jnp.asarray(_kernel(64, 16))
  x = jnp.asarray(np.random.default_rng(3).normal(size=(8, 64)).astype(np.float32))
  q8 = fake.quantize(w, bits=8, axis=-1, scale_dtype=FP8)
  q32 = quant.QArray(q8.value, full_scale(q8), None, bits=8, channel_axes=q8.channel_axes,
                     shape=q8.shape, dtype=q8.dtype)
  dn = (((1,), (0,)), ((), ()))
  xs = jnp.max(jnp.abs(x)) / 127
  a = quant.int8_dot_general(x, q8, xs, dn)
  b = quant.int8_dot_general(x, q32, xs, dn)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(a), np.asarray(x @ quant.dequantize(q8)),
                             rtol=0.05, atol=0.05 * float(jnp.max(jnp.abs(x @ w))))


def test_rules_accept_fp8_scale_storage():
  p = {"d": {"kernel": _kernel(64, 16)}}
  out = quant.quantize_params(p, [(r"kernel", {"bits": 4, "group_size": 32,
                                                "scale_dtype": FP8})])
  assert out["d"]["kernel"].scale.dtype == jnp.float8_e4m3fn
  with pytest.raises(ValueError, match="scale_dtype"):
    quant.QuantRule("kernel", scale_dtype="float8_e5m3")
  with pytest.raises(ValueError, match="symmetric=True"):
    fake.quantize(jnp.asarray(_kernel(64, 16)), bits=4, axis=-1, group_size=32,
                  symmetric=False, scale_dtype=FP8)
