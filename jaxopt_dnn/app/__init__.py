"""The application: one client of the library core among many.

Reference models (:mod:`~jaxopt_dnn.app.models`), embedded datasets
(:mod:`~jaxopt_dnn.app.data`), recipes (:mod:`~jaxopt_dnn.app.recipe`), the recipe ->
train-step composition (:mod:`~jaxopt_dnn.app.compose`), the ``compress`` job and its
report, serving artifacts and the CLI. Nothing in :mod:`jaxopt_dnn` outside this package
imports it.

Its own dependencies (scikit-learn, PyYAML, matplotlib, mnist1d) come with the ``app``
extra: ``pip install "jaxopt-dnn[app]"``; :func:`require` names it when one is missing.
"""

import importlib


def require(module: str, what: str):
  """``import module``, or an ``ImportError`` saying that ``what`` needs the app extra."""
  try:
    return importlib.import_module(module)
  except ImportError:
    raise ImportError(f"{what} needs {module.split('.')[0]}, which comes with the app extra: "
                      f'pip install "jaxopt-dnn[app]"') from None


from jaxopt_dnn.app import artifacts
from jaxopt_dnn.app import compose
from jaxopt_dnn.app import compress
from jaxopt_dnn.app import data
from jaxopt_dnn.app import models
from jaxopt_dnn.app import recipe
from jaxopt_dnn.app import report
from jaxopt_dnn.app import train
from jaxopt_dnn.app.compose import build
from jaxopt_dnn.app.recipe import Recipe
