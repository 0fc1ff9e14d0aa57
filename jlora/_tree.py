"""Walking nested parameter trees and naming their paths.

A jlora tree is an ordinary pytree of arrays (a Linen ``params`` dict, a
``FrozenDict``, ``nnx.State`` turned into a pure dict, any dict of arrays,
NamedTuples, dataclasses, ``equinox.Module``\\ s). Adapters live as sibling
entries in the mapping that holds the adapted weight, so all structural work
happens one mapping at a time; a weight whose holder is not a mapping gets
one of its own, a `Holder`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

Path = tuple[Any, ...]


def path_str(path: Path) -> str:
  """``("params", "dense", "kernel")`` -> ``"params/dense/kernel"``."""
  return "/".join(str(p) for p in path)


def key_to_raw(entry: Any) -> Any:
  """A `jax.tree_util` key entry -> the raw key it stands for."""
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return str(entry)


def keypath_to_path(keypath) -> Path:
  return tuple(key_to_raw(k) for k in keypath)


def is_array(x: Any) -> bool:
  from jlora.quant._array import Quantized  # a quantized weight is one leaf
  return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct, Quantized))


def is_quantized(x: Any) -> bool:
  """``is_leaf=`` for tree walks that treat a quantized weight as one leaf."""
  from jlora.quant._array import Quantized
  return isinstance(x, Quantized)


def rebuild_mapping(original: Mapping, items: dict) -> Mapping:
  """A mapping of the same type as ``original`` holding ``items``."""
  if type(original) is dict:
    return items
  try:
    return type(original)(items)
  except Exception:  # pragma: no cover - exotic mappings fall back to dict
    return items


class Holder(dict):
  """A weight whose holder is not a mapping, with its adapters beside it.

  A weight in a NamedTuple, a dataclass or an ``equinox.Module`` has no
  mapping to put its adapters in, so `add_adapters` replaces the weight leaf
  by a `Holder`: ``{"weight": W, "weight_lora": LoRA(...), "weight_lora_a":
  A, "weight_lora_b": B}``, a pytree node with dict keys. Reading the tree
  (`jlora._structure.read`, so `merge` and `lora`) turns it back into the
  bare weight.
  """

  def __repr__(self) -> str:
    return f"Holder({dict.__repr__(self)})"


def _holder_flatten_with_keys(h):
  keys = sorted(h)
  return [(jax.tree_util.DictKey(k), h[k]) for k in keys], tuple(keys)


jax.tree_util.register_pytree_with_keys(
    Holder, _holder_flatten_with_keys, lambda keys, children: Holder(zip(keys, children)),
    flatten_func=lambda h: ([h[k] for k in sorted(h)], tuple(sorted(h))))


def node_children(tree: Any) -> tuple[list, list, Any] | None:
  """``(keys, children, treedef)`` of one level of a pytree node, or None for
  a leaf (an array, a quantized weight, any non-pytree value)."""
  if is_array(tree) or tree is None:
    return None
  kps, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is not tree)
  if jax.tree_util.treedef_is_leaf(treedef):
    return None
  return [key_to_raw(kp[0]) for kp, _ in kps], [x for _, x in kps], treedef


def map_mappings(tree: Any, fn: Callable[[Path, Mapping], Mapping],
                 path: Path = ()) -> Any:
  """Rebuilds ``tree`` bottom-up, passing every mapping through ``fn``.

  ``fn(path, mapping)`` receives a mapping whose children have already been
  rebuilt and returns its replacement. Every other pytree node (lists,
  tuples, NamedTuples, dataclasses, ``equinox.Module``\\ s) is recursed into
  one level at a time and rebuilt with its own treedef; leaves are returned
  unchanged.
  """
  if isinstance(tree, Mapping):
    children = {k: map_mappings(v, fn, path + (k,)) for k, v in tree.items()}
    return fn(path, rebuild_mapping(tree, children))
  node = node_children(tree)
  if node is None:
    return tree
  keys, children, treedef = node
  return jax.tree_util.tree_unflatten(
      treedef, [map_mappings(v, fn, path + (k,)) for k, v in zip(keys, children)])


def iter_mappings(tree: Any, path: Path = ()):
  """Yields ``(path, mapping)`` for every mapping in ``tree``, top-down,
  through any pytree node."""
  if isinstance(tree, Mapping):
    yield path, tree
    for k, v in tree.items():
      yield from iter_mappings(v, path + (k,))
    return
  node = node_children(tree)
  if node is not None:
    for k, v in zip(node[0], node[1]):
      yield from iter_mappings(v, path + (k,))


def params_first(first: Any, second: Any, *, fn: str, tree: str, path: str):
  """``(tree, path)`` of a call that may still use the old order, path first.

  Every jlora function takes its tree first; the file functions once took
  the path first. The two are told apart by type (a path is a ``str`` or
  ``os.PathLike``, a tree never is), so old calls keep working, with a
  ``DeprecationWarning``.
  """
  import os
  import warnings
  paths = (str, bytes, os.PathLike)
  if isinstance(first, paths) and not isinstance(second, paths):
    warnings.warn(f"jlora.{fn}({path}, {tree}) is the old argument order; call "
                  f"jlora.{fn}({tree}, {path})", DeprecationWarning, stacklevel=3)
    return second, first
  return first, second
