"""Masks of FSDP-sharded kernels: computed shard-locally, equal to the unsharded ones."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from jaxopt_dnn import sparsity as sp


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Explicit,))


def _params():
  rng = np.random.default_rng(0)
  return {"kernel": jnp.asarray(rng.normal(size=(256, 64)), jnp.float32),
          "other": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)}


def _collectives(hlo: str) -> list[tuple[str, str]]:
  """(result type, op) of every cross-device collective in optimized HLO."""
  return re.findall(r"= (\([^)]*\)|\w+\[[\d,]*\])\S* (all-reduce|all-gather|all-to-all|"
                    r"collective-permute|reduce-scatter)", hlo)


def _is_scalar_type(t: str) -> bool:
  """``s32[]`` or a tuple of scalars like ``(s32[], s32[])``."""
  return all(dims == "" for dims in re.findall(r"\[([\d,]*)\]", t))


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_fsdp_sharded_magnitude_masks_do_not_gather_the_kernel(mesh, scope):
  params = _params()
  shard = {"kernel": NamedSharding(mesh, jax.P("fsdp", None)),
           "other": NamedSharding(mesh, jax.P(None, "fsdp"))}
  sharded = jax.device_put(params, shard)
  fn = jax.jit(lambda p, s: sp.magnitude_masks(p, s, scope=scope),
               out_shardings=shard)
  compiled = fn.lower(sharded, 0.7).compile()
  hlo = compiled.as_text()
  collectives = _collectives(hlo)
  # Only scalar counts cross devices: no all-gather of any kernel.
  assert collectives and all(_is_scalar_type(t) and op == "all-reduce" for t, op in collectives), collectives
  assert "sort" not in hlo          # no argsort of the weights
  got = fn(sharded, 0.7)
  assert got["kernel"].sharding.spec == jax.P("fsdp", None)
  want = sp.magnitude_masks(params, 0.7, scope=scope)
  chex.assert_trees_all_equal(got, want)


def test_nm_masks_of_sharded_kernel_stay_local(mesh):
  k = jax.device_put(_params()["kernel"], NamedSharding(mesh, jax.P(None, "fsdp")))
  fn = jax.jit(lambda k: sp.nm_masks({"k": k}, 2, 4, axis=0)["k"])
  hlo = fn.lower(k).compile().as_text()
  assert "all-gather" not in hlo
  np.testing.assert_array_equal(fn(k), sp.nm_masks({"k": np.asarray(k)}, 2, 4, axis=0)["k"])
