"""End to end: gradual magnitude pruning of the digits CNN with prune_optimizer(adam)."""

import jax

import optax
import pytest

from jaxopt_dnn.app import models, train
from jaxopt_dnn import parallel
from jaxopt_dnn import sparsity as sp
from jaxopt_dnn.trainer import Trainer

HIDDEN = r"^(?!Conv_0/|Dense_1/).*kernel$"   # first conv and classifier stay dense
STEPS = 600


def _fit(tx, digits):
  model = models.CNN()
  # one device: 600 conv steps on 8 virtual devices sharing 2 cores can starve XLA:CPU's
  # all-reduce rendezvous (40 s timeout); this test is about pruning, not sharding.
  trainer = Trainer(model, train.classification_loss, tx,
                    mesh=parallel.make_mesh(devices=jax.devices()[:1]))
  state = trainer.init(jax.random.key(0), digits.x_train[:1])
  result = train.fit(state, trainer.step, digits, train.TrainConfig(steps=STEPS, progress=False),
                     eval_fn=train.classifier_eval(model.apply, digits.x_test, digits.y_test))
  return result.state, result.history[-1]["accuracy"]


@pytest.mark.slow
def test_pruned_cnn_has_exact_sparsity_and_keeps_accuracy(digits):
  schedule = sp.polynomial_schedule(0.0, 0.9, begin=50, end=300, frequency=25)
  tx = sp.prune_optimizer(optax.adam(1e-3), schedule, update_every=25, update_until=300,
                          rules=HIDDEN)
  pruned, pruned_acc = _fit(tx, digits)
  dense, dense_acc = _fit(optax.adam(1e-3), digits)
  rep = sp.sparsity_report(pruned.params, sp.masks_from_state(pruned.opt_state))
  rows = [r for r in rep.leaves if r.pruned]
  assert {r.path for r in rows} == {"Conv_1/kernel", "Dense_0/kernel"}
  for r in rows:   # exactly the scheduled sparsity in every pruned leaf
    assert r.zeros == round(float(schedule(STEPS)) * r.size) == round(0.9 * r.size)
  print(f"\ndigits CNN test accuracy: dense {dense_acc:.4f}, pruned-90% {pruned_acc:.4f}")
  assert dense_acc >= 0.97
  assert pruned_acc >= dense_acc - 0.010
  packed = sp.tree_bytes(sp.pack(pruned.params, sp.masks_from_state(pruned.opt_state)))
  assert packed < 0.2 * sp.tree_bytes(dense.params)
