"""Bugs found by reading (c, d) and explain() honesty; (a) and (b) live with precision/quant."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import zoo_thirdparty as zoo
from jaxopt_dnn import quant
from jaxopt_dnn.app import compress


def test_compress_weights_count_norm_scales():
  """Bug (c): every leaf named ``scale`` was skipped, LayerNorm/BatchNorm scales included."""
  p = {"Dense_0": {"kernel": jnp.ones((4, 3))},
       "LayerNorm_0": {"scale": jnp.ones(3), "bias": jnp.zeros(3)}}
  assert compress._weights({"params": p}) == (18, 15)
  # a quantized kernel still counts once (its QArray scale is metadata)
  assert compress._weights({"params": quant.quantize_params(p)}) == (18, 15)


def test_shadowed_rule_is_reported_as_shadowed():
  """Bug (d): a rule shadowed by an earlier one was reported as "matches no leaf"."""
  p = {"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
  with pytest.raises(ValueError, match=r"'Dense_0/kernel' is shadowed.*earlier.*\['kernel'\]"):
    quant.quantize_params(p, ["kernel", "Dense_0/kernel"])
  with pytest.raises(ValueError, match=r"\['nothing'\] match no leaf"):
    quant.quantize_params(p, ["kernel", "nothing"])


@pytest.mark.slow
def test_explain_says_what_compiles_not_what_the_rule_hoped():
  model, inputs = zoo.linen_lm(layers=1)
  v = nn.unbox(model.init(jax.random.key(0), *inputs))
  rules = [quant.QuantRule("embedding", granularity=-1), quant.QuantRule("kernel")]   # per-embed-channel
  text = quant.explain(v["params"], rules, apply_fn=model, inputs=inputs, print_fn=None)
  rows = {line.split()[0]: line for line in text.splitlines()[1:]}
  assert "dot_general f32 x f32 -> f32 (float)" in rows["embed/embedding"]   # tied logits
  assert "s8 x s8 -> s32 (int8)" in rows["layer_0/query/kernel"]
  assert rows["layer_0/query/bias"].endswith("float")
  plain = quant.explain(v["params"], rules, print_fn=None)
  assert "what the rules ask for" in plain


def test_quant_package_has_no_import_cycle():
  """numerics (qarray, ranges, fake, ops) <- rules <- hooks <- modes <- qat / serve /
  coverage <- calibrate."""
  import ast
  import pathlib

  root = pathlib.Path(quant.__file__).parent
  graph = {}
  for f in root.glob("*.py"):
    deps = set()
    for node in ast.walk(ast.parse(f.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module:
        if node.module.startswith("jaxopt_dnn.quant."):
          deps.add(node.module.rsplit(".", 1)[1])
        elif node.module == "jaxopt_dnn.quant":
          deps.update(a.name for a in node.names)
    graph[f.stem] = deps - {f.stem}
  graph.pop("__init__")
  seen, done = set(), set()

  def visit(n, stack):
    assert n not in stack, f"import cycle: {stack + [n]}"
    if n in done:
      return
    for d in graph.get(n, ()):
      visit(d, stack + [n])
    done.add(n)

  for n in graph:
    visit(n, [])
  for m in ("qat", "serve", "coverage"):
    assert m not in graph["hooks"] and "calibrate" not in graph[m]
  assert "modes" not in graph["hooks"]


def test_linen_nnx_decision_lives_in_the_model_adapter():
  """Issue 21: the converted modules go through ``model_adapter.adapt``; none of them
  tests ``isinstance(..., nnx.Module)`` itself (a source scan). The Trainer is one of
  them: its linen and NNX halves live in ``train_model.py``, and ``trainer.py`` neither
  tests a module's kind (``is_nnx``, ``isinstance(..., nn.Module)``) nor calls ``nn.`` /
  ``nnx.`` functions."""
  import ast
  import pathlib
  import re

  root = pathlib.Path(__file__).resolve().parents[1] / "jaxopt_dnn"
  converted = ["quant/qat.py", "quant/serve.py", "quant/coverage.py", "quant/hessian.py",
               "sparsity/oneshot.py", "auto/search.py", "roles.py", "lora.py",
               "decode/decoding.py", "precision/policy.py", "trainer.py", "train_model.py"]
  pat = re.compile(r"isinstance\(.*\bnnx\.Module\b")
  bad = []
  for rel in converted:
    text = (root / rel).read_text()
    bad += [f"{rel}:{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1)
            if pat.search(line)]
    assert "model_adapter" in text, f"{rel} does not go through model_adapter"
  bad += [f"trainer.py:{n.lineno}: {ast.unparse(n)}"
          for n in _kind_tests(ast.parse((root / "trainer.py").read_text()))]
  assert not bad, "linen/NNX decided outside model_adapter:\n" + "\n".join(bad)
  assert pat.search((root / "model_adapter.py").read_text())
  for src in ("isinstance(model, nnx.Module)", "self.is_nnx = True", "nnx.split(model)",
              "isinstance(m, (nn.Module, int))", "nn.meta.unbox(v)"):   # the scan sees them
    assert _kind_tests(ast.parse(src)), src


def _kind_tests(tree):
  """The nodes of a parsed module that tell linen from NNX themselves: a name or
  attribute ``is_nnx``, an ``isinstance`` naming ``nn.Module`` / ``nnx.Module``, a call
  of an ``nn.`` / ``nnx.`` function (docstrings and type hints are not calls)."""
  import ast

  def root(e):
    while isinstance(e, ast.Attribute):
      e = e.value
    return e.id if isinstance(e, ast.Name) else None

  out = []
  for n in ast.walk(tree):
    name = getattr(n, "id", None) or getattr(n, "attr", None)
    call = n.func if isinstance(n, ast.Call) else None
    if name == "is_nnx":
      out.append(n)
    elif isinstance(call, ast.Attribute) and root(call) in ("nn", "nnx"):
      out.append(n)
    elif isinstance(call, ast.Name) and call.id == "isinstance" and any(
        isinstance(a, ast.Attribute) and a.attr == "Module" and root(a) in ("nn", "nnx", "linen")
        for a in ast.walk(n)):
      out.append(n)
  return out


def test_model_adapter_linen_and_nnx_are_the_same_pure_function():
  """``adapt`` gives linen and NNX models the same operations: the params tree, a pure
  forward of it, ``split`` leaves and ``rebuild`` (linen variables / a fresh module)."""
  from flax import nnx

  from jaxopt_dnn.model_adapter import adapt

  x = jnp.arange(12.0, dtype=jnp.float32).reshape(3, 4) / 10
  lin = nn.Dense(2)
  variables = lin.init(jax.random.key(0), x)
  mod = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
  for model, v, ref in ((lin, variables, lin.apply(variables, x)), (mod, None, mod(x))):
    a = adapt(model, v)
    params = a.params
    sp = a.split()
    assert sorted(sp.paths) == ["bias", "kernel"]
    assert jnp.allclose(jax.jit(lambda lv: sp.call(lv, sp.rest, x))(sp.leaves), ref)
    doubled = jax.tree.map(lambda w: 2 * w, params)
    assert jnp.allclose(jax.jit(a.apply_params)(doubled, x), 2 * ref)
    assert jnp.allclose(a.call(a.rebuild(doubled), x), 2 * ref)
  assert jnp.allclose(mod(x), adapt(mod).call(adapt(mod).rebuild(), x))   # untouched
  assert isinstance(adapt(mod).rebuild(), nnx.Linear)
  assert adapt(lin, variables).rebuild() is variables
