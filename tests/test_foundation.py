import jax
import numpy as np

import jaxopt_dnn
from jaxopt_dnn import data


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
