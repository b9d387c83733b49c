"""jaxopt_dnn: pruning, quantization, mixed precision and sharding as pure pytree transforms."""

__version__ = "0.1.0"

from jaxopt_dnn import data
from jaxopt_dnn import models
