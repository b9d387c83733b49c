"""SmoothQuant: scales, verified folds into LayerNorm / Dense, W8A8 error with outliers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_dnn import quant
from jaxopt_dnn.quant.smooth import smooth_scale


class PreLN(nn.Module):
  """LayerNorm feeding only q/k/v (foldable); fc2 fed by GELU (not foldable)."""

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="ln")(x)
    q, k, v = (nn.Dense(16, name=n)(h) for n in ("q", "k", "v"))
    a = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / 4.0) @ v
    x = x + nn.Dense(16, name="o")(a)
    return x + nn.Dense(16, name="fc2")(nn.gelu(nn.Dense(32, name="fc1")(x)))


class PostLN(nn.Module):
  """LayerNorm output also feeds the residual: folding into it is not allowed."""

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="ln")(x)
    return h + nn.Dense(16, name="fc")(h)


def _batches(seed=0, n=3):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    x = rng.standard_normal((4, 8, 16)).astype(np.float32)
    x[..., 3] *= 30.0                                  # an outlier channel
    out.append((jnp.asarray(x),))
  return out


def test_smooth_scale_formula():
  a = jnp.array([4.0, 1.0, 0.0, 9.0])
  w = jnp.array([1.0, 4.0, 2.0, 0.0])
  np.testing.assert_allclose(np.asarray(smooth_scale(a, w, 0.5)), [2.0, 0.5, 1.0, 1.0])


@pytest.mark.slow
def test_smooth_folds_verified_and_helps_w8a8():
  model = PreLN()
  batches = _batches()
  v = model.init(jax.random.key(0), batches[0][0])
  # make the LN output carry outliers (as trained LN scales do)
  v = jax.tree_util.tree_map_with_path(
      lambda p, x: x.at[3].set(25.0) if "ln" in jax.tree_util.keystr(p)
      and "scale" in jax.tree_util.keystr(p) else x, v)
  log = []
  sv = quant.smooth(model.apply, v, batches, alpha=0.5, log=log.append,
                    folds={r"^o$": "v"})
  text = "\n".join(log)
  assert "q: scaled, 1/s folded into layernorm 'ln'" in text
  assert "o: scaled, 1/s folded into dense 'v'" in text
  assert "fc2: no producer" in text
  x = batches[0][0]
  np.testing.assert_allclose(np.asarray(model.apply(sv, x)), np.asarray(model.apply(v, x)),
                             rtol=1e-4, atol=1e-4)
  assert not np.allclose(np.asarray(sv["params"]["ln"]["scale"]),
                         np.asarray(v["params"]["ln"]["scale"]))

  def w8a8(vv):
    st = quant.calibrate(model.apply, vv, batches)
    out = quant.int8_apply(model, {**vv, "params": quant.quantize_params(vv["params"])}, st, x)
    return float(jnp.mean((out - model.apply(v, x)) ** 2))

  assert w8a8(sv) < 0.7 * w8a8(v)


@pytest.mark.slow
def test_smooth_refuses_folds_that_change_the_model():
  model = PostLN()
  batches = _batches(1)
  v = model.init(jax.random.key(1), batches[0][0])
  log = []
  sv = quant.smooth(model.apply, v, batches, log=log.append)
  assert "changes the model output" in log[0]
  np.testing.assert_array_equal(np.asarray(sv["params"]["ln"]["scale"]),
                                np.asarray(v["params"]["ln"]["scale"]))
  with pytest.raises(ValueError, match="alpha"):
    quant.smooth(model.apply, v, batches, alpha=2.0)


@pytest.mark.slow
def test_awq_search_and_fold_beat_rtn():
  from jaxopt_dnn.quant.awq import awq_search
  rng = np.random.default_rng(0)
  x = rng.standard_normal((256, 32)).astype(np.float32)
  x[:, :3] *= 20.0
  w = rng.standard_normal((32, 16)).astype(np.float32)
  s, errs = awq_search(jnp.asarray(x), [jnp.asarray(w)], bits=4, group_size=16)
  assert float(errs.min()) < 0.9 * float(errs[0])         # alpha = 0 is plain RTN
  model = PreLN()
  batches = _batches(2)
  v = model.init(jax.random.key(0), batches[0][0])
  v = jax.tree_util.tree_map_with_path(
      lambda p, a: a.at[3].set(25.0) if "ln" in jax.tree_util.keystr(p)
      and "scale" in jax.tree_util.keystr(p) else a, v)
  log = []
  qp = quant.awq(model.apply, v, batches, bits=4, group_size=8, log=log.append)
  assert any("q: scaled, 1/s folded into layernorm 'ln'" in line for line in log)
  assert all(quant.is_qarray(qp[n]["kernel"]) for n in ("q", "k", "v", "o", "fc1", "fc2"))
  assert not quant.is_qarray(qp["ln"]["scale"])
  # the objective AWQ minimizes: each scaled op's output error on its own input
  rtn = quant.quantize_params(v["params"], r"kernel$", bits=4, group_size=8)
  x = batches[0][0]
  ln = lambda p: nn.LayerNorm().apply({"params": p["ln"]}, x).reshape(-1, 16)  # noqa: E731
  h0, h1 = ln(v["params"]), ln(quant.dequantize_params(qp))
  for n in ("q", "k", "v"):
    y = h0 @ v["params"][n]["kernel"]
    e_awq = float(jnp.sum((h1 @ quant.dequantize(qp[n]["kernel"]) - y) ** 2))
    e_rtn = float(jnp.sum((h0 @ quant.dequantize(rtn[n]["kernel"]) - y) ** 2))
    assert e_awq < 0.5 * e_rtn, (n, e_awq, e_rtn)
  # ops without a producer to fold into are plain RTN
  np.testing.assert_array_equal(np.asarray(qp["fc2"]["kernel"].value),
                                np.asarray(rtn["fc2"]["kernel"].value))


# ------------------------------------------------------------------ any contraction, any API
# SmoothQuant / AWQ capture through the jaxpr interpreter (quant.hessian): convs (channels
# = input features, shared by the window positions), Einsum, and a raw `x @ w` NNX param,
# with the producer found in the traced program (linen and NNX).
from flax import nnx  # noqa: E402


class ConvNet(nn.Module):
  """c1 -> relu -> c2 (c2's input has a producer through relu: c1) -> head."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(8, (3, 3), name="c1")(x))
    h = nn.relu(nn.Conv(8, (3, 3), strides=(2, 2), name="c2")(h))
    return nn.Dense(4, name="head")(h.reshape(h.shape[0], -1))


class EinsumLN(nn.Module):
  """LayerNorm -> Einsum (contracted axis 0 of the kernel) -> gelu -> Einsum (axis 1)."""

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="ln")(x)
    h = nn.Einsum((16, 4, 6), "btd,dnh->btnh", name="proj")(h)
    h = nn.gelu(h.reshape(h.shape[:2] + (24,)))
    y = nn.Einsum((3, 24, 8), "btd,ndh->btnh", name="mix")(h)
    return y.reshape(y.shape[:2] + (24,))


class RawLN(nnx.Module):
  """NNX: LayerNorm -> ``x @ self.w`` (a bare nnx.Param) -> gelu -> Linear."""

  def __init__(self, rngs):
    self.ln = nnx.LayerNorm(16, rngs=rngs)
    self.w = nnx.Param(jax.random.normal(rngs.params(), (16, 24)) / 4.0)
    self.out = nnx.Linear(24, 8, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.gelu(self.ln(x) @ self.w))


def _conv_case():
  m = ConvNet()
  rng = np.random.default_rng(5)
  batches = [(jnp.asarray(rng.standard_normal((4, 9, 9, 3)).astype(np.float32)),)
             for _ in range(3)]
  v = m.init(jax.random.key(3), batches[0][0])
  # c1's output channel 3 (c2's input channel 3) carries an outlier
  v = jax.tree_util.tree_map_with_path(
      lambda p, a: a.at[..., 3].multiply(30.0) if "c1" in jax.tree_util.keystr(p)
      and "kernel" in jax.tree_util.keystr(p) else a, v)
  return m, m.apply, v, batches


def _ln_outlier(v):
  return jax.tree_util.tree_map_with_path(
      lambda p, a: a.at[3].set(25.0) if "ln" in jax.tree_util.keystr(p)
      and "scale" in jax.tree_util.keystr(p) else a, v)


def _einsum_case():
  m = EinsumLN()
  batches = _batches(7)
  v = _ln_outlier(m.init(jax.random.key(4), batches[0][0]))
  return m, m.apply, v, batches


def _nnx_case():
  m = RawLN(nnx.Rngs(0))
  m.ln.scale[...] = m.ln.scale[...].at[3].set(25.0)
  rng = np.random.default_rng(8)
  batches = [(jnp.asarray(rng.standard_normal((32, 16)).astype(np.float32)),)
             for _ in range(3)]
  return m, (lambda mod, x: mod(x)), m, batches


_CASES = {"conv": (_conv_case, "c2", "conv 'c1'"),
          "einsum": (_einsum_case, "proj", "layernorm 'ln'"),
          "nnx_raw_dot": (_nnx_case, "w", "layernorm 'ln'")}


def _params(variables):
  if isinstance(variables, nnx.Module):
    return nnx.to_pure_dict(nnx.state(variables, nnx.Param))
  return variables["params"]


def _run(model, apply_fn, variables, params, x):
  """The model's float output with ``params`` (NNX: a pure dict merged into a clone)."""
  if isinstance(variables, nnx.Module):
    m = nnx.clone(variables)
    nnx.update(m, params)
    return m(x)
  return apply_fn({**variables, "params": params}, x)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(_CASES))
def test_smooth_any_contraction_keeps_the_model_and_helps_w8a8(case):
  make, op, folded = _CASES[case]
  model, apply_fn, v, batches = make()
  log = []
  sv = quant.smooth(apply_fn, v, batches, log=log.append)
  assert any(f"{op}: scaled, 1/s folded into {folded}" in line for line in log), log
  sp = sv if isinstance(v, nnx.Module) else sv["params"]
  p0 = _params(v)
  for (x,) in batches:          # the smoothed float model computes the same function
    ref = _run(model, apply_fn, v, p0, x)
    np.testing.assert_allclose(np.asarray(_run(model, apply_fn, v, sp, x)), np.asarray(ref),
                               rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(ref))))

  def w8a8(params):
    nnx_model = isinstance(v, nnx.Module)
    fv = _with(v, params) if nnx_model else {**v, "params": params}
    st = quant.calibrate(apply_fn, fv, batches)
    qp = quant.quantize_params(params)
    err = 0.0
    for (x,) in batches:
      out = quant.int8_apply(v if nnx_model else model, qp if nnx_model
                             else {**v, "params": qp}, st, x)
      err += float(jnp.sum((out - _run(model, apply_fn, v, p0, x)) ** 2))
    return err

  e_smooth, e_plain = w8a8(sp), w8a8(p0)
  assert e_smooth < 0.9 * e_plain, (e_smooth, e_plain)


def _with(module, params):
  m = nnx.clone(module)
  nnx.update(m, params)
  return m


_KERNEL = {"conv": "c2/kernel", "einsum": "proj/kernel", "nnx_raw_dot": "w"}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(_CASES))
def test_awq_any_contraction_beats_rtn_int4(case):
  make, op, folded = _CASES[case]
  model, apply_fn, v, batches = make()
  p0 = _params(v)
  # every kernel: each is int4, the scaled op's producer stays float
  log = []
  qa = quant.awq(apply_fn, v, batches, bits=4, group_size=None, log=log.append)
  assert any(f"{op}: scaled, 1/s folded into {folded}" in line for line in log), log
  assert quant.is_qarray(_leaf(qa, _KERNEL[case]))
  assert len(_kernels(qa)) == {"conv": 3, "einsum": 2, "nnx_raw_dot": 2}[case]
  # the scaled kernel alone (the model's error is then its error): AWQ's search over
  # alpha starts at plain RTN (alpha = 0), and the outlier channel makes it pay off
  rule = "^" + _KERNEL[case] + "$"
  qp = quant.awq(apply_fn, v, batches, bits=4, group_size=None, rules=[rule],
                 max_sample=100000)
  rtn = quant.quantize_params(p0, rule, bits=4, group_size=None)
  assert _kernels(qp) == _kernels(rtn) == [rule]
  err = lambda p: sum(float(jnp.sum((_run(model, apply_fn, v, quant.dequantize_params(p), x)  # noqa: E731
                                     - _run(model, apply_fn, v, p0, x)) ** 2))
                      for (x,) in batches)
  e_awq, e_rtn = err(qp), err(rtn)
  assert e_awq < 0.5 * e_rtn, (e_awq, e_rtn)


def _leaf(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def _kernels(params):
  import re
  return ["^" + re.escape(jax.tree_util.keystr(p, simple=True, separator="/")) + "$"
          for p, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=quant.is_qarray)[0]
          if quant.is_qarray(x)]
