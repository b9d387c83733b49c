"""Reference Flax models used by the main job, the benchmarks and the tests."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nn.Module):
  """Flatten -> [Dense -> relu]* -> Dense(num_classes)."""

  features: Sequence[int] = (128, 64)
  num_classes: int = 10
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = x.reshape((x.shape[0], -1))
    for f in self.features:
      x = nn.relu(nn.Dense(f, dtype=self.dtype)(x))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)


class CNN(nn.Module):
  """Small CNN for 8x8 digits: [Conv3x3 -> (BatchNorm) -> relu]* -> mean pool -> Dense -> Dense.

  With ``batch_norm=True`` the model has a ``batch_stats`` collection; call it with
  ``train=True`` and ``mutable=["batch_stats"]`` during training.
  """

  features: Sequence[int] = (32, 64)
  dense: int = 128
  num_classes: int = 10
  batch_norm: bool = False
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    for f in self.features:
      x = nn.Conv(f, (3, 3), dtype=self.dtype)(x)
      if self.batch_norm:
        x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype)(x)
      x = nn.relu(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.dense, dtype=self.dtype)(x))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)


class CNN1D(nn.Module):
  """Small 1-D CNN for MNIST-1D signals ``(N, length, channels)``:
  ``[Conv(k=5) -> relu]*`` (stride 1 for the first, ``strides`` after) -> flatten ->
  Dense -> relu -> Dense(num_classes).

  A sequential model without normalisation, so :func:`jaxopt_dnn.sparsity.shrink_channels`
  can remove channel-pruned outputs (layers ``Conv_0.. , Dense_0, Dense_1``). A
  ``(N, length)`` input gets a channel axis; an ``(N, H, W, C)`` image is read as a
  sequence of ``H * W`` pixels.
  """

  features: Sequence[int] = (32, 64, 64)
  dense: int = 128
  kernel_size: int = 5
  strides: int = 2
  num_classes: int = 10
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    if x.ndim == 2:
      x = x[..., None]
    elif x.ndim == 4:   # an image, read as a sequence of its pixels (row-major)
      x = x.reshape((x.shape[0], x.shape[1] * x.shape[2], x.shape[3]))
    if x.ndim != 3:
      raise ValueError(f"CNN1D: expected (N, length, channels) input, got shape {x.shape}")
    for i, f in enumerate(self.features):
      s = 1 if i == 0 else self.strides
      x = nn.relu(nn.Conv(f, (self.kernel_size,), strides=(s,), dtype=self.dtype)(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.dense, dtype=self.dtype)(x))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)


class BasicBlock(nn.Module):
  """ResNet basic block: ``conv3x3 -> BN -> relu -> conv3x3 -> BN`` plus the shortcut.

  The shortcut is the identity, or ``conv1x1 -> BN`` when the stride or the width
  changes. With ``batch_norm=False`` the BatchNorms are left out and the convolutions
  get biases: that is the model that :func:`jaxopt_dnn.fold.batchnorm` folds into.
  """

  features: int
  strides: int = 1
  batch_norm: bool = True
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = lambda f, k, s: nn.Conv(f, (k, k), (s, s), use_bias=not self.batch_norm,
                                   dtype=self.dtype)
    norm = lambda: (nn.BatchNorm(use_running_average=not train, dtype=self.dtype)
                    if self.batch_norm else (lambda y: y))
    residual = x
    y = norm()(conv(self.features, 3, self.strides)(x))
    y = nn.relu(y)
    y = norm()(conv(self.features, 3, 1)(y))
    if residual.shape != y.shape:
      residual = norm()(conv(self.features, 1, self.strides)(residual))
    return nn.relu(y + residual)


class ResNet(nn.Module):
  """A small ResNet: ``conv3x3 stem -> BN -> relu -> stages of BasicBlocks -> mean pool -> Dense``.

  ``stage_sizes[i]`` blocks of width ``features[i]``; every stage after the first
  halves the spatial size (stride 2). Defaults (two stages of one block, 16 and 32
  channels) train on 8x8 digits in seconds.
  """

  stage_sizes: Sequence[int] = (1, 1)
  features: Sequence[int] = (16, 32)
  num_classes: int = 10
  batch_norm: bool = True
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    if len(self.stage_sizes) != len(self.features):
      raise ValueError(f"ResNet: stage_sizes {tuple(self.stage_sizes)} and features "
                       f"{tuple(self.features)} must have the same length")
    x = nn.Conv(self.features[0], (3, 3), use_bias=not self.batch_norm, dtype=self.dtype)(x)
    if self.batch_norm:
      x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype)(x)
    x = nn.relu(x)
    for i, (n, f) in enumerate(zip(self.stage_sizes, self.features)):
      for j in range(n):
        strides = 2 if i > 0 and j == 0 else 1
        x = BasicBlock(f, strides, self.batch_norm, self.dtype)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)


class EncoderBlock(nn.Module):
  """Pre-LayerNorm Transformer encoder block: ``x + MHA(LN(x))``, then ``x + MLP(LN(x))``.

  The attention projections are the ``query``/``key``/``value``/``out`` Dense layers
  of :class:`flax.linen.MultiHeadDotProductAttention`, so path rules such as
  ``"attention/(query|key|value)"`` select them.
  """

  num_heads: int
  mlp_dim: int
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype,
                                        name="attention")(y, y)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, name="mlp_in")(y)
    y = nn.Dense(d, dtype=self.dtype, name="mlp_out")(nn.gelu(y))
    return x + y


class Transformer(nn.Module):
  """A small Transformer encoder classifier over image patches (ViT-style).

  ``(N, H, W, C)`` -> non-overlapping ``patch x patch`` tokens -> Dense(d_model) +
  learned position embedding -> ``num_layers`` :class:`EncoderBlock` -> LayerNorm ->
  mean over tokens -> Dense(num_classes). A ``(N, T, F)`` input is taken as tokens.
  """

  num_classes: int = 10
  patch: int = 2
  d_model: int = 32
  num_heads: int = 4
  num_layers: int = 2
  mlp_dim: int = 64
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    if x.ndim == 4:
      n, h, w, c = x.shape
      p = self.patch
      if h % p or w % p:
        raise ValueError(f"Transformer: image size {(h, w)} is not divisible by patch={p}")
      x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
      x = x.reshape(n, (h // p) * (w // p), p * p * c)
    elif x.ndim != 3:
      raise ValueError(f"Transformer: expected (N, H, W, C) or (N, T, F) input, got shape {x.shape}")
    x = nn.Dense(self.d_model, dtype=self.dtype, name="embed")(x)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1,) + x.shape[1:])
    x = x + pos.astype(x.dtype)
    for _ in range(self.num_layers):
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.dtype)(x)
    x = nn.LayerNorm(dtype=self.dtype)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(jnp.mean(x, axis=1))


# --------------------------------------------------------------------------- NNX


class NnxCNN(nnx.Module):
  """The NNX twin of :class:`CNN` (no BatchNorm): ``[Conv3x3 -> relu]* -> Dense -> Dense``.

  Built eagerly with ``rngs``; input ``(N, H, W, in_channels)``.
  """

  def __init__(self, num_classes: int = 10, features: Sequence[int] = (16, 32),
               dense: int = 64, *, in_channels: int = 1, image_size: tuple[int, int] = (8, 8),
               rngs: nnx.Rngs):
    chans = (in_channels,) + tuple(features)
    self.convs = nnx.List([nnx.Conv(a, b, (3, 3), rngs=rngs) for a, b in zip(chans, chans[1:])])
    flat = image_size[0] * image_size[1] * chans[-1]
    self.hidden = nnx.Linear(flat, dense, rngs=rngs)
    self.head = nnx.Linear(dense, num_classes, rngs=rngs)

  def __call__(self, x):
    for conv in self.convs:
      x = nnx.relu(conv(x))
    x = x.reshape((x.shape[0], -1))
    return self.head(nnx.relu(self.hidden(x)))


@dataclasses.dataclass(frozen=True)
class NnxModel:
  """A linen-style ``init``/``apply`` face over an NNX module, for pure-pytree pipelines.

  NNX modules are stateful objects; every transform in this library works on pytrees.
  The bridge is NNX's own split/merge: ``init`` builds the module and returns its
  ``nnx.Param`` state as a pure nested dict ``{"params": {...}}`` (paths such as
  ``params/convs/0/kernel``); ``apply`` merges a (possibly pruned, quantized or
  sharded) params dict back into the module's graph definition and calls it. Both
  run under ``jax.jit``.

  Attributes:
    factory: ``rngs -> nnx.Module``, e.g. ``functools.partial(NnxCNN, 10)``.
  """

  factory: Callable[[nnx.Rngs], nnx.Module]

  def _template(self):
    abstract = nnx.eval_shape(lambda: self.factory(nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    return graphdef, params

  def init(self, rng, x, train: bool = False) -> dict:
    del x, train
    module = self.factory(nnx.Rngs(rng))
    _, params = nnx.split(module, nnx.Param)
    return {"params": nnx.to_pure_dict(params)}

  def module(self, variables: Mapping[str, Any]) -> nnx.Module:
    """The NNX module holding ``variables["params"]``."""
    graphdef, template = self._template()
    state = jax.tree.map(lambda v: v, template)
    nnx.replace_by_pure_dict(state, variables["params"])
    return nnx.merge(graphdef, state)

  def apply(self, variables: Mapping[str, Any], x, train: bool = False, **kwargs):
    del train
    mutable = kwargs.pop("mutable", False)
    if kwargs:
      raise TypeError(f"NnxModel.apply: unsupported arguments {sorted(kwargs)}")
    out = self.module(variables)(x)
    return (out, {}) if mutable else out


# ---------------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[..., Any]] = {
    "mlp": lambda num_classes, **kw: MLP(num_classes=num_classes, **kw),
    "cnn": lambda num_classes, **kw: CNN(num_classes=num_classes, **kw),
    "cnn_bn": lambda num_classes, **kw: CNN(num_classes=num_classes, **{"batch_norm": True, **kw}),
    "cnn1d": lambda num_classes, **kw: CNN1D(num_classes=num_classes, **kw),
    "resnet": lambda num_classes, **kw: ResNet(num_classes=num_classes, **kw),
    "transformer": lambda num_classes, **kw: Transformer(num_classes=num_classes, **kw),
    "nnx_cnn": lambda num_classes, **kw: NnxModel(functools.partial(
        _nnx_cnn, num_classes=num_classes, **kw)),
}


def _nnx_cnn(rngs, **kw):
  return NnxCNN(rngs=rngs, **kw)


def model_names() -> list[str]:
  """Names accepted by :func:`get_model`."""
  return sorted(_REGISTRY)


# ------------------------------------------------------------ any model (user models)

_CUSTOM: dict[str, Any] = {}


class _NoTrainFlag(nn.Module):
  """Wraps a linen module whose ``__call__`` takes no ``train=`` flag (the composed train
  step passes one); its params move under ``inner/``."""

  inner: nn.Module

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    return self.inner(x)


@dataclasses.dataclass(frozen=True)
class _NoTrainFlagApply:
  """The same for an object with linen-style ``init``/``apply`` but no ``train=``."""

  model: Any

  def init(self, rng, x, train: bool = False):
    del train
    return self.model.init(rng, x)

  def apply(self, variables, x, train: bool = False, **kwargs):
    del train
    return self.model.apply(variables, x, **kwargs)


def _takes(fn: Callable, name: str) -> bool:
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False
  return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def as_model(obj: Any, where: str = "model"):
  """A user model with linen's ``init(rng, x)`` / ``apply(variables, x, train=...)``.

  Accepts a linen module, an ``nnx.Module`` instance (seen through :class:`NnxModel`),
  or any object with linen-style ``init``/``apply``; a forward without ``train=`` is
  wrapped so that the flag is dropped.
  """
  if isinstance(obj, nnx.Module):
    module = obj
    return NnxModel(lambda rngs: module)
  if isinstance(obj, nn.Module):
    return obj if _takes(type(obj).__call__, "train") else _NoTrainFlag(obj)
  if callable(getattr(obj, "init", None)) and callable(getattr(obj, "apply", None)):
    return obj if _takes(obj.apply, "train") else _NoTrainFlagApply(obj)
  raise TypeError(f"{where}: expected a flax linen Module, an nnx.Module, or an object with "
                  f"init(rng, x) and apply(variables, x); got {type(obj).__name__}: {obj!r}")


def _names(fn: Callable, name: str) -> bool:
  try:
    return name in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


def load_factory(spec: str) -> Callable:
  """``"package.module:factory"`` (or ``"path/to/file.py:factory"``) -> the factory.

  The current directory is importable (as with ``python -m``), so a module next to
  where ``jaxopt-dnn`` runs is found.
  """
  import importlib
  import importlib.util
  import os
  import sys

  mod_name, sep, attr = str(spec).rpartition(":")
  if not sep or not mod_name or not attr:
    raise ValueError(f"model factory {spec!r}: expected 'package.module:function'")
  try:
    if mod_name.endswith(".py"):
      if not os.path.isfile(mod_name):
        raise FileNotFoundError(f"model factory {spec!r}: no file {mod_name!r}")
      mspec = importlib.util.spec_from_file_location(
          os.path.splitext(os.path.basename(mod_name))[0], mod_name)
      module = importlib.util.module_from_spec(mspec)
      mspec.loader.exec_module(module)
    else:
      if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
      module = importlib.import_module(mod_name)
  except ModuleNotFoundError as e:
    raise ValueError(f"model factory {spec!r}: cannot import {mod_name!r} ({e})") from None
  fn = getattr(module, attr, None)
  if fn is None:
    raise ValueError(f"model factory {spec!r}: module {mod_name!r} has no {attr!r}")
  if not callable(fn):
    raise TypeError(f"model factory {spec!r}: {attr!r} is a {type(fn).__name__}, not callable")
  return fn


def resolve_model(spec: str, num_classes: int = 10, **kwargs) -> tuple[Any, Any, Any]:
  """Calls a ``"package.module:factory"`` factory: ``(model, loss_fn or None, metric or None)``.

  The factory is called with ``num_classes=`` when it names that parameter (and with the
  recipe's ``model_kwargs``), and returns a model, or a tuple ``(model, loss_fn)`` /
  ``(model, loss_fn, metric)``, or a dict with those keys (a ``(model, sample_inputs)``
  pair is taken as the model alone). ``loss_fn(logits, labels)``
  returns a scalar; ``metric(logits, labels)`` one score per example.
  """
  fn = load_factory(spec)
  call_kw = {k: v for k, v in kwargs.items() if _takes(fn, k)}
  dropped = sorted(set(kwargs) - set(call_kw))
  if dropped:
    raise TypeError(f"model factory {spec!r} does not accept model_kwargs {dropped}")
  if _names(fn, "num_classes"):   # named, not swallowed by **kwargs into a constructor
    call_kw["num_classes"] = num_classes
  out = fn(**call_kw)
  if isinstance(out, dict):
    unknown = sorted(set(out) - {"model", "loss_fn", "metric"})
    if unknown or "model" not in out:
      raise ValueError(f"model factory {spec!r} returned a dict with keys {sorted(out)}; "
                       "expected 'model' and optionally 'loss_fn', 'metric'")
    out = (out["model"], out.get("loss_fn"), out.get("metric"))
  if not isinstance(out, (tuple, list)):
    out = (out,)
  if not 1 <= len(out) <= 3:
    raise ValueError(f"model factory {spec!r} returned {len(out)} values; expected model, "
                     "(model, loss_fn) or (model, loss_fn, metric)")
  if len(out) == 2 and isinstance(out[1], (tuple, list)) and all(
      hasattr(a, "shape") for a in out[1]):
    out = (out[0],)   # (model, sample_inputs): the dataset gives the inputs
  model, loss_fn, metric = (tuple(out) + (None, None))[:3]
  for what, f in (("loss_fn", loss_fn), ("metric", metric)):
    if f is not None and not callable(f):
      raise TypeError(f"model factory {spec!r}: its {what} is a {type(f).__name__}, not callable")
  return as_model(model, f"model factory {spec!r}"), loss_fn, metric


def register_model(name: str, model: Any) -> str:
  """Makes a model object available to recipes as ``"custom:<name>"`` (this process)."""
  key = f"custom:{name}"
  _CUSTOM[key] = as_model(model)
  return key


def get_model(name: str, num_classes: int = 10, **kwargs):
  """A reference model by name (``"mlp"``, ``"cnn"``, ``"cnn_bn"``, ``"cnn1d"``, ``"resnet"``,
  ``"transformer"``, ``"nnx_cnn"``); ``kwargs`` go to its constructor.

  Every returned object has linen's ``init(rng, x)`` / ``apply(variables, x, train=...)``.
  """
  if isinstance(name, str) and name in _CUSTOM:
    return _CUSTOM[name]
  if isinstance(name, str) and ":" in name and name not in _REGISTRY:
    return resolve_model(name, num_classes, **kwargs)[0]
  if not isinstance(name, str) or name not in _REGISTRY:
    close = difflib.get_close_matches(str(name), _REGISTRY, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown model {name!r}; valid: {', '.join(model_names())}.{hint}")
  if not isinstance(num_classes, int) or num_classes < 2:
    raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
  return _REGISTRY[name](num_classes, **kwargs)


def has_batch_norm(variables: Mapping[str, Any]) -> bool:
  """Whether ``variables`` carries a ``batch_stats`` collection."""
  return bool(variables.get("batch_stats"))
