"""Every notebook in ``notebooks/`` runs top to bottom on CPU (small-steps mode) and is
committed with its outputs stripped.

The kernel is this interpreter (``sys.executable``): a kernel spec is written to a
temporary ``JUPYTER_PATH``, so nothing needs ``ipykernel install`` and a fresh CI venv
with ``pip install -e .[dev]`` is enough.
"""

import json
import pathlib
import sys
import time

import pytest

import nbclient
import nbformat

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
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
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S,
                                   resources={"metadata": {"path": str(path.parent)}})
  t0 = time.perf_counter()
  client.execute()  # raises CellExecutionError on the first failing cell
  print(f"{path.name}: {time.perf_counter() - t0:.1f} s")
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors
