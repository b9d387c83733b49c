"""Evaluation of a decoder against a reference: perplexity, next-token KL, agreement.

All three run through the adapter's cached ``forward`` (a fresh cache of the sequence's
length, every position prefilled at once), so a quantized KV cache is exercised exactly as
during generation: each position's keys/values are written, quantized, and read back.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_dnn.decode.decoding import as_adapter, model_variables


_FNS: dict = {}


def _logits_fn(model: Any, cache_dtype: Any):
  adapter = as_adapter(model)
  key = (id(adapter), None if cache_dtype is None else jnp.dtype(cache_dtype).name)
  if key in _FNS and _FNS[key][0] is adapter:
    return _FNS[key][1]

  @jax.jit
  def run(variables, tokens):
    cache = adapter.init_cache(variables, tokens.shape[0], tokens.shape[1], cache_dtype)
    return adapter.forward(variables, cache, tokens, 0)[0].astype(jnp.float32)

  _FNS[key] = (adapter, run)
  return run


def _as_batch(tokens: Any) -> list[np.ndarray]:
  if isinstance(tokens, (list, tuple)) and tokens and not np.isscalar(tokens[0]):
    seqs = [np.asarray(t, np.int32) for t in tokens]
  else:
    arr = np.asarray(tokens, np.int32)
    seqs = [arr] if arr.ndim == 1 else list(arr)
  for i, s in enumerate(seqs):
    if s.ndim != 1 or len(s) < 2:
      raise ValueError(f"tokens[{i}]: need a 1-D sequence of at least 2 tokens, got shape "
                       f"{s.shape}")
  return seqs


def logits(model: Any, variables: Any, tokens: Any, *, cache_dtype: Any = None) -> list:
  """Float32 logits ``(L, V)`` of each sequence (a list; sequences may differ in length)."""
  run = _logits_fn(model, cache_dtype)
  variables = model_variables(model, variables)
  return [np.asarray(run(variables, jnp.asarray(s[None]))[0]) for s in _as_batch(tokens)]


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def nll(model: Any, variables: Any, tokens: Any, *, cache_dtype: Any = None) -> np.ndarray:
  """Per-token negative log-likelihood ``-log p(x_{t+1} | x_<=t)`` of every sequence,
  concatenated (float64)."""
  out = []
  for s, lg in zip(_as_batch(tokens), logits(model, variables, tokens,
                                             cache_dtype=cache_dtype)):
    lp = _log_softmax(lg[:-1].astype(np.float64))
    out.append(-lp[np.arange(len(s) - 1), s[1:]])
  return np.concatenate(out)


def perplexity(model: Any, variables: Any, tokens: Any, *, cache_dtype: Any = None) -> float:
  """``exp(mean_t -log p(x_{t+1} | x_<=t))`` over all predicted tokens of all sequences.

  ``tokens``: one sequence ``(L,)``, a batch ``(B, L)`` or a list of sequences.
  """
  return float(np.exp(nll(model, variables, tokens, cache_dtype=cache_dtype).mean()))


def kl_divergence(ref_logits: list, logits_q: list) -> float:
  """Mean over positions of ``KL(p_ref || p_q) = sum_v p_ref (log p_ref - log p_q)``
  (nats), from lists of ``(L, V)`` logits (:func:`logits`)."""
  if len(ref_logits) != len(logits_q):
    raise ValueError(f"kl_divergence: {len(ref_logits)} reference vs {len(logits_q)} "
                     f"sequences")
  kls = []
  for a, b in zip(ref_logits, logits_q):
    if a.shape != b.shape:
      raise ValueError(f"kl_divergence: logits shapes differ: {a.shape} vs {b.shape}")
    la, lb = _log_softmax(a.astype(np.float64)), _log_softmax(b.astype(np.float64))
    kls.append((np.exp(la) * (la - lb)).sum(-1))
  return float(np.concatenate(kls).mean())


def token_agreement(reference: Any, tokens: Any) -> dict:
  """Greedy agreement of two ``(B, N)`` generations: the fraction of equal tokens
  position by position (``agreement``) and the mean length of the common prefix before
  the first difference (``prefix``, in tokens)."""
  a, b = np.asarray(reference), np.asarray(tokens)
  if a.shape != b.shape:
    raise ValueError(f"token_agreement: shapes differ: {a.shape} vs {b.shape}")
  eq = a == b
  prefix = np.where(eq.all(1), a.shape[1], np.argmin(eq, axis=1))
  return {"agreement": float(eq.mean()), "prefix": float(prefix.mean())}


def teacher_forced_agreement(model: Any, variables: Any, tokens: Any, *, reference_logits: list,
                             cache_dtype: Any = None, start: int = 0) -> float:
  """Teacher-forced greedy agreement with a reference on the *same* token sequences.

  ``tokens``: sequences ``(B, L)`` (typically prompt + the reference's greedy
  generation); ``reference_logits``: the reference's :func:`logits` on them. Both models
  read the identical prefix ``x_<=t`` at every position ``t >= start``, so, unlike
  free-running agreement (:func:`token_agreement`), one early difference does not change
  every later input::

      agreement = mean_{b, start <= t < L-1} [argmax_v p_q(v | x_b,<=t) == argmax_v p_ref(v | x_b,<=t)]

  ``start = prompt_len - 1`` scores only the generated positions.
  """
  seqs = _as_batch(tokens)
  if len(reference_logits) != len(seqs):
    raise ValueError(f"teacher_forced_agreement: {len(reference_logits)} reference logits "
                     f"for {len(seqs)} sequences")
  if not 0 <= start < min(len(s) for s in seqs) - 1:
    raise ValueError(f"teacher_forced_agreement: start {start} out of range for sequences "
                     f"of length {min(len(s) for s in seqs)}")
  got = logits(model, variables, seqs, cache_dtype=cache_dtype)
  eq = []
  for r, q in zip(reference_logits, got):
    if r.shape != q.shape:
      raise ValueError(f"teacher_forced_agreement: logits shapes differ: {r.shape} vs "
                       f"{q.shape}")
    eq.append(np.argmax(r[start:-1], -1) == np.argmax(q[start:-1], -1))
  return float(np.concatenate(eq).mean())
