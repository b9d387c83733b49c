import jax
import numpy as np

import jaxopt_dnn
from jaxopt_dnn.app import data


def test_eight_virtual_devices():
  assert jax.device_count() == 8


def test_digits_split_is_deterministic_and_disjoint(digits):
  again = data.load_digits()
  np.testing.assert_array_equal(digits.x_train, again.x_train)
  assert digits.x_train.shape[1:] == (8, 8, 1)
  assert len(digits.x_train) + len(digits.x_test) == 1797
  assert digits.x_train.dtype == np.float32 and 0.0 <= digits.x_train.min() <= digits.x_train.max() <= 1.0


def test_batches_cover_epoch_once():
  x = np.arange(10)[:, None].astype(np.float32)
  y = np.arange(10)
  seen = np.concatenate([b[1] for b in data.batches(x, y, 3, seed=1, drop_remainder=False)])
  assert sorted(seen.tolist()) == list(range(10))
  a = [b[1].tolist() for b in data.batches(x, y, 3, seed=1, epoch=0)]
  b = [b[1].tolist() for b in data.batches(x, y, 3, seed=1, epoch=1)]
  assert a != b and len(a) == 3


def test_public_api_has_version():
  assert isinstance(jaxopt_dnn.__version__, str)


def test_path_strings_name_linen_nnx_and_qarray_leaves_apart():
  import jax.numpy as jnp
  from flax import nnx

  from jaxopt_dnn import _tree, quant
  nnx_paths = [p for p, _ in _tree.leaves_with_paths(
      nnx.state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Param))]
  assert nnx_paths == ["bias", "kernel"]
  q = quant.quantize_params({"Dense_0": {"kernel": jnp.ones((4, 3))}})
  assert [p for p, _ in _tree.leaves_with_paths(q)] == ["Dense_0/kernel/value",
                                                        "Dense_0/kernel/scale"]


def test_census_counts_integer_ops_including_widened_ones():
  from jaxopt_dnn import _hlo
  text = "\n".join([
      "  %a = s8[4,4]{1,0} parameter(0)",
      "  %b = s32[4,4]{1,0} parameter(1)",
      "  %c = f32[4,4]{1,0} parameter(2)",
      "  %d = s32[4,4]{1,0} dot(%a, %a), lhs_contracting_dims={1}, rhs_contracting_dims={0}",
      "  %e = s32[4,4]{1,0} convolution(%b, %b), window={size=1}",
      "  ROOT %f = f32[4,4]{1,0} dot(%c, %c), lhs_contracting_dims={1}, rhs_contracting_dims={0}",
  ])
  census = _hlo.census_from_hlo(text)
  assert census.int8 == 1 and census.integer == 2 and census.float == 1 and census.total == 3


def test_library_core_never_imports_the_app():
  """The arrows point one way: nothing outside jaxopt_dnn/app imports it."""
  import pathlib
  import re
  import subprocess
  import sys
  root = pathlib.Path(jaxopt_dnn.__file__).parent
  offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
               if "app" not in p.relative_to(root).parts
               and re.search(r"^\s*(from|import)\s+jaxopt_dnn\.app|^\s*from jaxopt_dnn import .*\bapp\b",
                            p.read_text(), re.M)]
  assert offenders == []
  code = ("import sys, jaxopt_dnn, jaxopt_dnn.trainer, jaxopt_dnn.loop, jaxopt_dnn.compile, "
          "jaxopt_dnn.checkpoint; print(sorted(m for m in sys.modules if m.startswith('jaxopt_dnn.app')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
  assert out.stdout.strip() == "[]"
