"""Tests for jaxopt_dnn.quant: numerics, QArray storage, PTQ/QAT on digits, int8 serving."""

import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from jaxopt_dnn import quant
from jaxopt_dnn.app import data, models
from jaxopt_dnn.quant import ops, qarray


# ----------------------------------------------------------------- reference numerics
def torch_fake_quant_per_channel(x, scale, zero_point, axis, quant_min, quant_max):
  """numpy transcription of ATen's fake_quantize_per_channel_affine CPU kernel.

  out = (min(max(zp + nearbyint(x * (1.0f / scale)), qmin), qmax) - zp) * scale, float32.
  """
  shape = [1] * x.ndim
  shape[axis] = -1
  s = scale.astype(np.float32).reshape(shape)
  zp = zero_point.astype(np.int64).reshape(shape)
  inv = (np.float32(1.0) / s).astype(np.float32)
  q = np.rint((x * inv).astype(np.float32)).astype(np.int64) + zp
  q = np.minimum(np.maximum(q, quant_min), quant_max)
  return ((q - zp).astype(np.float32) * s).astype(np.float32)


@pytest.mark.parametrize("shape", [(3, 3, 4, 16), (64, 10), (7, 5)])
def test_per_channel_int8_matches_torch_reference_bitwise(shape):
  rng = np.random.default_rng(1)
  x = (rng.standard_normal(shape) * rng.uniform(0.01, 5, shape[-1])).astype(np.float32)
  x[..., 0] = 0.0                                       # an all-zero channel: s guarded to 1
  scale, zp = quant.compute_qparams(jnp.asarray(x), bits=8, axis=-1)
  assert zp is None and scale.dtype == jnp.float32 and float(scale.reshape(-1)[0]) == 1.0
  ours = np.asarray(quant.fake_quant(jnp.asarray(x), bits=8, axis=-1))
  ref = torch_fake_quant_per_channel(x, np.asarray(scale).reshape(-1),
                                     np.zeros(shape[-1]), x.ndim - 1, -127, 127)
  np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))
  # the scale is the documented one, absmax / 127 per output channel (XLA may turn the
  # division into a multiplication by 1/127: 1 ulp)
  np.testing.assert_allclose(np.asarray(scale).reshape(-1)[1:],
                             (np.abs(x).max(axis=tuple(range(x.ndim - 1))) / 127)[1:],
                             rtol=1.5e-7)


def test_asymmetric_matches_torch_reference_bitwise():
  rng = np.random.default_rng(2)
  x = (rng.standard_normal((32, 8)) + 1.5).astype(np.float32)
  scale, zp = quant.compute_qparams(jnp.asarray(x), bits=8, axis=-1, symmetric=False)
  ours = np.asarray(quant.fake_quant(jnp.asarray(x), bits=8, axis=-1, symmetric=False))
  ref = torch_fake_quant_per_channel(x, np.asarray(scale).reshape(-1),
                                     np.asarray(zp).reshape(-1), 1, -128, 127)
  np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))
  q = quant.quantize(jnp.asarray(x), bits=8, axis=-1, symmetric=False)
  np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), ours)


@settings(max_examples=30)
@given(hnp.arrays(np.float32, st.sampled_from([(9,), (4, 6), (2, 3, 5)]),
                  elements=st.floats(-1e4, 1e4, width=32)),
       st.sampled_from([4, 8]), st.booleans())
def test_fake_quant_error_at_most_half_a_step(x, bits, per_channel):
  axis = -1 if per_channel else None
  scale, _ = quant.compute_qparams(jnp.asarray(x), bits=bits, axis=axis)
  y = np.asarray(quant.fake_quant(jnp.asarray(x), bits=bits, axis=axis))
  s = np.broadcast_to(np.asarray(scale), x.shape)
  # absmax scaling puts every value inside the range: the bound holds everywhere
  assert np.all(np.abs(x.astype(np.float64) - y) <= s.astype(np.float64) / 2 * (1 + 1e-6)), (
      np.max(np.abs(x - y) / s))
  hi = 2 ** (bits - 1) - 1
  assert np.all(np.abs(np.round(y / s)) <= hi)


def test_ste_gradient_is_identity_inside_and_zero_outside():
  x = jnp.array([-3.0, -1.0, -0.2, 0.0, 0.4, 0.99, 1.3, 5.0])
  scale = jnp.float32(1.0 / 127)                         # range [-1, 1]
  g = jax.grad(lambda v: jnp.sum(quant.fake_quant(v, scale=scale) * jnp.arange(8.0)))(x)
  inside = np.abs(np.asarray(x)) <= 1.0
  np.testing.assert_array_equal(np.asarray(g), np.where(inside, np.arange(8.0), 0.0))
  # absmax scaling: everything inside, so the gradient is exactly the identity
  gw = jax.grad(lambda v: jnp.sum(quant.fake_quant(v, axis=-1) ** 2))(x.reshape(2, 4))
  np.testing.assert_allclose(gw, 2 * quant.fake_quant(x.reshape(2, 4), axis=-1))


def test_range_estimators_percentile_and_mse():
  rng = np.random.default_rng(3)
  x = jnp.asarray(np.concatenate([rng.standard_normal(4000), [60.0]]).astype(np.float32))
  s_abs, _ = quant.compute_qparams(x, bits=4, method="absmax")
  s_pct, _ = quant.compute_qparams(x, bits=4, method="percentile", percentile=99.9)
  s_mse, _ = quant.compute_qparams(x, bits=4, method="mse")
  assert s_mse.dtype == s_pct.dtype == jnp.float32
  s_abs, s_pct, s_mse = (float(v.reshape(())) for v in (s_abs, s_pct, s_mse))
  assert s_pct < s_abs and s_mse < s_abs
  err = lambda m: float(jnp.mean((x - quant.fake_quant(x, bits=4, method=m)) ** 2))
  assert err("mse") < err("absmax")


# ----------------------------------------------------------------- QArray
@pytest.mark.slow
def test_int4_pack_roundtrip_and_dequantize_equals_fake_quant():
  rng = np.random.default_rng(4)
  for shape in [(5, 3), (4, 6, 2), (7,)]:
    q = jnp.asarray(rng.integers(-8, 8, shape), jnp.int8)
    packed = qarray.pack_int4(q)
    assert packed.dtype == jnp.uint8 and packed.shape[0] == (shape[0] + 1) // 2
    np.testing.assert_array_equal(qarray.unpack_int4(packed, shape), q)
  x = jnp.asarray(rng.standard_normal((9, 6)), jnp.float32)
  for bits in (4, 8):
    qa = quant.quantize(x, bits=bits, axis=-1)
    np.testing.assert_array_equal(quant.dequantize(qa), quant.fake_quant(x, bits=bits, axis=-1))


def test_qarray_is_a_pytree_through_jit():
  x = jnp.linspace(-1, 1, 24).reshape(4, 6)
  qa = quant.quantize(x, bits=4, axis=-1)
  leaves = jax.tree.leaves(qa)
  assert [l.dtype for l in leaves] == [jnp.uint8, jnp.float32]
  out = jax.jit(lambda q: q)(qa)
  assert isinstance(out, quant.QArray) and out.bits == 4 and out.shape == (4, 6)
  np.testing.assert_array_equal(jax.jit(quant.dequantize)(qa), quant.dequantize(qa))


# ----------------------------------------------------------------- trained digits CNN
def _accuracy(logits, y):
  return float(np.mean(np.argmax(np.asarray(logits), -1) == y))


@pytest.fixture(scope="module")
def trained(digits):
  model = models.CNN()
  params = jax.jit(model.init)(jax.random.key(0), jnp.asarray(digits.x_train[:2]))["params"]
  tx = optax.adam(1e-3)
  opt = tx.init(params)

  @jax.jit
  def step(p, o, x, y):
    def loss(p):
      return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x),
                                                             y).mean()
    g = jax.grad(loss)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o

  it = data.infinite_batches(digits.x_train, digits.y_train, 64)
  for _ in range(350):
    params, opt = step(params, opt, *next(it))
  acc = _accuracy(jax.jit(model.apply)({"params": params}, digits.x_test), digits.y_test)
  calib = [jnp.asarray(x) for x, _ in data.batches(digits.x_train, digits.y_train, 128)][:4]
  stats = quant.calibrate(model.apply, {"params": params}, calib)
  return model, params, acc, stats


def _dir_bytes(path):
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def _save(tree, path):
  with ocp.CheckpointManager(path) as mgr:
    mgr.save(0, args=ocp.args.StandardSave(tree))
    mgr.wait_until_finished()
  return _dir_bytes(path)


@pytest.mark.slow
def test_orbax_roundtrip_and_checkpoint_bytes(trained, tmp_path):
  _, params, _, _ = trained
  b32 = _save(params, tmp_path / "f32")
  q8 = quant.quantize_params(params)
  b8 = _save(q8, tmp_path / "q8")
  q4 = quant.quantize_params(params, quant.QuantRule("kernel", bits=4, act_bits=None))
  b4 = _save(q4, tmp_path / "q4")
  print(f"orbax bytes: fp32 {b32}, int8 {b8} ({b8 / b32:.3f}x), int4 w-only {b4} "
        f"({b4 / b32:.3f}x)")
  assert b8 <= 0.27 * b32 and b4 <= 0.15 * b32
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), q4)
  with ocp.CheckpointManager(tmp_path / "q4") as mgr:
    back = mgr.restore(0, args=ocp.args.StandardRestore(abstract))
  assert isinstance(back["Dense_0"]["kernel"], quant.QArray)
  assert back["Dense_0"]["kernel"].bits == 4
  chex.assert_trees_all_equal(back, q4)


def test_ptq_w8a8_int8_serving_accuracy_census_and_fake_quant_agreement(trained, digits):
  model, params, acc32, stats = trained
  qvars = {"params": quant.quantize_params(params)}
  serve = jax.jit(lambda qv, x: quant.int8_apply(model, qv, stats, x))
  x = jnp.asarray(digits.x_test)
  logits = serve(qvars, x)
  acc8 = _accuracy(logits, digits.y_test)
  print(f"fp32 {acc32:.4f}  PTQ W8A8 int8 serving {acc8:.4f}")
  assert acc8 >= acc32 - 0.005
  census = quant.int8_dot_census(serve, qvars, x)
  print(census)
  assert census.lowered.count("s8", "s8", "s32") == 4      # 2 convs + 2 dense, all int8
  assert census.lowered.float == 0 and census.compiled.float == 0
  assert census.compiled.total == 4
  # the fake-quant (QAT-mode, ranges frozen) model computes the same thing in float
  fq = jax.jit(quant.qat(model).apply)({"params": params, "quant_stats": stats}, x)
  step = float(jnp.max(jnp.abs(fq))) / 127                  # one int8 step of the logits
  diff = float(jnp.max(jnp.abs(fq - logits)))
  print(f"max |int8 - fake_quant| = {diff:.5f}, one step = {step:.5f}")
  assert diff <= step


def test_weight_only_int4_serving(trained, digits):
  model, params, acc32, _ = trained
  rule = quant.QuantRule("kernel", bits=4, act_bits=None)
  qvars = {"params": quant.quantize_params(params, rule)}
  serve = jax.jit(lambda qv, x: quant.int8_apply(model, qv, None, x, weight_only=True))
  x = jnp.asarray(digits.x_test)
  acc4 = _accuracy(serve(qvars, x), digits.y_test)
  assert acc4 >= acc32 - 0.03
  census = quant.int8_dot_census(serve, qvars, x)
  assert census.lowered.int8 == 0 and census.lowered.float == 4
  hlo = jax.jit(serve).lower(qvars, x).as_text()
  assert "ui8" in hlo                                        # packed weights enter the program


@pytest.mark.slow
def test_qat_finetune_accuracy_and_stats_outside_params(trained, digits):
  model, params, acc32, stats = trained
  qm = quant.qat(model)
  tx = optax.adam(3e-4)
  opt = tx.init(params)
  stats = qm.init_stats(params, jnp.asarray(digits.x_train[:256]))
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(stats))

  @jax.jit
  def step(p, s, o, x, y):
    def loss(p):
      logits, upd = qm.apply({"params": p, "quant_stats": s}, x, mutable=["quant_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd
    g, upd = jax.grad(loss, has_aux=True)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), upd["quant_stats"], o

  it = data.infinite_batches(digits.x_train, digits.y_train, 64, seed=1)
  for _ in range(150):
    params, stats, opt = step(params, stats, opt, *next(it))
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path((params, opt))]
  assert not any("input_amax" in p for p in paths)
  acc_qat = _accuracy(jax.jit(qm.apply)({"params": params, "quant_stats": stats},
                                        digits.x_test), digits.y_test)
  qvars = {"params": quant.quantize_params(params)}
  serve = jax.jit(lambda qv, s, x: quant.int8_apply(model, qv, s, x))
  acc_int8 = _accuracy(serve(qvars, stats, jnp.asarray(digits.x_test)), digits.y_test)
  print(f"fp32 {acc32:.4f}  QAT fake-quant {acc_qat:.4f}  QAT->int8 serving {acc_int8:.4f}")
  assert acc_qat >= acc32 - 0.003 and acc_int8 >= acc32 - 0.003
