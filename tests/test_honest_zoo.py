"""The third-party-style zoo itself: every model initializes, runs, and has the styles it claims."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import zoo_thirdparty as zoo
from jaxopt_dnn import _tree


@pytest.mark.parametrize("name", sorted(zoo.LINEN))
def test_linen_zoo_runs(name):
  model, inputs = zoo.LINEN[name]()
  v = model.init(jax.random.key(0), *inputs)
  y = model.apply(v, *inputs)
  assert y.dtype == jnp.float32 and jnp.isfinite(y).all()


@pytest.mark.parametrize("name", sorted(zoo.NNX))
def test_nnx_zoo_runs(name):
  model, inputs = zoo.NNX[name]()
  y = model(*inputs)
  assert y.dtype == jnp.float32 and jnp.isfinite(y).all()


def test_linen_lm_has_boxed_params_and_2d_biases():
  model, inputs = zoo.linen_lm()
  v = model.init(jax.random.key(0), *inputs)
  assert isinstance(v["params"]["layer_0"]["query"]["kernel"], nn.LogicallyPartitioned)
  assert isinstance(v["params"]["embed"]["embedding"], nn.LogicallyPartitioned)
  shapes = {p: x.shape for p, x in _tree.leaves_with_paths(nn.unbox(v))}
  assert shapes["params/layer_0/query/bias"] == (4, 8)
  assert shapes["params/layer_0/query/kernel"] == (32, 4, 8)
  assert shapes["params/layer_0/out/kernel"] == (4, 8, 32)
