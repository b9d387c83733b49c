"""strip, packed storage round trip, channel shrinking, report."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxopt_dnn.app import models
from jaxopt_dnn import sparsity as sp


@given(shape=st.lists(st.integers(1, 7), min_size=1, max_size=3), density=st.floats(0, 1),
       seed=st.integers(0, 999), dtype=st.sampled_from([np.float32, np.float16]))
def test_pack_unpack_is_bit_exact(shape, density, seed, dtype):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=shape).astype(dtype)
  w[rng.random(shape) > density] = 0
  if w.size > 1:
    w.ravel()[0] = -0.0      # a signed zero survives: it is stored as a value
  packed = sp.pack({"w": w}, rules="w")
  out = sp.unpack(packed)["w"]
  assert out.dtype == w.dtype and out.shape == w.shape
  np.testing.assert_array_equal(out.view(np.uint8), w.view(np.uint8))


def test_pack_with_masks_and_bytes():
  rng = np.random.default_rng(0)
  p = {"k": rng.normal(size=(64, 64)).astype(np.float32), "b": np.ones(64, np.float32)}
  m = sp.magnitude_masks(p, 0.9)
  packed = sp.pack(p, m)
  assert isinstance(packed["k"], sp.PackedArray) and not isinstance(packed["b"], sp.PackedArray)
  restored = sp.unpack(packed)
  np.testing.assert_array_equal(restored["k"], np.asarray(sp.strip(p, m)["k"]))
  nnz = 4096 - round(0.9 * 4096)
  assert packed["k"].nbytes == 4096 // 8 + nnz * 4
  assert sp.tree_bytes(packed) == packed["k"].nbytes + 256
  assert sp.tree_bytes(packed) < 0.15 * sp.tree_bytes(p)


def test_packed_tree_is_a_pytree():
  p = {"k": np.arange(16, dtype=np.float32).reshape(4, 4)}
  packed = sp.pack(p, rules="k")
  leaves, tdef = jax.tree.flatten(packed)
  again = jax.tree.unflatten(tdef, leaves)
  np.testing.assert_array_equal(sp.unpack(again)["k"], p["k"])


def test_strip_needs_matching_tree():
  with pytest.raises(ValueError, match="mask tree"):
    sp.strip({"a": np.ones((2, 2))}, {"b": np.ones((2, 2), bool)})


@pytest.mark.parametrize("model,layers,x_shape", [
    (models.CNN(features=(8, 16), dense=32), ["Conv_0", "Conv_1", "Dense_0", "Dense_1"], (5, 8, 8, 1)),
    (models.MLP(features=(32, 16)), ["Dense_0", "Dense_1", "Dense_2"], (5, 8, 8, 1)),
])
@pytest.mark.slow
def test_shrink_channels_equals_masked_model(model, layers, x_shape):
  x = jax.random.normal(jax.random.key(1), x_shape)
  params = model.init(jax.random.key(0), x)["params"]
  masks = sp.channel_masks(params, 0.5, rules=[f"{n}/kernel" for n in layers[:-1]])
  masked = sp.strip(params, masks)
  small = sp.shrink_channels(params, masks, layers)
  want = model.apply({"params": masked}, x)
  small_model = model.clone(**({"features": tuple(s // 2 for s in model.features), "dense": model.dense // 2}
                               if isinstance(model, models.CNN) else
                               {"features": tuple(s // 2 for s in model.features)}))
  got = small_model.apply({"params": small}, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  expected = small_model.init(jax.random.key(0), x)["params"]
  assert jax.tree.map(np.shape, small) == jax.tree.map(np.shape, expected)
  assert params[layers[0]]["kernel"].shape[-1] == model.features[0]   # input untouched


def test_shrink_rejects_unstructured_masks_and_pruned_head():
  model = models.MLP(features=(16,))
  params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  with pytest.raises(ValueError, match="not a channel mask"):
    sp.shrink_channels(params, sp.magnitude_masks(params, 0.5), ["Dense_0", "Dense_1"])
  with pytest.raises(ValueError, match="last layer 'Dense_1'"):
    sp.shrink_channels(params, sp.channel_masks(params, 0.5), ["Dense_0", "Dense_1"])


def test_report_counts_and_table():
  p = {"k": np.array([[0.0, 1.0], [2.0, 0.0]], np.float32), "b": np.zeros(2, np.float32)}
  rep = sp.sparsity_report(p)
  assert rep.pruned_zeros == 2 and rep.pruned_size == 4
  assert rep.total_zeros == 4 and rep.total_size == 6 and rep.nonzeros == 2
  text = str(rep)
  assert "k" in text and "whole model" in text and "0.5000" in text
