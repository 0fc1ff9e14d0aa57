"""`save_adapters` / `load_adapters`: only the adapters, never the frozen base."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jlora import _structure, _tree
from jlora._errors import LoraError, Problems
from jlora.methods.base import Method
from jlora._structure import FullyTrainable
from jlora._tree import Path, keypath_to_path, path_str
from jlora._checkpoint.atomic import interrupted, write_beside
from jlora._checkpoint.files import (ADAPTERS, ARRAYS_ITEM, RECORD_ITEM, VERSION,
                                    checkpointer, compare_leaves, digest, fingerprint,
                                    first_line, host, json_path, method_types,
                                    ocp_module, read_arrays, read_record, sha)


def save_adapters(params: Any, path: str | os.PathLike, *, force: bool = False) -> None:
  """Saves the adapters of a lorified tree, without its frozen weights.

  Writes an orbax checkpoint directory holding the adapter arrays, the arrays
  of leaves trained in full, a JSON record of each adapter's method and
  fields (rank, alpha, layout) per adapted path, and a fingerprint (paths,
  shapes, dtypes) of the base tree they were trained on.

  The save is atomic: it writes into a temporary directory beside ``path``
  and swaps it in only when complete, so a save that fails (a full disk) or
  is killed leaves the previous adapters at ``path`` intact and loadable.

  Args:
    params: a lorified tree (e.g. ``trainer.params(state, frozen)``).
    path: a directory that does not exist yet.
    force: replace the adapter checkpoint at ``path``; it never replaces
      anything else (a file, another directory).

  Raises:
    LoraError: a bad argument, ``path`` exists (or, with ``force``, holds
      something other than jlora adapters), the tree has no adapters, or
      the write failed (then ``path`` is unchanged).

  Example:
    >>> import jax, jax.numpy as jnp, jlora, tempfile, os
    >>> base = {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}
    >>> params = jlora.lorify(base, 2, key=jax.random.key(0))
    >>> path = os.path.join(tempfile.mkdtemp(), "adapters")
    >>> jlora.save_adapters(params, path)
    >>> loaded = jlora.load_adapters(base, path)
    >>> loaded["dense"]["lora"], bool((loaded["dense"]["lora_a"] == params["dense"]["lora_a"]).all())
    (LoRA(rank=2, alpha=2), True)
  """
  params, path = _tree.params_first(params, path, fn="save_adapters", tree="params",
                                    path="path")
  problems = Problems("jlora: cannot save adapters")
  path = check_path(path, problems)
  _check_flag(force, "force", problems)
  if params is None or _tree.is_array(params):
    problems.add(f"params: got {_what(params)}, expected a lorified tree (a dict from "
                 "jlora.lorify or trainer.params(state, frozen)); pass that tree")
    problems.raise_if_any()
  base, entries, trained = _structure.read(params, what="the tree passed to save_adapters")
  if not entries and not trained:
    problems.add("params holds no adapters; add them with jlora.lorify first")
  if path is not None and os.path.lexists(path):
    if not force:
      problems.add(f"{path} already exists; choose a new directory or pass force=True "
                   "(which replaces only a jlora adapter directory)")
    else:
      why = _not_replaceable(path)
      if why:
        problems.add(f"{path}: {why}; force=True replaces only a jlora adapter "
                     "directory: remove it yourself or choose another path")
  problems.raise_if_any()
  methods, arrays, marked = [], [], []
  for wpath in sorted(entries, key=path_str):
    entry = entries[wpath]
    for adapter in entry.adapters:
      m = adapter.method
      fields = {f.name: getattr(m, f.name) for f in dataclasses.fields(m)}
      methods.append({"path": json_path(entry.mapping), "key": m.spec_key,
                      "type": type(m).__name__, "fields": fields,
                      # a weight outside any mapping: its adapters get a Holder
                      "holder": entry.mapping == wpath})
      arrays += list(zip(adapter.paths, adapter.arrays))
  leaves = dict((keypath_to_path(kp), x)
                for kp, x in jax.tree_util.tree_flatten_with_path(params)[0])
  by_mapping: dict[Path, list[str]] = {}
  for p in sorted(trained, key=path_str):
    by_mapping.setdefault(p[:-1], []).append(p[-1])
    arrays.append((p, leaves[p]))
  marked = [{"path": json_path(m), "keys": keys} for m, keys in by_mapping.items()]
  on_host = [host(x) for _, x in arrays]
  record = {
      "format": ADAPTERS, "version": VERSION, "methods": methods,
      "trainable": marked,
      "arrays": [{"path": json_path(p), "shape": list(x.shape),
                  "dtype": jnp.dtype(x.dtype).name, "sha256": sha(h)}
                 for (p, x), h in zip(arrays, on_host)],
      "base": fingerprint(base),
  }
  record["checksum"] = digest(record)
  items = {f"{i:05d}": x for i, (_, x) in enumerate(arrays)}
  try:
    write_beside(path, lambda tmp: write(tmp, items, record),
                 replace=os.path.lexists(path))
  except Exception as e:  # a full disk, a read-only folder, a failing writer
    raise LoraError([f"{path}: {type(e).__name__}: {first_line(e)}"], header=(
        "jlora: saving the adapters failed; nothing at that path was changed (any "
        "previous adapters there are intact); free space or fix the folder's "
        "permissions, then save again")) from e


def write(directory: str, items: dict, record: dict) -> None:
  """Writes the arrays and the record of an adapter checkpoint to ``directory``."""
  ocp = ocp_module()
  checkpointer().save(directory, ocp.args.Composite(**{
      ARRAYS_ITEM: ocp.args.StandardSave(items),
      RECORD_ITEM: ocp.args.JsonSave(record)}))


def check_path(path: Any, problems: Problems) -> str | None:
  """``path`` as an absolute str, or None after adding a problem."""
  if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
    problems.add(f"path: got {_what(path)}, expected a directory path (a str or "
                 "pathlib.Path) such as 'runs/adapters'")
    return None
  return os.path.abspath(os.fspath(path))


def _check_flag(value: Any, name: str, problems: Problems) -> None:
  if not isinstance(value, bool):
    problems.add(f"{name}: got {value!r}, expected True or False")


def _what(x: Any) -> str:
  if _tree.is_array(x):
    return f"an array of shape {tuple(x.shape)}"
  return "None" if x is None else f"{type(x).__name__} {x!r:.60}"


def is_adapter_dir(path: str) -> bool:
  """Whether ``path`` holds a complete adapter checkpoint (its record says so)."""
  try:
    with open(os.path.join(path, RECORD_ITEM, "metadata")) as f:
      record = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(record, dict) and record.get("format") == ADAPTERS


def _not_replaceable(path: str) -> str | None:
  """Why ``force=True`` must not replace what is at ``path`` (None: it may)."""
  if os.path.islink(path) or not os.path.isdir(path):
    return "is a file, not a directory" if os.path.isfile(path) else \
        "is not a directory"
  names = sorted(os.listdir(path))
  if not names or is_adapter_dir(path):
    return None
  shown = names[:8] + ([f"... and {len(names) - 8} more"] if len(names) > 8 else [])
  return f"is a directory that is not a jlora adapter checkpoint (it holds {shown})"


def load_adapters(base_params: Any, path: str | os.PathLike) -> Any:
  """Loads adapters saved by `save_adapters` onto a base tree.

  Args:
    base_params: the base (not lorified) tree the adapters were trained on:
      same paths, shapes and dtypes.
    path: the directory `save_adapters` wrote.

  Returns:
    The lorified tree: ``base_params`` with the saved adapters (and
    fully-trained leaves) in place.

  Raises:
    LoraError: the base tree differs from the one saved (naming each
      mismatched path), or the directory is missing, truncated or corrupted.
  """
  base_params, path = _tree.params_first(base_params, path, fn="load_adapters",
                                         tree="base_params", path="path")
  problems = Problems("jlora: cannot load adapters")
  path = check_path(path, problems)
  if base_params is None or _tree.is_array(base_params):
    problems.add(f"base_params: got {_what(base_params)}, expected the base tree the "
                 "adapters were trained on (e.g. model.init(...)); pass that tree")
  problems.raise_if_any()
  fix = "save the adapters again with jlora.save_adapters"
  if not os.path.exists(path):
    left = interrupted(path, is_adapter_dir)
    if left:
      roles = {"old": "the adapters it was replacing", "new": "the ones being saved"}
      raise LoraError([f"{path}: no such directory; a save to it was interrupted"] + [
          f"{p}: complete adapters, {roles[os.path.basename(p)]}" for p in left],
          header=f"jlora: cannot load adapters; move one of these to {path} and load "
          "again")
  record = read_record(path, kind=ADAPTERS, what="adapter checkpoint", fix=fix)
  base, entries, trained = _structure.read(base_params, what="base_params")
  if entries or trained:
    raise LoraError([f"{path_str(p)}: already adapted" for p in sorted(entries, key=path_str)]
                    + [f"{path_str(p)}: already trained in full"
                       for p in sorted(trained, key=path_str)],
                    header="jlora: load_adapters needs the base tree without adapters; "
                    "pass the tree from model.init (or the base you saved from)")
  problems = compare_leaves(record["base"], fingerprint(base), saved_name="saved base",
                             have_name="given base")
  if problems:
    raise LoraError(problems, header=(
        f"jlora: the adapters at {path} were trained on a different base tree; "
        "load them onto the same model (same config and dtype) they were saved from"))
  types = method_types()
  unknown = sorted({m["type"] for m in record["methods"]} - set(types))
  if unknown:
    raise LoraError([f"{path}: method {t!r}" for t in unknown],
                    header="jlora: unknown adapter method; upgrade jlora")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  values = read_arrays(path, record["arrays"], lambda i: device,
                        what="adapter checkpoint", fix=fix)
  by_path = {tuple(e["path"]): x for e, x in zip(record["arrays"], values)}
  methods: dict[Path, list[tuple[str, Method]]] = {}
  for m in record["methods"]:
    methods.setdefault(tuple(m["path"]), []).append((m["key"], types[m["type"]](**m["fields"])))
  marks = {tuple(t["path"]): tuple(t["keys"]) for t in record["trainable"]}

  def add(mpath: Path, mapping: Mapping) -> Mapping:
    if mpath not in methods and mpath not in marks:
      return mapping
    items = dict(mapping)
    for key, method in methods.get(mpath, ()):
      items[key] = method
      for leaf_key in method.leaf_keys:
        items[leaf_key] = by_path[mpath + (leaf_key,)]
    if mpath in marks:
      for k in marks[mpath]:
        items[k] = by_path[mpath + (k,)]
      items[_structure.TRAINABLE_KEY] = FullyTrainable(marks[mpath])
    return _tree.rebuild_mapping(mapping, items)

  held = {tuple(m["path"]): types[m["type"]](**m["fields"]).weight
          for m in record["methods"] if m.get("holder")}

  def hold(kp, leaf):
    weight = held.get(keypath_to_path(kp))
    return leaf if weight is None else _tree.Holder({weight: leaf})

  if held:
    base_params = jax.tree_util.tree_map_with_path(hold, base_params,
                                                   is_leaf=_tree.is_quantized)
  out = _tree.map_mappings(base_params, add)
  _structure.read(out, what=f"the adapters loaded from {path}")  # validates shapes
  return out


