import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import AxisType

from jaxopt_dnn import parallel
from jaxopt_dnn.app import data, models
from _helpers import np_init

P = jax.P


# ---------------------------------------------------------------------------- meshes


def test_make_mesh_defaults_to_all_devices_on_data():
  mesh = parallel.make_mesh()
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert mesh.axis_types == (AxisType.Auto,) * 3


def test_make_mesh_fills_minus_one_and_sets_explicit_types():
  mesh = parallel.make_mesh(data=-1, fsdp=2, tensor=2, axis_type="explicit")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert mesh.axis_types == (AxisType.Explicit,) * 3


def test_make_mesh_on_one_device():
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  assert mesh.size == 1
  x = parallel.shard_batch(np.ones((3, 2), np.float32), mesh)
  assert x.shape == (3, 2)


def test_make_mesh_larger_than_devices_is_an_error():
  with pytest.raises(ValueError, match=r"needs 16 devices but only 8"):
    parallel.make_mesh(data=16)
  with pytest.raises(ValueError, match="at most one"):
    parallel.make_mesh(data=-1, fsdp=-1)
  with pytest.raises(ValueError, match="not divisible"):
    parallel.make_mesh(data=-1, fsdp=3)
  with pytest.raises(ValueError, match="axis_type"):
    parallel.make_mesh(axis_type="manual")


# ----------------------------------------------------------------------- rules


@given(st.lists(st.integers(1, 40), min_size=0, max_size=4), st.sampled_from([1, 2, 4, 8]))
def test_fsdp_spec_shards_the_largest_divisible_axis(shape, n):
  spec = parallel.fsdp_spec(shape, n)
  divisible = [d for d, s in enumerate(shape) if s % n == 0]
  if n == 1 or not divisible:
    assert spec == P()
    return
  (dim,) = [d for d, e in enumerate(spec) if e == "fsdp"]
  assert shape[dim] % n == 0
  assert shape[dim] == max(shape[d] for d in divisible)
  assert dim == max(d for d in divisible if shape[d] == shape[dim])  # ties: later axis


def _cnn_params():
  model = models.CNN(features=(8, 16), dense=32)
  return model, np_init(model, (1, 8, 8, 1))["params"]


def test_strategies_give_expected_specs():
  _, params = _cnn_params()
  mesh = parallel.make_mesh(data=1, fsdp=8)
  rep = parallel.param_shardings(params, mesh, "data_parallel")
  assert all(s.spec == P() for s in jax.tree.leaves(rep))
  fs = parallel.param_shardings(params, mesh, "fsdp")
  assert fs["Conv_0"]["kernel"].spec == P(None, None, None, "fsdp")  # (3, 3, 1, 8)
  assert fs["Dense_0"]["kernel"].spec == P("fsdp")                   # (1024, 32)
  assert fs["Dense_1"]["bias"].spec == P()                           # (10,): not divisible
  with pytest.raises(ValueError, match="strategy"):
    parallel.param_shardings(params, mesh, "zero3")


def test_regex_rules_win_and_are_validated():
  _, params = _cnn_params()
  mesh = parallel.make_mesh(data=2, fsdp=1, tensor=4)
  sh = parallel.param_shardings(params, mesh, "fsdp", {r"Dense_0/kernel": P(None, "tensor")})
  assert sh["Dense_0"]["kernel"].spec == P(None, "tensor")
  placed = jax.device_put(params, sh)
  assert placed["Dense_0"]["kernel"].addressable_shards[0].data.shape == (1024, 8)
  with pytest.raises(ValueError, match=r"Dense_0/kernel.*'model'.*not in the mesh axes"):
    parallel.param_shardings(params, mesh, rules={r"Dense_0/kernel": P(None, "model")})
  with pytest.raises(ValueError, match="match no leaf"):
    parallel.param_shardings(params, mesh, rules={r"Transformer": P()})
  with pytest.raises(ValueError, match=r"Dense_1/bias.*not divisible"):
    parallel.param_shardings(params, mesh, rules={r"Dense_1/bias": P("tensor")})
  with pytest.raises(TypeError, match="PartitionSpec"):
    parallel.param_shardings(params, mesh, rules={r"Dense_1/bias": "tensor"})


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QArray:
  """Stand-in with the layout of ``jaxopt_dnn.quant.QArray``: int8 value + scale."""
  value: jax.Array
  scale: jax.Array


def test_optimizer_state_masks_and_qarrays_follow_params():
  params = {"a": jnp.ones((32, 16)), "b": jnp.ones((16, 24)), "c": jnp.ones((3,))}
  mesh = parallel.make_mesh(data=1, fsdp=8)
  psh = parallel.param_shardings(params, mesh, "fsdp")
  assert psh["a"].spec == P("fsdp") and psh["b"].spec == P(None, "fsdp")

  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  state = {"params": params, "opt": opt.init(params),
           "masks": jax.tree.map(lambda x: jnp.ones(x.shape, bool), params),
           "step": jnp.zeros((), jnp.int32)}
  sh = parallel.state_shardings(state, params, mesh, "fsdp")
  adam = sh["opt"][1][0]
  for tree in (sh["params"], sh["masks"], adam.mu, adam.nu):
    assert jax.tree.map(lambda s: s.spec, tree) == jax.tree.map(lambda s: s.spec, psh)
  assert adam.count.spec == P() and sh["step"].spec == P()
  placed = jax.device_put(state, sh)  # the shardings are usable as they are
  assert placed["opt"][1][0].mu["a"].sharding.spec == P("fsdp")

  q = {"a": QArray(jnp.ones((32, 16), jnp.int8), jnp.ones((1, 16))),
       "b": QArray(jnp.ones((16, 24), jnp.int8), jnp.ones((1, 24))),
       "c": jnp.ones((3,))}
  qsh = parallel.like_params(q, params, psh)
  assert qsh["a"].value.spec == P("fsdp") and qsh["a"].scale.spec == P()
  assert qsh["b"].value.spec == P(None, "fsdp") and qsh["b"].scale.spec == P(None, "fsdp")
  jax.device_put(q, qsh)


def test_shard_batch_checks_divisibility():
  mesh = parallel.make_mesh(data=4, fsdp=2)
  x = parallel.shard_batch({"x": np.ones((16, 3), np.float32)}, mesh)["x"]
  assert x.sharding.spec == P(("data", "fsdp"))
  assert x.addressable_shards[0].data.shape == (2, 3)
  with pytest.raises(ValueError, match=r"'x'.*size 60 is not divisible by the 8 devices.*data=4 x fsdp=2"):
    parallel.shard_batch({"x": np.ones((60, 3), np.float32)}, mesh)


def test_initialize_distributed_after_arrays_exist_is_an_error():
  jnp.ones(1).block_until_ready()  # the backend is running in this process
  with pytest.raises(RuntimeError, match="before the XLA backend starts"):
    parallel.initialize_distributed("127.0.0.1:1", 2, 0, initialization_timeout=1)
  with pytest.raises(ValueError, match="num_processes and process_id are required"):
    parallel.initialize_distributed("127.0.0.1:1")
  with pytest.raises(ValueError, match="out of range"):
    parallel.initialize_distributed("127.0.0.1:1", 2, 2)


# ------------------------------------------------------- data-parallel equality

STEPS = 20


@pytest.fixture(scope="module")
def problem():
  model, params = _cnn_params()
  params = jax.device_get(params)
  ds = data.load_digits()
  it = data.infinite_batches(ds.x_train, ds.y_train, 64, seed=1)
  batches = [next(it) for _ in range(STEPS)]
  # SGD+momentum is linear in the gradients, so reduction-order rounding stays at ulp
  # level; Adam divides by sqrt(v) and turns ulp noise in near-zero gradient entries
  # into O(lr) differences, whatever the sharding.
  opt = optax.sgd(0.1, momentum=0.9)

  def loss_fn(p, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, x), y).mean()

  def step(state, batch):
    p, o = state
    loss, g = jax.value_and_grad(loss_fn)(p, batch)
    u, o = opt.update(g, o, p)
    return (optax.apply_updates(p, u), o), loss

  return params, batches, opt, loss_fn, step


def _train_jit(problem, mesh, strategy):
  params, batches, opt, _, step = problem
  state = jax.tree.map(np.array, (params, opt.init(params)))
  sharding = parallel.state_shardings(state, params, mesh, strategy)
  state = jax.device_put(state, sharding)
  fn = parallel.data_parallel_step(step, mesh, sharding)
  losses = []
  for b in batches:
    old = state
    state, loss = fn(state, parallel.shard_batch(b, mesh))
    losses.append(float(loss))
  assert jax.tree.leaves(old)[0].is_deleted()  # the state was donated
  return state[0], losses


@pytest.mark.slow
def test_data_parallel_forms_agree_with_one_device(problem):
  params, batches, opt, loss_fn, _ = problem
  one, losses = _train_jit(problem, parallel.make_mesh(devices=jax.devices()[:1]), "data_parallel")
  assert losses[-1] < 0.85 * losses[0]  # it trains
  dp, _ = _train_jit(problem, parallel.make_mesh(data=8), "data_parallel")
  fsdp, _ = _train_jit(problem, parallel.make_mesh(data=1, fsdp=8), "fsdp")
  assert fsdp["Conv_1"]["kernel"].sharding.spec == P(None, None, None, "fsdp")
  assert len(fsdp["Conv_1"]["kernel"].addressable_shards[0].data.shape) == 4
  assert fsdp["Conv_1"]["kernel"].addressable_shards[0].data.shape[-1] == 2

  mesh = parallel.make_mesh(data=8)
  step = parallel.shard_map_train_step(loss_fn, opt, mesh)
  p, o = jax.device_put(jax.tree.map(np.array, (params, opt.init(params))),
                        parallel.replicated(mesh))
  for b in batches:
    p, o, _ = step(p, o, parallel.shard_batch(b, mesh))

  ref = jax.device_get(one)
  for name, got in (("data=8", dp), ("fsdp=8", fsdp), ("shard_map", p)):
    jax.tree.map(lambda a, b, n=name: np.testing.assert_allclose(
        np.asarray(a), b, rtol=1e-5, atol=1e-6, err_msg=n), got, ref)


def test_real_qarrays_int8_and_packed_int4_follow_params():
  from jaxopt_dnn.quant import fake as quant
  params = {"a": jnp.linspace(-1, 1, 32 * 16).reshape(32, 16),
            "b": jnp.linspace(-1, 1, 16 * 24).reshape(16, 24)}
  mesh = parallel.make_mesh(data=2, fsdp=4)
  psh = parallel.param_shardings(params, mesh, "fsdp")
  assert psh["a"].spec == P("fsdp") and psh["b"].spec == P(None, "fsdp")
  q = {"a": quant.quantize(params["a"], bits=4, axis=1),   # value (16, 16) uint8, scale (1, 16)
       "b": quant.quantize(params["b"], bits=8, axis=1)}   # value (16, 24) int8, scale (1, 24)
  qsh = parallel.like_params(q, params, psh)
  assert q["a"].value.shape == (16, 16)
  assert qsh["a"].value.spec == P("fsdp") and qsh["a"].scale.spec == P()
  assert qsh["b"].value.spec == P(None, "fsdp") and qsh["b"].scale.spec == P(None, "fsdp")
  placed = jax.device_put(q, qsh)
  assert placed["a"].value.addressable_shards[0].data.shape == (4, 16)
