"""Serving functions that take their weights as arguments export and reload in a fresh process."""

import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import nnx

import zoo_thirdparty as zoo
from _helpers import TEST_XLA_FLAGS
from jaxopt_dnn import compile as jcompile
from jaxopt_dnn import quant

_LOAD = """
    import sys, numpy as np
    from jaxopt_dnn import compile as jc
    fn = jc.load_exported(sys.argv[1])
    io = np.load(sys.argv[2])
    leaves = [io[k] for k in sorted(k for k in io.files if k.startswith("leaf"))]
    y = np.asarray(fn(*leaves))
    print("identical", bool(np.array_equal(y, io["expected"])), fn.flat_args)
"""


def _fresh(path, tmp_path, args, expected):
  leaves = jax.tree.leaves(args)
  np.savez(tmp_path / "io.npz", expected=np.asarray(expected),
           **{f"leaf{i:04d}": np.asarray(v) for i, v in enumerate(leaves)})
  out = subprocess.run([sys.executable, "-c", textwrap.dedent(_LOAD), str(path),
                        str(tmp_path / "io.npz")], capture_output=True, text=True,
                       timeout=300, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin",
                            "XLA_FLAGS": TEST_XLA_FLAGS})   # the same compiler options
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout


@pytest.mark.slow
def test_export_qarray_and_boxed_weights_as_arguments(tmp_path):
  model, inputs = zoo.linen_lm(layers=1)
  boxed = model.init(jax.random.key(0), *inputs)              # LogicallyPartitioned leaves
  v = nn.unbox(boxed)
  stats = quant.calibrate(model.apply, v, [inputs])
  qv = {"params": quant.quantize_params(v["params"])}         # QArray leaves

  def serve(qv, tokens):
    return quant.int8_apply(model, qv, stats, tokens)

  path = tmp_path / "q.stablehlo"
  jcompile.export(serve, qv, *inputs, path=path)
  expected = jax.jit(serve)(qv, *inputs)
  assert "identical True True" in _fresh(path, tmp_path, (qv, *inputs), expected)
  served = jcompile.load_exported(path)
  np.testing.assert_array_equal(served(qv, *inputs), expected)   # same trees, same process

  path_b = tmp_path / "boxed.stablehlo"
  jcompile.export(model.apply, boxed, *inputs, path=path_b)
  np.testing.assert_array_equal(jcompile.load_exported(path_b)(boxed, *inputs),
                                jax.jit(model.apply)(boxed, *inputs))


@pytest.mark.slow
def test_export_nnx_state_as_argument(tmp_path):
  model, inputs = zoo.nnx_mha()
  graphdef, state, rest = nnx.split(model, nnx.Param, ...)   # Param variables as arguments

  def serve(state, x):
    return nnx.merge(graphdef, state, rest)(x)

  path = tmp_path / "nnx.stablehlo"
  jcompile.export(serve, state, *inputs, path=path)
  expected = jax.jit(serve)(state, *inputs)
  assert "identical True True" in _fresh(path, tmp_path, (state, *inputs), expected)
