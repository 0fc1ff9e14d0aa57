"""Folding adapters back into plain weights."""

from __future__ import annotations

from typing import Any

import jax

from jlora import _structure
from jlora._adapted import enter
from jlora._tree import keypath_to_path


def merge(params: Any) -> Any:
  """Folds every adapter into its weight and returns a plain tree.

  The result has exactly the structure, shapes and dtypes of the tree before
  `lorify`, so it runs with the unmodified model at the base model's cost.
  Each weight becomes ``W + (alpha / rank)·A·B`` (computed in the wider of
  the weight's and the adapters' dtypes, then cast back), with every method on
  it applied in order.

  Args:
    params: a jlora tree.

  Returns:
    A plain tree for the base model.

  Raises:
    LoraError: adapters whose arrays are missing or don't fit their weight.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}
    >>> lorified = jlora.lorify(params, 2, key=jax.random.key(0))
    >>> merged = jlora.merge(lorified)
    >>> jax.tree.structure(merged) == jax.tree.structure(params)
    True
  """
  base, entries, _ = _structure.read(params, what="the tree passed to merge")
  if not entries:
    return base

  def fold(kp, leaf):
    path = keypath_to_path(kp)
    entry = entries.get(path)
    if entry is None:
      return leaf
    return enter(leaf, entry).materialize()

  return jax.tree_util.tree_map_with_path(fold, base)
