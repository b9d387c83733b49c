"""Every notebook in ``notebooks/`` runs top to bottom on CPU (small-steps mode) and is
committed with its outputs stripped.

The kernel is this interpreter (``sys.executable``): a kernel spec is written to a
temporary ``JUPYTER_PATH``, so nothing needs ``ipykernel install`` and a fresh CI venv
with ``pip install -e .[dev]`` is enough.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import importlib.util
import unittest.mock
import venv

import pytest

import nbclient
import nbformat
from _helpers import TEST_XLA_FLAGS

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL = "jaxopt-dnn-tests"
CELL_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("jupyter")
  spec = root / "kernels" / KERNEL
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "jaxopt_dnn tests", "language": "python"}))
  return root


def test_notebooks_exist():
  names = {p.name for p in NOTEBOOKS}
  for n in ("02_pruning.ipynb", "03_quantization.ipynb", "04_precision_and_sharding.ipynb",
            "05_tpu_pod.ipynb"):
    assert n in names, f"missing notebook {n}; found {sorted(names)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_stripped_and_colab_ready(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [], f"{path.name} cell {i} has outputs: strip them"
      assert cell.execution_count is None, f"{path.name} cell {i} has an execution count"
  first = next(c for c in nb.cells if c.cell_type == "code").source
  assert "pip" in first and "find_spec(\"jaxopt_dnn\")" in first, "first cell must install"
  assert 'os.environ.get("JAXOPT_DNN_SMALL") == "1"' in first


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, kernel_dir, monkeypatch):
  monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))
  monkeypatch.setenv("JAXOPT_DNN_SMALL", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", TEST_XLA_FLAGS)   # the suite's flags only
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S,
                                   resources={"metadata": {"path": str(path.parent)}})
  t0 = time.perf_counter()
  client.execute()  # raises CellExecutionError on the first failing cell
  print(f"{path.name}: {time.perf_counter() - t0:.1f} s")
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors


def _install_cell() -> str:
  """The first code cell, the same in every notebook (one install logic, one variable)."""
  cells = {p.name: next(c for c in nbformat.read(p, as_version=4).cells
                        if c.cell_type == "code").source for p in NOTEBOOKS}
  first = cells[NOTEBOOKS[0].name]
  assert all(c == first for c in cells.values()), \
      f"the install cells differ: {[n for n, c in cells.items() if c != first]}"
  assert "JAXOPT_DNN_SOURCE" in first and "OWNER" not in first
  return first


def _resolve(cell, cwd, monkeypatch, source=None):
  """Runs the cell here with jaxopt_dnn reported missing; returns the pip command it ran."""
  calls = []
  monkeypatch.chdir(cwd)
  if source is None:
    monkeypatch.delenv("JAXOPT_DNN_SOURCE", raising=False)
  else:
    monkeypatch.setenv("JAXOPT_DNN_SOURCE", source)
  with unittest.mock.patch("importlib.util.find_spec", lambda name, *a: None), \
      unittest.mock.patch("subprocess.check_call", lambda cmd, **kw: calls.append(cmd)):
    exec(compile(cell, "install-cell", "exec"), {})
  (cmd,) = calls
  assert cmd[:5] == [sys.executable, "-m", "pip", "install", "-q"]
  return cmd[5]


def test_install_cell_source_default_checkout_wheel_or_a_clear_error(tmp_path, monkeypatch):
  cell = _install_cell()
  # always with the app extra (the notebooks use its datasets and plots)
  assert _resolve(cell, ROOT / "notebooks", monkeypatch) == f"{ROOT}[app]"   # in a checkout
  (tmp_path / "jaxopt_dnn-0.1.0-py3-none-any.whl").write_bytes(b"")
  assert _resolve(cell, tmp_path, monkeypatch) == "jaxopt_dnn-0.1.0-py3-none-any.whl[app]"
  url = "git+https://example.com/me/jaxopt_dnn@v1"
  assert _resolve(cell, tmp_path, monkeypatch, source=url) == f"jaxopt-dnn[app] @ {url}"
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(RuntimeError, match="set JAXOPT_DNN_SOURCE"):
    _resolve(cell, empty, monkeypatch)


@pytest.mark.slow
def test_install_cell_installs_the_built_wheel_in_a_fresh_venv(tmp_path):
  """Builds the wheel (``pip wheel --no-deps``) from a copy of the package, then runs the
  install cell itself with the fresh venv's Python and ``JAXOPT_DNN_SOURCE`` = that wheel
  (``PIP_NO_DEPS``/``PIP_NO_INDEX``: only our package is installed, nothing fetched)."""
  src = tmp_path / "src"
  shutil.copytree(ROOT / "jaxopt_dnn", src / "jaxopt_dnn",
                  ignore=shutil.ignore_patterns("__pycache__"))
  for f in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / f, src / f)
  # setuptools and wheel here: build with them; otherwise in pip's isolated build env
  isolation = ["--no-build-isolation"] if all(
      importlib.util.find_spec(m) for m in ("setuptools", "wheel")) else []
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation,
                  "-w", str(tmp_path / "dist"), str(src)], check=True, timeout=300)
  (wheel,) = (tmp_path / "dist").glob("jaxopt_dnn-*.whl")
  env_dir = tmp_path / "venv"
  venv.create(env_dir, with_pip=True)
  py = env_dir / "bin" / "python"
  work = tmp_path / "work"    # not a checkout: the cell must use JAXOPT_DNN_SOURCE
  work.mkdir()
  env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
  env.update(JAXOPT_DNN_SOURCE=str(wheel), PIP_NO_DEPS="1", PIP_NO_INDEX="1",
             PIP_DISABLE_PIP_VERSION_CHECK="1")
  p = subprocess.run([str(py), "-c", _install_cell()], cwd=work, env=env, text=True,
                     capture_output=True, timeout=300)
  assert p.returncode == 0, p.stderr
  assert f"installing {wheel}[app]" in p.stdout
  q = subprocess.run([str(py), "-c", "import importlib.metadata as m, importlib.util as u; "
                      "print(m.version('jaxopt-dnn'), u.find_spec('jaxopt_dnn').origin)"],
                     cwd=work, env=env, text=True, capture_output=True, timeout=60)
  version, origin = q.stdout.split()
  assert wheel.name.startswith(f"jaxopt_dnn-{version}-")
  assert pathlib.Path(origin).is_relative_to(env_dir)   # installed in the fresh venv
