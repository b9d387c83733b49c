"""Real multi-host data parallelism: 2 processes x 4 CPU devices on loopback (gloo).

Each worker (``_multihost_worker.py``) is a fresh interpreter, because the device count
and the CPU collectives must be configured before JAX creates an array, and this pytest
process already has 8 devices. Every wait is bounded and the workers are killed on
timeout, so a process that never joins fails the test instead of hanging it.
"""

import pathlib
import sys

import jax
import numpy as np
import pytest

from _helpers import free_port, run_processes
from jaxopt_dnn import parallel

HERE = pathlib.Path(__file__).parent
TIMEOUT_S = 240


def _run_workers(out: pathlib.Path, n: int = 2) -> tuple[list[str], float]:
  port = free_port()
  return run_processes(
      [[HERE / "_multihost_worker.py", "--process-id", i, "--num-processes", n,
        "--port", port, "--out", out] for i in range(n)],
      timeout_s=TIMEOUT_S, what="multi-host workers")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_match_single_process_eight_devices(tmp_path):
  sys.path.insert(0, str(HERE))
  try:
    import _multihost_worker as worker
  finally:
    sys.path.remove(str(HERE))
  out = tmp_path / "params.npz"
  logs, elapsed = _run_workers(out)
  print(f"multi-host workers took {elapsed:.1f} s")
  assert all("done" in log for log in logs)

  mesh = parallel.make_mesh(data=8)
  ref = worker.train(mesh, lambda b: b)
  ref = {jax.tree_util.keystr(k): np.asarray(v)
         for k, v in jax.tree_util.tree_flatten_with_path(ref)[0]}
  got = np.load(out)
  assert sorted(got.files) == sorted(ref)
  for k, v in ref.items():
    np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
  # Not vacuous: the params moved far from their init during the 20 steps.
  init = {jax.tree_util.keystr(k): v
          for k, v in jax.tree_util.tree_flatten_with_path(worker.init_params())[0]}
  moved = max(float(np.abs(ref[k] - init[k]).max()) for k in ref)
  assert moved > 1e-2
