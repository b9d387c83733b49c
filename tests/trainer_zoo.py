"""Models written the way other people write them (not the app's zoo), for the Trainer tests.

* :class:`LinenLM` - a decoder LM as in Flax's examples / MaxText: ``nn.Embed`` with tied
  logits (``Embed.attend``), ``DenseGeneral`` q/k/v ``(embed, heads, head_dim)`` and an
  output projection over ``axis=(-2, -1)``, ``LayerNorm``, dropout, an explicit
  ``dtype=jnp.float32`` everywhere, and every parameter boxed with
  ``nn.with_logical_partitioning``.
* :class:`LinenResNet` - Conv -> BatchNorm -> ReLU blocks with a residual, dropout,
  explicit ``dtype=jnp.float32``; ``__call__(x, train)`` with no default.
* :class:`NnxGemma` - an NNX Gemma-style block: ``nnx.Einsum`` attention projections,
  ``nnx.RMSNorm``, a gated ``nnx.Linear`` MLP, tied embedding logits, dropout, params
  annotated with ``nnx.with_partitioning`` logical names.

Each ``*_case()`` returns ``(model, sample_inputs, make_batch)``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

VOCAB, SEQ, EMBED, HEADS, HEAD_DIM, MLP = 64, 16, 32, 4, 8, 64
F32 = jnp.float32


def _w(init, *names):
  return nn.with_logical_partitioning(init, names)


class LinenAttention(nn.Module):
  dtype: jnp.dtype = F32

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    dense = lambda name: nn.DenseGeneral(   # noqa: E731
        (HEADS, HEAD_DIM), dtype=self.dtype, name=name,
        kernel_init=_w(nn.initializers.lecun_normal(), "embed", "heads", "kv"),
        bias_init=_w(nn.initializers.zeros, "heads", "kv"))
    q, k, v = dense("query")(x), dense("key")(x), dense("value")(x)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HEAD_DIM).astype(np.float32)
    mask = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
    weights = nn.softmax(jnp.where(mask, logits, -1e9).astype(jnp.float32)).astype(self.dtype)
    weights = nn.Dropout(0.1)(weights, deterministic=deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return nn.DenseGeneral(EMBED, axis=(-2, -1), dtype=self.dtype, name="out",
                           kernel_init=_w(nn.initializers.lecun_normal(), "heads", "kv", "embed"),
                           bias_init=_w(nn.initializers.zeros, "embed"))(out)


class LinenLM(nn.Module):
  dtype: jnp.dtype = F32
  layers: int = 2

  @nn.compact
  def __call__(self, tokens, *, train: bool = False):
    embed = nn.Embed(VOCAB, EMBED, dtype=self.dtype, name="embed",
                     embedding_init=_w(nn.initializers.normal(1.0), "vocab", "embed"))
    x = embed(tokens)
    for i in range(self.layers):
      ln = lambda n: nn.LayerNorm(dtype=self.dtype, name=n,   # noqa: E731
                                  scale_init=_w(nn.initializers.ones, "embed"),
                                  bias_init=_w(nn.initializers.zeros, "embed"))
      x = x + LinenAttention(self.dtype, name=f"attn_{i}")(ln(f"ln1_{i}")(x),
                                                          deterministic=not train)
      h = nn.Dense(MLP, dtype=self.dtype, name=f"mlp_in_{i}",
                   kernel_init=_w(nn.initializers.lecun_normal(), "embed", "mlp"),
                   bias_init=_w(nn.initializers.zeros, "mlp"))(ln(f"ln2_{i}")(x))
      h = nn.Dropout(0.1)(nn.gelu(h), deterministic=not train)
      x = x + nn.Dense(EMBED, dtype=self.dtype, name=f"mlp_out_{i}",
                       kernel_init=_w(nn.initializers.lecun_normal(), "mlp", "embed"),
                       bias_init=_w(nn.initializers.zeros, "embed"))(h)
    x = nn.LayerNorm(dtype=self.dtype, name="ln_f", scale_init=_w(nn.initializers.ones, "embed"),
                     bias_init=_w(nn.initializers.zeros, "embed"))(x)
    return embed.attend(x)


def next_token_loss(apply_fn, variables, batch, rng):
  """Token-weighted next-token cross-entropy on padded sequences (weights 0 = padding)."""
  del rng
  logits = apply_fn(variables, batch["inputs"], train=True).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  w = batch["weights"]
  return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0), {"tokens": jnp.sum(w)}


def lm_batch(seed: int, batch: int = 8) -> dict:
  """Deterministic sequences from a tiny Markov chain, right-padded to different lengths."""
  rng = np.random.default_rng(seed)
  seq = np.zeros((batch, SEQ + 1), np.int32)
  seq[:, 0] = rng.integers(0, VOCAB, batch)
  for t in range(1, SEQ + 1):
    seq[:, t] = (3 * seq[:, t - 1] + rng.integers(0, 3, batch)) % VOCAB
  lengths = rng.integers(SEQ // 3, SEQ + 1, batch)
  weights = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.float32)
  return {"inputs": seq[:, :-1], "targets": seq[:, 1:], "weights": weights}


def lm_case():
  return LinenLM(), (np.zeros((1, SEQ), np.int32),), lm_batch


class LinenBlock(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.Conv(self.features, (3, 3), use_bias=False, dtype=F32)(x)
    y = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=F32)(y)
    y = nn.relu(y)
    y = nn.Conv(self.features, (3, 3), use_bias=False, dtype=F32)(y)
    y = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=F32)(y)
    return nn.relu(x + y)


class LinenResNet(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(16, (3, 3), use_bias=False, dtype=F32)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, dtype=F32)(x))
    x = LinenBlock(16)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(0.2, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=F32)(x)


def classification_loss(apply_fn, variables, batch, rng):
  logits = apply_fn(variables, batch["image"], train=True)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  acc = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
  return loss, {"accuracy": acc}


def image_batch(seed: int, batch: int = 16) -> dict:
  """Deterministic 8x8 images whose class is the brightest quadrant pattern (learnable)."""
  rng = np.random.default_rng(seed)
  label = rng.integers(0, 4, batch).astype(np.int32)
  img = rng.normal(0, 0.3, (batch, 8, 8, 1)).astype(np.float32)
  for i, c in enumerate(label):
    r, q = divmod(int(c), 2)
    img[i, 4 * r:4 * r + 4, 4 * q:4 * q + 4] += 1.5
  return {"image": img, "label": label}


def resnet_case():
  return LinenResNet(num_classes=4), (np.zeros((1, 8, 8, 1), np.float32),), image_batch


class NnxGemmaBlock(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal()
    self.pre_norm = nnx.RMSNorm(EMBED, rngs=rngs)
    self.q = nnx.Einsum("BTD,DNH->BTNH", (EMBED, HEADS, HEAD_DIM), rngs=rngs,
                        kernel_init=nnx.with_partitioning(init, ("embed", "heads", "kv")))
    self.k = nnx.Einsum("BTD,DNH->BTNH", (EMBED, HEADS, HEAD_DIM), rngs=rngs,
                        kernel_init=nnx.with_partitioning(init, ("embed", "heads", "kv")))
    self.v = nnx.Einsum("BTD,DNH->BTNH", (EMBED, HEADS, HEAD_DIM), rngs=rngs,
                        kernel_init=nnx.with_partitioning(init, ("embed", "heads", "kv")))
    self.o = nnx.Einsum("BTNH,NHD->BTD", (HEADS, HEAD_DIM, EMBED), rngs=rngs,
                        kernel_init=nnx.with_partitioning(init, ("heads", "kv", "embed")))
    self.mlp_norm = nnx.RMSNorm(EMBED, rngs=rngs)
    self.gate = nnx.Linear(EMBED, MLP, use_bias=False, rngs=rngs,
                           kernel_init=nnx.with_partitioning(init, ("embed", "mlp")))
    self.up = nnx.Linear(EMBED, MLP, use_bias=False, rngs=rngs,
                         kernel_init=nnx.with_partitioning(init, ("embed", "mlp")))
    self.down = nnx.Linear(MLP, EMBED, use_bias=False, rngs=rngs,
                           kernel_init=nnx.with_partitioning(init, ("mlp", "embed")))
    self.dropout = nnx.Dropout(0.1, rngs=rngs)

  def __call__(self, x):
    h = self.pre_norm(x)
    q, k, v = self.q(h), self.k(h), self.v(h)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(HEAD_DIM).astype(np.float32)
    mask = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
    w = jax.nn.softmax(jnp.where(mask, logits, -1e9).astype(jnp.float32)).astype(v.dtype)
    x = x + self.o(jnp.einsum("bnts,bsnh->btnh", w, v))
    h = self.mlp_norm(x)
    return x + self.down(self.dropout(jax.nn.gelu(self.gate(h)) * self.up(h)))


class NnxGemma(nnx.Module):
  def __init__(self, rngs: nnx.Rngs, layers: int = 2):
    self.embed = nnx.Embed(VOCAB, EMBED, rngs=rngs, embedding_init=nnx.with_partitioning(
        nnx.initializers.normal(1.0), ("vocab", "embed")))
    self.blocks = nnx.List([NnxGemmaBlock(rngs) for _ in range(layers)])
    self.final_norm = nnx.RMSNorm(EMBED, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self.embed.attend(self.final_norm(x))


def nnx_next_token_loss(model, batch, rng):
  del rng
  logits = model(batch["inputs"]).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  w = batch["weights"]
  return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)


def nnx_gemma_case(seed: int = 0):
  with nnx.use_eager_sharding(False):
    model = NnxGemma(nnx.Rngs(seed))
  return model, (np.zeros((1, SEQ), np.int32),), lm_batch


#: MaxText-style logical-axis rules for the models above.
LOGICAL_RULES = (("embed", "fsdp"), ("mlp", "tensor"), ("heads", None), ("kv", None),
                 ("vocab", None))
