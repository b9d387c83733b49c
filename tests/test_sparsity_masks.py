"""Masks: exact agreement with reference pruning, patterns, bad input."""

import copy

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

from jaxopt_dnn import sparsity as sp


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "Conv_0": {"kernel": rng.normal(size=(3, 3, 4, 8)).astype(np.float32),
                 "bias": rng.normal(size=(8,)).astype(np.float32)},
      "Dense_0": {"kernel": rng.normal(size=(32, 16)).astype(np.float32),
                  "bias": rng.normal(size=(16,)).astype(np.float32)},
      "Dense_1": {"kernel": rng.normal(size=(16, 4)).astype(np.float32)},
  }


def _reference_layer_mask(w, s):
  """torch.nn.utils.prune.l1_unstructured semantics: remove the k smallest |w|."""
  k = int(round(s * w.size))
  order = np.argsort(np.abs(w).ravel(), kind="stable")
  keep = np.ones(w.size, bool)
  keep[order[:k]] = False
  return keep.reshape(w.shape)


def _reference_global_masks(ws, s):
  flat = np.concatenate([np.abs(w).ravel() for w in ws])
  k = int(round(s * flat.size))
  keep = np.ones(flat.size, bool)
  keep[np.argsort(flat, kind="stable")[:k]] = False
  out, i = [], 0
  for w in ws:
    out.append(keep[i:i + w.size].reshape(w.shape))
    i += w.size
  return out


@pytest.mark.parametrize("s", [0.0, 0.1, 0.5, 0.9, 0.97])
def test_layer_magnitude_matches_reference(s):
  p = _params()
  masks = sp.magnitude_masks(p, s)
  for name in ("Conv_0", "Dense_0", "Dense_1"):
    np.testing.assert_array_equal(masks[name]["kernel"], _reference_layer_mask(p[name]["kernel"], s))
  assert sp.is_dense(masks["Conv_0"]["bias"]) and sp.is_dense(masks["Dense_0"]["bias"])


@pytest.mark.parametrize("s", [0.3, 0.8])
def test_global_magnitude_matches_reference(s):
  p = _params(1)
  masks = sp.magnitude_masks(p, s, scope="global")
  names = ["Conv_0", "Dense_0", "Dense_1"]   # flatten order of the chosen leaves
  ref = _reference_global_masks([p[n]["kernel"] for n in names], s)
  for n, r in zip(names, ref):
    np.testing.assert_array_equal(masks[n]["kernel"], r)


def test_ties_are_broken_by_position_deterministically():
  w = np.array([[1.0, 0.5, 0.5], [0.5, 2.0, 0.5]], np.float32)
  m = np.asarray(sp.magnitude_masks({"w": w}, 0.5)["w"])   # remove 3 of the four 0.5s
  np.testing.assert_array_equal(m, [[True, False, False], [False, True, True]])
  np.testing.assert_array_equal(m, _reference_layer_mask(w, 0.5))


def test_traced_sparsity_under_jit_matches_eager():
  p = _params(2)
  f = jax.jit(lambda p, s: sp.magnitude_masks(p, s))
  for s in (0.2, 0.75):
    jax.tree.map(np.testing.assert_array_equal, f(p, s), sp.magnitude_masks(p, s))


@given(shape=st.lists(st.integers(1, 9), min_size=2, max_size=4),
       s=st.floats(0.0, 0.99), seed=st.integers(0, 2**16))
@pytest.mark.slow
def test_layer_masks_remove_exact_count(shape, s, seed):
  w = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  m = np.asarray(sp.magnitude_masks({"w": w}, s)["w"])
  assert m.dtype == np.bool_ and m.shape == w.shape
  assert (~m).sum() == round(s * w.size)
  if 0 < (~m).sum() < w.size:   # every removed |w| is <= every kept |w|
    assert np.abs(w[~m]).max() <= np.abs(w[m]).min()


@given(s=st.floats(0.0, 0.99), seed=st.integers(0, 2**16))
def test_random_masks_exact_count_and_reproducible(s, seed):
  p = _params(seed % 7)
  key = jax.random.key(seed)
  m1, m2 = sp.random_masks(key, p, s), sp.random_masks(key, p, s)
  for n in ("Conv_0", "Dense_0", "Dense_1"):
    np.testing.assert_array_equal(m1[n]["kernel"], m2[n]["kernel"])
    assert (~np.asarray(m1[n]["kernel"])).sum() == round(s * p[n]["kernel"].size)


def test_random_masks_differ_from_magnitude():
  p = _params()
  r = sp.random_masks(jax.random.key(0), p, 0.5)["Dense_0"]["kernel"]
  m = sp.magnitude_masks(p, 0.5)["Dense_0"]["kernel"]
  assert not np.array_equal(r, m)


@given(n=st.integers(1, 4), extra=st.integers(0, 3), groups=st.integers(1, 4),
       out=st.integers(1, 5), seed=st.integers(0, 999))
@pytest.mark.slow
def test_nm_masks_keep_exactly_n_largest_per_group(n, extra, groups, out, seed):
  m = n + extra
  w = np.random.default_rng(seed).normal(size=(groups * m, out)).astype(np.float32)
  mask = np.asarray(sp.nm_masks({"k": w}, n, m, axis=0)["k"])
  g = mask.reshape(groups, m, out)
  assert (g.sum(axis=1) == n).all()
  wg = np.abs(w).reshape(groups, m, out)
  kept_min = np.where(g, wg, np.inf).min(axis=1)
  dropped_max = np.where(g, -np.inf, wg).max(axis=1)
  assert (kept_min >= dropped_max).all()


def test_nm_along_conv_input_axis():
  k = np.random.default_rng(0).normal(size=(3, 3, 8, 5)).astype(np.float32)
  mask = np.asarray(sp.nm_masks({"kernel": k}, 2, 4, axis=2)["kernel"])
  assert (mask.reshape(3, 3, 2, 4, 5).sum(axis=3) == 2).all()


def test_channel_masks_remove_whole_channels_and_bias():
  p = _params()
  m = sp.channel_masks(p, 0.25)
  k, b = np.asarray(m["Dense_0"]["kernel"]), np.asarray(m["Dense_0"]["bias"])
  cols = k.all(axis=0)
  assert (k.any(axis=0) == cols).all() and (~cols).sum() == 4
  np.testing.assert_array_equal(b, cols)
  norms = np.linalg.norm(p["Dense_0"]["kernel"], axis=0)
  assert norms[~cols].max() <= norms[cols].min()
  conv = np.asarray(m["Conv_0"]["kernel"]).reshape(-1, 8)
  assert (~conv.all(axis=0)).sum() == 2


def test_apply_masks_zeroes_and_keeps_dtype():
  p = _params()
  m = sp.magnitude_masks(p, 0.5)
  out = sp.apply_masks(p, m)
  assert out["Dense_0"]["kernel"].dtype == np.float32
  assert (np.asarray(out["Dense_0"]["kernel"]) == 0).sum() == 256
  np.testing.assert_array_equal(out["Dense_0"]["bias"], p["Dense_0"]["bias"])


def test_erk_distribution_hits_total_and_favours_small_layers():
  p = _params()
  m = sp.magnitude_masks(p, 0.8, distribution="erk")
  rep = sp.sparsity_report(p, m)
  assert abs(rep.pruned_sparsity - 0.8) < 0.01
  dens = {r.path: r.density for r in rep.leaves if r.pruned}
  assert dens["Dense_1/kernel"] > dens["Dense_0/kernel"]


def test_per_layer_sparsity_dict():
  p = _params()
  m = sp.magnitude_masks(p, {"Conv": 0.25, "Dense_0": 0.75})
  assert (~np.asarray(m["Conv_0"]["kernel"])).sum() == 72
  assert (~np.asarray(m["Dense_0"]["kernel"])).sum() == 384
  assert sp.is_dense(m["Dense_1"]["kernel"])


def test_regex_rules_choose_leaves():
  p = _params()
  m = sp.magnitude_masks(p, 0.5, rules=[r"Dense_\d/kernel"])
  assert sp.is_dense(m["Conv_0"]["kernel"]) and not sp.is_dense(m["Dense_1"]["kernel"])


def test_lists_tuples_linen_and_nnx_trees():
  tree = [np.ones((4, 4), np.float32), (np.arange(16.0, dtype=np.float32).reshape(4, 4),)]
  m = sp.magnitude_masks(tree, 0.5)
  assert jax.tree.structure(m) == jax.tree.structure(tree)
  assert (~np.asarray(m[1][0])).sum() == 8

  variables = nn.Dense(8).init(jax.random.key(0), jnp.ones((1, 4)))
  m = sp.magnitude_masks(variables, 0.5, rules=r"params/kernel")
  assert (~np.asarray(m["params"]["kernel"])).sum() == 16

  model = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  m = sp.magnitude_masks(state, 0.25)
  assert jax.tree.structure(m) == jax.tree.structure(state)
  masked = sp.apply_masks(state, m)
  nnx.update(model, masked)
  assert int((model.kernel[...] == 0).sum()) == 8


# ----------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_out_of_range(bad):
  with pytest.raises(ValueError, match="sparsity"):
    sp.magnitude_masks(_params(), bad)


def test_bad_sparsity_in_dict_names_pattern():
  with pytest.raises(ValueError, match="Dense_0"):
    sp.magnitude_masks(_params(), {"Dense_0": 1.2})


def test_n_greater_than_m():
  with pytest.raises(ValueError, match="n=5, m=4"):
    sp.nm_masks(_params(), 5, 4)


def test_nm_axis_not_multiple_names_leaf():
  with pytest.raises(ValueError, match="Dense_1/kernel.*length 16.*m=3"):
    sp.nm_masks(_params(), 2, 3, rules="Dense_1", axis=0)


def test_rule_matching_nothing_lists_candidates():
  with pytest.raises(ValueError, match=r"\['Dense_9'\].*Dense_0/kernel"):
    sp.magnitude_masks(_params(), 0.5, rules=["Dense_0", "Dense_9"])


def test_integer_leaf_chosen_is_type_error():
  p = {"w": np.ones((4, 4), np.float32), "ids": np.ones((4, 4), np.int32)}
  with pytest.raises(TypeError, match="'ids'.*int32"):
    sp.magnitude_masks(p, 0.5, rules=".*")


def test_mismatched_mask_tree():
  p = _params()
  m = sp.magnitude_masks(p, 0.5)
  del m["Dense_1"]
  with pytest.raises(ValueError, match="Dense_1/kernel"):
    sp.apply_masks(p, m)
  m2 = sp.magnitude_masks(p, 0.5)
  m2["Dense_0"]["kernel"] = m2["Dense_0"]["kernel"][:3]
  with pytest.raises(ValueError, match="Dense_0/kernel.*shape"):
    sp.apply_masks(p, m2)


def test_nothing_is_mutated_on_error_or_success():
  p = _params()
  before = copy.deepcopy(p)
  with pytest.raises(ValueError):
    sp.magnitude_masks(p, 2.0)
  sp.apply_masks(p, sp.magnitude_masks(p, 0.9))
  jax.tree.map(np.testing.assert_array_equal, p, before)


def test_global_scope_rejects_erk():
  with pytest.raises(ValueError, match="global"):
    sp.magnitude_masks(_params(), 0.5, scope="global", distribution="erk")
