"""jd.Trainer / jd.fit on models written in other people's styles (tests/trainer_zoo.py)."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import jaxopt_dnn as jd
import trainer_zoo as zoo
from jaxopt_dnn import parallel, quant, sparsity

MLP_KERNELS = r"(mlp_in|mlp_out)_\d/kernel"


def _mesh1():
  return parallel.make_mesh(devices=jax.devices()[:1])


def _composed_lm(mesh, sharding):
  model, sample, _ = zoo.lm_case()
  trainer = jd.Trainer(model, zoo.next_token_loss, optax.adam(3e-3),
                       prune=dict(method="magnitude", sparsity=0.5, rules=MLP_KERNELS),
                       quant=dict(mode="qat"), precision="bf16", mesh=mesh, sharding=sharding,
                       eval_kwargs={"train": False})
  return trainer, trainer.init(jax.random.key(0), *sample)


@pytest.mark.slow
def test_composed_lm_step_fsdp_8_devices_agrees_with_1_device_and_serves_int8():
  """prune + QAT + bf16 + FSDP in one step on a boxed DenseGeneral LM with tied logits."""
  runs = {}
  for name, mesh, sharding in (("1", _mesh1(), "data_parallel"), ("fsdp8", None, "fsdp")):
    trainer, state = _composed_lm(mesh, sharding)
    history = []
    for i in range(4):
      state, metrics = trainer.step(state, zoo.lm_batch(i))
      history.append({k: float(v) for k, v in metrics.items()})
    runs[name] = (trainer, state, history)
  trainer, state, history = runs["fsdp8"]
  # FSDP really shards: the MLP kernel and its Adam moments live 1/8 per device
  k = state.params["mlp_in_0"]["kernel"]
  assert k.sharding.spec == P(None, "fsdp") and k.addressable_shards[0].data.shape == (32, 8)
  mu = state.opt_state.inner_state[0].mu["mlp_in_0"]["kernel"]
  assert mu.sharding.spec == P(None, "fsdp")
  assert history[-1]["loss"] < history[0]["loss"]
  assert all(h["tokens"] == float(zoo.lm_batch(i)["weights"].sum()) for i, h in enumerate(history))
  # 1 device and 8 devices agree (bf16 compute: loose tolerances, same trajectory)
  for a, b in zip(runs["1"][2], history):
    assert abs(a["loss"] - b["loss"]) < 2e-2 * abs(a["loss"])
  # Same trajectory: the two runs differ by much less than what training moved. (Not
  # elementwise: bf16 reductions in another order change near-zero gradients, e.g. of the
  # key bias, which softmax ignores, and Adam turns their noise into full-size steps; the
  # fp32 test below checks exact agreement.)
  init = jax.device_get(_composed_lm(_mesh1(), "data_parallel")[1].params)
  one = jax.device_get(runs["1"][1].params)
  moved = np.sqrt(sum(np.sum((np.asarray(a) - np.asarray(b)) ** 2)
                      for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(init))))
  apart = np.sqrt(sum(np.sum((np.asarray(a) - np.asarray(b)) ** 2)
                      for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(state.params))))
  assert apart < 0.2 * moved, (apart, moved)
  # exact sparsity on every pruned leaf, biases / embeddings / norms untouched
  for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    zeros = int((np.asarray(leaf) == 0).sum())
    if re.search(MLP_KERNELS, name):
      assert zeros == leaf.size // 2, name
    else:
      assert zeros < leaf.size // 4, name
  # serving: int8 dots, close to the fake-quant forward the model was trained with
  serve_fn, serve_vars = trainer.serve(state)
  x = zoo.lm_batch(99)["inputs"]
  out = np.asarray(serve_fn(serve_vars, x))
  fq = np.asarray(trainer.apply_fn({"params": state.params, **state.collections}, x,
                                   train=False), np.float32)
  census = quant.int8_dot_census(serve_fn, serve_vars, x)
  assert census.lowered.int8 >= 4     # the 4 MLP Dense layers at least
  assert np.abs(out - fq).max() <= 0.05 * np.abs(fq).max()


def _weighted_step(mesh, sharding, lm_params):
  model, sample, _ = zoo.lm_case()

  def loss(apply_fn, variables, batch, rng):   # deterministic forward: exact comparisons
    logits = apply_fn(variables, batch["inputs"], train=False)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.sum(ce * batch["weights"]) / jnp.sum(batch["weights"])

  trainer = jd.Trainer(model, loss, optax.sgd(0.5), mesh=mesh, sharding=sharding)
  state = trainer.init(jax.random.key(0), *sample, variables={"params": lm_params})
  batch = zoo.lm_batch(7)
  batch["weights"][:4] = 0.0       # the first devices' rows are all padding
  batch["weights"][4, :3] = 0.0
  state, metrics = trainer.step(state, batch)
  return float(metrics["loss"]), jax.device_get(state.params)


@pytest.mark.slow
def test_token_weighted_loss_and_grads_same_on_1_device_data8_fsdp8():
  model, sample, _ = zoo.lm_case()
  params = jax.device_get(nn_unbox(model.init(jax.random.key(1), *sample))["params"])
  ref_loss, ref = _weighted_step(_mesh1(), "data_parallel", params)
  moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(ref),
                                                          jax.tree.leaves(params)))
  assert moved > 1e-3        # the step did something
  for mesh, sharding in ((parallel.make_mesh(data=8), "data_parallel"),
                         (parallel.make_mesh(data=1, fsdp=8), "fsdp")):
    loss, got = _weighted_step(mesh, sharding, params)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    chex.assert_trees_all_close(got, ref, rtol=1e-4, atol=1e-6)


def nn_unbox(tree):
  import flax.linen as nn
  return nn.meta.unbox(tree)


def test_shard_map_step_with_weighted_pair_matches_global_ratio():
  mesh = parallel.make_mesh(data=8)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 3)).astype(np.float32)
  y = rng.normal(size=(16,)).astype(np.float32)
  w = np.zeros(16, np.float32)
  w[:5] = 1.0                 # devices 3..7 hold only padding
  params = {"w": np.ones(3, np.float32)}

  def pair(p, b):
    err = (b[0] @ p["w"] - b[1]) ** 2
    return jnp.sum(err * b[2]), jnp.sum(b[2])

  def mean(p, b):
    return pair(p, b)[0] / pair(p, b)[1]
  ref_loss, ref_grad = jax.value_and_grad(mean)(params, (x, y, w))
  step = parallel.shard_map_train_step(pair, optax.sgd(1.0), mesh, donate=False)
  p, _, loss = step(params, optax.sgd(1.0).init(params), parallel.shard_batch((x, y, w), mesh))
  assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
  np.testing.assert_allclose(np.asarray(p["w"]), params["w"] - ref_grad["w"], rtol=1e-5)


@pytest.mark.slow
def test_logical_axis_rules_shard_boxed_linen_and_nnx_params():
  mesh = parallel.make_mesh(data=2, fsdp=4)
  model, sample, _ = zoo.lm_case()
  trainer = jd.Trainer(model, zoo.next_token_loss, optax.adam(1e-3), mesh=mesh,
                       sharding=zoo.LOGICAL_RULES, eval_kwargs={"train": False})
  state = trainer.init(jax.random.key(0), *sample)
  p = state.params
  assert p["embed"]["embedding"].sharding.spec == P(None, "fsdp")
  assert p["attn_0"]["query"]["kernel"].sharding.spec == P("fsdp", None, None)
  assert p["mlp_in_0"]["kernel"].sharding.spec == P("fsdp", "tensor")
  assert p["attn_0"]["query"]["bias"].sharding.spec == P(None, None)
  assert state.opt_state[0].nu["mlp_out_1"]["kernel"].sharding.spec == P("tensor", "fsdp")
  state, _ = trainer.step(state, zoo.lm_batch(0))
  assert state.params["mlp_in_0"]["kernel"].sharding.spec == P("fsdp", "tensor")

  model, sample, _ = zoo.nnx_gemma_case()
  trainer = jd.Trainer(model, zoo.nnx_next_token_loss, optax.adam(1e-3), mesh=mesh,
                       sharding=zoo.LOGICAL_RULES)
  state = trainer.init(jax.random.key(0), *sample)
  assert state.params["blocks"][0]["q"]["kernel"].sharding.spec == P("fsdp", None, None)
  assert state.params["blocks"][1]["down"]["kernel"].sharding.spec == P("tensor", "fsdp")
  with pytest.raises(ValueError, match="not divisible"):
    jd.Trainer(zoo.lm_case()[0], zoo.next_token_loss, optax.sgd(0.1),
               mesh=parallel.make_mesh(fsdp=8), sharding=(("heads", "fsdp"),),
               eval_kwargs={"train": False}).init(jax.random.key(0), *sample)


def test_init_creates_fsdp_state_at_per_device_shapes():
  """The compiled init never materialises a whole FSDP-sharded leaf on one device."""
  import flax.linen as nn

  class Wide(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(10, name="head")(nn.relu(nn.Dense(1024, name="wide")(x)))

  trainer = jd.Trainer(Wide(), lambda f, v, b, r: jnp.mean(f(v, b)), optax.adam(1e-3),
                       sharding="fsdp")
  state = trainer.init(jax.random.key(0), np.zeros((1, 200), np.float32))
  assert state.params["wide"]["kernel"].addressable_shards[0].data.shape == (200, 128)
  assert state.opt_state[0].mu["wide"]["kernel"].sharding.spec == P(None, "fsdp")
  hlo = trainer.lower_init().compile().as_text()
  assert "f32[200,128]" in hlo
  assert "f32[200,1024]" not in hlo and "f32[204800]" not in hlo


@pytest.mark.slow
def test_nnx_gemma_qat_bf16_prune_logical_and_int8_serving():
  model, sample, make = zoo.nnx_gemma_case()
  trainer = jd.Trainer(model, zoo.nnx_next_token_loss, optax.adam(3e-3),
                       prune=dict(method="magnitude", sparsity=0.5, rules=r"(gate|up|down)/kernel"),
                       quant=dict(mode="qat"), precision="bf16",
                       mesh=parallel.make_mesh(data=2, fsdp=4), sharding=zoo.LOGICAL_RULES)
  state = trainer.init(jax.random.key(0), *sample)
  losses = []
  for i in range(4):
    state, m = trainer.step(state, make(i))
    losses.append(float(m["loss"]))
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
  for b in range(2):
    for name in ("gate", "up", "down"):
      k = np.asarray(state.params["blocks"][b][name]["kernel"])
      assert (k == 0).sum() == k.size // 2
    amax = float(state.collections["blocks"][b]["gate"]["quant_input_amax"])
    assert amax > 0       # QAT ranges were trained (start at -1 = unseen)
  serve_fn, serve_vars = trainer.serve(state)
  x = make(50)["inputs"]
  out = np.asarray(serve_fn(serve_vars, x))
  fq = np.asarray(trainer.module(state)(x), np.float32)
  assert quant.int8_dot_census(serve_fn, serve_vars, x).lowered.int8 >= 6
  assert np.abs(out - fq).max() <= 0.05 * np.abs(fq).max()


@pytest.mark.slow
def test_resnet_batchnorm_dropout_fit_over_an_iterable_resumes_exactly(tmp_path):
  model, sample, make = zoo.resnet_case()

  def trainer():
    return jd.Trainer(model, zoo.classification_loss, optax.adam(3e-3),
                      eval_kwargs={"train": False})

  def batches():      # a plain generator: read forward only
    return (make(i) for i in range(100))

  t = trainer()
  straight = jd.fit(t, t.init(jax.random.key(0), *sample), batches(), steps=6, log_every=3,
                    return_result=True)
  assert [h["step"] for h in straight.history] == [1, 3, 6]
  assert "accuracy" in straight.history[-1]
  bn = straight.state.collections["batch_stats"]["BatchNorm_0"]["mean"]
  assert float(jnp.abs(bn).max()) > 0          # the BatchNorm statistics were updated
  t = trainer()
  jd.fit(t, t.init(jax.random.key(0), *sample), batches(), steps=3, checkpoint_dir=tmp_path,
         save_every=3)
  t = trainer()
  resumed = jd.fit(t, t.init(jax.random.key(0), *sample), batches(), steps=6,
                   checkpoint_dir=tmp_path, save_every=3, return_result=True)
  assert resumed.resumed_from == 3
  chex.assert_trees_all_equal(resumed.state.params, straight.state.params)
  chex.assert_trees_all_equal(resumed.state.collections, straight.state.collections)
  t = trainer()
  with pytest.warns(UserWarning, match="ran out"):
    short = jd.fit(t, t.init(jax.random.key(0), *sample), (make(i) for i in range(2)), steps=5)
  assert int(short.step) == 2


def test_dropout_gets_a_fresh_key_every_step():
  model, sample, _ = zoo.lm_case()
  seen = []

  def loss(apply_fn, variables, batch, rng):
    jax.debug.callback(lambda k: seen.append(np.asarray(k)), jax.random.key_data(rng))
    return zoo.next_token_loss(apply_fn, variables, batch, rng)

  trainer = jd.Trainer(model, loss, optax.sgd(0.0), mesh=_mesh1(), eval_kwargs={"train": False})
  state = trainer.init(jax.random.key(0), *sample)
  batch = zoo.lm_batch(0)
  state, a = trainer.step(state, batch)
  state, b = trainer.step(state, batch)   # lr 0: same params, same batch, other dropout
  jax.effects_barrier()
  assert len(seen) == 2 and not np.array_equal(seen[0], seen[1])
  assert float(a["loss"]) != float(b["loss"])


def test_fp16_dynamic_loss_scale_reports_and_skips():
  model, sample, make = zoo.resnet_case()
  trainer = jd.Trainer(model, zoo.classification_loss, optax.sgd(0.1), precision="fp16",
                       loss_scale="dynamic", eval_kwargs={"train": False})
  state = trainer.init(jax.random.key(0), *sample)
  state, m = trainer.step(state, make(0))
  assert {"loss", "accuracy", "loss_scale", "grads_finite"} <= set(m)
  assert float(m["grads_finite"]) in (0.0, 1.0)
  bad = make(1)
  bad["image"][0, 0, 0, 0] = np.inf
  before = jax.device_get(state.params)
  state, m = trainer.step(state, bad)
  assert float(m["grads_finite"]) == 0.0
  chex.assert_trees_all_equal(jax.device_get(state.params), before)   # the step was skipped


def test_trainer_rejects_bad_arguments_by_name():
  model, sample, _ = zoo.lm_case()
  with pytest.raises(TypeError, match="model"):
    jd.Trainer("resnet", zoo.next_token_loss, optax.sgd(0.1))
  with pytest.raises(TypeError, match="optimizer"):
    jd.Trainer(model, zoo.next_token_loss, "adam")
  with pytest.raises(ValueError, match="unknown keys.*sparsty"):
    jd.Trainer(model, zoo.next_token_loss, optax.sgd(0.1), prune=dict(sparsty=0.5))
  with pytest.raises(ValueError, match="quant.mode"):
    jd.Trainer(model, zoo.next_token_loss, optax.sgd(0.1), quant=dict(mode="int3"))
  with pytest.raises(ValueError, match="sharding"):
    jd.Trainer(model, zoo.next_token_loss, optax.sgd(0.1), sharding="zero3")
  with pytest.raises(ValueError, match="loss_scale"):
    jd.Trainer(model, zoo.next_token_loss, optax.sgd(0.1), loss_scale="auto")
  trainer = jd.Trainer(model, lambda *a: (1.0, 2.0), optax.sgd(0.1), eval_kwargs={"train": False})
  with pytest.raises(ValueError, match="init"):
    trainer.step(None, zoo.lm_batch(0))
  state = trainer.init(jax.random.key(0), *sample)
  with pytest.raises(TypeError, match="aux_dict"):
    trainer.step(state, zoo.lm_batch(0))
  with pytest.raises(ValueError, match="not divisible"):
    trainer.step(state, {k: v[:3] for k, v in zoo.lm_batch(0).items()})


@pytest.mark.parametrize("case", ["linen_lm", "nnx_gemma"])
def test_bf16_policy_puts_every_dot_of_the_train_step_in_bf16(case):
  """Forward and backward, including layers written with an explicit dtype=float32."""
  from jaxopt_dnn import precision
  if case == "linen_lm":
    (model, sample, make), loss, kw = zoo.lm_case(), zoo.next_token_loss, {
        "eval_kwargs": {"train": False}}
  else:
    (model, sample, make), loss, kw = zoo.nnx_gemma_case(), zoo.nnx_next_token_loss, {}
  trainer = jd.Trainer(model, loss, optax.adam(1e-3), precision="bf16", mesh=_mesh1(), **kw)
  state = trainer.init(jax.random.key(0), *sample)
  with jax.set_mesh(trainer.mesh):
    census = precision.compute_census(trainer.jitted_step, state,
                                      trainer.place_batch(make(0)), policy="bf16")
  assert census.ok and sum(census.ops.values()) > 20, census.summary()
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
