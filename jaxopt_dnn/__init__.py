"""jaxopt_dnn: pruning, quantization, mixed precision and sharding as pure pytree transforms.

Public modules (everything else is private):

* :mod:`jaxopt_dnn.sparsity` - pruning masks, schedules, the masked optax wrapper, export.
* :mod:`jaxopt_dnn.data`, :mod:`jaxopt_dnn.models` - embedded datasets, reference models.
"""

__version__ = "0.1.0"

from jaxopt_dnn import data
from jaxopt_dnn import models
from jaxopt_dnn import sparsity
