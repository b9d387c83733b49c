"""Group-wise scales and GPTQ: numerics vs a straightforward reference, model drivers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxopt_dnn import checkpoint, quant
from jaxopt_dnn.quant.gptq import gptq_solve
from jaxopt_dnn.quant.qarray import full_scale


def _correlated(rng, t, k):
  return (rng.standard_normal((t, k)) @ rng.standard_normal((k, k)) * 0.3
          + rng.standard_normal((t, k))).astype(np.float32)


def gptq_reference(W, H, bits=4, g=None, act_order=False, damp=0.01):
  """Column-by-column GPTQ in float64 NumPy (no lazy blocks, explicit inverse)."""
  W = W.astype(np.float64).copy()
  H = H.astype(np.float64).copy()
  K, N = W.shape
  qmax = 2 ** (bits - 1) - 1
  dead = np.diag(H) <= 0
  H[dead, dead] = 1
  W[dead] = 0
  H += damp * np.mean(np.diag(H)) * np.eye(K)
  perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(K)
  sc = lambda a: np.where(a > 0, a / qmax, 1.0)  # noqa: E731
  if g is None:
    scales = sc(np.abs(W).max(0))[None]
  else:
    G = -(-K // g)
    scales = sc(np.abs(np.pad(W, ((0, G * g - K), (0, 0)))).reshape(G, g, N).max(1))
  Wt = W[perm].copy()
  U = np.linalg.cholesky(np.linalg.inv(H[perm][:, perm])).T
  Q = np.zeros_like(W)
  for i in range(K):
    if g is not None and not act_order and i % g == 0:
      scales[i // g] = sc(np.abs(Wt[i:i + g]).max(0))
    s = scales[0] if g is None else scales[perm[i] // g]
    q = np.clip(np.round(Wt[i] / s), -qmax, qmax)
    Q[perm[i]] = q
    Wt[i:] -= np.outer(U[i, i:], (Wt[i] - q * s) / U[i, i])
  return Q, scales


# ---------------------------------------------------------------------------- group-wise
@pytest.mark.parametrize("bits,g,sdt", [(4, 64, jnp.bfloat16), (8, 32, None), (4, 48, None)])
def test_groupwise_bound_and_layout(bits, g, sdt):
  x = jax.random.normal(jax.random.key(0), (200, 24)) * jnp.linspace(0.1, 3, 24)
  q = quant.quantize(x, bits=bits, axis=-1, group_size=g, group_axis=0, scale_dtype=sdt)
  G = -(-200 // g)
  assert q.scale.shape == (G, 24) and q.group_size == g and q.group_axis == 0
  assert q.scale.dtype == (jnp.bfloat16 if sdt else jnp.float32)
  assert q.value.shape == ((100, 24) if bits == 4 else (200, 24))
  err = jnp.abs(quant.dequantize(q) - x)
  assert float(jnp.max(err / full_scale(q))) <= 0.5 + 1e-6       # <= scale/2 per group
  # the scale really is per group: group-wise beats per-channel error
  qc = quant.quantize(x, bits=bits, axis=-1)
  assert float(jnp.mean(err ** 2)) < float(jnp.mean((quant.dequantize(qc) - x) ** 2))
  fq = quant.fake_quant(x, bits=bits, axis=-1, group_size=g, group_axis=0, scale_dtype=sdt)
  np.testing.assert_array_equal(np.asarray(fq), np.asarray(quant.dequantize(q)))


def test_groupwise_bad_args():
  x = jnp.ones((8, 4))
  with pytest.raises(ValueError, match="group_size"):
    quant.quantize(x, bits=4, axis=-1, group_size=0, group_axis=0)
  with pytest.raises(ValueError, match="group_axis"):
    quant.quantize(x, bits=4, axis=-1, group_size=2, group_axis=1)
  with pytest.raises(ValueError, match="group_size"):
    quant.QuantRule("k", group_size=-1)


def test_quantize_params_int4_g64_checkpoint_bytes(tmp_path):
  rng = np.random.default_rng(0)
  params = {"a": {"kernel": rng.standard_normal((384, 384)).astype(np.float32),
                  "bias": np.zeros(384, np.float32)},
            "b": {"kernel": rng.standard_normal((384, 1536)).astype(np.float32)}}
  qp = quant.quantize_params(params, bits=4, group_size=64)
  assert qp["a"]["bias"] is params["a"]["bias"]
  assert qp["a"]["kernel"].scale.dtype == jnp.bfloat16
  checkpoint.save(tmp_path / "f", 0, {k: v["kernel"] for k, v in params.items()})
  checkpoint.save(tmp_path / "q", 0, {k: v["kernel"] for k, v in qp.items()})
  fb = checkpoint.checkpoint_bytes(tmp_path / "f")
  qb = checkpoint.checkpoint_bytes(tmp_path / "q")
  n = 384 * 384 + 384 * 1536
  # 4 + 16/64 bits per weight = 0.1328x float32, plus orbax metadata
  assert qb <= 0.14 * fb, (qb, fb, qb * 8 / n)
  back = checkpoint.restore(tmp_path / "q", {k: v["kernel"] for k, v in qp.items()})[0]
  np.testing.assert_array_equal(np.asarray(quant.dequantize(back["b"])),
                                np.asarray(quant.dequantize(qp["b"]["kernel"])))


# ---------------------------------------------------------------------------- GPTQ solve
@pytest.mark.slow
@pytest.mark.parametrize("g,act_order", [(None, False), (32, False), (64, True), (128, False)])
def test_gptq_matches_reference_and_beats_rtn(g, act_order):
  rng = np.random.default_rng(1)
  k, n = 192, 24
  X = _correlated(rng, 512, k)
  W = rng.standard_normal((k, n)).astype(np.float32)
  H = 2.0 * X.T.astype(np.float64) @ X
  codes, scales = gptq_solve(jnp.asarray(W), jnp.asarray(H, jnp.float32), bits=4,
                             group_size=g, act_order=act_order, block_size=64)
  Q, S = gptq_reference(W, H, 4, g, act_order)
  assert np.mean(np.asarray(codes) != Q) < 1e-3          # float32 vs float64 ties only
  np.testing.assert_allclose(np.asarray(scales), S, rtol=1e-5)
  deq = np.asarray(codes, np.float32) * np.repeat(np.asarray(scales), g or k, 0)[:k]
  rtn = np.asarray(quant.dequantize(quant.quantize(jnp.asarray(W), bits=4, axis=-1,
                                                   group_size=g, group_axis=0)))
  err = lambda d: np.sum((X @ W - X @ d) ** 2)  # noqa: E731
  assert err(deq) < 0.8 * err(rtn)


# ---------------------------------------------------------------------------- drivers
class Block(nn.Module):
  d: int = 32

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    q, k, v = (nn.Dense(self.d, name=n)(h) for n in ("q", "k", "v"))
    a = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / np.sqrt(self.d)) @ v
    a = a.reshape(a.shape[:-1] + (4, self.d // 4))
    x = x + nn.DenseGeneral(self.d, axis=(-2, -1), name="o")(a)
    h = nn.LayerNorm()(x)
    return x + nn.Dense(self.d, name="fc2")(nn.gelu(nn.Dense(4 * self.d, name="fc1")(h)))


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(32, name="embed")(x)
    x = Block(name="b0")(x)
    return Block(name="b1")(x)


def _data(n=4, seed=0):
  rng = np.random.default_rng(seed)
  base = rng.standard_normal((16, 12)).astype(np.float32)
  return [(jnp.asarray(rng.standard_normal((8, 6, 16)).astype(np.float32) @ base
                       + 0.1 * rng.standard_normal((8, 6, 12)).astype(np.float32)),)
          for _ in range(n)]


@pytest.fixture(scope="module")
def net():
  model = Net()
  batches = _data()
  variables = model.init(jax.random.key(0), batches[0][0])
  return model, variables, batches


def _out_err(model, variables, params, batches):
  f = model.apply(variables, batches[0][0])
  g = model.apply({**variables, "params": quant.dequantize_params(params)}, batches[0][0])
  return float(jnp.mean((f - g) ** 2))


@pytest.mark.slow
def test_gptq_linen_per_layer_beats_rtn(net):
  model, variables, batches = net
  qp = quant.gptq(model.apply, variables, batches, bits=4, group_size=16, sequential=False)
  rtn = quant.quantize_params(variables["params"], r"(^|/)(q|k|v|o|fc1|fc2|embed)/kernel",
                              bits=4, group_size=16)
  kernels = [p for p, x in jax.tree_util.tree_flatten_with_path(
      qp, is_leaf=quant.is_qarray)[0] if quant.is_qarray(x)]
  assert len(kernels) == 13                     # 2 blocks x 6 + embed; biases/LN untouched
  assert qp["b0"]["o"]["kernel"].group_axis == 1      # DenseGeneral: last contracted axis
  assert not quant.is_qarray(qp["b0"]["q"]["bias"])
  # every layer: output error on its own (float-model) inputs no worse than RTN
  from jaxopt_dnn.quant.hessian import HessianCapture
  from jaxopt_dnn.quant.layout import kernel_matrix
  cap = HessianCapture(model.apply, variables, batches, lambda p, x: True)
  for o in cap.ops:
    X = jnp.concatenate(cap.rows(None, [o])[o.kernel])
    path = o.kernel.split("/")
    w = variables["params"]
    gq, rq = qp, rtn
    for p in path:
      w, gq, rq = w[p], gq[p], rq[p]
    W = kernel_matrix(w, o)
    eg = float(jnp.sum((X @ W - X @ kernel_matrix(quant.dequantize(gq), o)) ** 2))
    er = float(jnp.sum((X @ W - X @ kernel_matrix(quant.dequantize(rq), o)) ** 2))
    assert eg <= er * 1.0001, (o.kernel, eg, er)
  assert _out_err(model, variables, qp, batches) < _out_err(model, variables, rtn, batches)


@pytest.mark.slow
def test_gptq_sequential_differs_and_is_better(net):
  model, variables, batches = net
  seq = quant.gptq(model.apply, variables, batches, bits=4, group_size=16)
  par = quant.gptq(model.apply, variables, batches, bits=4, group_size=16, sequential=False)
  # the first round sees identical inputs; later rounds see the quantized prefix
  np.testing.assert_array_equal(np.asarray(seq["embed"]["kernel"].value),
                                np.asarray(par["embed"]["kernel"].value))
  assert not np.array_equal(np.asarray(seq["b1"]["fc2"]["kernel"].value),
                            np.asarray(par["b1"]["fc2"]["kernel"].value))
  assert _out_err(model, variables, seq, batches) < 1.05 * _out_err(model, variables, par, batches)


def test_gptq_rules_and_weight_only_serving(net):
  model, variables, batches = net
  qp = quant.gptq(model.apply, variables, batches, rules={r"fc1/kernel": {"bits": 8}},
                  group_size=None)
  assert quant.is_qarray(qp["b0"]["fc1"]["kernel"]) and qp["b0"]["fc1"]["kernel"].bits == 8
  assert not quant.is_qarray(qp["b0"]["q"]["kernel"])
  out = quant.int8_apply(model, {"params": qp}, None, batches[0][0], weight_only=True)
  ref = model.apply(variables, batches[0][0])
  assert float(jnp.max(jnp.abs(out - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))
  with pytest.raises(ValueError, match="nope"):
    quant.gptq(model.apply, variables, batches, rules=["nope"])


def test_hessian_sharded_equals_single_device():
  from jaxopt_dnn.quant.hessian import gram
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  x = jax.random.normal(jax.random.key(3), (16, 5, 24))
  xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.P("data")))
  h1 = gram(x, 1)
  h8 = gram(xs, 1)
  np.testing.assert_allclose(np.asarray(h8), np.asarray(h1), rtol=1e-5, atol=1e-4)
  hlo = jax.jit(lambda a: gram(a, 1)).lower(xs).compile().as_text()   # XLA inserts it
  assert "all-reduce" in hlo or "all_reduce" in hlo or "psum" in hlo


@pytest.mark.slow
def test_gptq_sharded_batches_same_result(net):
  model, variables, batches = net
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  sh = jax.sharding.NamedSharding(mesh, jax.P("data"))
  sb = [(jax.device_put(b[0], sh),) for b in batches]
  a = quant.gptq(model.apply, variables, batches, bits=4, group_size=16, sequential=False)
  b = quant.gptq(model.apply, variables, sb, bits=4, group_size=16, sequential=False)
  da, db = quant.dequantize_params(a), quant.dequantize_params(b)
  diff = jax.tree.map(lambda u, v: float(jnp.mean(u != v)), da, db)
  assert max(jax.tree.leaves(diff)) < 0.01       # only float-order ties may differ


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(12, 32, rngs=rngs)
    self.l2 = nnx.Linear(32, 8, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.l1(x)))


def test_gptq_nnx():
  m = NnxNet(nnx.Rngs(0))
  batches = _data()
  qp = quant.gptq(lambda mod, x: mod(x), m, batches, bits=4, group_size=None)
  assert quant.is_qarray(qp["l1"]["kernel"]) and quant.is_qarray(qp["l2"]["kernel"])
  assert not quant.is_qarray(qp["l1"]["bias"])
  out = quant.int8_apply(m, qp, None, batches[0][0], weight_only=True)
  ref = m(batches[0][0])
  assert float(jnp.max(jnp.abs(out - ref))) < 0.1 * float(jnp.max(jnp.abs(ref)))


@pytest.mark.slow
def test_solve_alone_is_gptq_without_sequential_from_one_jitted_capture(net):
  """The auto planner's path: Hessians of every round from one jitted forward per batch,
  then every kernel solved alone (same-shape kernels vmapped together)."""
  import importlib
  G = importlib.import_module("jaxopt_dnn.quant.gptq")
  model, variables, batches = net
  from jaxopt_dnn.quant.hessian import HessianCapture
  cap = HessianCapture(model.apply, variables, batches, lambda p, x: True)
  hs = G.input_hessians(cap)
  for ops in cap.rounds():      # equal to the eager per-round capture
    eager = cap.round_hessians(None, ops)
    for o in ops:
      np.testing.assert_allclose(np.asarray(hs[o.kernel]), np.asarray(eager[o.kernel]),
                                 rtol=1e-4, atol=1e-3)
  rule = quant.QuantRule(".*", bits=4, group_size=16)
  got = G.solve_alone(cap, hs, {o.kernel: rule for o in cap.ops})
  want = quant.gptq(model.apply, variables, batches, bits=4, group_size=16, sequential=False)
  for o in cap.ops:
    w = want
    for k in o.kernel.split("/"):
      w = w[k]
    a, b = np.asarray(quant.dequantize(got[o.kernel])), np.asarray(quant.dequantize(w))
    # identical up to a rare code flipped by float summation order
    assert np.mean(a != b) < 0.01, o.kernel
    assert got[o.kernel].shape == w.shape and got[o.kernel].group_size == w.group_size
