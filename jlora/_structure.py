"""Reading adapters out of a tree: which weights are adapted, and how."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any

import jax

from jlora import _tree
from jlora._errors import Problems
from jlora.methods.base import Method
from jlora._tree import Path, path_str


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class FullyTrainable:
  """Marks the named entries of a mapping as trained in full (PEFT's
  ``modules_to_save``), e.g. a classification head."""

  keys: tuple[str, ...]

  def __repr__(self):
    return f"FullyTrainable{self.keys}"


TRAINABLE_KEY = "trainable"


@dataclasses.dataclass
class Adapter:
  """One method applied to one weight."""

  method: Method
  arrays: tuple[Any, ...]
  paths: tuple[Path, ...]


@dataclasses.dataclass
class Entry:
  """An adapted weight and the methods on it, in application order.

  ``path`` is the weight's path in the base tree; ``mapping`` the path of the
  mapping that holds its adapters: the weight's parent, or the weight's own
  path when it sits in a `jlora._tree.Holder` (a non-mapping holder).
  """

  path: Path
  weight: Any
  adapters: list[Adapter]
  mapping: Path = ()


def specs_in(mapping: Mapping) -> list[tuple[str, Method]]:
  return [(k, v) for k, v in mapping.items() if isinstance(v, Method)]


def adapter_keys(mapping: Mapping) -> set[str]:
  """Keys of spec nodes, adapter leaves and markers in one mapping."""
  keys = set()
  for k, m in specs_in(mapping):
    keys.add(k)
    keys.update(m.leaf_keys)
  if isinstance(mapping.get(TRAINABLE_KEY), FullyTrainable):
    keys.add(TRAINABLE_KEY)
  return keys


def read(params: Any, *, what: str = "this tree") -> tuple[Any, dict[Path, Entry], set[Path]]:
  """Splits a jlora tree into the base tree and its adapters.

  Returns:
    ``(base, entries, trained)``: ``base`` has the structure of the tree before
    `lorify` (adapter leaves, method nodes and markers removed); ``entries``
    maps each adapted weight's path to its `Entry`; ``trained`` holds the paths
    of leaves trained in full.

  Raises:
    LoraError: an adapter whose weight or arrays are missing or don't fit.
  """
  problems = Problems(f"jlora: {what} has malformed adapters")
  entries: dict[Path, Entry] = {}
  trained: set[Path] = set()

  def strip(path: Path, mapping: Mapping) -> Mapping:
    specs = specs_in(mapping)
    marker = mapping.get(TRAINABLE_KEY)
    holder = isinstance(mapping, _tree.Holder)
    if not specs and not isinstance(marker, FullyTrainable):
      orphans(path, mapping, problems)
      if holder and len(mapping) == 1:  # its adapters removed (jlora.disable)
        return next(iter(mapping.values()))
      if holder:
        problems.add(f"{path_str(path)}: holds {sorted(mapping)} without an adapter "
                     "record; re-create the adapters with lorify")
      return mapping
    if isinstance(marker, FullyTrainable):
      trained.update(path + (k,) for k in marker.keys if k in mapping)
    for key, method in sorted(specs, key=lambda km: km[1].order):
      where = path_str(path + (key,))
      weight = mapping.get(method.weight)
      if weight is None or not _tree.is_array(weight):
        problems.add(f"{where}: {method.describe()} adapts {method.weight!r}, which "
                     f"is not an array in this mapping (keys: {sorted(mapping)}); "
                     "remove the adapter or restore the weight")
        continue
      arrays, ok = [], True
      bad = _bad_record(method, weight.shape)
      if bad:
        problems.add(f"{where}: the {type(method).__name__} record is damaged ({bad}); "
                     "re-create the adapters with lorify, or load them with load_adapters")
        continue
      expected = method.shapes(weight.shape)
      for leaf_key, shape in zip(method.leaf_keys, expected):
        arr = mapping.get(leaf_key)
        leaf_path = path_str(path + (leaf_key,))
        if arr is None or not _tree.is_array(arr):
          problems.add(f"{leaf_path}: missing adapter array for {method.describe()}; "
                       "re-create the adapters with lorify or load them with load_adapters")
          ok = False
        elif shape is not None and tuple(arr.shape) != tuple(shape):
          problems.add(f"{leaf_path}: shape {tuple(arr.shape)} does not fit "
                       f"{method.weight} {tuple(weight.shape)} under {method.describe()} "
                       f"(expected {tuple(shape)}); the adapter belongs to another "
                       "model or rank: re-create it with lorify")
          ok = False
        arrays.append(arr)
      if not ok:
        continue
      wpath = path if holder else path + (method.weight,)
      entry = entries.setdefault(wpath, Entry(wpath, weight, [], path))
      entry.adapters.append(Adapter(method, tuple(arrays),
                                    tuple(path + (k,) for k in method.leaf_keys)))
    drop = adapter_keys(mapping)
    orphans(path, {k: v for k, v in mapping.items() if k not in drop}, problems)
    kept = {k: v for k, v in mapping.items() if k not in drop}
    if holder:  # the bare weight, where it was before lorify
      if len(kept) != 1:
        problems.add(f"{path_str(path)}: a weight's adapter holder holds {sorted(kept)} "
                     "besides its adapters, expected the weight alone; re-create the "
                     "adapters with lorify")
        return mapping
      return next(iter(kept.values()))
    return _tree.rebuild_mapping(mapping, kept)

  base = _tree.map_mappings(params, strip)
  problems.raise_if_any()
  return base, entries, trained


def _bad_record(method: Method, weight_shape) -> str | None:
  """What is wrong with a record's own fields (a rank that is a string), so
  that a damaged record is not reported as adapters of another model."""
  try:
    method.describe()
    shapes = method.shapes(weight_shape)
  except Exception as e:  # fields of the wrong type
    return f"{type(e).__name__}: {e}"
  for shape in shapes:
    if shape is not None and not all(isinstance(d, numbers.Integral) and not isinstance(d, bool)
                                     for d in shape):
      fields = {f.name: getattr(method, f.name) for f in dataclasses.fields(method)}
      return f"its fields {fields} give the adapter shape {tuple(shape)}, not integers"
  return None


def orphans(path: Path, mapping: Mapping, problems: Problems) -> None:
  """Adds a problem for adapter arrays whose method record was replaced (e.g.
  the ``lora`` record by a string): they would be silently ignored."""
  from jlora._checkpoint.files import method_types
  for cls in method_types().values():
    for k in mapping:
      if not isinstance(k, str):
        continue
      stem = next((k[:-len(f"_{leaf}")] for leaf in cls.leaves
                   if k.endswith(f"_{leaf}")), None)
      if stem is None or not (stem == cls.prefix or stem.endswith(f"_{cls.prefix}")
                              or f"{cls.prefix}@" in stem):
        continue
      record = mapping.get(stem)
      # A missing record may be the user's own naming (a model with built-in
      # LoRA); a record key holding something else is a damaged jlora tree.
      if stem in mapping and not isinstance(record, Method):
        found = f"a {type(record).__name__} ({record!r:.40})"
        problems.add(f"{path_str(path + (stem,))}: the {cls.__name__} record of the "
                     f"adapter array {k!r} is {found}, expected a jlora.{cls.__name__}; "
                     "restore the record from lorify, or remove the adapter arrays")
        return


def trainable_paths(params: Any) -> set[Path]:
  """Paths of every leaf that trains: adapter arrays and fully-trained leaves."""
  _, entries, trained = read(params)
  paths = set(trained)
  for entry in entries.values():
    for adapter in entry.adapters:
      keep = set(adapter.method.trainable_leaves)
      paths.update(p for leaf, p in zip(adapter.method.leaves, adapter.paths) if leaf in keep)
  return paths
