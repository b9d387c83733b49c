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
