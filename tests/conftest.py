"""Test configuration: 8 virtual CPU devices, fixed seeds, a cheap XLA backend.

The device count must be set before JAX creates any array, so it happens at import
time of this file, which pytest loads before any test module.

``XLA_FLAGS`` gets :data:`_helpers.TEST_XLA_FLAGS`: LLVM codegen at optimisation level 0
and XLA:CPU's legacy elemental fusion emitters (``--xla_cpu_use_fusion_emitters=false``).
The suite's programs are small and compiling them is most of its CPU time. Level 0
compiles faster and changes no HLO pass (the suite's CPU fell from ~2,670 s to ~1,570 s
on 2 cores); the legacy emitters compile much faster again (~1,580 s -> ~1,100 s, wall
13.2 -> 9.5 min). The optimized HLO then differs only in that an op no fusion took (a
reduce) is not wrapped into a one-op fusion for the new emitters (checked on a train step
and an int8 serving program): the dots, convolutions and their operand dtypes, which
every census, coverage and sharding assert counts, are the same. The environment is
inherited by every subprocess a test starts, which matters: one program compiled under
two sets of flags need not give bit-identical floats (an exported program reloaded in a
fresh process is compared bit for bit). Benchmarks do not load this file and compile at
XLA's defaults.
"""

import os
import random

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from _helpers import TEST_XLA_FLAGS  # noqa: E402

os.environ["XLA_FLAGS"] = TEST_XLA_FLAGS

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _fixed_seeds():
  random.seed(0)
  np.random.seed(0)
  yield


@pytest.fixture(scope="session")
def digits():
  from jaxopt_dnn.app import data
  return data.load_digits()

