"""jd.Trainer on the real upstream model files (tests/thirdparty), with tiny configs.

flax lm1b ``TransformerLM`` (dropout switched on by its config), flax imagenet
``ResNet`` (BatchNorm written for pmap: ``axis_name="batch"``), flax gemma (NNX, dropout
through call-time ``rngs``), big_vision ViT (returns ``(logits, out_dict)``), and small
modules for the rng-stream and bare-``nnx.Param`` cases.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxopt_dnn as jd
import thirdparty as tp
import trainer_zoo as zoo
from jaxopt_dnn import parallel, quant

F32 = jnp.float32
STEPS = 6


def _mesh1():
  return parallel.make_mesh(devices=jax.devices()[:1])


def _composed(model, loss, rules, sample, batches, **kw):
  """prune 50% + QAT + bf16, on 1 device and FSDP over 8; the same seed and batches
  (one batch, repeated: the loss must fall on it despite the dropout noise)."""
  runs = {}
  for name, mesh, sharding in (("1", _mesh1(), "data_parallel"), ("8", None, "fsdp")):
    trainer = jd.Trainer(model, loss, optax.adam(1e-2),
                         prune=dict(method="magnitude", sparsity=0.5, rules=rules),
                         quant=dict(mode="qat"), precision="bf16", mesh=mesh,
                         sharding=sharding, donate=False, **kw)
    state0 = trainer.init(jax.random.key(0), *sample)
    state, losses = state0, []
    for b in batches:
      state, m = trainer.step(state, b)
      losses.append(float(m["loss"]))
    runs[name] = dict(trainer=trainer, state0=state0, state=state, losses=losses)
  return runs


# bf16 compute: a reduction split over 8 shards rounds in another order (bf16 keeps 8
# mantissa bits, 2^-8 = 0.4% per rounding), and Adam's first steps have size ~lr whatever
# the gradient's size, so tiny gradient differences become visible in later losses. The
# largest 1-vs-8 gap measured over 6 steps was 2.8e-4 of the loss (gemma; lm1b 1.4e-4,
# ResNet 4.7e-5); 5e-3 leaves a 15x margin and is far below what training moved (> 6%).
REL_TOL = 5e-3


def _check_composed(runs, rules):
  one, eight = runs["1"], runs["8"]
  print("losses 1 device", one["losses"], "8 devices", eight["losses"])
  assert eight["losses"][-1] < eight["losses"][0], eight["losses"]
  for a, b in zip(one["losses"], eight["losses"]):
    assert abs(a - b) <= REL_TOL * abs(a), (one["losses"], eight["losses"])
  pruned = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(eight["state"].params):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    if re.search(rules, name):
      assert int((np.asarray(leaf) == 0).sum()) == leaf.size // 2, name
      pruned += 1
  assert pruned >= 2
  # the FSDP run really shards: some param is split 8 ways
  assert any(x.addressable_shards[0].data.size * 8 == x.size
             for x in jax.tree.leaves(eight["state"].params))


def _check_fresh_rng(run, batch):
  """The step's random draws come from ``state.rng``, which every step advances."""
  trainer, s0, s1 = run["trainer"], run["state0"], run["state"]
  assert not np.array_equal(np.asarray(s0.rng), np.asarray(s1.rng))
  _, a = trainer.step(s0, batch)
  _, b = trainer.step(s0, batch)                        # same state: reproduced exactly
  _, c = trainer.step(s0.replace(rng=s1.rng), batch)   # same params, later step's key
  assert float(a["loss"]) == float(b["loss"])
  assert float(a["loss"]) != float(c["loss"])


# --------------------------------------------------------------------- flax lm1b
LM1B_MLP = r"MlpBlock_0/Dense_\d/kernel"


def _lm1b_model():
  m = tp.lm1b()
  cfg = m.TransformerConfig(vocab_size=64, output_vocab_size=64, emb_dim=16, num_heads=2,
                            num_layers=1, qkv_dim=16, mlp_dim=32, max_len=16,
                            dropout_rate=0.1, attention_dropout_rate=0.1,
                            deterministic=False, logits_via_embedding=True)
  return m.TransformerLM(cfg)


def lm1b_loss(apply_fn, variables, batch, rng):
  """As flax's lm1b train step: the model predicts its (internally shifted) inputs; the
  dropout is on by the config, so the call passes no train flag and no rngs."""
  del rng
  logits = apply_fn(variables, batch["inputs"]).astype(F32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["inputs"])
  return jnp.sum(ce * batch["weights"]) / jnp.sum(batch["weights"])


@pytest.fixture(scope="module")
def lm1b_runs():
  return _composed(_lm1b_model(), lm1b_loss, LM1B_MLP, (np.zeros((1, 16), np.int32),),
                   [zoo.lm_batch(0)] * STEPS)


@pytest.mark.slow
def test_lm1b_with_dropout_composed_step_8_devices_agrees_with_1(lm1b_runs):
  _check_composed(lm1b_runs, LM1B_MLP)
  _check_fresh_rng(lm1b_runs["8"], zoo.lm_batch(0))
  # serving: the config keeps dropout on, so the serve forward gets fixed keys (a
  # deterministic function), with int8 dots
  run = lm1b_runs["8"]
  serve_fn, serve_vars = run["trainer"].serve(run["state"])
  x = zoo.lm_batch(9)["inputs"]
  a, b = np.asarray(serve_fn(serve_vars, x)), np.asarray(serve_fn(serve_vars, x))
  assert a.dtype == np.float32 and np.isfinite(a).all() and np.array_equal(a, b)
  assert quant.int8_dot_census(serve_fn, serve_vars, x).lowered.int8 >= 2


# --------------------------------------------------------------- flax imagenet ResNet
RESNET_CONVS = r"ResNetBlock_\d/Conv_\d/kernel"


@pytest.fixture(scope="module")
def resnet_runs():
  m = tp.imagenet()
  model = m.ResNet(stage_sizes=[1, 1], block_cls=m.ResNetBlock, num_classes=4, num_filters=4)
  return _composed(model, zoo.classification_loss, RESNET_CONVS,
                   (np.zeros((1, 8, 8, 1), np.float32),),
                   [zoo.image_batch(0)] * STEPS, eval_kwargs={"train": False})


@pytest.mark.slow
def test_resnet_batchnorm_composed_step_8_devices_agrees_with_1(resnet_runs):
  """BatchNorm(axis_name="batch") in the global-view step: its statistics cover the
  whole batch, so 8 shards of 2 images give the 1-device trajectory."""
  _check_composed(resnet_runs, RESNET_CONVS)
  for name in ("1", "8"):
    bs = resnet_runs[name]["state"].collections["batch_stats"]["bn_init"]
    assert float(jnp.abs(bs["mean"]).max()) > 0       # running statistics were updated
  np.testing.assert_allclose(
      np.asarray(resnet_runs["1"]["state"].collections["batch_stats"]["bn_init"]["mean"]),
      np.asarray(resnet_runs["8"]["state"].collections["batch_stats"]["bn_init"]["mean"]),
      rtol=REL_TOL, atol=1e-3)


# ------------------------------------------------------------------ flax gemma (NNX)
GEMMA_MLP = r"mlp/(gate|up|down)_proj/kernel"


def _gemma_inputs(tokens):
  b, t = tokens.shape
  positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
  mask = np.broadcast_to(np.tril(np.ones((t, t), bool)), (b, t, t))
  return tokens, positions, None, mask


def gemma_loss(model, batch, rng):
  """Gemma's dropout takes its keys at call time: the user passes the step's rng."""
  logits, _ = model(*_gemma_inputs(batch["inputs"]), rngs=nnx.Rngs(dropout=rng))
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(F32), batch["targets"])
  return jnp.sum(ce * batch["weights"]) / jnp.sum(batch["weights"])


@pytest.fixture(scope="module")
def gemma_runs():
  g = tp.gemma()
  kinds = g.modules.AttentionType
  cfg = g.TransformerConfig(num_layers=1, num_embed=64, embed_dim=16, hidden_dim=32,
                            num_heads=2, head_dim=8, num_kv_heads=1, final_logit_softcap=None,
                            use_post_attn_norm=False, use_post_ffw_norm=False,
                            attention_types=(kinds.GLOBAL,), dropout_rate=0.1)
  model = g.Transformer(cfg, rngs=nnx.Rngs(0))
  return _composed(model, gemma_loss, GEMMA_MLP, (), [zoo.lm_batch(0)] * STEPS)


@pytest.mark.slow
def test_nnx_gemma_composed_step_8_devices_agrees_with_1(gemma_runs):
  _check_composed(gemma_runs, GEMMA_MLP)
  _check_fresh_rng(gemma_runs["8"], zoo.lm_batch(0))


# --------------------------------------------------------- big_vision ViT: tuple output
def vit_loss(apply_fn, variables, batch, rng):
  del rng
  logits, _ = apply_fn(variables, batch["image"], train=True)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


@pytest.mark.slow
def test_vit_serve_returns_the_output_pytree_in_int8_close_to_fake_quant():
  vit = tp.big_vision_vit()
  model = vit.Model(num_classes=4, variant=None, width=16, depth=1, mlp_dim=32, num_heads=2,
                    patch_size=(4, 4))
  trainer = jd.Trainer(model, vit_loss, optax.adam(1e-2), quant=dict(mode="qat"),
                       mesh=_mesh1(), eval_kwargs={"train": False})
  state = trainer.init(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32))
  for i in range(3):
    state, _ = trainer.step(state, zoo.image_batch(i))
  serve_fn, serve_vars = trainer.serve(state)
  x = zoo.image_batch(50)["image"]
  logits, out = serve_fn(serve_vars, x)
  assert logits.shape == (16, 4) and "pre_logits" in out
  assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves((logits, out)))
  fq_logits, _ = trainer.apply_fn({"params": state.params, **state.collections}, x,
                                  train=False)
  fq = np.asarray(fq_logits, np.float32)
  assert np.abs(fq).max() > 0          # the zero-initialised head has trained
  assert np.abs(np.asarray(logits) - fq).max() <= 0.05 * np.abs(fq).max()
  assert quant.int8_dot_census(serve_fn, serve_vars, x).lowered.int8 >= 3


# ---------------------------------------------------------- NNX bare nnx.Param serve
class BareParam(nnx.Module):
  def __init__(self, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (4, 3)) / 2.0)

  def __call__(self, x):
    return x @ self.w


def _regression_batch(seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(16, 4)).astype(np.float32)
  return {"x": x, "y": (x @ np.arange(12.0).reshape(4, 3) / 10).astype(np.float32)}


@pytest.mark.slow
def test_nnx_bare_param_qat_trains_then_serves_int8():
  """The QAT range of ``self.w`` is ``quant_w_input_amax`` (not ``quant_input_amax``):
  serving derives the plain module's collections from the module itself."""
  def loss(model, batch, rng):
    del rng
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)

  trainer = jd.Trainer(BareParam(nnx.Rngs(0)), loss, optax.adam(3e-2), quant=dict(mode="qat"),
                       mesh=_mesh1())
  state = trainer.init(jax.random.key(0))
  losses = []
  for i in range(4):
    state, m = trainer.step(state, _regression_batch(i))
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0]
  assert float(state.collections["quant_w_input_amax"]) > 0
  serve_fn, serve_vars = trainer.serve(state)
  x = _regression_batch(9)["x"]
  out = np.asarray(serve_fn(serve_vars, x))
  fq = np.asarray(trainer.module(state)(x))
  assert quant.int8_dot_census(serve_fn, serve_vars, x).lowered.int8 == 1
  assert np.abs(out - fq).max() <= 0.05 * np.abs(fq).max()


# ------------------------------------------------------------- any named rng stream
class Noisy(nn.Module):
  """Draws from its own ``"noise"`` stream while training (not ``"dropout"``)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Dense(8)(x)
    if train:
      h = h + 0.5 * jax.random.normal(self.make_rng("noise"), h.shape)
    return nn.Dense(3)(nn.relu(h))


class HeldDropout(nnx.Module):
  """NNX dropout holding its own stream (``nnx.Dropout(rate, rngs=rngs)``)."""

  def __init__(self, rngs):
    self.fc = nnx.Linear(4, 16, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.out = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(self.drop(nnx.relu(self.fc(x))))


def test_every_rng_stream_is_fresh_per_step_and_reproducible():
  batch = _regression_batch(0)

  def linen_loss(apply_fn, variables, b, rng):
    del rng
    return jnp.mean((apply_fn(variables, b["x"], train=True) - b["y"]) ** 2)

  def nnx_loss(model, b, rng):
    del rng
    return jnp.mean((model(b["x"]) - b["y"]) ** 2)

  cases = ((Noisy(), linen_loss, dict(quant=dict(mode="qat"), eval_kwargs={"train": False})),
           (HeldDropout(nnx.Rngs(0)), nnx_loss, {}))
  for model, loss, kw in cases:
    trainer = jd.Trainer(model, loss, optax.sgd(0.1), mesh=_mesh1(), donate=False, **kw)
    s0 = trainer.init(jax.random.key(0), np.zeros((1, 4), np.float32))
    s1, _ = trainer.step(s0, batch)
    _check_fresh_rng(dict(trainer=trainer, state0=s0, state=s1), batch)
    serve_fn, serve_vars = trainer.serve(s1)
    y = np.asarray(serve_fn(serve_vars, batch["x"]))     # inference: no draws
    assert y.shape == (16, 3) and np.array_equal(y, np.asarray(serve_fn(serve_vars,
                                                                        batch["x"])))


def test_qat_model_init_gives_every_rng_stream_to_its_ranges_pass():
  """``quant.qat(model).init`` on the real lm1b LM with dropout on by config: the ranges
  pass runs the model again and needs init's keys (it raised InvalidRngError before)."""
  from jaxopt_dnn.quant.qat import QatModel
  from jaxopt_dnn.quant.stats import STATS
  lm1b = tp.lm1b()
  cfg = lm1b.TransformerConfig(vocab_size=32, output_vocab_size=32, emb_dim=8, num_heads=2,
                               num_layers=1, qkv_dim=8, mlp_dim=16, max_len=8,
                               dropout_rate=0.5, attention_dropout_rate=0.5,
                               deterministic=False)
  x = jnp.ones((2, 8), jnp.int32)
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  v = jax.jit(QatModel(lm1b.TransformerLM(cfg)).init)(rngs, x)
  amax = jax.tree.leaves(v[STATS])
  assert amax and all(bool(jnp.all(a > 0)) for a in amax)
