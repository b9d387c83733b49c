"""Post-training capture through the jaxpr interpreter (quant.hessian): GPTQ on convs,
Einsum and raw dots (linen and NNX), the captured Grams against NumPy references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from jaxopt_dnn import quant
from jaxopt_dnn.quant.hessian import HessianCapture
from jaxopt_dnn.quant.qarray import full_scale

_DN = ("NHWC", "HWIO", "NHWC")


class Cnn(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), strides=(2, 1), padding="SAME", name="c1")(x))
    x = nn.relu(nn.Conv(12, (3, 2), padding="VALID", kernel_dilation=(1, 2), name="c2")(x))
    return nn.Dense(5, name="head")(x.reshape(x.shape[0], -1))


class EinsumNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Einsum((16, 4, 6), "btd,dnh->btnh", name="proj")(x)            # contracted axis 0
    h = nn.gelu(h.reshape(h.shape[:2] + (24,)))
    y = nn.Einsum((3, 24, 8), "btd,ndh->btnh", name="mix")(h)              # contracted axis 1
    return y.reshape(y.shape[:2] + (24,))


class RawDot(nnx.Module):
  def __init__(self, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (16, 24)) / 4.0)
    self.out = nnx.Linear(24, 8, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.gelu(x @ self.w))


def _correlated(shape, seed):
  rng = np.random.default_rng(seed)
  c = shape[-1]
  mix = rng.standard_normal((c, c)).astype(np.float32)
  x = rng.standard_normal(shape).astype(np.float32) @ mix * 0.5
  return jnp.asarray(x + 0.3 * rng.standard_normal(shape).astype(np.float32))


def _leaf(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def _rtn_same_grid(w, q):
  """Round-to-nearest of ``w`` on the scales GPTQ chose (with ``act_order`` they are the
  absmax / qmax scales of the original weights, i.e. RTN's own)."""
  s = np.asarray(full_scale(q), np.float32)
  qmax = 2 ** (q.bits - 1) - 1
  return np.clip(np.round(np.asarray(w, np.float32) / s), -qmax, qmax) * s


def _im2col(x, kh, kw, stride, pad, dil=(1, 1)):
  """NumPy reference patches ``(T, kh * kw * C)`` in HWIO order (``(h, w, c)``)."""
  x = np.asarray(x, np.float32)
  n, _, _, c = x.shape
  xp = np.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
  eh, ew = (kh - 1) * dil[0] + 1, (kw - 1) * dil[1] + 1
  ho = (xp.shape[1] - eh) // stride[0] + 1
  wo = (xp.shape[2] - ew) // stride[1] + 1
  rows = [xp[b, i * stride[0]:i * stride[0] + eh:dil[0], j * stride[1]:j * stride[1] + ew:dil[1]]
          .reshape(-1) for b in range(n) for i in range(ho) for j in range(wo)]
  return np.asarray(rows, np.float64)


@pytest.fixture(scope="module")
def cnn():
  m = Cnn()
  batches = [(_correlated((4, 9, 8, 3), s),) for s in range(3)]
  return m, m.init(jax.random.key(0), batches[0][0]), batches


def _cnn_inputs(m, v, x):
  """Float inputs of c1, c2 and the head."""
  _, st = m.apply(v, x, capture_intermediates=True)
  it = st["intermediates"]
  x2 = jax.nn.relu(it["c1"]["__call__"][0])
  x3 = jax.nn.relu(it["c2"]["__call__"][0])
  return x, x2, x3.reshape(x3.shape[0], -1)


def test_conv_gram_equals_numpy_im2col(cnn):
  m, v, batches = cnn
  cap = HessianCapture(m.apply, v, batches, lambda p, x: True)
  assert [o.kernel for o in cap.ops] == ["c1/kernel", "c2/kernel", "head/kernel"]
  assert [o.n_in for o in cap.ops] == [3, 3, 1]
  hs = cap.hessians()
  ref1 = ref2 = 0.0
  for (x,) in batches:
    a, b, _ = _cnn_inputs(m, v, x)
    p1 = _im2col(a, 3, 3, (2, 1), ((1, 1), (1, 1)))
    p2 = _im2col(b, 3, 2, (1, 1), ((0, 0), (0, 0)), dil=(1, 2))
    ref1, ref2 = ref1 + 2 * p1.T @ p1, ref2 + 2 * p2.T @ p2
  for got, ref in ((hs["c1/kernel"], ref1), (hs["c2/kernel"], ref2)):
    assert got.shape == ref.shape
    rel = np.max(np.abs(np.asarray(got, np.float64) - ref)) / np.max(np.abs(ref))
    assert rel <= 1e-4, rel
  # and the reference patches really are the conv's rows: X W2 = the conv output
  a = batches[0][0]
  w = v["params"]["c1"]["kernel"]
  y = lax.conv_general_dilated(a, w, (2, 1), ((1, 1), (1, 1)), dimension_numbers=_DN)
  np.testing.assert_allclose(_im2col(a, 3, 3, (2, 1), ((1, 1), (1, 1))) @ np.asarray(
      w, np.float64).reshape(-1, 8), np.asarray(y).reshape(-1, 8), rtol=1e-4, atol=1e-4)


def test_dense_hessians_equal_the_module_capture():
  """Dense / DenseGeneral: the interpreter's Grams equal ``2 X^T X`` of each module's
  input (what the former module-level capture recorded), from capture_intermediates."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.gelu(nn.Dense(24, name="a")(x))
      h = h.reshape(h.shape[:-1] + (4, 6))
      return nn.DenseGeneral(8, axis=(-2, -1), name="b")(h)

  m = Net()
  batches = [(_correlated((4, 5, 12), s),) for s in range(2)]
  v = m.init(jax.random.key(1), batches[0][0])
  new = HessianCapture(m.apply, v, batches, lambda p, x: True).hessians()
  old = {"a/kernel": 0.0, "b/kernel": 0.0}
  for (x,) in batches:
    _, st = m.apply(v, x, capture_intermediates=True)
    h = jax.nn.gelu(st["intermediates"]["a"]["__call__"][0])
    for k, xin in (("a/kernel", x), ("b/kernel", h)):
      x2 = np.asarray(xin, np.float64).reshape(-1, xin.shape[-1])
      old[k] = old[k] + 2 * x2.T @ x2
  assert sorted(new) == sorted(old)
  for k in old:
    np.testing.assert_allclose(np.asarray(new[k]), old[k], rtol=1e-4, atol=1e-3)


def _assert_beats_rtn(errs):
  """errs: [(kernel, gptq error, rtn error)]: each <= RTN's, the sum strictly smaller."""
  for k, eg, er in errs:
    assert eg <= er * 1.0001, (k, eg, er)
  assert sum(e[1] for e in errs) < sum(e[2] for e in errs), errs


@pytest.mark.slow
@pytest.mark.parametrize("group_size", [None, 4])
def test_gptq_conv_model_beats_rtn_and_serves(cnn, group_size):
  m, v, batches = cnn
  qp = quant.gptq(m.apply, v, batches, bits=4, group_size=group_size, sequential=False)
  convs = {"c1": ((2, 1), ((1, 1), (1, 1)), (1, 1)), "c2": ((1, 1), ((0, 0), (0, 0)), (1, 2))}
  for name in ("c1", "c2", "head"):
    q = qp[name]["kernel"]
    assert quant.is_qarray(q), name
    assert q.shape == v["params"][name]["kernel"].shape
    assert not quant.is_qarray(qp[name]["bias"])
    if group_size is not None and name != "head":
      assert q.group_axis == 2      # HWIO: groups along the input channels
  errs = []
  for name, (stride, pad, dil) in convs.items():
    w = v["params"][name]["kernel"]
    q = qp[name]["kernel"]
    rtn = _rtn_same_grid(w, q)
    eg = er = 0.0
    for (x,) in batches:
      xin = _cnn_inputs(m, v, x)[0 if name == "c1" else 1]
      conv = lambda k: lax.conv_general_dilated(   # noqa: E731
          xin, jnp.asarray(k), stride, pad, rhs_dilation=dil, dimension_numbers=_DN)
      ref = conv(w)
      eg += float(jnp.sum((ref - conv(quant.dequantize(q))) ** 2))
      er += float(jnp.sum((ref - conv(rtn)) ** 2))
    errs.append((name, eg, er))
  _assert_beats_rtn(errs)
  out = quant.int8_apply(m, {"params": qp}, None, batches[0][0], weight_only=True)
  ref = m.apply(v, batches[0][0])
  assert float(jnp.max(jnp.abs(out - ref))) < 0.2 * float(jnp.max(jnp.abs(ref)))
  if group_size is None:   # per-output-channel scales: the convs really run s8 x s8 -> s32
    got = quant.int8_apply(m, {"params": qp}, "dynamic", batches[0][0], strict=True)
    assert float(jnp.max(jnp.abs(got - out))) < 0.1 * float(jnp.max(jnp.abs(ref)))


def test_gptq_conv_sequential_sees_the_quantized_prefix(cnn):
  m, v, batches = cnn
  seq = quant.gptq(m.apply, v, batches, bits=4, group_size=None)
  par = quant.gptq(m.apply, v, batches, bits=4, group_size=None, sequential=False)
  np.testing.assert_array_equal(np.asarray(seq["c1"]["kernel"].value),
                                np.asarray(par["c1"]["kernel"].value))
  assert not np.array_equal(np.asarray(seq["head"]["kernel"].value),
                            np.asarray(par["head"]["kernel"].value))

  def err(qp):
    return sum(float(jnp.sum((m.apply(v, x) - m.apply(
        {"params": quant.dequantize_params(qp)}, x)) ** 2)) for (x,) in batches)
  assert err(seq) < 1.05 * err(par)


@pytest.mark.slow
def test_gptq_einsum_model_beats_rtn():
  m = EinsumNet()
  batches = [(_correlated((4, 6, 16), s),) for s in range(3)]
  v = m.init(jax.random.key(2), batches[0][0])
  cap = HessianCapture(m.apply, v, batches, lambda p, x: p.endswith("kernel"))
  ops = {o.kernel: o for o in cap.ops}
  assert ops["proj/kernel"].perm is None and ops["mix/kernel"].perm == (1, 0, 2)
  # the Gram of the axis-1 contraction equals 2 X^T X of the einsum's input rows
  _, st = m.apply(v, batches[0][0], capture_intermediates=True)
  hs1 = HessianCapture(m.apply, v, batches[:1], lambda p, x: p.endswith("kernel")).hessians()
  h = jax.nn.gelu(st["intermediates"]["proj"]["__call__"][0])
  x2 = np.asarray(h, np.float64).reshape(-1, 24)
  np.testing.assert_allclose(np.asarray(hs1["mix/kernel"]), 2 * x2.T @ x2, rtol=1e-4,
                             atol=1e-3)
  qp = quant.gptq(m.apply, v, batches, bits=4, group_size=None, sequential=False)
  errs = []
  specs = {"proj": "btd,dnh->btnh", "mix": "btd,ndh->btnh"}
  for name, spec in specs.items():
    q = qp[name]["kernel"]
    w = v["params"][name]["kernel"]
    assert quant.is_qarray(q) and q.shape == w.shape
    rtn = _rtn_same_grid(w, q)
    eg = er = 0.0
    for (x,) in batches:
      _, st = m.apply(v, x, capture_intermediates=True)
      xin = x if name == "proj" else jax.nn.gelu(st["intermediates"]["proj"]["__call__"][0])
      xin = xin.reshape(xin.shape[:2] + (-1,))
      ref = jnp.einsum(spec, xin, w)
      eg += float(jnp.sum((ref - jnp.einsum(spec, xin, quant.dequantize(q))) ** 2))
      er += float(jnp.sum((ref - jnp.einsum(spec, xin, jnp.asarray(rtn))) ** 2))
    errs.append((name, eg, er))
  _assert_beats_rtn(errs)
  # per-channel along the free axes of the (3, 24, 8) kernel, one scale over the 24 inputs
  assert qp["mix"]["kernel"].scale.shape == (3, 1, 8)
  # group-wise along a non-leading contracted axis: the groups sit on that axis
  qg = quant.gptq(m.apply, v, batches, bits=4, group_size=8, sequential=False)
  assert qg["mix"]["kernel"].group_axis == 1 and qg["mix"]["kernel"].shape == (3, 24, 8)
  out = quant.int8_apply(m, {"params": qg}, None, batches[0][0], weight_only=True)
  ref = m.apply(v, batches[0][0])
  assert float(jnp.max(jnp.abs(out - ref))) < 0.2 * float(jnp.max(jnp.abs(ref)))


@pytest.mark.slow
def test_gptq_nnx_raw_dot_param_beats_rtn():
  m = RawDot(nnx.Rngs(0))
  batches = [(_correlated((32, 16), s),) for s in range(3)]
  qp = quant.gptq(lambda mod, x: mod(x), m, batches, bits=4, group_size=None,
                  sequential=False)
  assert quant.is_qarray(qp["w"]) and quant.is_qarray(qp["out"]["kernel"])
  assert not quant.is_qarray(qp["out"]["bias"])
  w = np.asarray(m.w[...])
  rtn = _rtn_same_grid(w, qp["w"])
  x = np.concatenate([np.asarray(b[0]) for b in batches])
  eg = float(np.sum((x @ w - x @ np.asarray(quant.dequantize(qp["w"]))) ** 2))
  er = float(np.sum((x @ w - x @ rtn) ** 2))
  assert eg < er, (eg, er)
  out = quant.int8_apply(m, qp, None, batches[0][0], weight_only=True)
  ref = m(batches[0][0])
  assert float(jnp.max(jnp.abs(out - ref))) < 0.2 * float(jnp.max(jnp.abs(ref)))
  # sequential (the default) quantizes both too
  qs = quant.gptq(lambda mod, x: mod(x), m, batches, bits=4, group_size=None)
  assert quant.is_qarray(qs["w"]) and quant.is_qarray(qs["out"]["kernel"])


def test_bad_inputs_raise_naming_the_leaf():
  class Grouped(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(4, (3, 3), feature_group_count=2, name="grouped")(x)

  x = _correlated((2, 6, 6, 4), 0)
  g = Grouped()
  v = g.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"grouped/kernel.*feature_group_count=2"):
    quant.gptq(g.apply, v, [(x,)], bits=4, group_size=None, sequential=False)

  class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
      y, _ = nn.scan(_Body, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=2)(name="layers")(x, None)
      return y

  xs = _correlated((4, 8), 1)
  s = Scanned()
  vs = s.init(jax.random.key(0), xs)
  with pytest.raises(ValueError, match=r"layers/fc/kernel.*scan"):
    quant.gptq(s.apply, vs, [(xs,)], bits=4, group_size=None)
  with pytest.raises(TypeError, match="variables"):
    quant.gptq(g.apply, v["params"], [(x,)])


class _Body(nn.Module):
  @nn.compact
  def __call__(self, c, _):
    return nn.Dense(8, name="fc")(c), None


def test_oneshot_sparsegpt_prunes_convs_exactly_and_beats_magnitude(cnn):
  from jaxopt_dnn import sparsity
  m, v, batches = cnn

  def run(method):
    return sparsity.oneshot(m.apply, v, batches, method=method, sparsity=0.5,
                            sequential=False)

  (sp, sm), (mp, _) = run("sparsegpt"), run("magnitude")
  for name in ("c1", "c2"):
    keep = np.asarray(sm[name]["kernel"])
    assert keep.shape == v["params"][name]["kernel"].shape
    k = keep.reshape(-1, keep.shape[-1])      # (H * W * I, O): every column half zeros
    np.testing.assert_array_equal(k.sum(0), np.full(k.shape[1], k.shape[0] // 2))
    assert np.all(np.asarray(sp[name]["kernel"])[~keep] == 0)
  err = lambda p: sum(float(jnp.sum((m.apply(v, x) - m.apply({"params": p}, x)) ** 2))  # noqa: E731
                      for (x,) in batches)
  assert err(sp) < err(mp)
