"""jd.auto: multiple-choice knapsack, per-layer sensitivity, budgeted plans."""

import importlib
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxopt_dnn as jd
from jaxopt_dnn import quant
from jaxopt_dnn.auto import knapsack


def _brute(costs, values, cap):
  best = None
  for picks in itertools.product(*[range(len(c)) for c in costs]):
    c = sum(costs[i][k] for i, k in enumerate(picks))
    v = sum(values[i][k] for i, k in enumerate(picks))
    if c <= cap and (best is None or v < best - 1e-12):
      best = v
  return best


@pytest.mark.parametrize("seed", range(40))
def test_knapsack_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  items, opts = rng.integers(1, 5), rng.integers(1, 4)
  costs = rng.integers(0, 9, (items, opts)).tolist()
  values = rng.random((items, opts)).round(3).tolist()
  cap = int(rng.integers(0, 9 * items))
  got = knapsack.solve(costs, values, cap)
  want = _brute(costs, values, cap)
  if want is None:
    assert got is None
  else:
    picks, total = got
    assert sum(costs[i][k] for i, k in enumerate(picks)) <= cap
    assert total == pytest.approx(want) == pytest.approx(
        sum(values[i][k] for i, k in enumerate(picks)))


def test_knapsack_is_monotone_in_the_budget():
  rng = np.random.default_rng(0)
  costs = rng.integers(1, 20, (12, 4)).tolist()
  values = rng.random((12, 4)).tolist()
  totals = [knapsack.solve(costs, values, c) for c in range(0, 240)]
  found = [t[1] for t in totals if t is not None]
  assert found and all(b <= a + 1e-12 for a, b in zip(found, found[1:]))
  with pytest.raises(ValueError, match="item 0"):
    knapsack.solve([[1, 2]], [[0.1]], 3)


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i, w in enumerate((96, 64, 96)):
      x = nn.gelu(nn.Dense(w, name=f"fc{i}")(x))
    return nn.Dense(10, name="head")(x)


@pytest.fixture(scope="module")
def mlp():
  model = _MLP()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 48)).astype(np.float32)
  variables = model.init(jax.random.key(0), x[:1])
  # heavier-tailed weights in one layer: it must come out as the most sensitive
  p = jax.tree.map(np.asarray, variables["params"])
  p["fc1"]["kernel"] = (p["fc1"]["kernel"] * rng.standard_t(2, p["fc1"]["kernel"].shape) * 0.5
                        ).astype(np.float32)
  variables = {"params": p}
  batches = [(x[i:i + 16],) for i in range(0, 64, 16)]
  sens = jd.auto.sensitivity(model.apply, variables, batches,
                             candidates=["int4", "int8", "16-bit"], method="rtn")
  return model, variables, batches, sens


@pytest.mark.slow
def test_sensitivity_is_the_direct_single_layer_measurement(mlp):
  model, variables, batches, sens = mlp
  assert sens.layers == ["fc0/kernel", "fc1/kernel", "fc2/kernel", "head/kernel"]
  ref = [model.apply(variables, *b) for b in batches]
  p = variables["params"]
  qk = quant.dequantize(quant.quantize_params(p, r"^fc1/kernel$", bits=4)["fc1"]["kernel"])
  swapped = {**p, "fc1": {**p["fc1"], "kernel": np.asarray(qk)}}
  direct = np.mean([float(jd.auto.output_distortion(model.apply({"params": swapped}, *b), r))
                    for b, r in zip(batches, ref)])
  assert sens.values["fc1/kernel"]["int4"] == pytest.approx(direct, rel=1e-4)
  for layer in sens.layers:   # more bits, less distortion
    v = sens.values[layer]
    assert v["int4"] > v["int8"] > v["16-bit"] >= 0
  assert max(sens.layers, key=lambda l: sens.values[l]["int4"]) == "fc1/kernel"


def test_plans_respect_the_budget_improve_with_it_and_predict_the_measurement(mlp):
  model, variables, batches, sens = mlp
  plans = [jd.auto.search(model.apply, variables, batches, bits_per_weight=b, sens=sens,
                          method="rtn", verify=True) for b in (5.0, 6.0, 8.5, 12.0)]
  for b, plan in zip((5.0, 6.0, 8.5, 12.0), plans):
    assert plan.bits_per_weight <= b
    # the achieved bits are those of the realised tree (values + scales)
    realised = plan.apply(model.apply, variables, batches)
    stored = sum(jd.auto.stored_bits(x) for p, x in
                 jax.tree_util.tree_flatten_with_path(realised, is_leaf=quant.is_qarray)[0]
                 if jax.tree_util.keystr(p, simple=True, separator="/") in plan.choices)
    assert stored == pytest.approx(plan.bits_per_weight * sum(plan.sizes.values()))
    assert "fc1/kernel" in str(plan) and "bits/weight" in str(plan)
  preds = [p.predicted for p in plans]
  assert all(b <= a for a, b in zip(preds, preds[1:]))
  # the most sensitive layer gets more bits than a uniform split would give it
  assert plans[1].choices["fc1/kernel"] != "int4"
  # additivity: predicted vs measured rank the plans the same way
  meas = [p.measured for p in plans]
  assert np.argsort(preds).tolist() == np.argsort(meas).tolist()
  # uniform int4 for comparison: the 6-bit plan is better than uniform int4 (4.5 bits)
  uniform = sens.uniform("int4")
  assert plans[1].measured < uniform.verify(model.apply, variables, batches)
  # the reused leaves are what the method gives when run again on those layers only (RTN)
  fresh = plans[1].apply(model.apply, variables, batches, reuse=False)
  reused = plans[1].apply(model.apply, variables, batches)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               fresh, reused)
  with pytest.raises(ValueError, match="below the cheapest plan"):
    jd.auto.search(model.apply, variables, batches, bits_per_weight=2.0, sens=sens)


def test_quality_target_gives_the_smallest_plan_meeting_it(mlp):
  model, variables, batches, sens = mlp
  target = 1e-3
  plan = jd.auto.search(model.apply, variables, batches, target=target, sens=sens,
                        method="rtn")
  assert plan.measured <= target
  cheaper = jd.auto.search(model.apply, variables, batches, sens=sens, method="rtn",
                           bits_per_weight=plan.bits_per_weight - 0.5, verify=True)
  assert cheaper.measured > target or cheaper.bits_per_weight >= plan.bits_per_weight - 0.5
  by_bytes = jd.auto.search(model.apply, variables, batches, sens=sens, method="rtn",
                            bits_per_weight=None, budget_bytes=plan.bytes)
  assert by_bytes.bytes <= plan.bytes


@pytest.mark.slow
def test_nnx_module_in_place_of_apply_fn():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Linear(16, 32, rngs=rngs)
      self.b = nnx.Linear(32, 4, rngs=rngs)

    def __call__(self, x):
      return self.b(jax.nn.relu(self.a(x)))

  net = Net(nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(net, nnx.Param))
  x = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
  for method in ("rtn", "gptq"):    # GPTQ runs the module itself (cross-fitted halves)
    plan = jd.auto.search(net, params, [(x,)], bits_per_weight=9.0, method=method,
                          candidates=["int4", "int8", "16-bit"], verify=True)
    assert set(plan.choices) == {"a/kernel", "b/kernel"} and plan.bits_per_weight <= 9.0
    assert plan.measured is not None and plan.measured < 0.05
  with pytest.raises(ValueError, match="unknown candidate"):
    jd.auto.search(net, params, [(x,)], candidates=["int3"], method="rtn")
  with pytest.raises(ValueError, match="method"):
    jd.auto.search(net, params, [(x,)], method="magic")


@pytest.mark.slow
def test_plan_command_writes_table_json_and_pareto_plot(tmp_path, capsys):
  import json
  from jaxopt_dnn.app import cli
  out = tmp_path / "plan"
  rc = cli.main(["plan", "--dataset", "digits", "--steps", "60", "--budgets", "5,9",
                 "--candidates", "int4,int8,16-bit", "--out", str(out)])
  assert rc == 0
  res = json.loads((out / "plan.json").read_text())
  assert [p["name"] for p in res["uniform"]] == ["int4", "int8", "16-bit"]
  assert all(p["bits_per_weight"] <= b for p, b in zip(res["auto"], (5, 9)))
  assert (out / "pareto.png").stat().st_size > 10_000
  assert "bits/weight" in (out / "plan.md").read_text()
  assert "s[int4]" in capsys.readouterr().out
  # bad input: one line, exit 2, nothing written
  bad = tmp_path / "bad"
  assert cli.main(["plan", "--candidates", "int3", "--out", str(bad)]) == 2
  assert cli.main(["plan", "--budgets", "x", "--out", str(bad)]) == 2
  assert not bad.exists()
  assert "int3" in capsys.readouterr().err


def test_candidate_names_set_scale_storage_and_int8_is_per_channel(mlp):
  _, variables, _, _ = mlp
  c = jd.auto.Candidate.parse("int4-g32-fp8")
  assert (c.bits, c.group_size, c.scale_dtype) == (4, 32, "float8_e4m3fn")
  assert jd.auto.Candidate.parse("int8").quant_kwargs == {"bits": 8, "group_size": None}
  k = variables["params"]["fc1"]["kernel"]
  n = k.size
  leaves = {name: quant.quantize_params({"k": k}, [("k", jd.auto.Candidate.parse(name)
                                                    .quant_kwargs)])["k"]
            for name in ("int4-g16", "int4-g16-fp8", "int8")}
  bits = {name: jd.auto.Candidate.parse(name).cost_bits(q) for name, q in leaves.items()}
  assert bits["int4-g16"] == 4 * n + 16 * n // 16
  assert bits["int4-g16-fp8"] == 4 * n + 8 * n // 16 + 32          # + one f32 super scale
  assert bits["int8"] == 8 * n + 32 * k.shape[1]                    # one scale per output
  # fp8 scales cost half, and quantize almost as well
  err = {name: float(np.mean((np.asarray(quant.dequantize(q)) - k) ** 2))
         for name, q in leaves.items()}
  assert err["int4-g16-fp8"] < 1.2 * err["int4-g16"]


@pytest.mark.slow
def test_crossfit_sensitivity_calibrates_and_measures_on_different_halves(mlp):
  model, variables, batches, _ = mlp
  sens = jd.auto.sensitivity(model.apply, variables, batches, method="gptq",
                             candidates=["int4"])
  insample = jd.auto.sensitivity(model.apply, variables, batches, method="gptq",
                                 candidates=["int4"], crossfit=False)
  layers = sens.layers
  rules = [(f"^{layer}$", {"bits": 4, "group_size": None}) for layer in layers]
  p = variables["params"]

  def measured(fit, on, layer="fc1"):
    # each layer alone: GPTQ calibrated on the float model's inputs (not sequential)
    q = quant.gptq(model.apply, variables, [batches[i] for i in fit], bits=4,
                   group_size=None, rules=rules, sequential=False)[layer]["kernel"]
    swapped = {**p, layer: {**p[layer], "kernel": np.asarray(quant.dequantize(q))}}
    return [float(jd.auto.output_distortion(model.apply({"params": swapped}, *batches[i]),
                                            model.apply(variables, *batches[i]))) for i in on]

  direct = np.mean(measured([0, 2], [1, 3]) + measured([1, 3], [0, 2]))
  assert sens.values["fc1/kernel"]["int4"] == pytest.approx(direct, rel=1e-4)
  assert insample.values["fc1/kernel"]["int4"] == pytest.approx(
      np.mean(measured([0, 1, 2, 3], [0, 1, 2, 3])), rel=1e-4)
  # GPTQ fits its calibration batches: in-sample it looks better than on unseen batches
  assert insample.values["fc1/kernel"]["int4"] < sens.values["fc1/kernel"]["int4"]
  assert sens.stored is None and insample.stored is not None
  # one batch: cut in two halves along the batch axis
  one = (np.concatenate([batches[0][0], batches[1][0]]),)
  split = jd.auto.sensitivity(model.apply, variables, [one], method="gptq",
                              candidates=["int4"])
  halves = jd.auto.sensitivity(model.apply, variables, batches[:2], method="gptq",
                               candidates=["int4"])
  assert split.stored is None
  for layer in layers:
    assert split.values[layer]["int4"] == pytest.approx(halves.values[layer]["int4"],
                                                        rel=1e-5)
  with pytest.raises(ValueError, match="two calibration batches"):
    jd.auto.sensitivity(model.apply, variables, [(batches[0][0][:1],)], method="gptq",
                        candidates=["int4"], crossfit=True)


@pytest.mark.slow
def test_sparse_candidates_cost_nonzero_bits_and_keep_their_pattern(mlp):
  model, variables, batches, _ = mlp
  c = jd.auto.Candidate.parse("int4-g16+2:4")
  assert c.prune_kwargs == {"n": 2, "m": 4} and c.bits == 4 and c.group_size == 16
  assert jd.auto.Candidate.parse("16-bit+50%").prune_kwargs == {"sparsity": 0.5}
  for bad in ("int4+4:4", "int8+0%", "int8+2-4"):
    with pytest.raises(ValueError, match="sparsity|unknown candidate"):
      jd.auto.Candidate.parse(bad)
  k = variables["params"]["fc1"]["kernel"]
  n = k.size
  # nonzero bits: kept values + a 1-bit mask per weight (unstructured) + the scales
  half = np.where(np.abs(k) > np.median(np.abs(k), axis=0), k, 0).astype(np.float32)
  q = quant.quantize_params({"k": half}, [("k", {"bits": 8, "group_size": None})])["k"]
  assert jd.auto.Candidate.parse("int8+50%").cost_bits(q) == 8 * (n // 2) + n + 32 * k.shape[1]
  cands = ["int4-g16", "int4-g16+2:4", "16-bit"]
  sens = jd.auto.sensitivity(model.apply, variables, batches, method="gptq", candidates=cands,
                             crossfit=False)
  # 2:4: kept values + a 2-bit index per kept value + the scales
  assert sens.bits["fc1/kernel"]["int4-g16+2:4"] == 4 * n // 2 + 2 * n // 2 + 16 * n // 16
  for layer in sens.layers:   # pruning half the weights costs quality
    assert sens.values[layer]["int4-g16+2:4"] > sens.values[layer]["int4-g16"]
  plan = jd.auto.search(model.apply, variables, batches, bits_per_weight=4.0, sens=sens,
                        method="gptq")
  assert plan.bits_per_weight <= 4.0
  assert any("+" in c for c in plan.choices.values())
  realised = plan.apply(model.apply, variables, batches)
  for path, choice in plan.choices.items():
    leaf = realised[path.split("/")[0]]["kernel"]
    w = np.asarray(quant.dequantize(leaf) if quant.is_qarray(leaf) else leaf, np.float32)
    if choice == "int4-g16+2:4":      # 2 of every 4 consecutive inputs survive GPTQ
      assert np.all((w.reshape(-1, 4, w.shape[1]) != 0).sum(1) <= 2)


def test_gptq_keep_zeros_keeps_a_pruned_pattern_and_compensates():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(64, 16)).astype(np.float32)
  x = rng.normal(size=(256, 64)).astype(np.float32) @ rng.normal(size=(64, 64)).astype(
      np.float32) * 0.3
  keep = np.abs(w) > np.median(np.abs(w), axis=0)
  wp = np.where(keep, w, 0.0).astype(np.float32)
  h = jnp.asarray(2 * x.T @ x)
  codes, scales = quant.gptq_solve(jnp.asarray(wp), h, bits=4, group_size=None,
                                   keep=jnp.asarray(keep))
  assert np.all(np.asarray(codes)[~keep] == 0)
  deq = np.asarray(codes, np.float32) * np.asarray(scales)
  rtn = np.asarray(quant.dequantize(quant.quantize(jnp.asarray(wp), bits=4, axis=-1)))
  loss = lambda d: float(np.sum((x @ (wp - d)) ** 2))   # noqa: E731
  assert loss(deq) < 0.9 * loss(rtn)
  # without the mask, GPTQ's updates refill the pruned weights
  refilled, _ = quant.gptq_solve(jnp.asarray(wp), h, bits=4, group_size=None)
  assert np.any(np.asarray(refilled)[~keep] != 0)


@pytest.mark.slow
def test_gptq_sensitivity_calibrates_conv_kernels():
  """A conv kernel is captured by the interpreter (im2col rows) like quant.gptq does:
  its GPTQ candidate is calibrated alone and beats RTN on its own input; the Dense layer
  too."""
  class C(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(8, (3,), name="conv")(x))
      return nn.Dense(4, name="head")(x.reshape(x.shape[0], -1))

  x = np.random.default_rng(0).normal(size=(16, 12, 3)).astype(np.float32)
  m = C()
  v = m.init(jax.random.key(0), x)
  sens = jd.auto.sensitivity(m.apply, v, [(x[:8],), (x[8:],)], method="gptq",
                             candidates=["int4", "int8"], crossfit=False)
  assert sens.layers == ["conv/kernel", "head/kernel"]
  rtn = quant.dequantize(quant.quantize_params(v["params"], r"^conv/kernel$", bits=4,
                                               group_size=None)["conv"]["kernel"])
  w = v["params"]["conv"]["kernel"]
  conv = lambda k: jax.lax.conv_general_dilated(   # noqa: E731
      jnp.asarray(x), jnp.asarray(k), (1,), "SAME", dimension_numbers=("NHC", "HIO", "NHC"))
  err = lambda k: float(jnp.sum((conv(w) - conv(k)) ** 2))   # noqa: E731
  got = quant.dequantize(sens.stored["int4"]["conv/kernel"])
  assert not np.array_equal(np.asarray(got), np.asarray(rtn))
  assert err(got) < err(rtn)
  for layer in sens.layers:
    assert sens.values[layer]["int4"] > sens.values[layer]["int8"] > 0


@pytest.mark.slow
def test_background_workers_change_nothing_and_errors_still_surface(mlp, monkeypatch):
  """The pipelined pass (compiles ahead, realises the next candidate while measuring)
  gives exactly the sequential pass's numbers, with batches of two different shapes."""
  model, variables, batches, _ = mlp
  mixed = batches[:2] + [(batches[2][0][:12],), (batches[3][0][:12],)]
  kw = dict(method="gptq", candidates=["int4", "int8", "16-bit"])
  seq = jd.auto.sensitivity(model.apply, variables, mixed, workers=0, **kw)
  par = jd.auto.sensitivity(model.apply, variables, mixed, workers=2, **kw)
  assert par.values == seq.values and par.bits == seq.bits
  with pytest.raises(ValueError, match="workers must be"):
    jd.auto.sensitivity(model.apply, variables, mixed, workers=3, **kw)
  # an error inside a background realisation reaches the caller
  gptq_module = importlib.import_module("jaxopt_dnn.quant.gptq")   # (quant.gptq is the function)

  def broken(*_a, **_k):
    raise RuntimeError("solver broke")
  monkeypatch.setattr(gptq_module, "solve_alone", broken)
  with pytest.raises(RuntimeError, match="solver broke"):
    jd.auto.sensitivity(model.apply, variables, mixed, workers=2, **kw)
