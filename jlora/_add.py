"""Adding adapters to a parameter tree: the engine behind every method's
entry point (`jlora.lorify`, `jlora.dora`, `jlora.ia3`, a custom method's)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jlora import _structure, _targets, _tree
from jlora._errors import Problems
from jlora._targets import Targets
from jlora._tree import Path, path_str
from jlora.methods.base import Method


def _check_key(key: Any, problems: Problems) -> None:
  ok = isinstance(key, jax.Array) and (
      jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
      or (key.dtype == jnp.uint32 and key.shape == (2,)))
  if not ok:
    problems.add(f"key must be a PRNG key such as jax.random.key(0), got {key!r}")


def _candidates(params: Any, problems: Problems) -> list[tuple[Path, Any]]:
  """Every array leaf that is not itself an adapter; non-arrays are problems."""
  out = []
  leaves, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_tree.is_quantized)
  adapter_leaves = set()
  for path, mapping in _tree.iter_mappings(params):
    adapter_leaves.update(path + (k,) for k in _structure.adapter_keys(mapping))
  for kp, leaf in leaves:
    path = _tree.keypath_to_path(kp)
    if path in adapter_leaves:
      continue
    if not _tree.is_array(leaf):
      problems.add(f"{path_str(path)}: leaf of type {type(leaf).__name__} is not an "
                   "array; lorify needs a tree of arrays, e.g. from model.init")
      continue
    out.append((path, leaf))
  return out


def add_adapters(params: Any, make: Callable[[Path, Any], Method], *,
                 key: jax.Array, targets: Targets = None, trainable: Targets = None,
                 dtype=None, what: str = "adapters",
                 problems: Problems | None = None) -> Any:
  """Adds the method ``make(path, weight)`` to every weight ``targets`` picks.

  The engine behind `lorify` and every other method's entry point, a custom
  `Method`'s included (see `jlora.methods.base`): validation (collected,
  raised once), target selection, keys, and the tree rebuild.

  Args:
    params: a tree of arrays (may already hold other adapters).
    make: ``make(path, weight) -> Method`` for each chosen weight; it may raise
      ``ValueError``, whose message becomes one of the collected problems.
    key: a PRNG key, split over the chosen weights for `Method.create`.
    targets: which weights, in any form `lorify` accepts.
    trainable: leaves to train in full, as in `lorify`.
    dtype: dtype of the new arrays (default: each weight's).
    what: what is being added, for error messages.
    problems: problems already found by the caller, raised with these.

  Returns:
    The tree with the adapters added.

  Raises:
    LoraError: every problem found, at once.
  """
  problems = Problems(f"jlora: cannot add {what}") if problems is None else problems
  callers = bool(problems)
  _check_key(key, problems)
  candidates = _candidates(params, problems)
  chosen = _targets.select(candidates, targets, what="weight to adapt",
                           problems=problems)
  existing = {}
  for path, mapping in _tree.iter_mappings(params):
    for k, m in _structure.specs_in(mapping):
      existing[(path + (m.weight,), m.spec_key)] = m
  full: dict[Path, tuple[str, ...]] = {}
  if trainable is not None:
    picked = _trainable_leaves(candidates, trainable, problems)
    for p in picked:
      full.setdefault(p[:-1], ())
      full[p[:-1]] += (p[-1],)
  methods: dict[Path, Method] = {}
  for path, leaf in chosen:
    where = path_str(path)
    if not isinstance(path[-1], str):
      problems.add(f"{where}: adapters are stored beside their weight in a mapping; "
                   "this leaf is not held in a dict")
      continue
    if path[:-1] in full and path[-1] in full[path[:-1]]:
      problems.add(f"{where}: selected both for adapters and for full training; "
                   "remove it from `trainable` or from `targets`")
      continue
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      problems.add(f"{where}: dtype {leaf.dtype} is not floating point; only float "
                   "weights can be adapted, exclude this path from targets")
      continue
    if leaf.ndim < 2:
      problems.add(f"{where}: shape {tuple(leaf.shape)} has rank {leaf.ndim}; adapters "
                   "need a weight with input and output axes, exclude this path")
      continue
    if callers:  # the options are bad; `make` would only repeat them
      continue
    try:
      method = make(path, leaf)
    except (ValueError, KeyError) as e:
      problems.add(str(e.args[0]) if e.args else str(e))
      continue
    if (path, method.spec_key) in existing:
      problems.add(f"{where}: already has {existing[(path, method.spec_key)].describe()} "
                   f"adapters ('{method.spec_key}'); merge them first "
                   "(jlora.merge) or adapt another weight")
      continue
    order = sum(1 for (p, _) in existing if p == path)
    methods[path] = dataclasses.replace(method, order=order)
  problems.raise_if_any()

  keys = dict(zip(sorted(methods, key=path_str),
                  jax.random.split(key, max(len(methods), 1))))

  def add(path: Path, mapping: Mapping) -> Mapping:
    items = dict(mapping)
    for k, leaf in mapping.items():
      method = methods.get(path + (k,))
      if method is None:
        continue
      # A quantized weight: the method sees its values (DoRA's norms, PiSSA's
      # SVD); a weight it changes (PiSSA's residual) is quantized again alike.
      values = leaf.dequantize() if _tree.is_quantized(leaf) else leaf
      arrays, new_weight = method.create(keys[path + (k,)], values,
                                         dtype=dtype or leaf.dtype)
      if values is not leaf:
        from jlora.quant._transform import like
        new_weight = leaf if new_weight is values else like(leaf, new_weight)
      items[k] = new_weight
      items[method.spec_key] = method
      items.update(zip(method.leaf_keys, arrays))
    if path in full:
      marker = items.get(_structure.TRAINABLE_KEY)
      keys_ = tuple(sorted(set(full[path]) | set(getattr(marker, "keys", ()))))
      items[_structure.TRAINABLE_KEY] = _structure.FullyTrainable(keys_)
    return _tree.rebuild_mapping(mapping, items)

  return _tree.map_mappings(params, add)


def _trainable_leaves(candidates, trainable: Targets, problems: Problems) -> list[Path]:
  if isinstance(trainable, str):
    trainable = (trainable,)
  if isinstance(trainable, (list, tuple)):
    names = list(trainable)
    picked = [p for p, _ in candidates if len(p) >= 2 and p[-2] in names]
    found = {p[-2] for p in picked}
    missing = [n for n in names if n not in found]
    if missing:
      available = sorted({str(p[-2]) for p, _ in candidates if len(p) >= 2})
      problems.add(f"trainable {missing} matched no module; available module "
                   f"names: {available}")
    return picked
  chosen = _targets.select(candidates, trainable, what="trainable leaf",
                           problems=problems)
  return [p for p, _ in chosen]


def check_name(name: Any, problems: Problems) -> None:
  """Adapter names become part of tree keys (``lora@name``)."""
  if not isinstance(name, str) or not name or not all(
      c.isalnum() or c in "-_." for c in name):
    problems.add(f"name must be a non-empty string of letters, digits, '-', '_' "
                 f"or '.', got {name!r}")


def check_flag(value: Any, name: str, problems: Problems) -> None:
  """Flags are bools: ``rslora="yes"`` is a mistake, not a truthy value."""
  if not isinstance(value, bool):
    problems.add(f"{name} must be True or False, got {value!r}")
