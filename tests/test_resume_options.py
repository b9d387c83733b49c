"""Resume through ``jd.fit(..., checkpoint_dir=...)`` with every Trainer option that
changes the train state: the interrupted-and-resumed run equals the uninterrupted one
exactly (every leaf of the state, typed PRNG keys included).

Options (all combinations): pruning (the masks and a typed PRNG key in ``opt_state``),
QAT (activation ranges in ``collections``), precision (``bf16``; ``fp16`` with a dynamic
loss scale in the state), and the mesh (data parallel over 8 devices; FSDP over 2).
Tiny MLP with dropout, 2 + 2 steps.
"""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxopt_dnn as jd
from jaxopt_dnn import checkpoint, parallel


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dropout(0.25, deterministic=not train)(nn.relu(nn.Dense(16)(x)))
    return nn.Dense(4)(x)


def _loss(apply_fn, variables, batch, rng):
  logits = apply_fn(variables, batch["x"], train=True)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def _batch(step):   # random access: step -> batch (deterministic)
  r = np.random.default_rng(step)
  return {"x": r.normal(size=(8, 12)).astype(np.float32),
          "y": r.integers(0, 4, 8).astype(np.int32)}


PRUNE = {"none": None,
         "magnitude": dict(method="magnitude", sparsity=0.5, rules=r"Dense_0/kernel"),
         "random-gradual": dict(method="random", sparsity=0.5, schedule="polynomial", end=4,
                                update_every=1)}
QUANT = {"none": None, "qat": dict(mode="qat", bits=8)}
PRECISION = {"f32": {}, "bf16": dict(precision="bf16"),
             "fp16-dynamic": dict(precision="fp16", loss_scale="dynamic")}
MESH = {"data8": {}, "fsdp2": dict(sharding="fsdp")}
# Every pair of option values appears in one of these (a covering array), plus the README
# quick start's combination and a random gradual mask schedule (the key is used each step).
PAIRWISE = {("none", "none", "f32", "data8"), ("magnitude", "qat", "f32", "fsdp2"),
            ("none", "qat", "bf16", "fsdp2"), ("magnitude", "none", "bf16", "data8"),
            ("magnitude", "none", "fp16-dynamic", "fsdp2"), ("none", "qat", "fp16-dynamic", "data8"),
            ("magnitude", "qat", "bf16", "fsdp2"), ("random-gradual", "qat", "bf16", "fsdp2")}
# The rest of the full product: slow (each case compiles its own init and step).
CASES = [c if c in PAIRWISE else pytest.param(*c, marks=pytest.mark.slow)
         for c in itertools.product(PRUNE, QUANT, PRECISION, MESH)
         if c[0] != "random-gradual" or c in PAIRWISE]


def _plain(tree):
  return jax.device_get(checkpoint.unwrap_keys(tree))


@pytest.mark.parametrize("prune,quant,prec,mesh", CASES,
                         ids=lambda v: v if isinstance(v, str) else None)
@pytest.mark.slow
def test_fit_resumes_exactly_with_every_state_changing_option(tmp_path, prune, quant, prec,
                                                               mesh):
  kw = dict(PRECISION[prec])
  if mesh == "fsdp2":
    kw.update(MESH[mesh], mesh=parallel.make_mesh(data=1, fsdp=2, devices=jax.devices()[:2]))
  trainer = jd.Trainer(_MLP(), _loss, optax.adam(1e-2), prune=PRUNE[prune],
                       quant=QUANT[quant], eval_kwargs={"train": False}, **kw)
  state0 = trainer.init(jax.random.key(0), np.zeros((1, 12), np.float32))
  init = lambda: jax.tree.map(lambda a: a.copy(), state0)   # noqa: E731 - the step donates
  straight = jd.fit(trainer, init(), _batch, steps=4, progress=False)
  jd.fit(trainer, init(), _batch, steps=2, checkpoint_dir=tmp_path, save_every=2,
         progress=False)
  resumed = jd.fit(trainer, init(), _batch, steps=4, checkpoint_dir=tmp_path, save_every=2,
                   progress=False, return_result=True)
  assert resumed.resumed_from == 2
  got, want = _plain(resumed.state), _plain(straight)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  # the typed keys came back typed, of the same implementation, where the state had them
  for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(straight)):
    assert a.dtype == b.dtype and a.sharding.is_equivalent_to(b.sharding, a.ndim)
  if prune != "none":
    key = resumed.state.opt_state.key
    assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)


def test_typed_keys_anywhere_in_the_tree_round_trip_onto_their_target(tmp_path):
  mesh = jax.make_mesh((8,), ("x",))
  sharded = jax.sharding.NamedSharding(mesh, jax.P("x"))
  state = {"k": jax.random.key(3), "nested": [jax.random.key(4, impl="rbg"),
                                               {"w": np.arange(3, dtype=np.float32)}],
           "ks": jax.device_put(jax.random.split(jax.random.key(5), 8), sharded)}
  checkpoint.save(tmp_path, 1, state)
  raw, _, _ = checkpoint.restore(tmp_path)           # no target: the raw key data
  assert raw["k"].dtype == np.uint32 and raw["nested"][0].shape == (4,)
  got, _, _ = checkpoint.restore(tmp_path, checkpoint.abstract_like(state))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(state)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(_plain(a), _plain(b))
  assert jax.random.key_impl(got["nested"][0]) == jax.random.key_impl(state["nested"][0])
  assert got["ks"].sharding.is_equivalent_to(sharded, 1)
  bad = {**state, "k": jax.random.key(3, impl="rbg")}   # other key shape: named, not a crash
  with pytest.raises(ValueError, match=r"k: checkpoint \(2,\) uint32 vs target \(4,\) uint32"):
    checkpoint.restore(tmp_path, bad)
