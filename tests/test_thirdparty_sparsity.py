"""Pruning on the real upstream models (tests/thirdparty, unchanged files, tiny configs).

* flax examples WMT encoder-decoder: 2:4 along the contraction of every
  ``MultiHeadDotProductAttention`` kernel (q/k/v ``(embed, heads, head_dim)``, out
  ``(heads, head_dim, embed)``), with 4 and 6 heads;
* flax examples ImageNet ResNet: channel pruning through BatchNorm (eval and train mode,
  random running statistics), residual adds, and ``shrink_channels`` == masked forward;
* big_vision ViT with ``scan=True``: masks on ``(depth, ...)``-stacked kernels.

The expected contraction axes below are written from the upstream layer definitions
(flax ``DenseGeneral`` puts the contracted axes first), not read from the library.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import thirdparty as tp
from jaxopt_dnn import Trainer, _tree, roles, sparsity


def _random_variables(init, seed=0):
  """Variables with the shapes of ``init()`` (traced abstractly, nothing compiled), filled
  with random values: weights ``N(0, 0.2^2)``, variances in ``[0.5, 2]``, and
  non-trivial running means and BatchNorm scales / biases ``N(0.5, 1)``."""
  rng = np.random.default_rng(seed)

  def fill(path, a):
    name = _tree.path_str(path)
    if name.endswith("/var"):
      return rng.uniform(0.5, 2.0, a.shape).astype(a.dtype)
    if name.endswith("/mean") or "norm" in name.lower() or "bn_init" in name:
      return rng.normal(0.5, 1.0, a.shape).astype(a.dtype)
    return (0.2 * rng.normal(size=a.shape)).astype(a.dtype)
  return jax.tree_util.tree_map_with_path(fill, jax.eval_shape(init))


# ------------------------------------------------------------------------------- WMT
def _wmt(heads, qkv_dim):
  wmt = tp.wmt()
  cfg = wmt.TransformerConfig(vocab_size=32, output_vocab_size=32, emb_dim=24,
                              num_heads=heads, num_layers=1, qkv_dim=qkv_dim, mlp_dim=32,
                              max_len=16, deterministic=True)
  model = wmt.Transformer(cfg)
  x = np.asarray(jax.random.randint(jax.random.key(1), (2, 8), 1, 32), np.int32)
  v = _random_variables(lambda: model.init(jax.random.key(0), x, x))
  return model, x, v, roles.trace(model.apply, v, x, x)


@pytest.fixture(scope="module", params=[(4, 16), (6, 36)], ids=["4heads", "6heads"])
def wmt(request):
  return _wmt(*request.param)


def _attention_kernels(params):
  return {p: np.asarray(x) for p, x in _tree.leaves_with_paths(params)
          if "MultiHeadDotProductAttention" in p and p.endswith("kernel")}


def _as_km(x, path):
  """The ``(K, N)`` matrix of an upstream attention kernel (contracted axes first)."""
  n_in = 2 if "/out/" in path else 1
  return x.reshape(int(np.prod(x.shape[:n_in])), -1)


def test_wmt_2_4_runs_along_the_contraction_of_every_attention_kernel(wmt):
  model, x, v, r = wmt
  masks = sparsity.nm_masks(v["params"], 2, 4, roles=r, rules=roles.kernels(r))
  kernels = _attention_kernels(v["params"])
  flat = dict(_tree.leaves_with_paths(masks))
  # encoder self-attention, decoder self- and cross-attention: q, k, v, out each
  assert len(kernels) == 12
  assert any("encoderdecoderblock_0/MultiHeadDotProductAttention_1/" in p for p in kernels)
  for path, w in kernels.items():
    mask = np.asarray(flat[path])
    km, wm = _as_km(mask, path), _as_km(np.abs(w), path)
    groups = km.reshape(km.shape[0] // 4, 4, km.shape[1])
    pruned = _as_km(np.where(mask, w, 0), path).reshape(groups.shape)
    assert ((pruned != 0).sum(axis=1) <= 2).all(), path
    assert (groups.sum(axis=1) == 2).all(), path
    assert (~mask).sum() * 2 == mask.size, path
    wg = wm.reshape(groups.shape)           # the kept ones are the 2 largest of each group
    kept_min = np.where(groups, wg, np.inf).min(axis=1)
    dropped_max = np.where(groups, -np.inf, wg).max(axis=1)
    assert (kept_min >= dropped_max).all(), path


def test_wmt_nm_needs_the_traced_contraction_and_names_the_leaf(wmt):
  model, x, v, r = wmt
  with pytest.raises(ValueError, match=r"roles=.*axis="):
    sparsity.nm_masks(v["params"], 2, 4)
  with pytest.raises(ValueError, match=r"leaf '.*kernel'.*length 24.*not a multiple of m=5"):
    sparsity.nm_masks(v["params"], 2, 5, roles=r, rules=roles.kernels(r))


@pytest.mark.slow
def test_wmt_trainer_prune_nm_follows_the_contraction():
  model, x, v, _ = _wmt(6, 36)
  x = np.tile(x, (4, 1))   # one example per device of the 8-device test mesh

  def loss(apply_fn, variables, batch, rng):
    del rng
    return jnp.mean(apply_fn(variables, batch[0], batch[0]) ** 2)

  trainer = Trainer(model, loss, optax.sgd(0.1), prune={"method": "nm"})
  state = trainer.init(0, x, x)
  state, _ = trainer.step(state, (x,))
  masks = dict(_tree.leaves_with_paths(sparsity.masks_from_state(state.opt_state)))
  params = dict(_tree.leaves_with_paths(state.params))
  for path in _attention_kernels(state.params):
    km = _as_km(np.asarray(masks[path]), path)
    assert (km.reshape(-1, 4, km.shape[1]).sum(axis=1) == 2).all(), path
    assert (np.asarray(params[path])[~np.asarray(masks[path])] == 0).all(), path


# ---------------------------------------------------------------------------- ResNet
@pytest.fixture(scope="module")
def resnet():
  im = tp.imagenet()
  # one block per stage: stage 0 has an identity shortcut, stage 1 a projection
  model = im.ResNet(stage_sizes=[1, 1], block_cls=im.ResNetBlock, num_filters=8,
                    num_classes=5)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3), jnp.float32)
  v = _random_variables(lambda: model.init(jax.random.key(0), x, train=False))
  r = roles.trace(model.apply, v, x, train=False)
  masks = sparsity.channel_masks(v["params"], 0.5, roles=r)
  return model, x, v, r, masks


def test_resnet_only_block_inner_convs_are_channel_pruned(resnet):
  _, _, v, r, masks = resnet
  pruned = {p for p, m in _tree.leaves_with_paths(masks) if not sparsity.is_dense(m)}
  assert {p for p in pruned if p.endswith("kernel")} == {
      "ResNetBlock_0/Conv_0/kernel", "ResNetBlock_1/Conv_0/kernel"}
  for blk in ("ResNetBlock_0", "ResNetBlock_1"):
    assert {f"{blk}/BatchNorm_0/scale", f"{blk}/BatchNorm_0/bias"} <= pruned
  for conv in ("ResNetBlock_0/Conv_1", "ResNetBlock_1/Conv_1", "ResNetBlock_1/conv_proj",
               "conv_init"):                # their outputs are added to the residual stream
    g = roles.lookup(r, f"{conv}/kernel").channels
    assert not g.removable and "residual" in g.reason, conv
  assert "output" in roles.lookup(r, "Dense_0/kernel").channels.reason


def _bn_outputs(model, variables, x, train):
  kw = dict(capture_intermediates=True, mutable=["intermediates", "batch_stats"] if train
            else ["intermediates"])
  if train:   # upstream BatchNorm averages batch statistics over the named axis "batch"
    _, inter = jax.vmap(lambda xb: model.apply(variables, xb, train=True, **kw),
                        axis_name="batch")(x[None])
    inter = jax.tree.map(lambda a: a[0], inter)
  else:
    _, inter = model.apply(variables, x, train=False, **kw)
  return {blk: np.asarray(inter["intermediates"][blk]["BatchNorm_0"]["__call__"][0])
          for blk in ("ResNetBlock_0", "ResNetBlock_1")}


@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_resnet_removed_channels_are_exactly_zero_after_batchnorm(resnet, train):
  model, x, v, _, masks = resnet
  masked = {"params": sparsity.apply_masks(v["params"], masks), "batch_stats": v["batch_stats"]}
  for blk, out in _bn_outputs(model, masked, x, train).items():
    keep = np.asarray(masks[blk]["Conv_0"]["kernel"])[0, 0, 0]
    assert (~keep).sum() == keep.size // 2
    assert (out[..., ~keep] == 0).all(), blk
    assert (np.abs(out[..., keep]) > 0).mean() > 0.5, blk
  # without the traced program the BatchNorm is not masked and the channel is not zero
  plain = sparsity.channel_masks(v["params"], 0.5, rules=r"ResNetBlock_0/Conv_0/kernel")
  keep = np.asarray(plain["ResNetBlock_0"]["Conv_0"]["kernel"])[0, 0, 0]
  off = _bn_outputs(model, {"params": sparsity.apply_masks(v["params"], plain),
                            "batch_stats": v["batch_stats"]}, x, train)["ResNetBlock_0"]
  assert np.abs(off[..., ~keep]).max() > 1e-3


@pytest.mark.slow
def test_resnet_shrunk_equals_masked_with_fewer_params(resnet):
  model, x, v, r, masks = resnet
  masked = {"params": sparsity.apply_masks(v["params"], masks), "batch_stats": v["batch_stats"]}
  want = model.apply(masked, x, train=False)
  small = sparsity.shrink_channels(v, masks, roles=r)
  assert small["params"]["ResNetBlock_0"]["Conv_0"]["kernel"].shape == (3, 3, 8, 4)
  assert small["params"]["ResNetBlock_0"]["Conv_1"]["kernel"].shape == (3, 3, 4, 8)
  assert small["batch_stats"]["ResNetBlock_1"]["BatchNorm_0"]["mean"].shape == (8,)
  assert small["params"]["ResNetBlock_1"]["conv_proj"]["kernel"].shape == (1, 1, 8, 16)
  got = sparsity.shrunk_apply(model)(jax.tree.map(jnp.asarray, small), x, train=False)
  # equal up to float32 summation order (the shrunk convs sum over fewer channels; XLA's
  # threaded conv may block them differently run to run): relative to the output's size
  assert float(jnp.max(jnp.abs(got - want))) <= 1e-6 * float(jnp.max(jnp.abs(want)))
  size = lambda t: sum(np.size(a) for a in jax.tree.leaves(t))  # noqa: E731
  assert size(small["params"]) < size(v["params"])
  with pytest.raises(Exception):   # the upstream module itself rejects the smaller kernels
    model.apply(jax.tree.map(jnp.asarray, small), x, train=False)


def test_resnet_shrink_refuses_an_unmasked_batchnorm(resnet):
  _, _, v, r, masks = resnet
  bad = jax.tree.map(lambda m: m, masks)
  bad["ResNetBlock_0"]["BatchNorm_0"]["scale"] = sparsity.dense_marker()
  with pytest.raises(ValueError, match=r"BatchNorm_0/scale.*not masked like it"):
    sparsity.shrink_channels(v, bad, roles=r)


# ------------------------------------------------------------------------- ViT (scan)
@pytest.fixture(scope="module")
def vit():
  mod = tp.big_vision_vit()
  model = mod._Model(num_classes=10, patch_size=(4, 4), width=16, depth=3, mlp_dim=32,
                     num_heads=2, scan=True)
  x = jax.random.normal(jax.random.key(1), (1, 8, 8, 3), jnp.float32)
  v = _random_variables(lambda: model.init(jax.random.key(0), x))
  return model, x, v, roles.trace(model.apply, v, x)


_VIT_CONTRACTED = {"MlpBlock_0/Dense_0": (1,), "MlpBlock_0/Dense_1": (1,), "query": (1,),
                   "key": (1,), "value": (1,), "out": (1, 2)}


def _stacked(params):
  out = {}
  for p, x in _tree.leaves_with_paths(params):
    if "encoderblock/" in p and p.endswith("kernel"):
      name = next(k for k in _VIT_CONTRACTED if f"/{k}/kernel" in p)
      out[p] = (np.asarray(x), _VIT_CONTRACTED[name])
  return out


def test_vit_scan_roles_see_through_the_scan(vit):
  _, _, v, r = vit
  stacked = _stacked(v["params"])
  assert len(stacked) == 6
  for path, (_, contracted) in stacked.items():
    role = roles.lookup(r, path)
    assert role.role == "kernel" and role.stacked == (0,), path
    assert role.contracting == contracted, path


def test_vit_scan_layer_sparsity_is_exact_per_slice(vit):
  _, _, v, r = vit
  masks = dict(_tree.leaves_with_paths(
      sparsity.magnitude_masks(v["params"], 0.3, roles=r, rules=roles.kernels(r))))
  for path, (w, _) in _stacked(v["params"]).items():
    m = np.asarray(masks[path])
    for layer in range(w.shape[0]):
      sl, ws = m[layer], np.abs(w[layer])
      assert (~sl).sum() == round(0.3 * sl.size), (path, layer)
      assert ws[~sl].max() <= ws[sl].min(), (path, layer)   # its own smallest ones


def test_vit_scan_2_4_along_the_contraction_of_every_slice(vit):
  _, _, v, r = vit
  with pytest.raises(ValueError, match=r"embedding/kernel.*length 3.*m=4"):   # C_in = 3 (RGB)
    sparsity.nm_masks(v["params"], 2, 4, roles=r, rules=roles.kernels(r))
  masks = dict(_tree.leaves_with_paths(
      sparsity.nm_masks(v["params"], 2, 4, roles=r, rules=r"encoderblock/.*kernel")))
  for path, (w, contracted) in _stacked(v["params"]).items():
    m = np.asarray(masks[path])
    for layer in range(w.shape[0]):
      sl = m[layer]
      n_in = len(contracted)
      km = sl.reshape(int(np.prod(sl.shape[:n_in])), -1)
      assert (km.reshape(-1, 4, km.shape[1]).sum(axis=1) == 2).all(), (path, layer)
