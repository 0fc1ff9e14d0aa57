"""`save_adapters` / `load_adapters`: only the adapters, never the frozen base."""

from __future__ import annotations

import dataclasses
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
from jlora._checkpoint.files import (ADAPTERS, ARRAYS_ITEM, RECORD_ITEM, VERSION,
                                    checkpointer, compare_leaves, digest, fingerprint,
                                    host, json_path, method_types, ocp_module,
                                    read_arrays, read_record, sha)


def save_adapters(params: Any, path: str | os.PathLike, *, force: bool = False) -> None:
  """Saves the adapters of a lorified tree, without its frozen weights.

  Writes an orbax checkpoint directory holding the adapter arrays, the arrays
  of leaves trained in full, a JSON record of each adapter's method and
  fields (rank, alpha, layout) per adapted path, and a fingerprint (paths,
  shapes, dtypes) of the base tree they were trained on.

  Args:
    params: a lorified tree (e.g. ``trainer.params(state, frozen)``).
    path: a directory that does not exist yet.
    force: overwrite ``path`` if it exists.

  Raises:
    LoraError: ``path`` exists, or the tree has no adapters.

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
  path = os.path.abspath(os.fspath(path))
  base, entries, trained = _structure.read(params, what="the tree passed to save_adapters")
  problems = Problems("jlora: cannot save adapters")
  if not entries and not trained:
    problems.add("params holds no adapters; add them with jlora.lorify first")
  if os.path.exists(path) and not force:
    problems.add(f"{path} already exists; choose a new directory or pass force=True")
  problems.raise_if_any()
  methods, arrays, marked = [], [], []
  for wpath in sorted(entries, key=path_str):
    for adapter in entries[wpath].adapters:
      m = adapter.method
      fields = {f.name: getattr(m, f.name) for f in dataclasses.fields(m)}
      methods.append({"path": json_path(wpath[:-1]), "key": m.spec_key,
                      "type": type(m).__name__, "fields": fields})
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
  ocp = ocp_module()
  checkpointer().save(path, ocp.args.Composite(**{
      ARRAYS_ITEM: ocp.args.StandardSave(items),
      RECORD_ITEM: ocp.args.JsonSave(record)}), force=force)


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
  path = os.path.abspath(os.fspath(path))
  fix = "save the adapters again with jlora.save_adapters"
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

  out = _tree.map_mappings(base_params, add)
  _structure.read(out, what=f"the adapters loaded from {path}")  # validates shapes
  return out


