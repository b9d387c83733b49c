"""jaxopt_dnn: pruning, quantization, mixed precision and sharding as pure pytree transforms.

Public modules (everything not listed here is private):

* :mod:`jaxopt_dnn.sparsity`  - pruning masks, schedules, the masked optax wrapper, export.
* :mod:`jaxopt_dnn.quant`     - fake-quant (QAT), calibration (PTQ), QArray, int8 serving.
* :mod:`jaxopt_dnn.precision` - dtype policies and loss scaling.
* :mod:`jaxopt_dnn.parallel`  - meshes, sharding rules, data-parallel / FSDP steps, multi-host.
* :mod:`jaxopt_dnn.compile`   - XLA cost/memory reports, HLO dot census, StableHLO export.
* :mod:`jaxopt_dnn.distill`, :mod:`jaxopt_dnn.fold` - distillation loss, BatchNorm folding.
* :mod:`jaxopt_dnn.recipe`, :mod:`jaxopt_dnn.compose`, :mod:`jaxopt_dnn.train` - recipes,
  one jitted train step / serving function from a recipe, the training loop.
* :mod:`jaxopt_dnn.checkpoint`, :mod:`jaxopt_dnn.artifacts` - orbax checkpoints; serving
  checkpoints inspected, rebuilt and exported.
* :mod:`jaxopt_dnn.compress`, :mod:`jaxopt_dnn.report` - the main job and its table.
* :mod:`jaxopt_dnn.data`, :mod:`jaxopt_dnn.models` - embedded datasets, reference models.
"""

__version__ = "0.1.0"

from jaxopt_dnn import artifacts
from jaxopt_dnn import checkpoint
from jaxopt_dnn import compile
from jaxopt_dnn import compose
from jaxopt_dnn import compress
from jaxopt_dnn import data
from jaxopt_dnn import distill
from jaxopt_dnn import fold
from jaxopt_dnn import models
from jaxopt_dnn import parallel
from jaxopt_dnn import precision
from jaxopt_dnn import quant
from jaxopt_dnn import recipe
from jaxopt_dnn import report
from jaxopt_dnn import sparsity
from jaxopt_dnn import train
from jaxopt_dnn.compose import build
from jaxopt_dnn.recipe import Recipe
