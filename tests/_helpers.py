"""Shared test helpers (not a test module)."""

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
