"""Test configuration: 8 virtual CPU devices and fixed seeds.

The device count must be set before JAX creates any array, so it happens at import
time of this file, which pytest loads before any test module.
"""

import os
import random

os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
