"""A bf16 policy really computes in bf16 on models with explicit dtype=float32 layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo_thirdparty as zoo
from jaxopt_dnn import compile as jcompile
from jaxopt_dnn import precision, quant
from jaxopt_dnn.precision import Policy


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(zoo.LINEN))
def test_linen_bf16_policy_every_dot_conv_bf16(name):
  model, inputs = zoo.LINEN[name]()
  v = model.init(jax.random.key(0), *inputs)
  fn = precision.with_policy(model.apply, "bf16")
  cen = precision.compute_census(fn, v, *inputs, policy="bf16")
  assert cen.ok, cen.summary()
  assert sum(cen.ops.values()) > 0
  assert jcompile.analyze(fn, v, *inputs).off_dtype(jnp.bfloat16) == {}
  y = fn(v, *inputs)
  assert y.dtype == jnp.float32 and jnp.isfinite(y).all()


def test_report_flags_f32_dots_left_under_bf16():
  model, inputs = zoo.linen_lm()
  v = model.init(jax.random.key(0), *inputs)
  fn = precision.with_policy(model.apply, "bf16", override_module_dtype=False)
  text = Policy.from_string("bf16").report(nn.unbox(v), fn, v, *inputs)
  assert "NOT in bf16" in text and "f32 x f32 -> f32" in text
  assert jcompile.analyze(fn, v, *inputs).off_dtype(jnp.bfloat16)


@pytest.mark.parametrize("name", sorted(zoo.NNX))
def test_nnx_bf16_policy_every_dot_bf16(name):
  from flax import nnx
  model, inputs = zoo.NNX[name]()
  fn = precision.with_policy(lambda m, *a: m(*a), "bf16")
  graphdef, state = nnx.split(model)
  run = lambda s, *a: fn(nnx.merge(graphdef, s), *a)  # noqa: E731
  cen = precision.compute_census(run, state, *inputs, policy="bf16")
  assert cen.ok, cen.summary()
  y = run(state, *inputs)
  assert y.dtype == jnp.float32
  assert model.__dict__ and jax.tree.leaves(nnx.state(model, nnx.Param))[0].dtype == jnp.float32


def test_quant_stats_stay_float32_under_bf16_policy():
  """Bug (a): the quant_stats EMA was cast to bf16 and stalled (1.003 -> 1.003)."""
  model = nn.Dense(4, dtype=jnp.float32)
  x = jnp.full((2, 4), 1.3, jnp.float32)
  qm = quant.qat(model)
  v = model.init(jax.random.key(0), x)
  stats = {"input_amax": jnp.float32(1.003)}
  fn = precision.with_policy(qm.apply, "bf16")
  _, upd = fn({**v, "quant_stats": stats}, x, mutable=["quant_stats"])
  got = upd["quant_stats"]["input_amax"]
  assert got.dtype == jnp.float32
  # bf16 of 1.3 is 1.296875; the f32 EMA moves by (1 - 0.99) * (1.296875 - 1.003)
  np.testing.assert_allclose(float(got), 0.99 * 1.003 + 0.01 * 1.296875, rtol=1e-6)
  assert Policy.from_string("bf16").cast_to_compute({"quant_stats": stats})[
      "quant_stats"]["input_amax"].dtype == jnp.float32
