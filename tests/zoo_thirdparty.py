"""Small Flax models written the way other people write them (not the way this library would).

Each factory returns ``(model, inputs)`` where ``inputs`` is a tuple of sample inputs:

* linen models: ``variables = model.init(jax.random.key(0), *inputs)``, then
  ``model.apply(variables, *inputs)`` (eval mode by default; dropout / BatchNorm updates
  are opt-in through the call's keyword arguments, as in the Flax examples).
* NNX models: ``model(*inputs)``; ``model.train()`` / ``model.eval()`` as usual.

Styles covered (every layer sets ``dtype=jnp.float32`` explicitly, as the Flax examples,
MaxText-style code and most research models do):

* :func:`linen_lm`: a decoder-only LM; attention projections are ``nn.DenseGeneral``
  (q/k/v kernels ``(embed, heads, head_dim)``, biases ``(heads, head_dim)``, the output
  projection contracts ``axis=(-2, -1)``), params boxed by
  ``nn.with_logical_partitioning``, dropout, LayerNorm, and logits tied to the token
  embedding through ``nn.Embed.attend``.
* :func:`linen_resnet`: Conv -> BatchNorm -> ReLU residual blocks, global pool, Dense head.
* :func:`nnx_gemma`: NNX decoder in the Gemma style: ``nnx.Einsum`` projections
  (``"BTD,DNH->BTNH"``), RMSNorm, gated MLP, tied ``nnx.Embed.attend`` logits.
* :func:`nnx_mha`: ``nnx.MultiHeadAttention`` (``nnx.LinearGeneral`` projections) + a head.
* :func:`linen_user_einsum`: a user module that declares its own params and calls
  ``jnp.einsum`` / ``jnp.dot`` on them directly (no Flax layer at all).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

F32 = jnp.float32


# --------------------------------------------------------------------------- linen LM
def _lp(init, *names):
  return nn.with_logical_partitioning(init, names)


class _LinenBlock(nn.Module):
  heads: int
  head_dim: int
  mlp: int
  dropout: float = 0.1
  dtype: jnp.dtype = F32

  @nn.compact
  def __call__(self, x, deterministic=True):
    d = x.shape[-1]
    h = nn.LayerNorm(dtype=self.dtype, name="ln_attn")(x)
    proj = lambda name: nn.DenseGeneral(  # noqa: E731
        (self.heads, self.head_dim), dtype=self.dtype, name=name,
        kernel_init=_lp(nn.initializers.lecun_normal(), "embed", "heads", "kv"),
        bias_init=_lp(nn.initializers.normal(0.02), "heads", "kv"))
    q, k, v = proj("query")(h), proj("key")(h), proj("value")(h)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(self.head_dim).astype(self.dtype)
    t = x.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(causal, logits, jnp.finfo(self.dtype).min)
    att = nn.Dropout(self.dropout)(jax.nn.softmax(logits, axis=-1), deterministic)
    o = jnp.einsum("bhqk,bkhd->bqhd", att, v)
    o = nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype, name="out",
                        kernel_init=_lp(nn.initializers.lecun_normal(), "heads", "kv", "embed"),
                        bias_init=_lp(nn.initializers.zeros, "embed"))(o)
    x = x + nn.Dropout(self.dropout)(o, deterministic)
    h = nn.LayerNorm(dtype=self.dtype, name="ln_mlp")(x)
    h = nn.Dense(self.mlp, dtype=self.dtype, name="wi",
                 kernel_init=_lp(nn.initializers.lecun_normal(), "embed", "mlp"),
                 bias_init=_lp(nn.initializers.normal(0.02), "mlp"))(h)
    h = nn.gelu(h)
    h = nn.Dense(d, dtype=self.dtype, name="wo",
                 kernel_init=_lp(nn.initializers.lecun_normal(), "mlp", "embed"),
                 bias_init=_lp(nn.initializers.zeros, "embed"))(h)
    return x + nn.Dropout(self.dropout)(h, deterministic)


class LinenLM(nn.Module):
  vocab: int = 64
  embed: int = 32
  heads: int = 4
  head_dim: int = 8
  mlp: int = 64
  layers: int = 2
  dtype: jnp.dtype = F32

  @nn.compact
  def __call__(self, tokens, deterministic=True):
    emb = nn.Embed(self.vocab, self.embed, dtype=self.dtype, name="embed",
                   embedding_init=_lp(nn.initializers.normal(1.0), "vocab", "embed"))
    x = emb(tokens)
    pos = self.param("pos", _lp(nn.initializers.normal(0.02), "seq", "embed"),
                     (tokens.shape[1], self.embed))
    x = x + pos.astype(self.dtype)
    for i in range(self.layers):
      x = _LinenBlock(self.heads, self.head_dim, self.mlp, dtype=self.dtype,
                      name=f"layer_{i}")(x, deterministic)
    x = nn.LayerNorm(dtype=self.dtype, name="ln_f")(x)
    return emb.attend(x)   # tied logits


def linen_lm(batch: int = 2, seq: int = 8, **kw):
  model = LinenLM(**kw)
  tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0, model.vocab)
  return model, (tokens,)


# --------------------------------------------------------------------------- linen ResNet
class _ResBlock(nn.Module):
  features: int
  strides: int = 1
  dtype: jnp.dtype = F32

  @nn.compact
  def __call__(self, x, train=False):
    norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9,  # noqa: E731
                                     dtype=self.dtype, name=name)
    y = nn.Conv(self.features, (3, 3), (self.strides, self.strides), use_bias=False,
                dtype=self.dtype, name="conv1")(x)
    y = nn.relu(norm("bn1")(y))
    y = nn.Conv(self.features, (3, 3), use_bias=False, dtype=self.dtype, name="conv2")(y)
    y = norm("bn2")(y)
    if x.shape != y.shape:
      x = nn.Conv(self.features, (1, 1), (self.strides, self.strides), use_bias=False,
                  dtype=self.dtype, name="proj")(x)
      x = norm("bn_proj")(x)
    return nn.relu(x + y)


class LinenResNet(nn.Module):
  widths: tuple = (8, 16)
  classes: int = 10
  dtype: jnp.dtype = F32

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(self.widths[0], (3, 3), use_bias=False, dtype=self.dtype, name="stem")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, dtype=self.dtype,
                             name="bn_stem")(x))
    for i, w in enumerate(self.widths):
      x = _ResBlock(w, 1 if i == 0 else 2, dtype=self.dtype, name=f"block_{i}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.classes, dtype=self.dtype, name="head")(x)


def linen_resnet(batch: int = 2, size: int = 8, **kw):
  model = LinenResNet(**kw)
  x = jax.random.normal(jax.random.key(2), (batch, size, size, 3), F32)
  return model, (x,)


# --------------------------------------------------------------------------- NNX Gemma-style
class _GemmaBlock(nnx.Module):

  def __init__(self, embed, heads, head_dim, mlp, *, rngs):
    self.pre_attn = nnx.RMSNorm(embed, dtype=F32, rngs=rngs)
    self.q = nnx.Einsum("BTD,DNH->BTNH", (embed, heads, head_dim), dtype=F32, rngs=rngs)
    self.k = nnx.Einsum("BTD,DNH->BTNH", (embed, heads, head_dim), dtype=F32, rngs=rngs)
    self.v = nnx.Einsum("BTD,DNH->BTNH", (embed, heads, head_dim), dtype=F32, rngs=rngs)
    self.o = nnx.Einsum("BTNH,NHD->BTD", (heads, head_dim, embed), dtype=F32, rngs=rngs)
    self.pre_mlp = nnx.RMSNorm(embed, dtype=F32, rngs=rngs)
    self.gate = nnx.Linear(embed, mlp, use_bias=False, dtype=F32, rngs=rngs)
    self.up = nnx.Linear(embed, mlp, use_bias=False, dtype=F32, rngs=rngs)
    self.down = nnx.Linear(mlp, embed, use_bias=False, dtype=F32, rngs=rngs)
    self.head_dim = head_dim

  def __call__(self, x):
    h = self.pre_attn(x)
    q, k, v = self.q(h), self.k(h), self.v(h)
    s = jnp.einsum("btnh,bsnh->bnts", q, k) * (self.head_dim ** -0.5)
    t = x.shape[1]
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, jnp.finfo(s.dtype).min)
    o = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, axis=-1), v)
    x = x + self.o(o)
    h = self.pre_mlp(x)
    return x + self.down(nnx.gelu(self.gate(h)) * self.up(h))


class NnxGemma(nnx.Module):

  def __init__(self, vocab=64, embed=32, heads=4, head_dim=8, mlp=64, layers=2, *, rngs):
    self.embedder = nnx.Embed(vocab, embed, dtype=F32, rngs=rngs)
    self.blocks = nnx.List([_GemmaBlock(embed, heads, head_dim, mlp, rngs=rngs)
                            for _ in range(layers)])
    self.final_norm = nnx.RMSNorm(embed, dtype=F32, rngs=rngs)
    self.vocab = vocab

  def __call__(self, tokens):
    x = self.embedder(tokens) * jnp.sqrt(jnp.float32(self.embedder.features))
    for b in self.blocks:
      x = b(x)
    return self.embedder.attend(self.final_norm(x))   # tied logits


def nnx_gemma(batch: int = 2, seq: int = 8, **kw):
  model = NnxGemma(rngs=nnx.Rngs(0), **kw)
  tokens = jax.random.randint(jax.random.key(3), (batch, seq), 0, model.vocab)
  return model, (tokens,)


# --------------------------------------------------------------------------- NNX MHA
class NnxMha(nnx.Module):

  def __init__(self, features=32, heads=4, classes=10, *, rngs):
    self.proj_in = nnx.Linear(16, features, dtype=F32, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(heads, features, dtype=F32, decode=False,
                                       dropout_rate=0.1, rngs=rngs)
    self.norm = nnx.LayerNorm(features, dtype=F32, rngs=rngs)
    self.head = nnx.Linear(features, classes, dtype=F32, rngs=rngs)

  def __call__(self, x):
    h = self.proj_in(x)
    h = self.norm(h + self.attn(h))
    return self.head(jnp.mean(h, axis=1))


def nnx_mha(batch: int = 2, seq: int = 8, **kw):
  model = NnxMha(rngs=nnx.Rngs(0), **kw)
  model.eval()
  x = jax.random.normal(jax.random.key(4), (batch, seq, 16), F32)
  return model, (x,)


# --------------------------------------------------------------------------- user einsum
class LinenUserEinsum(nn.Module):
  """Declares its own params and contracts them with ``jnp.einsum`` / ``jnp.dot``."""

  hidden: int = 32
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    w1 = self.param("w_in", nn.initializers.lecun_normal(), (x.shape[-1], self.hidden))
    b1 = self.param("b_in", nn.initializers.zeros, (self.hidden,))
    w2 = self.param("w_mix", nn.initializers.lecun_normal(), (4, self.hidden // 4, self.hidden))
    w3 = self.param("w_out", nn.initializers.lecun_normal(), (self.hidden, self.classes))
    h = jax.nn.relu(jnp.dot(x, w1) + b1)
    h = h.reshape(h.shape[:-1] + (4, self.hidden // 4))
    h = jax.nn.relu(jnp.einsum("bgc,gcd->bd", h, w2))
    return jnp.dot(h, w3)


def linen_user_einsum(batch: int = 4, features: int = 16, **kw):
  model = LinenUserEinsum(**kw)
  x = jax.random.normal(jax.random.key(5), (batch, features), F32)
  return model, (x,)


LINEN = {"linen_lm": linen_lm, "linen_resnet": linen_resnet,
         "linen_user_einsum": linen_user_einsum}
NNX = {"nnx_gemma": nnx_gemma, "nnx_mha": nnx_mha}
