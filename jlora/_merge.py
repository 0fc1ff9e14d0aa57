"""Folding adapters back into plain weights."""

from __future__ import annotations

from typing import Any

import jax

from jlora import _structure
from jlora._adapted import enter
from jlora._add import check_dtype
from jlora._errors import Problems
from jlora._tree import is_array, is_quantized, keypath_to_path


def merge(params: Any, *, dtype: Any = None, requantize: Any = None) -> Any:
  """Folds every adapter into its weight and returns a plain tree.

  The result has exactly the structure, shapes and dtypes of the tree before
  `lorify`, so it runs with the unmodified model at the base model's cost.
  Each weight becomes ``W + (alpha / rank)·A·B`` (computed in the wider of
  the weight's and the adapters' dtypes, then cast back), with every method on
  it applied in order.

  Quantized weights (`jlora.quantize`) come back as float arrays, folded
  with their adapters when they have any.

  Args:
    params: a jlora tree.
    dtype: dtype of the merged and the dequantized weights; None keeps each
      weight's dtype (a quantized weight's logical dtype).
    requantize: for a tree with quantized weights: None gives float arrays,
      True quantizes each merged weight again in its own format and layout,
      a format name (``"nf4"``) quantizes them all in that format.

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
  problems = Problems("jlora: cannot merge")
  check_dtype(dtype, problems, none="each weight's own")
  if not any(is_array(x) or is_quantized(x)
             for x in jax.tree.leaves(params, is_leaf=is_quantized)):
    problems.add(f"params: got {type(params).__name__} with no arrays, so there is nothing "
                 "to merge; pass the lorified tree")
  problems.raise_if_any()
  base, entries, _ = _structure.read(params, what="the tree passed to merge")
  quantized = any(is_quantized(x) for x in jax.tree.leaves(base, is_leaf=is_quantized))
  if not entries and not quantized and dtype is None and requantize in (None, False):
    return base

  def fold(kp, leaf):
    path = keypath_to_path(kp)
    entry = entries.get(path)
    if entry is None and not is_quantized(leaf):
      return leaf
    w = leaf.dequantize() if entry is None else enter(leaf, entry).materialize()
    return w if dtype is None else w.astype(dtype)

  merged = jax.tree_util.tree_map_with_path(fold, base, is_leaf=is_quantized)
  if requantize is None or requantize is False:
    return merged
  from jlora.quant._transform import requantize as again
  return again(merged, base, requantize)
