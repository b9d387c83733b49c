"""Unchanged upstream model files as test fixtures (see README.md for paths and commits).

Each loader imports the upstream module as the upstream code expects to be imported:
* flax examples import their siblings as top-level modules (``import layers``): their folder
  is put on ``sys.path`` while the module loads;
* big_vision and tunix are packages (``from big_vision.models import common``): this folder
  is put on ``sys.path`` once.
"""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import sys

HERE = pathlib.Path(__file__).parent


def _load_example(folder: str, name: str):
  """Import ``<folder>/<name>.py`` under the unique name ``thirdparty_<folder>_<name>``."""
  key = f"thirdparty_{folder}_{name}"
  if key in sys.modules:
    return sys.modules[key]
  path = HERE / folder
  sys.path.insert(0, str(path))
  try:
    spec = importlib.util.spec_from_file_location(key, path / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(str(path))
  return module


def lm1b():
  """flax/examples/lm1b/models.py (``TransformerLM``, ``TransformerConfig``)."""
  return _load_example("flax_lm1b", "models")


def wmt():
  """flax/examples/wmt/models.py (encoder-decoder ``Transformer``)."""
  return _load_example("flax_wmt", "models")


def imagenet():
  """flax/examples/imagenet/models.py (``ResNet18``, ``ResNet50``, ``_ResNet1``...)."""
  return _load_example("flax_imagenet", "models")


def gemma():
  """flax/examples/gemma/transformer.py (NNX ``Transformer``, ``TransformerConfig``)."""
  return _load_example("flax_gemma", "transformer")


def _packages():
  if str(HERE) not in sys.path:
    sys.path.append(str(HERE))


def big_vision_vit():
  """big_vision/models/vit.py (linen ``_Model``; ``scan=True`` stacks the encoder blocks)."""
  _packages()
  return importlib.import_module("big_vision.models.vit")


def tunix_llama3():
  """tunix/models/llama3/model.py (NNX ``Llama3``, ``ModelConfig``)."""
  _packages()
  return importlib.import_module("tunix.models.llama3.model")
