"""int8 serving, QAT and GPTQ on the real upstream models (tests/thirdparty), counted on
the lowered program: every quantized contraction is an ``s8 x s8 -> s32`` instruction
of the lowered HLO, coverage is read off that HLO, and both agree with the census."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import thirdparty as tp
from jaxopt_dnn import _hlo, quant

S8 = ("s8", "s8", "s32")
# ViT: conv stem + per block (query, key, value, out, mlp in, mlp out) + head
VIT_BLOCK = 6


def _lowered_s8(fn, *args):
  """``s8 x s8 -> s32`` dots/convs of the lowered HLO (as ``int8_dot_census(...).lowered``,
  without compiling)."""
  return _hlo.census_from_hlo(jax.jit(fn).lower(*args).as_text(dialect="hlo")).count(*S8)


# ----------------------------------------------------------------------------- lm1b
@pytest.fixture(scope="module")
def lm1b():
  m = tp.lm1b()
  cfg = m.TransformerConfig(
      vocab_size=64, output_vocab_size=64, logits_via_embedding=True, emb_dim=16,
      num_heads=2, num_layers=2, qkv_dim=16, mlp_dim=32, max_len=16, dropout_rate=0.0,
      attention_dropout_rate=0.0, deterministic=True)
  model = m.TransformerLM(cfg)
  x = jax.random.randint(jax.random.key(1), (2, 8), 1, 64)
  v = model.init(jax.random.key(0), x)       # boxed (LogicallyPartitioned), as upstream
  return model, x, v


@pytest.mark.slow
def test_lm1b_tied_logits_int8_and_coverage_is_the_lowered_census(lm1b):
  """``Embed.attend`` (logits = y @ table.T, contracted over embed) runs s8 x s8 with the
  default per-channel rule: a table's channel is its row. 2 layers x 6 projections + the
  tied logits = 13 contractions, all int8 in the lowered HLO, all attributed."""
  model, x, v = lm1b
  rules = [quant.QuantRule("embedding"), quant.QuantRule("kernel")]
  v = nn.unbox(v)
  stats = quant.calibrate(model.apply, v, [(x,)], rules=rules)
  qv = {**v, "params": quant.quantize_params(v["params"], rules)}
  table = qv["params"]["decoder"]["Embed_0"]["embedding"]
  assert table.channel_axes == (0,) and table.scale.shape == (64, 1)   # one scale per row
  with warnings.catch_warnings():
    warnings.simplefilter("error")                # no quantized weight consumed in float
    lowered = _lowered_s8(lambda q, a: quant.int8_apply(model, q, stats, a, rules=rules,
                                                        strict=True), qv, x)
  cov = quant.coverage(model, qv, x, calibration=stats, rules=rules)
  assert lowered == 13 == cov.int8_ops == cov.census.count(*S8)
  assert cov.unattributed_int8 == 0 and not cov.float_contractions()
  rows = cov.by_path()["params/decoder/Embed_0/embedding"]
  assert sorted(r.primitive for r in rows) == ["dot_general", "gather"]
  assert [r.signature for r in rows if r.primitive == "dot_general"] == ["s8 x s8 -> s32"]
  # QAT (frozen ranges) simulates what serving runs, the per-row table included
  fq = jax.jit(quant.qat(model, rules).apply)({**v, "quant_stats": stats}, x)
  y8 = jax.jit(lambda q, a: quant.int8_apply(model, q, stats, a, rules=rules))(qv, x)
  step = float(jnp.max(jnp.abs(fq))) / 127
  assert float(jnp.max(jnp.abs(y8 - fq))) <= step


def test_lm1b_per_embed_column_table_is_reported_float_by_coverage(lm1b):
  """An explicitly per-embed-column table cannot feed attend in int8: the lowered HLO has
  12 int8 contractions and one f32 one, and coverage says exactly that."""
  model, x, v = lm1b
  rules = [quant.QuantRule("embedding", granularity=-1), quant.QuantRule("kernel")]
  v = nn.unbox(v)
  stats = quant.calibrate(model.apply, v, [(x,)], rules=rules)
  qv = {**v, "params": quant.quantize_params(v["params"], rules)}
  with pytest.warns(RuntimeWarning, match="Embed_0/embedding"):
    lowered = _lowered_s8(lambda q, a: quant.int8_apply(model, q, stats, a, rules=rules),
                          qv, x)
  cov = quant.coverage(model, qv, x, calibration=stats, rules=rules)
  assert lowered == 12 == cov.int8_ops
  bad = cov.float_contractions()
  assert [(r.path, r.signature) for r in bad] == [
      ("params/decoder/Embed_0/embedding", "f32 x f32 -> f32")]


# ----------------------------------------------------------------------------- ViT
def _vit(scan, **kw):
  vit = tp.big_vision_vit()
  return vit.Model(num_classes=4, variant=None, width=16, depth=2, mlp_dim=32, num_heads=2,
                   patch_size=(4, 4), scan=scan, head_zeroinit=False, **kw)


@pytest.fixture(scope="module")
def vit_pair():
  """The unrolled ViT and the scanned one with the same weights (upstream converter)."""
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  flat = _vit(False)
  v = nn.unbox(flat.init(jax.random.key(0), x))
  vs = {"params": tp.big_vision_vit().pyloop_to_scan(jax.device_get(v["params"]))}
  vs = jax.tree.map(jnp.asarray, vs)
  return flat, v, _vit(True), vs, x


@pytest.mark.slow
def test_vit_coverage_counts_only_what_is_lowered(vit_pair):
  """big_vision's ViT applies ``head`` twice (logits and logits_2d). Served for logits
  only, the logits_2d head is dead code and is not lowered: 14 int8 contractions (conv
  stem, 2 x 6, head), not 15. Coverage of the function as served says 14; of the full
  output, 15 (head consumed by two instructions)."""
  model, v, _, _, x = vit_pair
  stats = quant.calibrate(model.apply, v, [(x,)])
  qv = {**v, "params": quant.quantize_params(v["params"])}

  def logits(q, a):
    return model.apply(q, a)[0]

  n_logits = _lowered_s8(lambda q, a: quant.int8_apply(logits, q, stats, a, strict=True),
                         qv, x)
  n_full = _lowered_s8(lambda q, a: quant.int8_apply(model, q, stats, a, strict=True), qv, x)
  assert n_logits == 1 + 2 * VIT_BLOCK + 1 == 14 and n_full == 15
  cov = quant.coverage(logits, qv, x, calibration=stats)
  assert cov.int8_ops == n_logits == cov.census.count(*S8) and cov.unattributed_int8 == 0
  assert [r.signature for r in cov.by_path()["params/head/kernel"]] == ["s8 x s8 -> s32"]
  full = quant.coverage(model, qv, x, calibration=stats)
  assert full.int8_ops == n_full
  assert len(full.by_path()["params/head/kernel"]) == 2
  for path, rows in cov.by_path().items():
    assert rows and all(r.int8 for r in rows), (path, rows)


@pytest.mark.slow
@pytest.mark.parametrize("per_layer", [False, True])
def test_vit_scan_int8_serving(vit_pair, per_layer):
  """``scan=True`` (kernels ``(depth, ...)``, one ``nn.scan`` + ``nn.remat`` body): the
  body's 6 contractions run s8 x s8 -> s32 and are lowered once (a ``while`` body), so
  the census shows 6 + stem + head = 8; coverage says 8 and attributes each to its
  stacked kernel. Scales are per output channel shared by the layers (default) or per
  layer and output channel (``granularity=(0, -1)``); outputs stay close to float, and
  the stacked kernel's activation range is the max of the unrolled layers' ranges."""
  flat, v, model, vs, x = vit_pair
  rules = ([quant.QuantRule("encoderblock/.*kernel", granularity=(0, -1)),
            quant.QuantRule("kernel")] if per_layer else None)
  stats = quant.calibrate(model.apply, vs, [(x,)], rules=rules)
  flat_stats = quant.calibrate(flat.apply, v, [(x,)])
  for op in ("MlpBlock_0/Dense_0", "MultiHeadDotProductAttention_0/out"):
    got = quant.stats.flat_stats(stats)[f"Transformer/encoderblock/{op}"]
    per = [quant.stats.flat_stats(flat_stats)[f"Transformer/encoderblock_{i}/{op}"]
           for i in range(2)]
    np.testing.assert_allclose(got, max(per), rtol=1e-6)
  qv = {**vs, "params": quant.quantize_params(vs["params"], rules)}
  k = qv["params"]["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert k.scale.shape == ((2, 1, 32) if per_layer else (1, 1, 32))

  def logits(q, a):
    return model.apply(q, a)[0]

  serve = jax.jit(lambda q, a: quant.int8_apply(logits, q, stats, a, rules=rules, strict=True))
  cov = quant.coverage(logits, qv, x, calibration=stats, rules=rules)
  assert _lowered_s8(serve, qv, x) == VIT_BLOCK + 2 == cov.int8_ops
  assert cov.unattributed_int8 == 0 and not cov.float_contractions()
  stacked = [p for p in cov.weights if "/encoderblock/" in p]
  assert len(stacked) == VIT_BLOCK
  for p in stacked:
    assert [r.signature for r in cov.by_path()[p]] == ["s8 x s8 -> s32"], p
  y8, yf = serve(qv, x), jax.jit(flat.apply)(v, x)[0]
  np.testing.assert_allclose(jax.jit(logits)(vs, x), yf, rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(y8 - yf))) < 0.05 * float(jnp.max(jnp.abs(yf)))
  # QAT with frozen ranges simulates the scanned int8 program
  fq = jax.jit(quant.qat(model, rules).apply)({**vs, "quant_stats": stats}, x)[0]
  assert float(jnp.max(jnp.abs(y8 - fq))) <= 2 * float(jnp.max(jnp.abs(fq))) / 127


@pytest.mark.slow
def test_vit_scan_qat_trains_a_step(vit_pair):
  """QAT through the scan: stacked kernels get gradients in every layer slice, and a
  stacked kernel's range moves as the EMA of its layers' largest batch range."""
  _, _, model, vs, x = vit_pair
  x2 = 3.0 * jax.random.normal(jax.random.key(7), x.shape) + 1.0
  labels = jnp.array([0, 3])
  qm = quant.qat(model)
  variables = {**vs, "quant_stats": qm.init_stats(vs, x)}
  op = "Transformer/encoderblock/MlpBlock_0/Dense_0"
  assert op in quant.stats.flat_stats(variables["quant_stats"])
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, stats, opt):
    def loss(p):
      (logits, _), upd = qm.apply({"params": p, "quant_stats": stats}, x2,
                                  mutable=["quant_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), upd

    (l, upd), g = jax.value_and_grad(loss, has_aux=True)(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), upd["quant_stats"], opt, l, g

  params = vs["params"]
  p1, s1, _, l0, g = step(params, variables["quant_stats"], tx.init(params))
  gk = g["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert gk.shape == (2, 16, 32) and bool(jnp.all(jnp.isfinite(gk)))
  assert float(jnp.abs(gk[0]).sum()) > 0 and float(jnp.abs(gk[1]).sum()) > 0
  before = quant.stats.flat_stats(variables["quant_stats"])[op]
  after = quant.stats.flat_stats(s1)[op]
  # a = 0.99 a' + 0.01 max_layers(batch): the implied batch range is near the float one
  # (not equal: the second layer's input follows the first layer's fake-quant)
  batch = quant.stats.flat_stats(quant.calibrate(model.apply, vs, [(x2,)]))[op]
  implied = (float(after) - 0.99 * float(before)) / 0.01
  assert abs(float(batch) - float(before)) > 0.1
  assert abs(implied - float(batch)) < 0.25 * float(batch), (implied, float(batch))
  _, _, _, l1, _ = step(p1, s1, tx.init(p1))
  assert np.isfinite(float(l1))


def test_vit_scan_gptq_raises_naming_the_stacked_leaf(vit_pair):
  _, _, model, vs, x = vit_pair
  with pytest.raises(ValueError, match=r"Transformer/encoderblock/.*kernel.*scan body"):
    quant.gptq(model.apply, vs, [(x,)], bits=4, group_size=None)


# ----------------------------------------------------------------------------- NNX scan
class _Block(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(8, 16, rngs=rngs)
    self.down = nnx.Linear(16, 8, rngs=rngs)

  def __call__(self, x):
    return x + self.down(nnx.relu(self.up(x)))


class _Stack(nnx.Module):
  """MaxText-style: blocks created by ``nnx.vmap`` (kernels ``(layers, in, out)``) and
  run by ``nnx.scan``."""

  def __init__(self, layers, rngs):
    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r):
      return _Block(r)

    self.blocks = make(rngs)
    self.head = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(h, block):
      return block(h)

    return self.head(body(x, self.blocks))


def test_nnx_scan_stack_int8_serving():
  model = _Stack(3, nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 8))
  stats = quant.calibrate(lambda m, a: m(a), model, [(x,)])
  qp = quant.quantize_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  assert qp["blocks"]["up"]["kernel"].shape == (3, 8, 16)
  serve = jax.jit(lambda q, a: quant.int8_apply(model, q, stats, a, strict=True))
  cov = quant.coverage(model, qp, x, calibration=stats)
  assert _lowered_s8(serve, qp, x) == 3 == cov.int8_ops and cov.unattributed_int8 == 0
  y8, yf = serve(qp, x), model(x)
  assert float(jnp.max(jnp.abs(y8 - yf))) < 0.05 * float(jnp.max(jnp.abs(yf)))


def test_hlo_trace_sources_follows_calls_while_and_cond():
  """The dataflow under coverage: an s8 weight reaches dots through a ``jit`` call, a
  ``scan`` (``while`` body, counted once) and both branches of a ``cond``; an untracked
  parameter (the activation) never counts as the weight."""
  def dot(x, w):
    return jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.int32)

  def f(w, stack, x, flag):
    y = jax.jit(dot)(x, w.T.T)
    y = y + jax.lax.scan(lambda c, wi: (c + dot(x, wi), None), y, stack)[0]
    return y + jax.lax.cond(flag, lambda: dot(x, w), lambda: dot(x, -w))

  w = jnp.ones((4, 3), jnp.int8)
  args = (w, jnp.ones((2, 4, 3), jnp.int8), jnp.ones((5, 4), jnp.int8), True)
  text = jax.jit(f, keep_unused=True).lower(*args).as_text(dialect="hlo")
  uses = _hlo.trace_sources(text, {0: (0, "value"), 1: (1, "value")})
  dots = [u for u in uses if u.op == "dot"]
  assert len(dots) == _hlo.census_from_hlo(text).count(*S8) == 4
  owners = sorted(_hlo._owner(u.sources[1]) for u in dots)   # noqa: SLF001
  assert owners == [0, 0, 0, 1]
  assert all(_hlo._owner(u.sources[0]) is None for u in dots)   # noqa: SLF001
