"""Autoregressive generation with a preallocated KV cache: one jitted prefill, one jitted
decode loop (``lax.fori_loop`` over one step), any batch of right-padded prompts.

**Adapter protocol** (duck-typed; :func:`as_adapter` wraps the common conventions)::

    init_cache(variables, batch, max_len, dtype) -> cache pytree (all zeros)
    forward(variables, cache, tokens (B, L), start) -> (logits (B, L, V), cache)
    full_logits(variables, tokens (B, L)) -> logits (B, L, V)     # no cache (optional)

``forward`` puts ``tokens[:, j]`` at absolute position ``start + j`` *in every row*,
writes their keys/values into the cache there, and lets each query attend to cache
positions ``<=`` its own; ``logits[:, j]`` predicts position ``start + j + 1``.
``full_logits`` is the plain causal forward without a cache (the naive reference,
:func:`naive_greedy`; :func:`jaxopt_dnn.decode.perplexity` uses it when present).

Built-in adapters:

* :class:`LinenDecode`: linen models in flax's ``decode=True`` convention (a mutable
  ``"cache"`` collection with its own ``cache_index``, one token per call, e.g. flax's
  lm1b ``TransformerLM``); ``forward`` scans over the tokens.
* :class:`NNXExplicitCache`: NNX models called as ``model(tokens, positions, cache,
  attention_mask) -> (logits, cache)`` (flax's gemma ``Transformer``, tunix's
  ``Llama3``), cache from ``model.init_cache`` or built from ``model.config``.
* :class:`LinenExplicitCache`: linen modules called as ``apply(v, tokens, start, cache)``.

**Padding: prompts are right-padded** (``lengths[b]`` valid tokens, the rest ignored).
All rows advance in lock-step over absolute positions ``0, 1, 2, ...``: the prefill runs
the first ``min(lengths)`` positions at once; at each later position a row whose prompt
is not finished is fed its own next prompt token (teacher forcing) and a finished row is
fed its generated token. So every row's tokens sit at their true positions ``0 .. len_b +
N - 1`` and no row ever attends to padding; this needs no attention mask from the model,
which is why it also works for the ``decode=True`` convention (one shared
``cache_index``). Rows with shorter prompts simply start generating earlier.

QArray weights (``quant.quantize_params`` / ``quant.gptq``) are dequantized inside the
jitted functions by the default ``apply`` of every adapter (weight-only serving);
:func:`int8_serving` routes the contractions through the library's s8 x s8 -> s32 path.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxopt_dnn import model_adapter
from jaxopt_dnn.decode import kv as _kv
from jaxopt_dnn.quant.qarray import dequantize, is_qarray


def float_variables(tree: Any) -> Any:
  """Replaces every QArray leaf by its float value (a no-op on float trees)."""
  return jax.tree.map(lambda x: dequantize(x) if is_qarray(x) else x, tree,
                      is_leaf=is_qarray)


def _dequantizing(apply_fn):
  @functools.wraps(apply_fn)
  def run(variables, *args, **kwargs):
    return apply_fn(float_variables(variables), *args, **kwargs)
  return run


# --------------------------------------------------------------------------- adapters
class LinenExplicitCache:
  """A linen module called as ``module.apply(v, tokens, start, cache) -> (logits, cache)``.

  ``cache=None`` must give the plain causal forward. ``init_cache(batch, max_len, dtype)``
  builds the zero cache. ``apply`` (default: ``module.apply`` on dequantized variables)
  can be replaced, e.g. by :func:`int8_serving`.
  """

  def __init__(self, module: nn.Module, init_cache: Callable[..., Any],
               apply: Callable[..., Any] | None = None):
    self.module = module
    self._init = init_cache
    self.apply = apply or _dequantizing(module.apply)

  def with_apply(self, apply):
    return type(self)(self.module, self._init, apply)

  def init_cache(self, variables, batch, max_len, dtype=None):
    return self._init(batch, max_len, dtype)

  def forward(self, variables, cache, tokens, start):
    return self.apply(variables, tokens, start, cache)

  def full_logits(self, variables, tokens):
    return self.apply(variables, tokens, 0, None)[0]


class LinenDecode:
  """flax's linen ``decode=True`` convention (``TransformerLM(config.replace(decode=True))``).

  The cache is the ``"cache"`` collection that ``module.init`` creates for inputs of
  shape ``(batch, max_len)`` (zeroed, so ``cache_index`` starts at 0); ``forward`` feeds
  one token per ``apply(..., mutable=["cache"])`` (the convention allows no more) in a
  ``lax.scan``. ``full_module`` is the same model with ``decode=False`` for
  :meth:`full_logits`; by default derived with ``config.replace(decode=False)``.
  Cache dtypes other than the model's own are refused (flax's attention writes keys in
  the model dtype).
  """

  def __init__(self, module: nn.Module, full_module: nn.Module | None = None,
               apply: Callable[..., Any] | None = None):
    self.module = module
    cfg = getattr(module, "config", None)
    if full_module is None and cfg is not None and hasattr(cfg, "replace"):
      full_module = module.clone(config=cfg.replace(decode=False))
    self.full_module = full_module
    self.apply = apply or _dequantizing(module.apply)

  def with_apply(self, apply):
    return type(self)(self.module, self.full_module, apply)

  def init_cache(self, variables, batch, max_len, dtype=None):
    if dtype is not None:
      raise ValueError("cache_dtype: the linen decode=True convention keeps its cache in "
                       "the model's dtype; pass cache_dtype=None")
    x = jnp.ones((batch, max_len), jnp.int32)
    shapes = jax.eval_shape(lambda: self.module.init(jax.random.key(0), x))
    if "cache" not in shapes:
      raise ValueError("LinenDecode: the module created no 'cache' collection; build it "
                       "with decode=True")
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])

  def forward(self, variables, cache, tokens, start):
    del start  # the convention keeps the position in cache_index
    base = {k: v for k, v in variables.items() if k != "cache"}

    def one(c, tok):
      logits, mut = self.apply({**base, "cache": c}, tok[:, None], mutable=["cache"])
      return mut["cache"], logits[:, 0]

    cache, logits = jax.lax.scan(one, cache, jnp.swapaxes(tokens, 0, 1))
    return jnp.swapaxes(logits, 0, 1), cache

  def full_logits(self, variables, tokens):
    """Non-decode forward. flax's lm1b shifts its inputs right (predicting ``x_t`` from
    ``x_<t`` with a 0 in front), so ``tokens[:, 0]`` must be that 0 (BOS); the rest is
    fed shifted, with a non-pad filler at the end."""
    if self.full_module is None:
      raise ValueError("LinenDecode: pass full_module (the decode=False model)")
    base = {k: v for k, v in float_variables(variables).items() if k != "cache"}
    shifted = jnp.concatenate([tokens[:, 1:], jnp.ones_like(tokens[:, :1])], axis=1)
    return self.full_module.apply(base, shifted)


class NNXExplicitCache:
  """NNX decoders called as ``model(tokens, positions, cache, attention_mask)``.

  ``variables``: the model's ``nnx.State`` (``nnx.state(model)``) or ``None`` for the
  model's own; the graph is split once and merged inside the jitted functions. The
  attention mask is ``(B, L, S)`` with ``mask[b, j, s] = s <= start + j``. The cache:
  ``model.init_cache(max_len, batch, dtype)`` when the model has it (gemma), else
  ``{"layer_i": {"k", "v": (B, S, kv_heads, head_dim), "end_index": (B,)}}`` from
  ``model.config`` (tunix ``Llama3``: ``num_layers``, ``num_kv_heads``, ``head_dim``).
  """

  def __init__(self, model: nnx.Module, init_cache: Callable[..., Any] | None = None):
    self.graphdef, self.state = nnx.split(model)
    self._model = model
    self._init = init_cache

  def _merged(self, variables):
    state = self.state if variables is None else variables
    return nnx.merge(self.graphdef, float_variables(state))

  def init_cache(self, variables, batch, max_len, dtype=None):
    dt = jnp.float32 if dtype is None else dtype
    if _kv.canonical(dt) in _kv.QUANTIZED or not jnp.issubdtype(jnp.dtype(dt), jnp.floating):
      raise ValueError(f"cache_dtype: NNXExplicitCache stores the model's own float cache; "
                       f"got {dtype!r}")
    if self._init is not None:
      return self._init(batch, max_len, dt)
    if hasattr(self._model, "init_cache"):
      return self._model.init_cache(max_len, batch, dt)
    c = getattr(self._model, "config", None)
    try:
      n, h, d = c.num_layers, c.num_kv_heads, c.head_dim
    except AttributeError as e:
      raise ValueError("NNXExplicitCache: the model has no init_cache and its config no "
                       "num_layers/num_kv_heads/head_dim; pass init_cache=") from e
    z = lambda: jnp.zeros((batch, max_len, h, d), dt)  # noqa: E731
    return {f"layer_{i}": {"k": z(), "v": z(), "end_index": jnp.zeros((batch,), jnp.int32)}
            for i in range(n)}

  def forward(self, variables, cache, tokens, start):
    b, l = tokens.shape
    size = max(jax.tree.leaves(cache), key=jnp.ndim).shape[1]   # a (B, S, heads, dim) leaf
    pos = start + jnp.arange(l)
    mask = jnp.arange(size)[None, :] <= pos[:, None]
    logits, cache = self._merged(variables)(tokens, jnp.broadcast_to(pos, (b, l)), cache,
                                            jnp.broadcast_to(mask, (b, l, size)))
    return logits, cache

  def full_logits(self, variables, tokens):
    b, l = tokens.shape
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((l, l), bool)), (b, l, l))
    pos = jnp.broadcast_to(jnp.arange(l), (b, l))
    return self._merged(variables)(tokens, pos, None, mask)[0]


_ADAPTERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_GENERATORS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def as_adapter(model: Any) -> Any:
  """``model`` if it already implements the protocol, else the matching built-in adapter
  (one per model object, so that repeated calls reuse its compiled functions)."""
  try:
    return _ADAPTERS[model]
  except (KeyError, TypeError):
    pass
  adapter = _make_adapter(model)
  try:
    _ADAPTERS[model] = adapter
  except TypeError:
    pass
  return adapter


def model_variables(model: Any, variables: Any) -> Any:
  """``variables``, or an NNX model's current ``nnx.state`` when ``variables`` is None."""
  if variables is None and model_adapter.is_module(model):
    return model_adapter.adapt(model).state
  return variables


def _make_adapter(model: Any) -> Any:
  if not model_adapter.is_module(model):
    if all(hasattr(model, m) for m in ("init_cache", "forward")):
      return model
    raise TypeError(f"generate: model must be a linen/NNX decoder or implement the adapter "
                    f"protocol (init_cache, forward), got {type(model).__name__}")
  return model_adapter.adapt(model).match(linen=LinenDecode, nnx=NNXExplicitCache)


def int8_serving(adapter: Any, calibration: Any, rules: Any = None, *, strict: bool = False):
  """The adapter with every rule-selected contraction served as ``s8 x s8 -> s32`` (W8A8)
  through :func:`jaxopt_dnn.quant.int8_apply` (its variables: ``quantize_params`` output
  with ``act_bits=8`` rules; ``calibration``: :func:`jaxopt_dnn.quant.calibrate`'s
  ``quant_stats``). The adapter must expose ``module`` and ``with_apply`` (the linen
  adapters do)."""
  from jaxopt_dnn.quant.serve import int8_apply
  if not hasattr(adapter, "with_apply"):
    raise TypeError(f"int8_serving: {type(adapter).__name__} has no with_apply")
  module = adapter.module

  def apply(variables, *args, **kwargs):
    return int8_apply(module, variables, calibration, *args, rules=rules, strict=strict,
                      **kwargs)

  return adapter.with_apply(apply)


# --------------------------------------------------------------------------- sampling
def _select(logits, temperature, top_k, key):
  """Next token from ``logits (B, V)``: argmax at temperature 0, else a sample of
  ``softmax(logits / T)`` restricted to the ``top_k`` largest."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  z = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    kth = jax.lax.top_k(z, top_k)[0][:, -1:]
    z = jnp.where(z < kth, -jnp.inf, z)
  return jax.random.categorical(key, z, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class _Plan:
  batch: int
  width: int        # padded prompt width P
  first: int        # min(lengths): prefilled positions
  last: int         # max(lengths) + N - 1: the last position written
  max_len: int      # cache size


def _plan(prompt: np.ndarray, lengths: np.ndarray, n: int) -> _Plan:
  b, p = prompt.shape
  return _Plan(b, p, int(lengths.min()), int(lengths.max()) + n - 1, p + n)


class Generator:
  """The compiled pieces of :func:`generate` for one adapter and settings.

  ``prefill(variables, cache, tokens (B, m))`` and ``step(variables, state)`` are jitted
  separately (the benchmark times them); ``loop`` is the jitted ``fori_loop`` over
  ``step``. ``state = (cache, seq (B, T), lengths (B,), pos, logits (B, V), key)``.
  """

  def __init__(self, adapter, *, temperature: float = 0.0, top_k: int | None = None,
               cache_dtype: Any = None):
    self.adapter = adapter
    self.temperature = float(temperature)
    self.top_k = top_k
    self.cache_dtype = cache_dtype
    self.prefill = jax.jit(self._prefill)
    self.step = jax.jit(self._step)
    self.loop = jax.jit(self._loop, static_argnums=2)

  def _prefill(self, variables, cache, tokens):
    logits, cache = self.adapter.forward(variables, cache, tokens, 0)
    return logits[:, -1].astype(jnp.float32), cache

  def _choose(self, state):
    cache, seq, lengths, pos, logits, key = state
    key, sub = jax.random.split(key)
    nxt = _select(logits, self.temperature, self.top_k, sub)
    forced = jax.lax.dynamic_index_in_dim(seq, pos + 1, axis=1, keepdims=False)
    nxt = jnp.where(pos + 1 < lengths, forced, nxt)
    seq = jax.lax.dynamic_update_index_in_dim(seq, nxt, pos + 1, axis=1)
    return nxt, (cache, seq, lengths, pos, logits, key)

  def _step(self, variables, state):
    """Writes the token of position ``pos + 1`` and feeds it: ``pos -> pos + 1``."""
    nxt, (cache, seq, lengths, pos, _, key) = self._choose(state)
    logits, cache = self.adapter.forward(variables, cache, nxt[:, None], pos + 1)
    return cache, seq, lengths, pos + 1, logits[:, -1].astype(jnp.float32), key

  def _loop(self, variables, state, steps):
    state = jax.lax.fori_loop(0, steps, lambda _, s: self._step(variables, s), state)
    return self._choose(state)[1]

  def init_cache(self, variables, batch, max_len):
    return self.adapter.init_cache(variables, batch, max_len, self.cache_dtype)


def _generator(adapter, temperature, top_k, cache_dtype) -> Generator:
  """The adapter's :class:`Generator` for these settings, built once."""
  key = (temperature, top_k, None if cache_dtype is None else _kv.canonical(cache_dtype))
  try:
    table = _GENERATORS.setdefault(adapter, {})
  except TypeError:
    table = {}
  if key not in table:
    table[key] = Generator(adapter, temperature=temperature, top_k=top_k,
                           cache_dtype=cache_dtype)
  return table[key]


def _check_prompt(prompt_tokens, lengths, max_new_tokens):
  prompt = np.asarray(prompt_tokens)
  if prompt.ndim != 2 or not np.issubdtype(prompt.dtype, np.integer):
    raise ValueError(f"generate: prompt_tokens must be an integer array (batch, length), "
                     f"got shape {prompt.shape} dtype {prompt.dtype}")
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens must be a positive int, got "
                     f"{max_new_tokens!r}")
  lens = (np.full((prompt.shape[0],), prompt.shape[1]) if lengths is None
          else np.asarray(lengths))
  if lens.shape != (prompt.shape[0],) or lens.min() < 1 or lens.max() > prompt.shape[1]:
    raise ValueError(f"generate: lengths must be (batch,) ints in [1, {prompt.shape[1]}], "
                     f"got {lens!r}")
  return prompt.astype(np.int32), lens.astype(np.int32)


def generate(model: Any, variables: Any, prompt_tokens: Any, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, key: Any = None,
             cache_dtype: Any = None, lengths: Any = None,
             generator: Generator | None = None) -> jax.Array:
  """Generates ``max_new_tokens`` tokens after each (right-padded) prompt.

  Args:
    model: a decoder: linen ``decode=True`` module, NNX explicit-cache module, or an
      adapter (see the module docstring).
    variables: linen ``{"params": ...}`` (QArray leaves allowed), NNX ``nnx.State`` or
      ``None``.
    prompt_tokens: ``(B, P)`` integer prompts, right-padded.
    max_new_tokens: ``N``.
    temperature: 0 for greedy argmax, else sampling from ``softmax(logits / T)``.
    top_k: sample among the ``top_k`` most likely tokens only.
    key: PRNG key, required when ``temperature > 0``.
    cache_dtype: KV-cache storage (``None``: the adapter's default; float dtypes,
      ``"int8"`` or ``"float8_e4m3fn"`` where the adapter supports them).
    lengths: ``(B,)`` valid prompt lengths (default: all ``P``).
    generator: a :class:`Generator` to reuse (its compiled functions) across calls.

  Returns:
    ``(B, N)`` int32: row ``b``'s tokens at positions ``lengths[b] .. lengths[b]+N-1``.
  """
  if temperature < 0:
    raise ValueError(f"generate: temperature must be >= 0, got {temperature!r}")
  if temperature > 0 and key is None:
    raise ValueError("generate: temperature > 0 needs a PRNG key")
  if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
    raise ValueError(f"generate: top_k must be a positive int or None, got {top_k!r}")
  prompt, lens = _check_prompt(prompt_tokens, lengths, max_new_tokens)
  variables = model_variables(model, variables)
  plan = _plan(prompt, lens, int(max_new_tokens))
  gen = generator or _generator(as_adapter(model), float(temperature), top_k, cache_dtype)
  seq = np.zeros((plan.batch, plan.max_len), np.int32)
  seq[:, :plan.width] = np.where(np.arange(plan.width)[None] < lens[:, None], prompt, 0)
  cache = gen.init_cache(variables, plan.batch, plan.max_len)
  logits, cache = gen.prefill(variables, cache, jnp.asarray(seq[:, :plan.first]))
  key = jax.random.key(0) if key is None else key
  state = (cache, jnp.asarray(seq), jnp.asarray(lens), jnp.int32(plan.first - 1), logits, key)
  state = gen.loop(variables, state, plan.last - plan.first)
  out = state[1]
  idx = lens[:, None] + np.arange(int(max_new_tokens))[None]
  return jnp.take_along_axis(out, jnp.asarray(idx), axis=1)


def naive_greedy(model: Any, variables: Any, prompt_tokens: Any, max_new_tokens: int, *,
                 lengths: Any = None, fill: int = 1) -> np.ndarray:
  """Reference greedy decoding by full recompute: every new token is the argmax of a
  fresh, cache-free causal ``full_logits`` over the whole sequence so far (row by row).

  The sequence lives in a fixed ``(1, P + N)`` buffer (positions not yet generated hold
  ``fill``), so one compilation serves every step; causality makes the unfilled tail
  invisible to the positions read. Slow by design; for checking :func:`generate`."""
  adapter = as_adapter(model)
  prompt, lens = _check_prompt(prompt_tokens, lengths, max_new_tokens)
  variables = model_variables(model, variables)
  full = jax.jit(adapter.full_logits)
  width = prompt.shape[1] + int(max_new_tokens)
  out = np.zeros((prompt.shape[0], max_new_tokens), np.int32)
  for b in range(prompt.shape[0]):
    buf = np.full((1, width), fill, np.int32)
    n = int(lens[b])
    buf[0, :n] = prompt[b, :n]
    for i in range(max_new_tokens):
      logits = full(variables, jnp.asarray(buf))
      buf[0, n] = int(jnp.argmax(logits[0, n - 1]))
      out[b, i] = buf[0, n]
      n += 1
  return out
