"""The Trainer's two model halves: :class:`LinenTrainModel` and :class:`NnxTrainModel`.

The :class:`~jaxopt_dnn.trainer.Trainer` picks one ONCE, through
``model_adapter.adapt(model).match(linen=..., nnx=...)``, and from then on calls the same
operations on either, never testing the model's kind itself:

* construction: QAT-wraps the model (``quant.mode="qat"``) into :attr:`trained`, the
  model the step runs;
* :meth:`init_variables`: ``(params, collections, boxes)`` of a fresh or given start
  (linen: ``model.init`` and the QAT ranges at -1; NNX: the module's own values as pure
  dicts);
* :meth:`loss`: the user's loss at ``params`` with the step's rngs, and the collection
  updates it made (linen: through the instrumented ``apply_fn``; NNX: a fresh module in
  training mode, its streams re-keyed);
* :meth:`logical_specs`: mesh specs from the model's logical-axis annotations;
* :meth:`serve`: the inference function of a trained state (float / int8);
* :attr:`apply_fn` (linen) and :meth:`module` (NNX), each raising ``TypeError`` on the
  other kind; :attr:`holds_values`: whether the model holds its initial values (NNX).

The glue they share (rng streams, the global view, NNX state <-> pure dicts) is in
:mod:`jaxopt_dnn._adapter`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import traverse_util
from jax.sharding import Mesh

from jaxopt_dnn import _adapter as adapter
from jaxopt_dnn import fold as fold_lib
from jaxopt_dnn import lora as lora_lib
from jaxopt_dnn import parallel
from jaxopt_dnn import precision as precision_lib
from jaxopt_dnn import quant as quant_lib
from jaxopt_dnn.train_state import QuantConfig

PyTree = Any
QUANT_STATS = "quant_stats"


def _qat_wrapped(model: Any, quant: QuantConfig) -> Any:
  """``model`` with QAT fake-quant (``quant.qat``) under ``quant.mode="qat"``, else itself."""
  if quant.mode != "qat":
    return model
  return quant_lib.qat(model, quant.rules, bits=quant.bits, estimator=quant.estimator)


def _output_dtype(policy: Any) -> Any:
  """The dtype ``serve`` returns: the policy's output dtype (float32 without a policy)."""
  return jnp.float32 if policy is None else policy.output_dtype


# ------------------------------------------------------------------------ linen


class LinenTrainModel:
  """The Trainer's linen half: ``model.apply`` with the transforms, variables as dicts.

  Attributes:
    model: the user's ``nn.Module``.
    trained: the module the step runs (``quant.qat(model)`` under QAT, else ``model``).
    quant, policy, lora: the Trainer's configs (``QuantConfig``, ``Policy | None``,
      ``LoraConfig | None``).
    holds_values: ``False``: ``init`` runs ``model.init`` as a jitted program.
  """

  holds_values = False

  def __init__(self, model: nn.Module, *, quant: QuantConfig, policy: Any, lora: Any):
    self.model, self.quant, self.policy, self.lora = model, quant, policy, lora
    self.qat = quant.mode == "qat"
    self.trained = _qat_wrapped(model, quant)

  @property
  def apply_fn(self) -> Callable:
    """The transformed ``model.apply`` the loss sees (:meth:`forward`)."""
    return self.forward

  def module(self, state: Any, *, train: bool = False) -> Any:
    """Linen has no module holding the state: raises ``TypeError``."""
    raise TypeError("Trainer.module is for NNX models; for linen use trainer.apply_fn")

  def forward(self, variables, *args, **kwargs):
    """``model.apply`` with the transforms (QAT fake-quant, then the policy), in the
    global view (:func:`adapter.linen_global_view`). Without ``rngs``, a model that
    draws random numbers gets fixed keys (:func:`adapter.infer`)."""
    fn = self.trained.apply
    if self.lora is not None:   # adapters + (dequantized) base -> ordinary kernels
      variables = {**variables, "params": lora_lib.materialize(variables["params"])}
    if self.policy is not None:
      fn = precision_lib.with_policy(fn, self.policy)
    return adapter.infer(adapter.linen_global_view(fn), variables, *args, **kwargs)

  def init_variables(self, k_params, k_drop, variables, inputs: tuple,
                     init_kwargs: Mapping) -> tuple[PyTree, dict, PyTree]:
    """``(params, collections, boxed variables or None)``: ``variables`` (boxed or not)
    or ``model.init`` (keys ``k_params`` / ``k_drop``); under QAT the ranges at -1."""
    boxed = None
    if variables is None:   # (QAT ranges: below, from the same model's forward)
      init = adapter.linen_global_view(self.model.init)
      boxed = init({"params": k_params, "dropout": k_drop}, *inputs, **init_kwargs)
      variables = boxed
    variables = dict(nn.meta.unbox(variables))
    params = variables.pop("params")
    cols = {k: v for k, v in variables.items() if k != QUANT_STATS}
    if self.qat:
      cols[QUANT_STATS] = self._unseen_ranges(params, cols, k_drop, inputs, init_kwargs)
    return params, cols, boxed

  def _unseen_ranges(self, params, cols, k_drop, inputs: tuple, init_kwargs: Mapping) -> PyTree:
    """One range per quantized op, -1 = not seen yet: the first step sets it to its
    batch's absmax (as NNX QuantStats start), so only the sample's shapes matter (a zero
    sample would otherwise give zero ranges that the EMA keeps)."""
    qat_apply = adapter.linen_global_view(self.trained.apply)
    upd = jax.eval_shape(lambda p, c, k, *x: qat_apply(
        {"params": p, **c}, *x, mutable=[QUANT_STATS],
        **adapter.with_rngs(init_kwargs, k))[1], params, cols, k_drop, *inputs)
    return jax.tree.map(lambda x: jnp.full(x.shape, -1.0, jnp.float32), upd[QUANT_STATS])

  def logical_specs(self, boxed: PyTree, rules: Any, mesh: Mesh) -> PyTree:
    """Mesh specs of the params from the ``nn.with_logical_partitioning`` boxes."""
    if boxed is None:
      raise ValueError("Trainer: logical-axis sharding rules need the model's annotations "
                       "(nn.with_logical_partitioning boxes)")
    return parallel.logical_specs(boxed["params"], rules, mesh)

  def loss(self, loss_fn: Callable, params, collections: Mapping, batch, rng):
    """``(loss_fn's output, collection updates)``: ``loss_fn(apply_fn, variables, batch,
    rng)`` with an ``apply_fn`` keying every stream from ``rng`` and catching the
    updates of the mutable collections (the last call's win)."""
    box: dict[str, Any] = {}

    def apply_fn(variables, *args, **kwargs):
      kwargs = adapter.with_rngs(kwargs, rng)   # every stream; the user's own rngs win
      if "mutable" in kwargs:        # the user manages collections explicitly
        return self.forward(variables, *args, **kwargs)
      mutable = [c for c in variables if c != "params" and c in collections]
      if not mutable:
        return self.forward(variables, *args, **kwargs)
      out, upd = self.forward(variables, *args, mutable=mutable, **kwargs)
      box["updates"] = upd
      return out

    out = loss_fn(apply_fn, {"params": params, **collections}, batch, rng)
    return out, dict(box.get("updates", {}))

  def serve(self, state: Any, calibration_batches: Iterable[Any], *, eval_kwargs: Mapping,
            fold_batchnorm: bool = False) -> tuple[Callable, PyTree]:
    """``(serve_fn, serve_vars)`` of ``state`` (see :meth:`Trainer.serve`)."""
    cols = {k: v for k, v in state.collections.items() if k != QUANT_STATS}
    variables = {"params": state.params, **cols}
    model, kw = self.model, eval_kwargs
    calibration_batches = list(calibration_batches)
    if fold_batchnorm and cols.get("batch_stats"):
      if not calibration_batches:
        raise ValueError("Trainer.serve(fold_batchnorm=True) needs one calibration batch to "
                         "trace the model")
      sample = calibration_batches[0]
      folded = fold_lib.batchnorm(jax.device_get(variables), model=model,
                                  sample=sample[0] if isinstance(sample, tuple) else sample,
                                  apply_kwargs=kw)
      variables, model = folded.variables, folded.model
    q = self.quant
    out_dtype = _output_dtype(self.policy)
    if q.mode == "none":
      fwd = model.apply
      if self.policy is not None:
        fwd = precision_lib.with_policy(model.apply, self.policy)
        variables = self.policy.cast_to_compute(variables)
      fwd = adapter.linen_global_view(fwd)
      fn = jax.jit(lambda v, *x: adapter.cast_floating(adapter.infer(fwd, v, *x, **kw),
                                                       out_dtype))
      return fn, variables
    if q.mode == "qat":
      stats = state.collections[QUANT_STATS]
    elif q.weight_only:
      stats = None
    else:
      if not calibration_batches:
        raise ValueError("Trainer.serve: quant.mode='ptq' needs calibration_batches (tuples "
                         "of model inputs)")
      apply = adapter.linen_global_view(model.apply)
      stats = quant_lib.calibrate(lambda v, *x: adapter.infer(apply, v, *x, **kw), variables,
                                  calibration_batches, method=q.calibration, rules=q.rules,
                                  max_batches=q.calibration_batches)
    qvars = {**variables, "params": quant_lib.quantize_params(variables["params"], q.rules,
                                                              bits=q.bits)}
    if stats is not None:
      qvars[QUANT_STATS] = stats

    def int8(v, *x, **k):
      return quant_lib.int8_apply(adapter.linen_global_view(model.apply), v, None, *x,
                                  rules=q.rules, bits=q.bits, weight_only=q.weight_only, **k)

    def fn(v, *x):
      return adapter.cast_floating(adapter.infer(int8, v, *x, **kw), out_dtype)
    return jax.jit(fn), qvars


# -------------------------------------------------------------------------- NNX


class NnxTrainModel:
  """The Trainer's NNX half: the module split once; params and the other state are pure
  dicts (typed keys as raw data), merged into a fresh module per use.

  Attributes:
    model: the user's ``nnx.Module`` (never modified).
    trained: the module the step runs (``quant.qat(model)`` under QAT, else ``model``).
    quant, policy, lora: the Trainer's configs (``QuantConfig``, ``Policy | None``,
      ``LoraConfig | None``).
    holds_values: ``True``: without given variables, ``init`` places the module's own
      values (no init program).
  """

  holds_values = True

  def __init__(self, model: nnx.Module, *, quant: QuantConfig, policy: Any, lora: Any):
    self.model, self.quant, self.policy, self.lora = model, quant, policy, lora
    self.trained = _qat_wrapped(model, quant)
    graphdef, params, rest = nnx.split(self.trained, nnx.Param, ...)
    self._graphdef = graphdef
    self._param_template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    self._rest_template = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), rest)
    self._impls = adapter.keys_to_data(nnx.to_pure_dict(rest))[1]

  @property
  def apply_fn(self) -> Callable:
    """NNX has no ``apply``: raises ``TypeError``."""
    raise TypeError("Trainer.apply_fn is for linen models; for NNX use "
                    "trainer.module(state)")

  def module(self, state: Any, *, train: bool = False) -> nnx.Module:
    """The transformed module (QAT hooks, policy) holding ``state``'s values, in
    training or eval mode."""
    m = self.merge(state.params, state.collections)
    m.train() if train else m.eval()
    return m

  def merge(self, params: PyTree, collections: PyTree) -> nnx.Module:
    """A fresh :attr:`trained` module holding ``params`` and ``collections`` (LoRA
    materialized, the policy applied), in the global view."""
    if self.lora is not None:
      params = lora_lib.materialize(params)
    if self.policy is not None:   # norm parameters keep float32 (the policy's path exceptions)
      params = self.policy.cast_to_compute(params)
    module = adapter.nnx_build(self._graphdef, self._param_template, self._rest_template,
                               self._impls, params, collections)
    if self.policy is not None:
      module = precision_lib.nnx_apply_policy(module, self.policy)
    return adapter.nnx_global_view(module)

  @staticmethod
  def split(module: nnx.Module) -> tuple[PyTree, PyTree]:
    """``(params, collections)`` of ``module`` as pure dicts (keys as raw data)."""
    _, params, rest = nnx.split(module, nnx.Param, ...)
    cols, _ = adapter.keys_to_data(nnx.to_pure_dict(rest))
    return nnx.to_pure_dict(params), cols

  def init_variables(self, k_params, k_drop, variables, inputs: tuple,
                     init_kwargs: Mapping) -> tuple[PyTree, dict, None]:
    """``(params, collections, None)``: :attr:`trained`'s own values, the params
    replaced by ``variables["params"]`` when given (the keys are unused)."""
    del k_params, k_drop, inputs, init_kwargs
    params, cols = self.split(self.trained)
    if variables is not None:
      params = variables["params"]
    return params, cols, None

  def logical_specs(self, boxed: PyTree, rules: Any, mesh: Mesh) -> PyTree:
    """Mesh specs of the params from the module's sharding metadata (``boxed`` unused)."""
    del boxed
    return parallel.logical_specs(None, rules, mesh, nnx.state(self.trained, nnx.Param))

  def loss(self, loss_fn: Callable, params, collections: Mapping, batch, rng):
    """``(loss_fn's output, collection updates)``: ``loss_fn(module, batch, rng)`` on a
    fresh module in training mode, every stream it holds re-keyed from ``rng``."""
    module = adapter.nnx_reseed(self.merge(params, collections), jax.random.fold_in(rng, 2))
    module.train()
    out = loss_fn(module, batch, rng)
    return out, self.split(module)[1]

  def serve(self, state: Any, calibration_batches: Iterable[Any], *, eval_kwargs: Mapping,
            fold_batchnorm: bool = False) -> tuple[Callable, PyTree]:
    """``(serve_fn, serve_vars)`` of ``state`` (see :meth:`Trainer.serve`;
    ``eval_kwargs`` and ``fold_batchnorm`` are linen's)."""
    del eval_kwargs, fold_batchnorm
    q = self.quant
    out_dtype = _output_dtype(self.policy)
    if q.mode == "none":
      params = state.params if self.policy is None else self.policy.cast_to_compute(state.params)
      variables = {"params": params, "collections": state.collections}

      def fn(v, *x):
        m = self.merge(v["params"], v["collections"])
        m.eval()
        return adapter.cast_floating(m(*x), out_dtype)
      return jax.jit(fn), variables
    # int8: the user's module (no QAT hooks) with the trained non-param state
    plain_cols = self._plain_collections(state.collections)
    if q.mode == "qat":
      stats = adapter.nnx_stats(state.collections)
    elif q.weight_only:
      stats = None
    else:
      calib = self._plain(state.params, plain_cols)
      calib.eval()
      stats = quant_lib.calibrate(lambda m, *x: m(*x), calib, list(calibration_batches),
                                  method=q.calibration, rules=q.rules,
                                  max_batches=q.calibration_batches)
    qvars = {"params": quant_lib.quantize_params(state.params, q.rules, bits=q.bits),
             "collections": plain_cols}
    if stats is not None:
      qvars[QUANT_STATS] = stats

    def fn(v, *x):
      base = self._plain(quant_lib.dequantize_params(v["params"]), v["collections"])
      base.eval()
      out = quant_lib.int8_apply(base, v["params"], v.get(QUANT_STATS), *x, rules=q.rules,
                                 bits=q.bits, weight_only=q.weight_only)
      return adapter.cast_floating(out, out_dtype)
    return jax.jit(fn), qvars

  def _plain_collections(self, collections: Mapping) -> dict:
    """The part of a QAT state's ``collections`` that the user's own module holds.

    The structure comes from the module itself (``nnx.split(model, nnx.Param, ...)``),
    not from names: the QAT clone adds ``QuantStat`` variables (``quant_input_amax`` for
    a ``kernel``, ``quant_<leaf>_input_amax`` for a param named otherwise, e.g. a bare
    ``self.w = nnx.Param(...)``), which the plain module does not have.
    """
    _, _, rest = nnx.split(self.model, nnx.Param, ...)
    want = traverse_util.flatten_dict(adapter.keys_to_data(nnx.to_pure_dict(rest))[0])
    have = traverse_util.flatten_dict(dict(collections))
    missing = sorted("/".join(map(str, k)) for k in want if k not in have)
    if missing:
      raise ValueError(f"Trainer.serve: state.collections lacks the module's variables "
                       f"{missing[:5]}")
    return traverse_util.unflatten_dict({k: have[k] for k in want})

  def _plain(self, params: PyTree, collections: PyTree) -> nnx.Module:
    """The user's own module (no QAT hooks) holding ``params`` and ``collections`` (the
    structure of :meth:`_plain_collections`), in the global view."""
    graphdef, p, r = nnx.split(self.model, nnx.Param, ...)
    impls = adapter.keys_to_data(nnx.to_pure_dict(r))[1]
    return adapter.nnx_global_view(adapter.nnx_build(graphdef, p, r, impls, params,
                                                     collections))
