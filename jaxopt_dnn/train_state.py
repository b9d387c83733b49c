"""The Trainer's state and configuration objects.

:class:`TrainState` is everything one step reads and writes (an ordinary pytree:
checkpointable, shardable); :class:`PruneConfig` and :class:`QuantConfig` are the frozen
(hashable) configurations ``Trainer(prune=..., quant=...)`` takes, as dataclasses or as
dicts (:func:`config_from`); :func:`policy_from` and :func:`loss_scale_from` normalise
``precision=`` and ``loss_scale=``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxopt_dnn import precision as precision_lib
from jaxopt_dnn import sparsity as sparsity_lib

PyTree = Any


# ----------------------------------------------------------------------- state


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; an ordinary pytree (checkpointable, shardable).

  Attributes:
    step: int32 scalar, number of completed optimizer steps.
    params: the model's parameters (the paths of ``model.init(...)["params"]``, or of
      ``nnx.state(model, nnx.Param)`` for NNX), unboxed, in the policy's param dtype.
    opt_state: optax state (pruning masks live here).
    rng: raw ``uint32[2]`` PRNG key data, split by every step.
    collections: the model's other state, e.g. ``{"batch_stats": ..., "quant_stats":
      ...}`` (linen collections; for NNX every non-``Param`` variable, PRNG keys as raw
      key data).
    loss_scale: ``None`` or a loss-scale pytree (:mod:`jaxopt_dnn.precision`).
  """
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  rng: jax.Array
  collections: PyTree = flax.struct.field(default_factory=dict)
  loss_scale: PyTree = None

  @classmethod
  def create(cls, params: PyTree, tx: optax.GradientTransformation, *, rng: Any = 0,
             collections: PyTree | None = None, loss_scale: PyTree = None) -> TrainState:
    """``step=0``, ``opt_state=tx.init(params)``; ``rng`` an int seed or a key."""
    if isinstance(rng, int):
      rng = jax.random.key(rng)
    if jnp.issubdtype(jnp.asarray(rng).dtype, jax.dtypes.prng_key):
      rng = jax.random.key_data(rng)
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               rng=jnp.asarray(rng, jnp.uint32),
               collections={} if collections is None else collections, loss_scale=loss_scale)

  def apply_gradients(self, grads: PyTree, tx: optax.GradientTransformation,
                      **changes) -> TrainState:
    """One optax update; ``step += 1``; other fields replaced by ``changes``."""
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state, **changes)


# --------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class PruneConfig:
  """Pruning inside the optimizer (:func:`sparsity.prune_optimizer`).

  The sparsity follows ``schedule``: ``"constant"`` (``sparsity`` from ``begin``) or
  ``"polynomial"`` (Zhu–Gupta cubic from 0 at ``begin`` to ``sparsity`` at ``end``).
  Masks are recomputed every ``update_every`` steps until ``end`` (``None``: for a
  constant schedule, only at ``begin``), then frozen.

  Attributes:
    method: ``magnitude`` | ``random`` | ``nm`` | ``channel``.
    rules: regex over key paths of the leaves to prune (``None``: the library default).
  """
  method: str = "magnitude"
  sparsity: float = 0.5
  schedule: str = "constant"
  begin: int = 0
  end: int | None = None
  update_every: int = 100
  scope: str = "layer"
  rules: Any = None
  distribution: Any = "uniform"
  n: int = 2
  m: int = 4

  def __post_init__(self):
    if self.method not in ("magnitude", "random", "nm", "channel"):
      raise ValueError(f"prune.method must be magnitude|random|nm|channel, got {self.method!r}")
    if self.schedule not in ("constant", "polynomial"):
      raise ValueError(f"prune.schedule must be constant|polynomial, got {self.schedule!r}")
    for name in ("begin", "update_every"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name == "update_every" else 0):
        raise ValueError(f"prune.{name} must be an int >= "
                         f"{1 if name == 'update_every' else 0}, got {v!r}")
    if self.end is not None and (not isinstance(self.end, int) or self.end <= self.begin):
      raise ValueError(f"prune.end must be an int > begin={self.begin}, got {self.end!r}")
    if self.schedule == "polynomial" and self.end is None:
      raise ValueError("prune.schedule='polynomial' needs prune.end (the step at which the "
                       "target sparsity is reached)")
    if not isinstance(self.sparsity, (int, float)) or not 0.0 <= float(self.sparsity) < 1.0:
      raise ValueError(f"prune.sparsity must be a float in [0, 1), got {self.sparsity!r}")

  def optimizer(self, tx: optax.GradientTransformation,
                roles: Any = None) -> optax.GradientTransformation:
    """``tx`` wrapped in :func:`sparsity.prune_optimizer` per this config (``roles``:
    the leaf roles or ``params -> roles``, which N:M needs for its contraction axes)."""
    if self.schedule == "polynomial":
      schedule = sparsity_lib.polynomial_schedule(0.0, self.sparsity, self.begin, self.end,
                                                  frequency=self.update_every)
    else:
      schedule = sparsity_lib.constant_schedule(self.sparsity, self.begin)
    until = self.begin if self.end is None else self.end
    return sparsity_lib.prune_optimizer(
        tx, schedule, method=self.method, scope=self.scope, update_every=self.update_every,
        update_until=until, rules=self.rules, distribution=self.distribution, n=self.n,
        m=self.m, roles=roles)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """Quantization: ``qat`` (fake-quant training, then int8 serving with the trained
  activation ranges), ``ptq`` (int8 serving calibrated on ``calibration_batches``) or
  ``none``. ``weight_only`` stores int ``bits`` weights and computes in float."""
  mode: str = "none"
  bits: int = 8
  weight_only: bool = False
  calibration: str = "absmax"
  calibration_batches: int = 4
  estimator: str = "ste"
  rules: Any = None

  def __post_init__(self):
    if self.mode not in ("none", "ptq", "qat"):
      raise ValueError(f"quant.mode must be none|ptq|qat, got {self.mode!r}")
    if self.bits not in (4, 8) or isinstance(self.bits, bool):
      raise ValueError(f"quant.bits must be 4 or 8, got {self.bits!r}")
    if self.calibration not in ("absmax", "percentile", "mse"):
      raise ValueError(f"quant.calibration must be absmax|percentile|mse, got "
                       f"{self.calibration!r}")
    if self.estimator not in ("ste", "int8_forward"):
      raise ValueError(f"quant.estimator must be ste|int8_forward, got {self.estimator!r}")
    if not isinstance(self.calibration_batches, int) or self.calibration_batches < 1:
      raise ValueError(f"quant.calibration_batches must be an int >= 1, got "
                       f"{self.calibration_batches!r}")


def config_from(value: Any, cls: type, name: str):
  if value is None:
    return None
  if isinstance(value, cls):
    return value
  if isinstance(value, Mapping):
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - fields)
    if unknown:
      raise ValueError(f"{name}: unknown keys {unknown}; valid: {sorted(fields)}")
    return cls(**value)
  raise TypeError(f"{name} must be None, a dict or a {cls.__name__}, got {value!r}")


def policy_from(value: Any) -> precision_lib.Policy | None:
  if value is None:
    return None
  policy = precision_lib.Policy.from_string(value) if isinstance(value, str) else value
  if not isinstance(policy, precision_lib.Policy):
    raise TypeError(f"precision must be None, a Policy or a spec string, got {value!r}")
  if all(d == jnp.float32 for d in (policy.param_dtype, policy.compute_dtype,
                                    policy.output_dtype)):
    return None
  return policy


def loss_scale_from(value: Any) -> Any:
  if value is None:
    return None
  if isinstance(value, str):
    if value == "static":
      return precision_lib.StaticLossScale(jnp.float32(2.0 ** 15))
    if value == "dynamic":
      return precision_lib.DynamicLossScale(jnp.float32(2.0 ** 15))
    raise ValueError(f"loss_scale must be None, 'static', 'dynamic' or a loss-scale object, "
                     f"got {value!r}")
  if not all(hasattr(value, a) for a in ("scale", "unscale", "adjust")):
    raise TypeError(f"loss_scale must be None, 'static', 'dynamic' or a loss-scale object "
                    f"(scale/unscale/adjust), got {value!r}")
  return value
