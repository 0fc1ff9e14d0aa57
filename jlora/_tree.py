"""Walking nested parameter trees and naming their paths.

A jlora tree is an ordinary nested-mapping pytree (a Linen ``params`` dict, a
``FrozenDict``, ``nnx.State`` turned into a pure dict, or any dict of arrays).
Adapters live as sibling entries in the mapping that holds the adapted weight,
so all structural work happens one mapping at a time.
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


def map_mappings(tree: Any, fn: Callable[[Path, Mapping], Mapping],
                 path: Path = ()) -> Any:
  """Rebuilds ``tree`` bottom-up, passing every mapping through ``fn``.

  ``fn(path, mapping)`` receives a mapping whose children have already been
  rebuilt and returns its replacement. Lists and tuples are recursed into;
  anything else is returned unchanged.
  """
  if isinstance(tree, Mapping):
    children = {k: map_mappings(v, fn, path + (k,)) for k, v in tree.items()}
    return fn(path, rebuild_mapping(tree, children))
  if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
    return type(tree)(map_mappings(v, fn, path + (i,)) for i, v in enumerate(tree))
  return tree


def iter_mappings(tree: Any, path: Path = ()):
  """Yields ``(path, mapping)`` for every mapping in ``tree``, top-down."""
  if isinstance(tree, Mapping):
    yield path, tree
    for k, v in tree.items():
      yield from iter_mappings(v, path + (k,))
  elif isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
    for i, v in enumerate(tree):
      yield from iter_mappings(v, path + (i,))


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
