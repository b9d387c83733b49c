"""jaxopt_dnn: pruning, quantization, mixed precision and sharding as pure pytree transforms.

Public modules (everything not listed here is private):

* :mod:`jaxopt_dnn.sparsity`  - pruning masks, schedules, the masked optax wrapper, export.
* :mod:`jaxopt_dnn.quant`     - fake-quant (QAT), calibration (PTQ), QArray, int8 serving.
* :mod:`jaxopt_dnn.precision` - dtype policies and loss scaling.
* :mod:`jaxopt_dnn.parallel`  - meshes, sharding rules, data-parallel / FSDP steps, multi-host.
* :mod:`jaxopt_dnn.compile`   - XLA cost/memory reports, HLO dot census, StableHLO export.
* :mod:`jaxopt_dnn.roles`     - leaf roles (kernel / bias / scale / embedding) traced from a model.
* :mod:`jaxopt_dnn.lora`      - LoRA / QLoRA adapters on a frozen float, bf16, int8, int4 or NF4 base.
* :mod:`jaxopt_dnn.distill`, :mod:`jaxopt_dnn.fold` - distillation loss, BatchNorm folding.
* :mod:`jaxopt_dnn.checkpoint` - orbax checkpoints.
* :mod:`jaxopt_dnn.decode`    - decoder LLMs: KV-cache generation (float/int8/fp8 caches),
  perplexity, KL and greedy agreement against a reference.
* :class:`Trainer` (:mod:`jaxopt_dnn.trainer`) - any Flax model, the user's loss and
  optimizer, with pruning, QAT, a precision policy and sharding in ONE jitted step;
  :func:`fit` (:mod:`jaxopt_dnn.loop`) - the loop: checkpoints, exact resume, metrics.

The application built on this core (reference models, embedded datasets, recipes, the
``compress`` job, its report and the CLI) lives in :mod:`jaxopt_dnn.app`; the core never
imports it.
"""

__version__ = "0.1.0"

from jaxopt_dnn import auto
from jaxopt_dnn import checkpoint
from jaxopt_dnn import compile
from jaxopt_dnn import decode
from jaxopt_dnn import distill
from jaxopt_dnn import fold
from jaxopt_dnn import lora
from jaxopt_dnn import loop
from jaxopt_dnn import parallel
from jaxopt_dnn import precision
from jaxopt_dnn import quant
from jaxopt_dnn import roles
from jaxopt_dnn import sparsity
from jaxopt_dnn import trainer
from jaxopt_dnn.decode import generate
from jaxopt_dnn.decode import perplexity
from jaxopt_dnn.loop import fit
from jaxopt_dnn.train_state import PruneConfig
from jaxopt_dnn.train_state import QuantConfig
from jaxopt_dnn.train_state import TrainState
from jaxopt_dnn.trainer import Trainer
