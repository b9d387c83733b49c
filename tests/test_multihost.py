"""Real multi-host data parallelism: 2 processes x 4 CPU devices on loopback (gloo).

Each worker (``_multihost_worker.py``) is a fresh interpreter, because the device count
and the CPU collectives must be configured before JAX creates an array, and this pytest
process already has 8 devices. Every wait is bounded and the workers are killed on
timeout, so a process that never joins fails the test instead of hanging it.
"""

import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxopt_dnn import parallel

HERE = pathlib.Path(__file__).parent
TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_workers(out: pathlib.Path, n: int = 2) -> tuple[list[str], float]:
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen(
      [sys.executable, str(HERE / "_multihost_worker.py"), "--process-id", str(i),
       "--num-processes", str(n), "--port", str(port), "--out", str(out)],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
      for i in range(n)]
  t0 = time.perf_counter()
  logs = []
  try:
    for p in procs:
      left = max(1.0, TIMEOUT_S - (time.perf_counter() - t0))
      out_text, _ = p.communicate(timeout=left)
      logs.append(out_text)
  except subprocess.TimeoutExpired:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for p in procs:
      p.communicate()
    pytest.fail(f"multi-host workers did not finish within {TIMEOUT_S} s")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  elapsed = time.perf_counter() - t0
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"worker {i} exited with {p.returncode}:\n{log[-4000:]}"
  return logs, elapsed


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
  ref = worker.train(mesh, lambda b: parallel.shard_batch(b, mesh))
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
