"""Folding inference-mode BatchNorm into the preceding Conv/Dense.

At inference a BatchNorm is an affine map per output channel ``c``:

  BN(z)_c = gamma_c * (z_c - mu_c) / sqrt(var_c + eps) + beta_c

so after ``z = x @ W + b`` (or a convolution, whose kernel's last axis is the output
channel) it folds into the layer itself with ``s = gamma / sqrt(var + eps)``:

  W' = W * s        (broadcast over the kernel's last axis)
  b' = (b - mu) * s + beta        (``b = 0`` when the layer had no bias)

The folded network computes the same function with one layer less per pair, which is
also what int8 serving wants (quantize the folded kernel, not a kernel whose scale
BatchNorm changes afterwards).

Pairs are found by tracing the model (``model=`` and ``sample=``): a BatchNorm is
paired with the Conv/Dense whose *output object* is its input, so ``conv -> relu ->
BN`` is never folded by mistake, and the traced modules give each BatchNorm's
``epsilon``. Without a model, ``BatchNorm_i`` is paired with the one sibling layer
``<Layer>_i`` of matching width (linen numbers each layer type in creation order; dict
order itself is lost to ``jax.tree`` operations, which sort keys). Pairs can also be given
explicitly as ``[("Conv_0", "BatchNorm_0"), ...]`` (module paths, ``/``-separated).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxopt_dnn._tree import leaves_with_paths


class FoldResult(NamedTuple):
  """``variables``: folded (BatchNorm entries removed); ``model``: the model to apply
  them with (``None`` if no model was given); ``pairs``: ``((layer, batchnorm), ...)``."""
  variables: dict
  model: Any
  pairs: tuple[tuple[str, str], ...]


def _to_dict(tree):
  if isinstance(tree, Mapping):
    return {k: _to_dict(v) for k, v in tree.items()}
  return tree


def _get(tree: Mapping, path: str, what: str, candidates: Sequence[str]):
  node = tree
  for part in path.split("/"):
    if not isinstance(node, Mapping) or part not in node:
      raise ValueError(f"fold.batchnorm: no {what} {path!r} in the variables; candidates: "
                       + ", ".join(candidates))
    node = node[part]
  return node


def _delete(tree: dict, path: str):
  parts = path.split("/")
  stack = [tree]
  for p in parts[:-1]:
    stack.append(stack[-1][p])
  stack[-1].pop(parts[-1], None)
  for node, p in zip(reversed(stack[:-1]), reversed(parts[:-1])):  # prune empty dicts
    if not node[p]:
      node.pop(p)


def _module_paths(params: Mapping, leaf: str) -> list[str]:
  return [p[: -len("/" + leaf)] for p, _ in leaves_with_paths(params) if p.endswith("/" + leaf)
          or p == leaf]


def _norm_path(p: Any, argname: str) -> str:
  if not isinstance(p, str) or not p.strip("/"):
    raise TypeError(f"fold.batchnorm: {argname} must be a non-empty module path string, got {p!r}")
  p = p.strip("/")
  return p[len("params/"):] if p.startswith("params/") else p


def _name_pairs(params: Mapping, stats: Mapping) -> list[tuple[str, str]]:
  """Pairs ``BatchNorm_i`` with the one kernel-bearing sibling ``<Layer>_i`` of matching width.

  Dict order cannot be trusted (``jax.tree`` operations and checkpoint restores sort
  keys), but linen's automatic names number each layer type in creation order, so in a
  sequential block ``Conv_i`` feeds ``BatchNorm_i``. Anything ambiguous is an error.
  """
  pairs = []

  def walk(p_node, s_node, prefix):
    for key, child in p_node.items():
      s_child = s_node.get(key, {}) if isinstance(s_node, Mapping) else {}
      path = f"{prefix}{key}"
      if isinstance(s_child, Mapping) and "mean" in s_child and "var" in s_child:
        width = s_child["mean"].shape[-1:]
        idx = key.rsplit("_", 1)[-1]
        layers = [k for k, c in p_node.items() if k != key and isinstance(c, Mapping)
                  and "kernel" in c and not isinstance(c["kernel"], Mapping)]
        hits = [k for k in layers if k.rsplit("_", 1)[-1] == idx
                and p_node[k]["kernel"].shape[-1:] == width]
        if len(hits) != 1:
          raise ValueError(
              f"fold.batchnorm: cannot tell which layer feeds BatchNorm {path!r} (same-index "
              f"candidates {[prefix + h for h in hits]}, siblings {[prefix + k for k in layers]}); "
              "pass pairs=[(layer, batchnorm), ...] or model= and sample= to trace the model")
        pairs.append((prefix + hits[0], path))
      elif isinstance(child, Mapping) and "kernel" not in child:
        walk(child, s_child, path + "/")

  walk(params, stats, "")
  return pairs


@dataclasses.dataclass
class _Call:
  path: str
  module: nn.Module
  inp: Any
  out: Any
  kwargs: dict


def trace_pairs(model: nn.Module, variables: Mapping, *args, **kwargs):
  """Finds ``(layer, batchnorm, epsilon)`` triples by tracing ``model.apply``.

  A BatchNorm pairs with the Conv/Dense whose output it receives unchanged. The trace
  runs under ``jax.eval_shape`` (no FLOPs). ``args``/``kwargs`` go to ``apply`` and
  must select inference mode (running averages).
  """
  calls: list[_Call] = []

  def interceptor(next_fun, a, kw, context):
    out = next_fun(*a, **kw)
    if context.method_name == "__call__" and a:
      calls.append(_Call("/".join(context.module.path), context.module, a[0], out, kw))
    return out

  def run(v, *a):
    with nn.intercept_methods(interceptor):
      model.apply(v, *a, **{"mutable": True, **kwargs})
    found = []
    producers = {id(c.out): c for c in calls if not isinstance(c.module, nn.BatchNorm)}
    for c in calls:
      if not isinstance(c.module, nn.BatchNorm):
        continue
      ura = c.kwargs.get("use_running_average", c.module.use_running_average)
      if not ura:
        raise ValueError(f"fold.batchnorm: BatchNorm {c.path!r} ran in training mode; trace "
                         "the model in inference mode (e.g. train=False)")
      if c.module.axis not in (-1, c.inp.ndim - 1):
        raise ValueError(f"fold.batchnorm: BatchNorm {c.path!r} normalises axis {c.module.axis}, "
                         "only the last (feature) axis can fold into a kernel")
      src = producers.get(id(c.inp))
      if src is not None:
        found.append((src.path, c.path, float(c.module.epsilon)))
    return found

  box = []
  jax.eval_shape(lambda v, *a: box.append(run(v, *a)), variables, *args)
  return box[0]


def _fold_one(params, stats, layer, bn, eps, candidates):
  lp = _get(params, layer, "layer", candidates)
  if not isinstance(lp, Mapping) or "kernel" not in lp:
    raise ValueError(f"fold.batchnorm: layer {layer!r} has no kernel; found {sorted(lp)}")
  st = _get(stats, bn, "BatchNorm statistics (batch_stats)", _module_paths(stats, "mean"))
  if not isinstance(st, Mapping) or "mean" not in st or "var" not in st:
    raise ValueError(f"fold.batchnorm: {bn!r} in batch_stats has no mean/var")
  bp = params
  for part in bn.split("/"):
    bp = bp.get(part, {}) if isinstance(bp, Mapping) else {}
  kernel = lp["kernel"]
  mean, var = st["mean"], st["var"]
  c = kernel.shape[-1]
  if mean.shape != (c,) or var.shape != (c,):
    raise ValueError(f"fold.batchnorm: layer {layer!r} has {c} output features (kernel "
                     f"{kernel.shape}) but BatchNorm {bn!r} has statistics of shape {mean.shape}")
  dt = jnp.promote_types(kernel.dtype, jnp.float32)
  gamma = bp.get("scale", jnp.ones((c,), dt)).astype(dt)
  beta = bp.get("bias", jnp.zeros((c,), dt)).astype(dt)
  s = gamma * jax.lax.rsqrt(var.astype(dt) + jnp.asarray(eps, dt))
  b = lp.get("bias", jnp.zeros((c,), dt)).astype(dt)
  new = dict(lp)
  new["kernel"] = (kernel.astype(dt) * s).astype(kernel.dtype)
  new["bias"] = ((b - mean.astype(dt)) * s + beta).astype(lp.get("bias", kernel).dtype)
  return new, "bias" not in lp


class FoldedModel:
  """Applies a linen model with folded BatchNorms skipped (identity) and the biases
  that folding created added to their (bias-free) layers' outputs, via
  ``nn.intercept_methods``. Works for any linen model; inference only."""

  def __init__(self, model: nn.Module, batchnorms: Sequence[str], new_biases: Sequence[str]):
    self.model = model
    self.batchnorms = frozenset(batchnorms)
    self.new_biases = frozenset(new_biases)

  def init(self, *args, **kwargs):
    return self.model.init(*args, **kwargs)

  def apply(self, variables, *args, **kwargs):
    params = variables["params"]

    def interceptor(next_fun, a, kw, context):
      path = "/".join(context.module.path)
      if context.method_name == "__call__" and path in self.batchnorms:
        return a[0]
      out = next_fun(*a, **kw)
      if context.method_name == "__call__" and path in self.new_biases:
        bias = params
        for part in path.split("/"):
          bias = bias[part]
        out = out + bias["bias"].astype(out.dtype)
      return out

    with nn.intercept_methods(interceptor):
      return self.model.apply(variables, *args, **kwargs)


def _same_structure(model, variables, sample, kwargs) -> bool:
  try:
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, **kwargs), sample)
  except Exception:  # noqa: BLE001 - any failure means "not a drop-in model"
    return False
  want = jax.tree.map(lambda a: (a.shape, a.dtype), _to_dict(variables))
  got = jax.tree.map(lambda a: (a.shape, a.dtype), _to_dict(shapes))
  return want == got


def batchnorm(variables: Mapping[str, Any], pairs: Sequence[tuple[str, str]] | None = None, *,
              model: nn.Module | None = None, sample: Any = None, epsilon: float = 1e-5,
              apply_kwargs: Mapping[str, Any] | None = None) -> FoldResult:
  """Folds inference-mode BatchNorms into the preceding Conv/Dense layers.

  Args:
    variables: ``{"params": ..., "batch_stats": ...}`` of a linen model.
    pairs: ``[(layer_path, batchnorm_path), ...]`` module paths (``"Conv_0"``,
      ``"BasicBlock_0/Conv_1"``); ``None`` finds them (by tracing when ``model`` and
      ``sample`` are given, else by params-dict order).
    model: the linen model; with ``sample`` it is traced to find pairs and
      epsilons, and a model to apply the folded variables with is returned: a clone
      with ``batch_norm=False`` when the model has that field and the clone's
      variables match, else a :class:`FoldedModel`.
    sample: an example input for tracing (only its shape/dtype matter).
    epsilon: BatchNorm epsilon when no traced module gives it (linen's default).
    apply_kwargs: extra keyword arguments for ``model.apply``/``init`` (inference
      mode, e.g. ``{"train": False}``).

  Returns:
    :class:`FoldResult`. The folded outputs equal the unfolded ones up to float
    rounding (~1e-6 relative in float32).

  Raises:
    ValueError: a path that does not exist (the message lists the candidates), a
      layer without a kernel, mismatched feature counts, a BatchNorm used twice.
  """
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise TypeError("fold.batchnorm: variables must be a mapping with a 'params' collection, "
                    f"got {type(variables).__name__}")
  variables = _to_dict(variables)
  params, stats = variables["params"], variables.get("batch_stats", {})
  kwargs = dict(apply_kwargs or {})
  eps_of: dict[str, float] = {}
  if model is not None and sample is not None:
    traced = trace_pairs(model, variables, sample, **kwargs)
    eps_of = {bn: eps for _, bn, eps in traced}
    if pairs is None:
      pairs = [(layer, bn) for layer, bn, _ in traced]
  if pairs is None:
    pairs = _name_pairs(params, stats)
  if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
    raise TypeError(f"fold.batchnorm: pairs must be a sequence of (layer, batchnorm) paths, "
                    f"got {pairs!r}")
  norm_pairs = []
  for pr in pairs:
    if not isinstance(pr, (tuple, list)) or len(pr) != 2:
      raise TypeError(f"fold.batchnorm: each pair must be (layer_path, batchnorm_path), got {pr!r}")
    norm_pairs.append((_norm_path(pr[0], "layer"), _norm_path(pr[1], "batchnorm")))
  seen: set[str] = set()
  for layer, bn in norm_pairs:
    for p in (layer, bn):
      if p in seen:
        raise ValueError(f"fold.batchnorm: {p!r} appears in more than one pair")
      seen.add(p)

  candidates = _module_paths(params, "kernel")
  new_biases = []
  out = _to_dict(variables)
  for layer, bn in norm_pairs:
    folded, created = _fold_one(params, stats, layer, bn, eps_of.get(bn, epsilon), candidates)
    node = out["params"]
    for part in layer.split("/")[:-1]:
      node = node[part]
    node[layer.split("/")[-1]] = folded
    if created:
      new_biases.append(layer)
  for _, bn in norm_pairs:
    _delete(out["params"], bn)
    if "batch_stats" in out:
      _delete(out["batch_stats"], bn)
  if "batch_stats" in out and not out["batch_stats"]:
    out.pop("batch_stats")

  folded_model = None
  if model is not None:
    folded_model = FoldedModel(model, [bn for _, bn in norm_pairs], new_biases)
    fields = {f.name for f in dataclasses.fields(model)} if dataclasses.is_dataclass(model) else set()
    if "batch_norm" in fields and sample is not None:
      clone = model.clone(batch_norm=False)
      if _same_structure(clone, out, sample, kwargs):
        folded_model = clone
  return FoldResult(out, folded_model, tuple(norm_pairs))
