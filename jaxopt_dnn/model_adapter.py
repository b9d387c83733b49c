"""The one place that tells a linen model from an NNX one (as qwix's ``quantize_model``).

:func:`adapt` takes what a user hands the library and returns a :class:`Linen` or an
:class:`Nnx` adapter with the same operations; the transforms (QAT, calibration, int8
serving, the post-training capture of GPTQ / AWQ / SmoothQuant / SparseGPT, the auto
planner, roles, LoRA) call those operations and never test the model's kind themselves;
the Trainer picks its linen or NNX half (:mod:`jaxopt_dnn.train_model`) with ``match``.

The library's calling convention is a pair ``(model, variables)``:

* linen: ``model`` is an ``nn.Module`` (its ``apply`` is used) or any
  ``f(variables, *inputs)``; ``variables`` is the variables pytree
  (``{"params": ..., "batch_stats": ...}``), or any pytree for a plain function;
* NNX: ``model`` is an ``nnx.Module`` (called as ``module(*inputs)``); ``variables`` is
  ``None`` (the module's own params) or the pure params dict
  (``nnx.to_pure_dict(nnx.state(module, nnx.Param))``, possibly with ``QArray`` leaves;
  ``{"params": pure}`` is accepted too);
* NNX, capture style: ``model`` is ``apply_fn(module, *inputs)`` and ``variables`` is the
  ``nnx.Module``.

Paths are ``_tree.path_str`` strings: linen params paths are relative to ``params``
(``Conv_0/kernel``), NNX paths are those of ``nnx.to_pure_dict`` (``blocks/0/q/kernel``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
from flax import nnx

from jaxopt_dnn import _tree

PyTree = Any


class Split(NamedTuple):
  """A model as a pure function of its params leaves.

  Attributes:
    paths: each leaf's path (``None`` for a linen leaf outside ``params``).
    leaves: the leaves, in ``paths`` order (what ``is_leaf`` keeps whole stays whole).
    rest: everything else the forward reads (linen: the other collections; NNX: the
      non-``Param`` state); a pytree, so it can be a ``jit`` argument.
    call: ``call(leaves, rest, *inputs, **kwargs)`` -> the model's output; pure and
      jittable (NNX: merges a fresh module per call, the given one is not touched).
  """
  paths: list
  leaves: list
  rest: Any
  call: Callable


def is_module(x: Any) -> bool:
  """Whether ``x`` is a Flax module, linen or NNX."""
  return isinstance(x, (nn.Module, nnx.Module))


def modules(module: nnx.Module) -> dict[str, nnx.Module]:
  """NNX: ``{path: submodule}`` of every module in ``module``'s graph, the root at
  ``""``, in graph order; each module once (shared modules are not repeated)."""
  return {"/".join(str(q) for q in path): node for path, node in nnx.iter_graph(module)
          if isinstance(node, nnx.Module)}


def adapt(model: Any, variables: Any = None) -> Linen | Nnx:
  """The adapter of ``(model, variables)`` in the library's convention (module doc).

  Raises:
    TypeError: ``model`` is neither a Flax module nor callable.
  """
  if isinstance(variables, nnx.Module):
    return Nnx(variables, call=model)
  if isinstance(model, nnx.Module):
    if isinstance(variables, Mapping) and set(variables) == {"params"}:
      variables = variables["params"]
    return Nnx(model, params=variables)
  if isinstance(model, nn.Module):
    return Linen(model.apply, variables, module=model)
  if not callable(model):
    raise TypeError(f"apply_fn must be callable (linen) or an nnx.Module, got {model!r}")
  return Linen(model, variables)


class Linen:
  """A linen model (or any ``fn(variables, *inputs)``) and its variables.

  Attributes:
    fn: ``fn(variables, *inputs, **kwargs)`` (``module.apply`` for a module).
    module: the ``nn.Module``, or ``None`` for a plain function.
    variables: the variables pytree as given (may be ``None``).
    model: ``fn``: what the convention's first argument is for this model.
  """

  prefix = "params/"   # where the params' paths sit in the variables' paths
  params_expr = "params"   # how a user writes this model's params (for messages)

  def __init__(self, fn: Callable, variables: Any, module: nn.Module | None = None):
    self.fn, self.variables, self.module = fn, variables, module
    self.model = fn

  @property
  def has_params(self) -> bool:
    """Whether ``variables`` is a mapping with a ``params`` collection."""
    return isinstance(self.variables, Mapping) and "params" in self.variables

  @property
  def state(self) -> PyTree:
    """The variables as given (linen models hold no state of their own)."""
    return self.variables

  @property
  def params(self) -> PyTree | None:
    """``variables["params"]``, or ``None`` when there is no ``params`` collection."""
    return self.variables["params"] if self.has_params else None

  def rebuild(self, params: PyTree = None) -> PyTree:
    """The variables holding ``params`` (``{**variables, "params": params}``); without
    ``params``, :attr:`variables` as given."""
    if params is None:
      return self.variables
    return {**self.variables, "params": params}

  def with_params(self, params: PyTree) -> PyTree:
    """The convention's ``variables`` holding ``params`` (linen: :meth:`rebuild`)."""
    return self.rebuild(params)

  def call(self, rebuilt: PyTree, *inputs, **kwargs):
    """Runs the model on what :meth:`rebuild` gave: ``fn(variables, *inputs)``."""
    return self.fn(rebuilt, *inputs, **kwargs)

  def apply_params(self, params: PyTree, *inputs, **kwargs):
    """``fn({**variables, "params": params}, *inputs)``: pure in ``params``."""
    return self.fn(self.rebuild(params), *inputs, **kwargs)

  def split(self, is_leaf: Callable | None = None, *, where: str | None = None) -> Split:
    """The params leaves (paths relative to ``params``), the other collections as
    ``rest``. Variables without a ``params`` collection (a plain function's pytree) are
    all leaves, at their full paths, unless ``where`` is given: then that raises."""
    v = self.variables
    if self.has_params:
      flat, pdef = jax.tree_util.tree_flatten_with_path(v["params"], is_leaf=is_leaf)
      rest = {k: x for k, x in v.items() if k != "params"}
      fn = self.fn

      def call(lv, r, *inputs, **kwargs):
        return fn({**r, "params": jax.tree.unflatten(pdef, lv)}, *inputs, **kwargs)
      return Split([_tree.path_str(p) for p, _ in flat], [x for _, x in flat], rest, call)
    if where is not None:
      raise TypeError(f"{where}: variables must be a dict with a 'params' collection "
                      f"(linen) or an nnx.Module, got {type(v).__name__}")
    return self.flatten(v, is_leaf=is_leaf)

  def flatten(self, variables: PyTree = None, *, is_leaf: Callable | None = None) -> Split:
    """Every leaf of ``variables`` (default: :attr:`variables`) in the convention's form
    (linen: the whole variables pytree); paths relative to ``params`` (``None`` for
    the other collections' leaves) when there is a ``params`` collection, else full.
    ``rest`` is ``None``."""
    v = self.variables if variables is None else variables
    flat, treedef = jax.tree_util.tree_flatten_with_path(v, is_leaf=is_leaf)
    has = (isinstance(v, dict) or hasattr(v, "keys")) and "params" in v
    paths = []
    for p, _ in flat:
      s = _tree.path_str(p)
      if has:
        s = s[len("params/"):] if s.startswith("params/") else None
      paths.append(s)
    fn = self.fn

    def call(lv, r, *inputs, **kwargs):
      del r
      return fn(jax.tree.unflatten(treedef, lv), *inputs, **kwargs)
    return Split(paths, [x for _, x in flat], None, call)

  def trace_args(self) -> tuple[Callable, PyTree, Callable[[str], bool] | None]:
    """``(fn, tree, maskable)`` to trace the model over every leaf it reads:
    ``fn(tree, *inputs)``; boxed (``LogicallyPartitioned``) leaves unboxed; ``maskable``
    chooses the ``params`` collection (``None``: every leaf)."""
    v = nn.unbox(self.variables)
    maskable = ((lambda p: p.startswith("params/"))
                if isinstance(v, dict) and "params" in v else None)
    return self.fn, v, maskable

  def match(self, *, linen: Callable, nnx: Callable, error: str | None = None):
    """``linen(module)`` (the kind-specific construction); a plain function raises
    ``TypeError(error + type)`` when ``error`` is given, else gets ``linen(fn)``."""
    del nnx
    if self.module is None and error is not None:
      raise TypeError(f"{error}{type(self.fn).__name__}")
    return linen(self.fn if self.module is None else self.module)


class Nnx:
  """An NNX module, optionally with replacement params, and how to call it.

  Attributes:
    module: the ``nnx.Module`` (never modified by the adapter).
    model: the module: what the convention's first argument is for this model.
    params: the pure params dict (the given one, else the module's own).
    variables: the convention's ``variables``: the pure params dict.
  """

  prefix = ""
  params_expr = "nnx.to_pure_dict(nnx.state(model, nnx.Param))"

  def __init__(self, module: nnx.Module, *, params: PyTree = None,
               call: Callable | None = None):
    self.module = self.model = module
    self._fn = call if call is not None else (lambda m, *a, **k: m(*a, **k))
    self._params = params
    self._given = params is not None
    self.has_params = True

  @functools.cached_property
  def _parts(self):
    """``(graphdef, Param state, rest)`` of the module, split once, when first needed."""
    return nnx.split(self.module, nnx.Param, ...)

  @functools.cached_property
  def params(self) -> PyTree:
    return nnx.to_pure_dict(self._parts[1]) if self._params is None else self._params

  @property
  def variables(self) -> PyTree:
    return self.params

  @property
  def state(self) -> nnx.State:
    """The module's whole current ``nnx.state`` (what NNX decoders take as variables)."""
    return nnx.state(self.module)

  def rebuild(self, params: PyTree = None) -> nnx.Module:
    """A fresh module of the same graph holding the pure dict ``params`` (default:
    :attr:`params`); the other state is the module's."""
    params = self.params if params is None else params
    gd, pstate, rest = self._parts
    state = jax.tree.map(lambda x: x, pstate)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(gd, state, rest)

  def with_params(self, params: PyTree) -> PyTree:
    """The convention's ``variables`` holding ``params``: the pure dict itself."""
    return params

  def call(self, rebuilt: nnx.Module, *inputs, **kwargs):
    """Runs the model on a module (what :meth:`rebuild` gave)."""
    return self._fn(rebuilt, *inputs, **kwargs)

  def apply_params(self, params: PyTree, *inputs, **kwargs):
    """The model's output with the pure params dict ``params``: pure in ``params``."""
    return self._fn(self.rebuild(params), *inputs, **kwargs)

  def split(self, is_leaf: Callable | None = None, *, where: str | None = None) -> Split:
    """The ``nnx.Param`` leaves (paths as in ``nnx.to_pure_dict``; given params
    replace the module's by path, ``is_leaf`` keeping QArrays whole), the other state
    as ``rest``."""
    del where
    gd, pstate, rest = self._parts
    flat, pdef = jax.tree_util.tree_flatten_with_path(pstate)
    paths = [_tree.path_str(p) for p, _ in flat]
    leaves = [x for _, x in flat]
    if self._given:
      pure = dict(_tree.leaves_with_paths(self.params, is_leaf=is_leaf))
      leaves = [pure.get(p, x) for p, x in zip(paths, leaves)]
    fn = self._fn

    def call(lv, r, *inputs, **kwargs):
      return fn(nnx.merge(gd, jax.tree.unflatten(pdef, lv), r), *inputs, **kwargs)
    return Split(paths, leaves, rest, call)

  def flatten(self, variables: PyTree = None, *, is_leaf: Callable | None = None) -> Split:
    """Every leaf of the module's whole state (``nnx.split(module)``), the leaves of
    the pure dict ``variables`` (default: :attr:`params`; ``is_leaf`` keeps QArrays
    whole) replacing them by path. ``rest`` is ``None``."""
    params = self.params if variables is None else variables
    gd, state = nnx.split(self.module)
    flat, sdef = jax.tree_util.tree_flatten_with_path(state)
    paths = [_tree.path_str(p) for p, _ in flat]
    given = dict(_tree.leaves_with_paths(params, is_leaf=is_leaf))
    leaves = [given.get(p, x) for p, (_, x) in zip(paths, flat)]
    fn = self._fn

    def call(lv, r, *inputs, **kwargs):
      del r
      return fn(nnx.merge(gd, jax.tree.unflatten(sdef, lv)), *inputs, **kwargs)
    return Split(paths, leaves, None, call)

  def trace_args(self) -> tuple[Callable, PyTree, Callable[[str], bool]]:
    """``(fn, state, maskable)``: ``fn(state, *inputs)`` over the module's whole
    ``nnx.State``; ``maskable`` chooses the ``nnx.Param`` paths."""
    graphdef, state = nnx.split(self.module)
    params = {p for p, _ in _tree.leaves_with_paths(nnx.state(self.module, nnx.Param))}
    fn = self._fn
    return (lambda s, *a, **k: fn(nnx.merge(graphdef, s), *a, **k)), state, params.__contains__

  def match(self, *, linen: Callable, nnx: Callable, error: str | None = None):
    """``nnx(module)`` (the kind-specific construction)."""
    del linen, error
    return nnx(self.module)

