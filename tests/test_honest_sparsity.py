"""Role-aware pruning on third-party models: defaults, N:M along contractions, BN channels, NNX."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import zoo_thirdparty as zoo
from jaxopt_dnn import _tree, roles, sparsity


def _lm():
  model, inputs = zoo.linen_lm(layers=1)
  v = nn.unbox(model.init(jax.random.key(0), *inputs))
  return model, inputs, v


def test_default_masks_leave_biases_norms_and_embeddings_dense():
  _, _, v = _lm()
  masks = sparsity.magnitude_masks(v["params"], 0.5)
  pruned = {p for p, m in _tree.leaves_with_paths(masks) if not sparsity.is_dense(m)}
  assert pruned == {f"layer_0/{n}/kernel" for n in ("query", "key", "value", "out", "wi", "wo")}


def test_traced_roles_match_and_select_kernels():
  model, inputs, v = _lm()
  r = roles.trace(model, v, *inputs)
  assert r["params/layer_0/query/bias"].role == "bias"          # (heads, head_dim): 2-D
  assert r["params/embed/embedding"].role == "embedding"        # lookup + tied attend
  assert r["params/layer_0/ln_attn/scale"].role == "scale"
  assert r["params/layer_0/out/kernel"].contracting == (0, 1)
  masks = sparsity.magnitude_masks(v["params"], 0.5, rules=roles.kernels(r))
  pruned = {p for p, m in _tree.leaves_with_paths(masks) if not sparsity.is_dense(m)}
  assert pruned == {f"layer_0/{n}/kernel" for n in ("query", "key", "value", "out", "wi", "wo")}


def test_2_4_masks_run_along_the_contraction_axes():
  model, inputs, v = _lm()
  r = roles.trace(model, v, *inputs)
  masks = sparsity.nm_masks(v["params"], 2, 4, roles=r)
  for name in ("query", "key", "value"):          # (embed, heads, head_dim): groups along embed
    m = np.asarray(masks["layer_0"][name]["kernel"])
    groups = m.reshape(m.shape[0] // 4, 4, -1)
    assert (groups.sum(axis=1) == 2).all()
    # not the heads axis: the legacy axis=-2 default gives a different pattern
    assert not np.array_equal(m, np.asarray(
        sparsity.nm_masks(v["params"], 2, 4, axis=-2)["layer_0"][name]["kernel"]))
  out = np.asarray(masks["layer_0"]["out"]["kernel"])        # contracted over (heads, head_dim)
  flat = out.reshape(-1, out.shape[-1])
  assert (flat.reshape(-1, 4, out.shape[-1]).sum(axis=1) == 2).all()
  conv_model, (x,) = zoo.linen_resnet()
  cv = conv_model.init(jax.random.key(0), x)
  cr = roles.trace(conv_model, cv, x)
  cm = sparsity.nm_masks(cv["params"], 2, 4, roles=cr, rules="block_0/conv1/kernel")
  k = np.asarray(cm["block_0"]["conv1"]["kernel"])          # HWIO: groups along I
  assert (k.reshape(3, 3, -1, 4, 8).sum(axis=3) == 2).all()


def test_channel_masks_zero_the_following_batchnorm():
  model, (x,) = zoo.linen_resnet()
  v = model.init(jax.random.key(0), x)
  stats = jax.tree.map(lambda a: a + 0.3, v["batch_stats"])   # nonzero running mean
  v = {"params": v["params"], "batch_stats": stats}
  r = roles.trace(model, v, x)
  masks = sparsity.channel_masks(v["params"], 0.5, rules=r"stem/kernel", roles=r)
  keep = np.asarray(masks["stem"]["kernel"])[0, 0, 0]
  assert (np.asarray(masks["bn_stem"]["scale"]) == keep).all()
  assert (np.asarray(masks["bn_stem"]["bias"]) == keep).all()
  masked = {"params": sparsity.apply_masks(v["params"], masks), "batch_stats": stats}
  _, inter = model.apply(masked, x, capture_intermediates=True, mutable=["intermediates"])
  bn_out = np.asarray(inter["intermediates"]["bn_stem"]["__call__"][0])
  assert (bn_out[..., ~keep] == 0).all() and (bn_out[..., keep] != 0).any()
  plain = sparsity.channel_masks(v["params"], 0.5, rules=r"stem/kernel")   # without roles
  assert sparsity.is_dense(plain["bn_stem"]["bias"])


def test_nnx_optimizer_masks_work_with_report_pack_apply():
  model, (x,) = zoo.nnx_mha()
  tx = sparsity.prune_optimizer(optax.sgd(0.1), lambda s: 0.5)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(m, o):
    g = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(m)
    o.update(m, g)

  step(model, opt)
  masks = sparsity.masks_from_state(opt.opt_state)
  assert not any(isinstance(m, nnx.Variable) for m in
                 jax.tree.leaves(masks, is_leaf=lambda z: isinstance(z, nnx.Variable)))
  params = nnx.state(model, nnx.Param)
  rep = sparsity.sparsity_report(params, masks)
  assert abs(rep.pruned_sparsity - 0.5) < 0.01
  masked = sparsity.apply_masks(params, masks)
  assert jax.tree.structure(masked) == jax.tree.structure(params)
  packed = sparsity.pack(params, masks)
  for a, b in zip(jax.tree.leaves(sparsity.unpack(packed)), jax.tree.leaves(masked)):
    np.testing.assert_array_equal(a, b)
