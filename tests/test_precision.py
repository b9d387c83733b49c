import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxopt_dnn import _hlo
from jaxopt_dnn.app import data, models
from jaxopt_dnn import precision as mp
from _helpers import np_init
from jaxopt_dnn.quant import QArray

F32, BF16, F16 = np.dtype(jnp.float32), np.dtype(jnp.bfloat16), np.dtype(jnp.float16)


# --------------------------------------------------------------------- policies


def test_policy_from_string_and_short_names():
  p = mp.Policy.from_string("params=float32,compute=bfloat16,output=float32")
  assert (p.param_dtype, p.compute_dtype, p.output_dtype) == (F32, BF16, F32)
  assert mp.Policy.from_string("bf16") == p
  assert mp.Policy.from_string("fp16").compute_dtype == F16
  assert mp.Policy.from_string("FP32").compute_dtype == F32
  assert mp.Policy.from_string("p=f32, c=f16, o=bf16").output_dtype == BF16
  assert str(p) == "params=float32,compute=bfloat16,output=float32"
  assert hash(p) == hash(mp.Policy.from_string("bf16"))  # a valid jit static argument


def test_policy_bad_input():
  with pytest.raises(ValueError, match=r"unknown dtype name 'bfloat8'"):
    mp.Policy.from_string("params=float32,compute=bfloat8")
  with pytest.raises(ValueError, match="unknown key 'weights'"):
    mp.Policy.from_string("weights=float32")
  with pytest.raises(ValueError, match="expected key=dtype"):
    mp.Policy.from_string("mixed")
  with pytest.raises(ValueError, match="not a floating dtype"):
    mp.Policy(compute_dtype=jnp.int8)
  with pytest.raises(ValueError, match="invalid regex"):
    mp.Policy(exceptions={"(": "float32"})


def test_casts_touch_only_floating_leaves():
  tree = {"w": jnp.ones((2, 2)), "step": jnp.zeros((), jnp.int32), "flag": jnp.array(True),
          "key": jax.random.key(0), "BatchNorm_0": {"scale": jnp.ones(2)},
          "q": QArray(jnp.ones((2, 2), jnp.int8), jnp.ones((1, 2), jnp.float32), bits=8,
                      channel_axes=(1,), shape=(2, 2)),
          "half": jnp.ones(2, jnp.float16)}
  out = mp.Policy.from_string("bf16").cast_to_compute(tree)
  assert out["w"].dtype == BF16 and out["half"].dtype == BF16
  assert out["step"].dtype == jnp.int32 and out["flag"].dtype == jnp.bool_
  assert jax.dtypes.issubdtype(out["key"].dtype, jax.dtypes.prng_key)
  assert out["BatchNorm_0"]["scale"].dtype == F32  # default exception
  assert out["q"].value.dtype == jnp.int8 and out["q"].scale.dtype == F32
  back = mp.Policy.from_string("bf16").cast_to_param(out)
  assert back["w"].dtype == F32 and back["q"].scale.dtype == F32
  custom = mp.Policy("float32", "float16", "float32", exceptions={r"^w$": "bfloat16"})
  out = custom.cast_to_compute(tree)
  assert out["w"].dtype == BF16 and out["BatchNorm_0"]["scale"].dtype == F16
  assert "[exception '^w$']" in custom.report(tree)


def test_real_qarray_values_and_scales_are_never_cast():
  from jaxopt_dnn.quant import fake
  q = fake.quantize(jnp.linspace(-1, 1, 24).reshape(4, 6), bits=8, axis=1)
  tree = {"q": q, "w": jnp.ones(3)}
  for cast in ("cast_to_compute", "cast_to_param", "cast_to_output"):
    out = getattr(mp.Policy("bfloat16", "float16", "bfloat16"), cast)(tree)
    assert out["q"] is q and out["w"].dtype != F32
  assert bool(mp.all_finite(tree))


@pytest.fixture(scope="module")
def bn_model():
  model = models.CNN(features=(8, 16), dense=32, batch_norm=True)
  return model, jax.tree.map(jnp.asarray, np_init(model, (2, 8, 8, 1)))


def _train_step(model, policy, opt, **kw):
  apply = mp.with_policy(model.apply, policy, **kw)

  def loss_fn(params, batch_stats, x, y):
    logits, state = apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                          mutable=["batch_stats"])
    assert logits.dtype == policy.output_dtype  # softmax runs in float32
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, state["batch_stats"]

  def step(params, batch_stats, opt_state, x, y):
    (loss, batch_stats), g = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, x, y)
    updates, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  return step


def test_bf16_train_step_has_bf16_dots_and_f32_master_weights(bn_model):
  model, variables = bn_model
  policy = mp.Policy.from_string("bf16")
  opt = optax.sgd(1e-4)
  step = _train_step(model, policy, opt)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(16, 8, 8, 1)), jnp.float32)
  y = jnp.arange(16, dtype=jnp.int32) % 10
  args = (variables["params"], variables["batch_stats"], opt.init(variables["params"]), x, y)
  # On CPU the *optimized* HLO converts bf16 dots to f32, so the dtypes the program asks
  # for are read from the lowered (pre-optimization) HLO.
  census = _hlo.census_from_hlo(jax.jit(step).lower(*args).as_text(dialect="hlo"))
  n_conv, n_dot = census.count(kind="conv"), census.count(kind="dot")
  assert n_conv >= 2 and n_dot >= 2  # forward + backward
  assert census.count("bf16", "bf16", "bf16", kind="conv") == n_conv
  assert census.count("bf16", "bf16", "bf16", kind="dot") == n_dot
  params, stats, _, loss = jax.jit(step)(*args)
  assert all(p.dtype == F32 for p in jax.tree.leaves(params))
  assert all(s.dtype == F32 for s in jax.tree.leaves(stats))
  # The tiny SGD step is kept in the float32 master weights although most of it would
  # vanish if the weights were stored in bf16.
  old, new = variables["params"]["Dense_0"]["kernel"], params["Dense_0"]["kernel"]
  changed = np.asarray(old != new)
  lost_in_bf16 = np.asarray(old.astype(BF16) == new.astype(BF16))
  assert changed.mean() > 0.5 and (changed & lost_in_bf16).mean() > 0.5
  assert np.isfinite(float(loss))


def test_norm_outputs_are_cast_back_to_compute(bn_model):
  model, variables = bn_model
  opt = optax.sgd(1e-3)
  policy = mp.Policy.from_string("bf16")
  step = _train_step(model, policy, opt, norm_outputs_in_compute=False)
  args = (variables["params"], variables["batch_stats"], opt.init(variables["params"]),
          jnp.ones((4, 8, 8, 1)), jnp.zeros(4, jnp.int32))
  census = _hlo.census_from_hlo(jax.jit(step).lower(*args).as_text(dialect="hlo"))
  # Without the cast, the f32 BatchNorm output promotes the next layers to float32.
  assert census.count("f32", kind="both") > 0


# ----------------------------------------------------------------- loss scaling


def _fields(obj):
  return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


@given(st.floats(1.0, 2.0**24), st.integers(1, 10_000), st.floats(1.1, 8.0),
       st.floats(1e-3, 1.0), st.integers(0, 100))
def test_dynamic_loss_scale_every_field_survives_flatten_unflatten(s, period, factor, mn, c):
  ls = mp.DynamicLossScale(s, period, factor, mn, counter=c)
  leaves, treedef = jax.tree.flatten(ls)
  again = jax.tree.unflatten(treedef, leaves)
  mapped = jax.tree.map(lambda x: x, ls)
  for other in (again, mapped):
    for name, value in _fields(ls).items():
      assert np.array_equal(np.asarray(getattr(other, name)), np.asarray(value)), name
  assert len(leaves) == 2  # only loss_scale and counter are arrays


def test_loss_scales_survive_jit_and_name_their_leaves():
  for ls in (mp.NoOpLossScale(), mp.StaticLossScale(128.0),
             mp.DynamicLossScale(2.0**15, 7, 3.0, 0.25, counter=5)):
    out = jax.jit(lambda s: s)(ls)
    assert type(out) is type(ls)
    for name, value in _fields(ls).items():
      assert np.array_equal(np.asarray(getattr(out, name)), np.asarray(value)), name
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(mp.DynamicLossScale(8.0))[0]]
  assert paths == [".loss_scale", ".counter"]


def test_dynamic_loss_scale_adjust_rules():
  ls = mp.DynamicLossScale(16.0, period=3, factor=2.0, min_loss_scale=4.0)
  ok, bad = jnp.array(True), jnp.array(False)
  adjust = jax.jit(lambda s, f: s.adjust(f))
  ls = adjust(ls, ok)
  ls = adjust(ls, ok)
  assert float(ls.loss_scale) == 16.0 and int(ls.counter) == 2
  ls = adjust(ls, ok)
  assert float(ls.loss_scale) == 32.0 and int(ls.counter) == 0
  ls = adjust(ls, bad)
  assert float(ls.loss_scale) == 16.0 and int(ls.counter) == 0
  for _ in range(5):
    ls = adjust(ls, bad)
  assert float(ls.loss_scale) == 4.0 and ls.min_loss_scale == 4.0  # clamped at the floor
  huge = mp.DynamicLossScale(3e38, period=1)
  assert float(adjust(huge, ok).loss_scale) == np.float32(3e38)  # never grows to inf
  with pytest.raises(ValueError, match="factor"):
    mp.DynamicLossScale(1.0, factor=1.0)
  with pytest.raises(ValueError, match="period"):
    mp.DynamicLossScale(1.0, period=0)
  with pytest.raises(ValueError, match="min_loss_scale"):
    mp.DynamicLossScale(1.0, min_loss_scale=0.0)


def test_static_and_noop_scale_unscale():
  g = {"a": jnp.full((3,), 2.0, jnp.float16), "n": jnp.arange(3)}
  s = mp.StaticLossScale(64.0)
  assert s.scale(g)["a"].dtype == F16 and float(s.scale(g)["a"][0]) == 128.0
  assert float(s.unscale(s.scale(g))["a"][0]) == 2.0
  assert np.array_equal(s.scale(g)["n"], g["n"])
  assert mp.NoOpLossScale().scale(g) is g


def test_all_finite():
  assert bool(mp.all_finite({"a": jnp.ones(3), "i": jnp.arange(3)}))
  assert not bool(mp.all_finite({"a": jnp.array([1.0, jnp.inf])}))
  assert not bool(mp.all_finite([jnp.ones(2), jnp.array([jnp.nan], jnp.bfloat16)]))
  assert bool(mp.all_finite({}))


def test_scaled_grads_equal_plain_grads():
  w = jnp.array([0.5, -1.5, 2.0])

  def loss(w, x):
    return jnp.sum((w * x) ** 2)

  x = jnp.array([1.0, 2.0, 3.0])
  val, g = mp.value_and_grad(loss)(mp.StaticLossScale(1024.0), w, x)
  np.testing.assert_allclose(g, jax.grad(loss)(w, x), rtol=1e-6)
  assert float(val) == float(loss(w, x))


def test_injected_inf_step_is_skipped_bit_identically():
  params = {"w": jnp.linspace(-1, 1, 12).reshape(3, 4), "b": jnp.zeros(4)}
  opt = optax.adam(1e-2)
  opt_state = opt.init(params)
  ls = mp.DynamicLossScale(2.0**15, period=10)
  step = jax.jit(lambda g, o, p, s: mp.guarded_update(opt, g, o, p, s))

  good = jax.tree.map(jnp.ones_like, params)
  params, opt_state, ls, finite = step(good, opt_state, params, ls)
  assert bool(finite) and int(ls.counter) == 1

  bad = {"w": good["w"].at[1, 2].set(jnp.inf), "b": good["b"]}
  p2, o2, ls2, finite = step(bad, opt_state, params, ls)
  assert not bool(finite)
  for a, b in zip(jax.tree.leaves((p2, o2)), jax.tree.leaves((params, opt_state))):
    assert a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes()
  assert float(ls2.loss_scale) == 2.0**14 and int(ls2.counter) == 0
  p3, _, _, _ = step(good, o2, p2, ls2)
  assert not np.array_equal(p3["w"], p2["w"])


# ------------------------------------------------------------- fp16 vs fp32 training

STEPS = 300


def _train_digits(policy: str, ds, loss_scale):
  model = models.CNN(features=(16, 32), dense=64)
  params = np_init(model, (1, 8, 8, 1))["params"]
  opt = optax.adam(1e-3)
  apply = mp.with_policy(model.apply, policy)

  def loss_fn(p, x, y):
    logits = apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, o, s, x, y):
    _, g = mp.value_and_grad(loss_fn)(s, p, x, y)
    return mp.guarded_update(opt, g, o, p, s)

  o, s, skipped = opt.init(params), loss_scale, 0
  it = data.infinite_batches(ds.x_train, ds.y_train, 64, seed=0)
  for _ in range(STEPS):
    x, y = next(it)
    params, o, s, finite = step(params, o, s, x, y)
    skipped += int(not bool(finite))
  logits = jax.jit(apply)({"params": params}, ds.x_test)
  acc = float(np.mean(np.asarray(logits.argmax(-1)) == ds.y_test))
  return acc, s, skipped


@pytest.mark.slow
def test_fp16_with_dynamic_loss_scale_matches_fp32(digits):
  acc32, _, skipped32 = _train_digits("fp32", digits, mp.NoOpLossScale())
  # 2**24 overflows float16 on the first backward passes: the scale must come down.
  acc16, s, skipped16 = _train_digits("fp16", digits, mp.DynamicLossScale(2.0**24, period=100))
  print(f"digits test accuracy: fp32 {acc32:.4f}, fp16+DynamicLossScale {acc16:.4f}, "
        f"fp16 skipped steps {skipped16}, final scale {float(s.loss_scale):g}")
  assert acc32 > 0.9 and skipped32 == 0
  assert skipped16 >= 1 and float(s.loss_scale) < 2.0**24
  assert abs(acc16 - acc32) <= 0.01
