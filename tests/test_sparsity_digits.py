"""End to end: gradual magnitude pruning of the digits CNN with prune_optimizer(adam)."""

import numpy as np
import pytest

from jaxopt_dnn import cli
from jaxopt_dnn import sparsity as sp


@pytest.mark.slow
def test_pruned_cnn_has_exact_sparsity_and_keeps_accuracy(capsys):
  r = cli.prune_demo(steps=600, sparsity=0.9, seed=0)
  rep = sp.sparsity_report(r["pruned_params"], r["masks"])
  pruned = [row for row in rep.leaves if row.pruned]
  assert {row.path for row in pruned} == {"Conv_1/kernel", "Dense_0/kernel"}
  for row in pruned:   # exactly the scheduled sparsity in every pruned leaf
    assert row.zeros == round(float(r["schedule"](600)) * row.size) == round(0.9 * row.size)
  print(f"dense {r['dense_acc']:.4f} pruned {r['pruned_acc']:.4f}")
  assert r["dense_acc"] >= 0.97
  assert r["pruned_acc"] >= r["dense_acc"] - 0.010
  packed = sp.tree_bytes(sp.pack(r["pruned_params"], r["masks"]))
  assert packed < 0.2 * sp.tree_bytes(r["dense_params"])


def test_cli_rejects_bad_sparsity(capsys):
  assert cli.main(["prune-demo", "--sparsity", "1.5", "--steps", "2"]) == 2
  assert "sparsity" in capsys.readouterr().err
