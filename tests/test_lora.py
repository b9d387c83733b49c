"""LoRA / QLoRA (jaxopt_dnn.lora): adapters on a frozen float / bf16 / int8 / int4 / NF4
base, alone and in the Trainer (only adapters train, FSDP, resume, distillation)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxopt_dnn as jd
from jaxopt_dnn import lora, parallel, quant, roles
from jaxopt_dnn.quant import nf4


class Attn(nn.Module):
  """Conv -> tokens -> DenseGeneral query, Einsum key, DenseGeneral out -> Dense head."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), name="conv")(x)                         # (B, 4, 4, 8)
    t = x.reshape(x.shape[0], -1, 8)                                # (B, 16, 8)
    q = nn.DenseGeneral((2, 4), name="q")(t)                        # (B, 16, 2, 4)
    k = nn.Einsum((8, 2, 4), "btd,dnh->btnh", name="k")(t)
    a = jax.nn.softmax(jnp.einsum("bqnh,bknh->bnqk", q, k) / 2.0, axis=-1)
    ctx = jnp.einsum("bnqk,bknh->bqnh", a, k)
    o = nn.DenseGeneral(8, axis=(-2, -1), name="o")(ctx)            # (B, 16, 8)
    return nn.Dense(3, name="head")(jax.nn.gelu(o).mean(1))


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.k = nnx.Einsum("btd,dnh->btnh", (8, 2, 4), (2, 4), rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    x = self.conv(x)
    t = x.reshape(x.shape[0], -1, 8)
    k = self.k(t)
    return self.head(jax.nn.gelu(k.reshape(k.shape[:2] + (8,))).mean(1))


X = jnp.asarray(np.random.RandomState(0).randn(4, 4, 4, 3), jnp.float32)
KERNELS = ("params/conv/kernel", "params/q/kernel", "params/k/kernel", "params/o/kernel",
           "params/head/kernel")


def _batch(i, n=8):
  r = np.random.RandomState(100 + i)
  x = r.randn(n, 4, 4, 3).astype(np.float32)
  return {"x": x, "y": np.tanh(x.reshape(n, -1)[:, :3] * 2).astype(np.float32)}


def linen_loss(apply_fn, variables, batch, rng):
  return jnp.mean((apply_fn(variables, batch["x"]) - batch["y"]) ** 2)


def nnx_loss(model, batch, rng):
  return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


@pytest.fixture(scope="module")
def linen_case():
  m = Attn()
  v = m.init(jax.random.key(0), X)
  return m, v, roles.trace(m.apply, v, X)


def _loras(tree):
  return {jax.tree_util.keystr(p, simple=True, separator="/"): x for p, x in
          jax.tree_util.tree_flatten_with_path(tree, is_leaf=lora.is_lora)[0]
          if lora.is_lora(x)}


def _rel(a, b):
  return float(jnp.abs(a - b).max() / jnp.abs(b).max())


# --------------------------------------------------------------------------- transform


@pytest.mark.slow
def test_adapter_shapes_follow_the_traced_contraction_and_init_equals_base(linen_case):
  m, v, r = linen_case
  lp = lora.lora(v["params"], rank=2, key=1, roles=r)
  ad = _loras(lp)
  assert sorted(ad) == sorted(k.removeprefix("params/") for k in KERNELS)
  shapes = {k: (x.a.shape, x.b.shape, x.contracting) for k, x in ad.items()}
  assert shapes["conv/kernel"] == ((27, 2), (2, 8), (0, 1, 2))        # HWIO: H*W*I x O
  assert shapes["q/kernel"] == ((8, 2), (2, 8), (0,))                 # embed x heads*hd
  assert shapes["k/kernel"] == ((8, 2), (2, 8), (0,))                 # Einsum "dnh"
  assert shapes["o/kernel"] == ((8, 2), (2, 8), (0, 1))               # heads*hd x embed
  assert all(float(jnp.abs(x.b).max()) == 0 for x in ad.values())
  bound = {k: 1 / np.sqrt(x.a.shape[0]) for k, x in ad.items()}
  assert all(0 < float(jnp.abs(x.a).max()) <= bound[k] for k, x in ad.items())
  # b = 0: the materialized tree is the base bit for bit
  out = lora.materialize(lp)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               out, v["params"])
  # without roles the last axis is the output (the Flax convention): o's (2, 4, 8) agrees
  assert _loras(lora.lora(v["params"], "o/kernel", rank=2))["o/kernel"].contracting == (0, 1)
  # q/k differ: without the trace (embed, heads, hd) would be split as (embed*heads, hd)
  assert _loras(lora.lora(v["params"], "q/kernel", rank=2))["q/kernel"].a.shape == (16, 2)


@pytest.mark.slow
@pytest.mark.parametrize("base", ["bf16", "int8", "int4", "nf4"])
def test_quantized_base_merge_equals_unmerged_forward(linen_case, base):
  m, v, r = linen_case
  lp = lora.lora(v["params"], rank=2, key=1, base=base, roles=r, group_size=4)
  ad = lora.adapters(lp)
  ad = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(3), x.shape), ad)
  lp = lora.with_adapters(lp, ad)
  kinds = {type(x.base).__name__ for x in _loras(lp).values()}
  assert kinds == {"bf16": {"ArrayImpl"}, "int8": {"QArray"}, "int4": {"QArray"},
                   "nf4": {"NF4Array"}}[base]
  unmerged = jax.jit(lambda p: m.apply({"params": lora.materialize(p)}, X))(lp)
  merged = lora.merge(lp)
  assert not _loras(merged)
  assert _rel(m.apply({"params": merged}, X), unmerged) <= 1e-5
  # the quantized base is dequantized inside the jitted program (no float copy stored)
  if base in ("int4", "nf4"):
    assert lora.count(lp)["base_bytes"] < lora.nbytes(v["params"]) / 2
  # merge(requantize=True) stores the merged kernels again in the base's format
  rq = lora.merge(lp, requantize=True)
  for path, x in _loras(lp).items():
    leaf = rq
    for k in path.split("/"):
      leaf = leaf[k]
    assert type(leaf) is type(x.base)
    if base == "int4":
      assert (leaf.bits, leaf.group_size, leaf.group_axis) == (4, x.base.group_size,
                                                                x.base.group_axis)


@pytest.mark.slow
@pytest.mark.parametrize("base", ["int4", "nf4"])
def test_loftq_init_is_the_truncated_svd_of_the_quantization_residual(linen_case, base):
  """init="loftq": base = RTN of W (one iteration), scale * a @ b = the rank-r truncated
  SVD of W - dequantize(base) in the (prod K, prod N) layout of the traced contraction;
  the kernel error and the forward error both shrink at step 0."""
  m, v, r = linen_case
  rank = 2
  zero = lora.lora(v["params"], rank=rank, base=base, roles=r, group_size=4, alpha=4.0)
  lq = lora.lora(v["params"], rank=rank, base=base, roles=r, group_size=4, alpha=4.0,
                 init="loftq")
  z, q = _loras(zero), _loras(lq)
  assert sorted(z) == sorted(q)
  for path, x in q.items():
    w = v["params"]
    for k in path.split("/"):
      w = w[k]
    w = np.asarray(w, np.float64)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 x.base, z[path].base)                      # the base is plain RTN
    kk = list(x.contracting)
    nn_ = [d for d in range(w.ndim) if d not in kk]
    res = w - np.asarray(lora.materialize({"k": x.base})["k"], np.float64)
    mat = np.transpose(res, kk + nn_).reshape(x.a.shape[0], -1)
    u, sv, vt = np.linalg.svd(mat, full_matrices=False)
    best = (u[:, :rank] * sv[:rank]) @ vt[:rank]
    got = x.scale * np.asarray(x.a, np.float64) @ np.asarray(x.b, np.float64)
    np.testing.assert_allclose(got, best, atol=1e-5 * np.abs(mat).max())
    # Eckart-Young: the kernel error drops by exactly the top-r singular energy
    e_loftq = np.linalg.norm(np.asarray(lora.effective(x), np.float64) - w)
    np.testing.assert_allclose(e_loftq ** 2, np.sum(sv[rank:] ** 2), rtol=1e-3)
    assert e_loftq < np.linalg.norm(res)
  ref = m.apply(v, X)
  err = lambda p: _rel(m.apply({"params": lora.materialize(p)}, X), ref)  # noqa: E731
  assert err(lq) < err(zero)
  # merge == unmerged holds for a LoftQ start too
  assert _rel(m.apply({"params": lora.merge(lq)}, X),
              m.apply({"params": lora.materialize(lq)}, X)) <= 1e-5
  # more alternations: a different base, a smaller kernel error than one
  l3 = _loras(lora.lora(v["params"], rank=rank, base=base, roles=r, group_size=4, alpha=4.0,
                        init="loftq", loftq_iters=3))
  tot = lambda t: sum(float(jnp.sum((lora.effective(x) - _leaf(v["params"], p)) ** 2))  # noqa: E731
                      for p, x in t.items())
  assert tot(l3) <= tot(q) * (1 + 1e-4)


def _leaf(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def test_loftq_bad_inputs(linen_case):
  _, v, r = linen_case
  with pytest.raises(ValueError, match="init"):
    lora.lora(v["params"], rank=2, base="int4", init="svd")
  with pytest.raises(ValueError, match="lossy base"):
    lora.lora(v["params"], rank=2, init="loftq")
  with pytest.raises(ValueError, match="loftq_iters"):
    lora.lora(v["params"], rank=2, base="int4", init="loftq", loftq_iters=0)
  pre = dict(v["params"])
  pre["head"] = {**pre["head"], "kernel": quant.quantize(pre["head"]["kernel"], bits=4,
                                                         axis=1)}
  with pytest.raises(TypeError, match="head/kernel"):
    lora.lora(pre, "head/kernel", rank=2, base="int4", init="loftq")
  with pytest.raises(ValueError, match="lora.init"):
    lora.LoraConfig(init="svd")


def test_nf4_code_book_and_error_bound():
  np.testing.assert_allclose(nf4.normal_code_book(), nf4.NF4_CODE, atol=1e-6)
  w = jax.random.normal(jax.random.key(0), (96, 5))
  q = nf4.quantize(w, block_size=32, block_axis=0)
  assert q.value.dtype == jnp.uint8 and q.value.shape == (48, 5) and q.absmax.shape == (3, 5)
  d = nf4.dequantize(q)
  amax = np.repeat(np.asarray(q.absmax, np.float32), 32, axis=0)
  gaps = np.diff(nf4.NF4_CODE).max() / 2
  assert np.all(np.abs(np.asarray(d) - np.asarray(w)) <= gaps * amax + 1e-6)
  # nearest code: NF4 beats int4 absmax RTN on normal weights
  rtn = quant.dequantize(quant.quantize(w, bits=4, axis=1, group_size=32, group_axis=0))
  assert float(jnp.mean((d - w) ** 2)) < float(jnp.mean((rtn - w) ** 2))


def test_bad_inputs(linen_case):
  _, v, r = linen_case
  with pytest.raises(ValueError, match="rank"):
    lora.lora(v["params"], rank=0)
  with pytest.raises(ValueError, match="base"):
    lora.lora(v["params"], base="int3")
  with pytest.raises(ValueError, match="match no leaf"):
    lora.lora(v["params"], ["q/kernel", "nothing_here"])
  with pytest.raises(TypeError, match="q/bias"):
    lora.lora(v["params"], "q/bias", roles=r)
  with pytest.raises(TypeError, match="materialize"):
    jnp.asarray(_loras(lora.lora(v["params"]))["head/kernel"])
  with pytest.raises(ValueError, match="lora: unknown keys"):
    jd.Trainer(Attn(), linen_loss, optax.adam(1e-2), lora=dict(rank=2, bogus=1))
  with pytest.raises(ValueError, match="prune"):
    jd.Trainer(Attn(), linen_loss, optax.adam(1e-2), lora=dict(rank=2), prune=dict())


# ----------------------------------------------------------------------------- Trainer


def _linen_trainer(mesh=None, sharding="data_parallel", base="int4", precision=None):
  return jd.Trainer(Attn(), linen_loss, optax.adam(3e-2), mesh=mesh, sharding=sharding,
                    precision=precision,
                    lora=dict(rank=2, alpha=4.0, base=base, group_size=4))


def _steps(trainer, state, n):
  losses = []
  for i in range(n):
    state, met = trainer.step(state, _batch(i))
    losses.append(float(met["loss"]))
  return state, losses


def _assert_only_adapters_changed(before, after):
  b_ad, a_ad = lora.adapters(before), lora.adapters(after)
  flat_b = jax.tree_util.tree_flatten_with_path(before)[0]
  flat_a = jax.tree.leaves(after)
  assert len(flat_b) == len(flat_a)
  for (p, x), y in zip(flat_b, flat_a):
    name = jax.tree_util.keystr(p, simple=True, separator="/")
    if name.endswith("/a") or name.endswith("/b"):
      continue
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
  moved = [k for k in b_ad if float(jnp.abs(a_ad[k]["b"] - b_ad[k]["b"]).max()) > 0]
  assert sorted(moved) == sorted(b_ad)


@pytest.fixture(scope="module")
def fsdp_case():
  """One int4-base LoRA Trainer on 8 devices with FSDP, shared (compiled once); tests
  start from fresh copies of its initial state."""
  t = _linen_trainer(sharding="fsdp")
  s0 = jax.device_get(t.init(jax.random.key(0), X))
  return t, s0, lambda: jax.device_put(s0, t.state_sharding)


def _check_trained(t, before, s, losses, tol=1e-5):
  assert {type(x.base).__name__ for x in _loras(before).values()} == {"QArray"}
  assert losses[-1] < losses[0]
  _assert_only_adapters_changed(before, jax.device_get(s.params))
  # optimizer state: Adam's two moments of the adapters (+ a count), nothing for the base
  c = lora.count(s.params)
  assert lora.nbytes(s.opt_state) <= 2 * c["adapter_bytes"] + 16
  assert c["adapters"] == sum(x.a.size + x.b.size for x in _loras(before).values())
  # serve folds the adapters: the merged forward equals the trained one
  serve_fn, sv = t.serve(s)
  assert _rel(serve_fn(sv, X), t.apply_fn({"params": s.params}, X)) <= tol


@pytest.mark.slow
def test_trainer_fsdp_trains_only_adapters_on_an_int4_base(fsdp_case):
  t, s0, fresh = fsdp_case
  s, losses = _steps(t, fresh(), 6)
  _check_trained(t, s0.params, s, losses)
  # the base really is sharded like the params (packed int4 codes split over fsdp), the
  # adapters' moments follow the adapters
  conv = _loras(s.params)["conv/kernel"]
  assert conv.base.value.sharding.spec == P(None, None, None, "fsdp")
  assert conv.base.value.addressable_shards[0].data.shape[-1] == 1
  assert s.opt_state[0].mu["conv/kernel"]["a"].sharding == conv.a.sharding


@pytest.mark.slow
def test_trainer_bf16_policy_trains_only_adapters():
  t = _linen_trainer(mesh=parallel.make_mesh(devices=jax.devices()[:1]), precision="bf16")
  s0 = t.init(jax.random.key(0), X)
  before = jax.device_get(s0.params)
  s, losses = _steps(t, s0, 6)
  _check_trained(t, before, s, losses, tol=2e-2)


@pytest.mark.slow
def test_nnx_trainer_trains_only_adapters_and_merges():
  model = NnxNet(nnx.Rngs(0))
  t = jd.Trainer(model, nnx_loss, optax.adam(3e-2), mesh=parallel.make_mesh(
      devices=jax.devices()[:1]), lora=dict(rank=2, base="nf4", group_size=4))
  s0 = t.init(jax.random.key(0), X)
  before = jax.device_get(s0.params)
  ad = _loras(before)
  assert sorted(ad) == ["conv/kernel", "head/kernel", "k/kernel"]
  assert ad["k/kernel"].a.shape == (8, 2) and ad["conv/kernel"].a.shape == (27, 2)
  assert {type(x.base).__name__ for x in ad.values()} == {"NF4Array"}
  np.testing.assert_allclose(np.asarray(t.module(s0)(X)), np.asarray(
      t.module(s0.replace(params=lora.merge(s0.params)))(X)), rtol=1e-5, atol=1e-6)
  s, losses = _steps(t, s0, 5)
  assert losses[-1] < losses[0]
  _assert_only_adapters_changed(before, jax.device_get(s.params))
  assert lora.nbytes(s.opt_state) <= 2 * lora.count(s.params)["adapter_bytes"] + 16
  serve_fn, sv = t.serve(s)
  assert _rel(serve_fn(sv, X), t.module(s)(X)) <= 1e-5


def test_fsdp_8_devices_equals_1_device(fsdp_case):
  t8, _, fresh = fsdp_case
  s8, l8 = _steps(t8, fresh(), 3)
  t1 = _linen_trainer(mesh=parallel.make_mesh(devices=jax.devices()[:1]))
  s1, l1 = _steps(t1, t1.init(jax.random.key(0), X), 3)
  np.testing.assert_allclose(l1, l8, rtol=1e-5)
  _assert_close = lambda a, b: np.testing.assert_allclose(  # noqa: E731
      np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  jax.tree.map(_assert_close, lora.adapters(jax.device_get(s1.params)),
               lora.adapters(jax.device_get(s8.params)))


def test_fit_resume_is_exact(fsdp_case, tmp_path):
  t, _, fresh = fsdp_case

  def fit(steps, ckpt=None):
    return jd.fit(t, fresh(), _batch, steps=steps, checkpoint_dir=ckpt, save_every=2,
                  log_every=100)
  straight = fit(4)
  fit(2, tmp_path)
  resumed = fit(4, tmp_path)
  assert int(resumed.step) == 4
  a, b = jax.device_get(straight), jax.device_get(resumed)
  assert type(_loras(b.params)["q/kernel"].base).__name__ == "QArray"
  jax.tree.map(lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)),
               (a.params, a.opt_state), (b.params, b.opt_state))


# ---------------------------------------------------------------- distillation recovery


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jax.nn.gelu(nn.Dense(64, name="fc1")(x))
    return nn.Dense(32, name="fc2")(h)


@pytest.mark.slow
def test_lora_distillation_recovers_most_of_the_int4_gap():
  """Teacher: a float MLP; student: its int4 g16 RTN copy + rank-8 LoRA, distilled on
  the teacher's outputs. Inputs lie near an 8-dimensional subspace of the 64 features,
  as real activations are anisotropic; the held-out metric is the relative error."""
  r = np.random.RandomState(0)
  mix = r.randn(8, 64).astype(np.float32)

  def inputs(n, seed):
    z = np.random.RandomState(seed).randn(n, 8).astype(np.float32)
    return jnp.asarray(z @ mix + 0.05 * np.random.RandomState(seed + 1).randn(n, 64))

  m = MLP()
  v = m.init(jax.random.key(0), inputs(1, 0))
  teacher = jax.jit(m.apply)
  held = inputs(256, 99)
  ref = teacher(v, held)

  def err(params):
    out = m.apply({"params": lora.materialize(params)}, held)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))

  def loss(apply_fn, variables, batch, rng):
    return jnp.mean((apply_fn(variables, batch) - teacher(v, batch)) ** 2)

  # donate=False: a CI worker aborted (twice, same place) in the eager dequantize after the
  # donated steps while this test passes alone; under investigation (issue 20 note)
  t = jd.Trainer(m, loss, optax.adam(1e-2), lora=dict(rank=8, base="int4", group_size=16),
                 donate=False)
  s = t.init(jax.random.key(1), inputs(1, 0), variables=v)
  gap0 = err(s.params)
  assert gap0 > 0.01                  # int4 really loses something
  for i in range(150):
    s, _ = t.step(s, inputs(64, 1000 + i))
  gap1 = err(s.params)
  assert gap1 <= 0.5 * gap0, (gap0, gap1)
