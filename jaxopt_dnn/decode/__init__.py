"""Decoder LLMs: KV-cache generation, quantized KV caches, and evaluation.

* :func:`generate` - preallocated KV cache, one jitted prefill and a jitted
  ``fori_loop`` of single steps, right-padded batches, greedy / temperature / top-k;
  adapters for flax's linen ``decode=True`` convention, NNX explicit-cache decoders
  (flax gemma, tunix Llama3) and a small protocol for others.
* :mod:`jaxopt_dnn.decode.kv` - KV-cache storage in float, int8 or float8 e4m3 with one
  scale per token and head.
* :func:`perplexity`, :func:`kl_divergence`, :func:`token_agreement`,
  :func:`teacher_forced_agreement` - evaluation against
  a float reference.
"""

from jaxopt_dnn.decode import kv
from jaxopt_dnn.decode.evaluate import kl_divergence
from jaxopt_dnn.decode.evaluate import logits
from jaxopt_dnn.decode.evaluate import nll
from jaxopt_dnn.decode.evaluate import perplexity
from jaxopt_dnn.decode.evaluate import teacher_forced_agreement
from jaxopt_dnn.decode.evaluate import token_agreement
from jaxopt_dnn.decode.decoding import Generator
from jaxopt_dnn.decode.decoding import LinenDecode
from jaxopt_dnn.decode.decoding import LinenExplicitCache
from jaxopt_dnn.decode.decoding import NNXExplicitCache
from jaxopt_dnn.decode.decoding import as_adapter
from jaxopt_dnn.decode.decoding import float_variables
from jaxopt_dnn.decode.decoding import generate
from jaxopt_dnn.decode.decoding import int8_serving
from jaxopt_dnn.decode.decoding import naive_greedy
