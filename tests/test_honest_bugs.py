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
