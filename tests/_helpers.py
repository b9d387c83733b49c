"""Shared test helpers (not a test module)."""

import importlib.util
import mmap
import pathlib


def _jaxlib_knows(flag: str) -> bool:
  """Whether the installed jaxlib's binaries name the XLA flag ``flag``: XLA aborts the
  process on an unknown flag in ``XLA_FLAGS``, so a flag a later jaxlib drops is left out
  instead (reads the ``.so`` files' bytes through mmap, ~0.2 s)."""
  root = pathlib.Path(importlib.util.find_spec("jaxlib").origin).parent
  for so in root.glob("*.so"):
    with open(so, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
      if m.find(flag.encode()) >= 0:
        return True
  return False


# XLA_FLAGS of every test process (tests/conftest.py) and of the processes tests start:
# LLVM codegen at level 0 and the legacy fusion emitters (compiling is most of the suite's
# CPU time; the same dots/convs and dtypes, see tests/conftest.py)
TEST_XLA_FLAGS = " ".join(
    ["--xla_backend_optimization_level=0"]
    + (["--xla_cpu_use_fusion_emitters=false"]
       if _jaxlib_knows("xla_cpu_use_fusion_emitters") else []))

import jax
import jax.numpy as jnp
import numpy as np


def np_init(model, x_shape, seed=0):
  """Model variables drawn with numpy (shapes from ``jax.eval_shape``): no init compile.

  Kernels ~ N(0, 1/fan_in); norm scales and running variances 1; other vectors 0.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.ones(x_shape))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if len(s.shape) > 1:
      return (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
    fill = 1.0 if ("scale" in name or "var" in name) else 0.0
    return np.full(s.shape, fill, np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def free_port() -> int:
  """A free TCP port on the loopback interface."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_processes(argvs, *, timeout_s: float, what: str, cwd=None):
  """Runs one JAX process per argv (CPU platform, the suite's XLA_FLAGS) and waits, bounded.

  Every wait shares one deadline; on timeout every process is killed and the test
  fails (a process that never joins must not hang the suite). Returns
  ``(logs, seconds)``; a non-zero exit fails with the tail of that process's log.
  """
  import os
  import subprocess
  import sys
  import time

  import pytest

  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", XLA_FLAGS=TEST_XLA_FLAGS)
  procs = [subprocess.Popen([sys.executable, *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
           for argv in argvs]
  t0 = time.perf_counter()
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=max(1.0, timeout_s - (time.perf_counter() - t0)))[0])
  except subprocess.TimeoutExpired:
    pytest.fail(f"{what} did not finish within {timeout_s} s")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  elapsed = time.perf_counter() - t0
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"{what}: process {i} exited with {p.returncode}:\n{log[-4000:]}"
  return logs, elapsed
