# Not an upstream file. big_vision's real `big_vision/utils.py` imports TensorFlow, einops,
# ml_collections and big_vision.pp at import time; the vendored `models/vit.py` and
# `models/common.py` use it only to load checkpoints (`utils.load_params`,
# `u.tree_flatten_with_names`, ...), which the tests never do. This stand-in keeps the two
# upstream files importable unchanged and fails loudly if a checkpoint path is ever taken.


def __getattr__(name):
  raise NotImplementedError(
      f"big_vision.utils.{name}: the vendored test fixture has no checkpoint utilities "
      "(the real module needs TensorFlow)")
