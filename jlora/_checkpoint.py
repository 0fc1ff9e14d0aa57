"""Checkpoints with orbax: adapters alone, and full training state.

Two formats, both written with ``orbax.checkpoint`` (atomically: orbax writes
into a temporary directory and renames it when complete), both holding a JSON
record beside the arrays:

* `save_adapters` / `load_adapters`: only the adapter arrays (and leaves
  trained in full), never the frozen base weights. The record holds each
  adapter's method and its fields (rank, alpha, layout) per adapted path, and
  a fingerprint of the base tree (every path, shape and dtype), so loading
  onto another base model fails with the mismatched paths.
* `Checkpoints`: the full `TrainState` (adapters, optimizer state, step, PRNG
  key) every ``every`` steps, keeping the last ``keep``, plus a JSON-able
  data position. Restoring takes a target state (e.g. from
  ``trainer.init``), so a run can resume on another device count or mesh.

Both record a SHA-256 of every array and of the record itself, and check them
when loading: a truncated, corrupted or mismatched checkpoint raises
`LoraError` naming the checkpoint and the fix; nothing is loaded partially.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _structure, _tree
from jlora._errors import LoraError, Problems
from jlora._method import Method
from jlora._structure import FullyTrainable
from jlora._tree import Path, keypath_to_path, path_str

_ADAPTERS = "jlora-adapters"
_STATE = "jlora-train-state"
_VERSION = 1
_ARRAYS_ITEM = "arrays"
_RECORD_ITEM = "jlora"
_SHOWN = 8  # mismatches listed per kind before "... and N more"


# -- helpers -------------------------------------------------------------------

def _digest(record: Mapping) -> str:
  body = {k: v for k, v in record.items() if k != "checksum"}
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _host(x: Any) -> np.ndarray | None:
  """The full value of ``x`` on this host, or None if no host holds all of it."""
  if isinstance(x, np.ndarray):
    return x
  if x.is_fully_addressable:
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  return None


def _sha(x: np.ndarray | None) -> str | None:
  if x is None:
    return None
  x = np.ascontiguousarray(x)
  return hashlib.sha256(str((x.shape, x.dtype.name)).encode() + x.tobytes()).hexdigest()


def _json_path(path: Path) -> list:
  out = []
  for k in path:
    if not isinstance(k, (str, int)):
      raise LoraError([f"{path_str(path)}: key {k!r} of type {type(k).__name__}"],
                      header="jlora: checkpoints need tree keys that are strings or "
                      "integers; rename the keys")
    out.append(k)
  return out


def _more(items: list[str]) -> list[str]:
  if len(items) <= _SHOWN:
    return items
  return items[:_SHOWN] + [f"... and {len(items) - _SHOWN} more"]


def _ocp():
  """``orbax.checkpoint``, imported on first use: ``import jlora`` stays light."""
  import orbax.checkpoint as ocp
  return ocp


def _checkpointer():
  ocp = _ocp()
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def _fingerprint(base: Any) -> list[list]:
  return [[_json_path(keypath_to_path(kp)), list(x.shape), jnp.dtype(x.dtype).name]
          for kp, x in jax.tree_util.tree_flatten_with_path(base)[0]]


def _compare_leaves(saved: list[list], have: list[list], *, saved_name: str,
                    have_name: str) -> list[str]:
  """Problems between two ``[path, shape, dtype]`` lists, by path."""
  s = {path_str(p): (tuple(sh), dt) for p, sh, dt in saved}
  h = {path_str(p): (tuple(sh), dt) for p, sh, dt in have}
  problems = []
  missing = [p for p in s if p not in h]
  extra = [p for p in h if p not in s]
  changed = [p for p in s if p in h and s[p] != h[p]]
  problems += _more([f"{p}: in the {saved_name} but not in the {have_name}"
                     for p in missing])
  problems += _more([f"{p}: in the {have_name} but not in the {saved_name}"
                     for p in extra])
  problems += _more([f"{p}: {saved_name} has shape {s[p][0]} {s[p][1]}, "
                     f"{have_name} has {h[p][0]} {h[p][1]}" for p in changed])
  return problems


def _read(directory: str, args: Any, *, what: str, fix: str) -> Any:
  try:
    return _checkpointer().restore(directory, args)
  except LoraError:
    raise
  except Exception as e:  # orbax/tensorstore errors: missing or broken files
    raise LoraError([f"{directory}: {type(e).__name__}: {_first_line(e)}"], header=(
        f"jlora: cannot read the {what}: it is truncated or corrupted; {fix}")) from e


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return text[0][:300] if text else repr(e)


def _read_record(directory: str, *, kind: str, what: str, fix: str) -> dict:
  if not os.path.isdir(os.path.join(directory, _RECORD_ITEM)):
    found = sorted(os.listdir(directory)) if os.path.isdir(directory) else None
    raise LoraError([f"{directory}: " + ("no such directory" if found is None else
                                         f"no '{_RECORD_ITEM}' record (found {found})")],
                    header=f"jlora: {directory} is not a complete {what}; {fix}")
  ocp = _ocp()
  record = _read(directory, ocp.args.Composite(**{_RECORD_ITEM: ocp.args.JsonRestore()}),
                 what=what, fix=fix)[_RECORD_ITEM]
  if not isinstance(record, dict) or record.get("format") != kind:
    got = record.get("format") if isinstance(record, dict) else type(record).__name__
    raise LoraError([f"{directory}: format {got!r}, expected {kind!r}"],
                    header=f"jlora: {directory} is not a {what}; {fix}")
  if record.get("checksum") != _digest(record):
    raise LoraError([f"{directory}/{_RECORD_ITEM}: checksum mismatch"], header=(
        f"jlora: the record of the {what} is corrupted; {fix}"))
  if record.get("version", 0) > _VERSION:
    raise LoraError([f"{directory}: version {record.get('version')}"], header=(
        f"jlora: the {what} was written by a newer jlora; upgrade jlora"))
  return record


def _read_arrays(directory: str, entries: list[dict], sharding_of, *, what: str,
                 fix: str) -> list[jax.Array]:
  """Restores ``entries`` (path/shape/dtype/sha256) and checks every digest."""
  target = {f"{i:05d}": jax.ShapeDtypeStruct(tuple(e["shape"]), jnp.dtype(e["dtype"]),
                                             sharding=sharding_of(i))
            for i, e in enumerate(entries)}
  ocp = _ocp()
  args = ocp.args.Composite(**{_ARRAYS_ITEM: ocp.args.StandardRestore(target)})
  arrays = _read(directory, args, what=what, fix=fix)[_ARRAYS_ITEM]
  bad = []
  out = []
  for i, e in enumerate(entries):
    x = arrays.get(f"{i:05d}")
    if x is None:
      bad.append(f"{path_str(e['path'])}: missing from {directory}/{_ARRAYS_ITEM}")
      continue
    digest = _sha(_host(x))
    if e.get("sha256") and digest is not None and digest != e["sha256"]:
      bad.append(f"{path_str(e['path'])}: contents do not match their checksum")
    out.append(x)
  if bad:
    raise LoraError(_more(bad), header=(
        f"jlora: the {what} at {directory} is corrupted; nothing was loaded; {fix}"))
  return out


def _method_types() -> dict[str, type]:
  found, todo = {}, [Method]
  while todo:
    cls = todo.pop()
    for sub in cls.__subclasses__():
      if "prefix" in sub.__dict__:
        found[sub.__name__] = sub
      todo.append(sub)
  return found


# -- adapters -------------------------------------------------------------------

def save_adapters(path: str | os.PathLike, params: Any, *, force: bool = False) -> None:
  """Saves the adapters of a lorified tree, without its frozen weights.

  Writes an orbax checkpoint directory holding the adapter arrays, the arrays
  of leaves trained in full, a JSON record of each adapter's method and
  fields (rank, alpha, layout) per adapted path, and a fingerprint (paths,
  shapes, dtypes) of the base tree they were trained on.

  Args:
    path: a directory that does not exist yet.
    params: a lorified tree (e.g. ``trainer.params(state, frozen)``).
    force: overwrite ``path`` if it exists.

  Raises:
    LoraError: ``path`` exists, or the tree has no adapters.

  Example:
    >>> import jax, jax.numpy as jnp, jlora, tempfile, os
    >>> base = {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}
    >>> params = jlora.lorify(base, 2, key=jax.random.key(0))
    >>> path = os.path.join(tempfile.mkdtemp(), "adapters")
    >>> jlora.save_adapters(path, params)
    >>> loaded = jlora.load_adapters(path, base)
    >>> loaded["dense"]["lora"], bool((loaded["dense"]["lora_a"] == params["dense"]["lora_a"]).all())
    (LoRA(rank=2, alpha=2), True)
  """
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
      fields = {f: getattr(m, f) for f in m.__dataclass_fields__}
      methods.append({"path": _json_path(wpath[:-1]), "key": m.spec_key,
                      "type": type(m).__name__, "fields": fields})
      arrays += list(zip(adapter.paths, adapter.arrays))
  leaves = dict((keypath_to_path(kp), x)
                for kp, x in jax.tree_util.tree_flatten_with_path(params)[0])
  by_mapping: dict[Path, list[str]] = {}
  for p in sorted(trained, key=path_str):
    by_mapping.setdefault(p[:-1], []).append(p[-1])
    arrays.append((p, leaves[p]))
  marked = [{"path": _json_path(m), "keys": keys} for m, keys in by_mapping.items()]
  host = [_host(x) for _, x in arrays]
  record = {
      "format": _ADAPTERS, "version": _VERSION, "methods": methods,
      "trainable": marked,
      "arrays": [{"path": _json_path(p), "shape": list(x.shape),
                  "dtype": jnp.dtype(x.dtype).name, "sha256": _sha(h)}
                 for (p, x), h in zip(arrays, host)],
      "base": _fingerprint(base),
  }
  record["checksum"] = _digest(record)
  items = {f"{i:05d}": x for i, (_, x) in enumerate(arrays)}
  ocp = _ocp()
  _checkpointer().save(path, ocp.args.Composite(**{
      _ARRAYS_ITEM: ocp.args.StandardSave(items),
      _RECORD_ITEM: ocp.args.JsonSave(record)}), force=force)


def load_adapters(path: str | os.PathLike, base_params: Any) -> Any:
  """Loads adapters saved by `save_adapters` onto a base tree.

  Args:
    path: the directory `save_adapters` wrote.
    base_params: the base (not lorified) tree the adapters were trained on:
      same paths, shapes and dtypes.

  Returns:
    The lorified tree: ``base_params`` with the saved adapters (and
    fully-trained leaves) in place.

  Raises:
    LoraError: the base tree differs from the one saved (naming each
      mismatched path), or the directory is missing, truncated or corrupted.
  """
  path = os.path.abspath(os.fspath(path))
  fix = "save the adapters again with jlora.save_adapters"
  record = _read_record(path, kind=_ADAPTERS, what="adapter checkpoint", fix=fix)
  base, entries, trained = _structure.read(base_params, what="base_params")
  if entries or trained:
    raise LoraError([f"{path_str(p)}: already adapted" for p in sorted(entries, key=path_str)]
                    + [f"{path_str(p)}: already trained in full"
                       for p in sorted(trained, key=path_str)],
                    header="jlora: load_adapters needs the base tree without adapters; "
                    "pass the tree from model.init (or the base you saved from)")
  problems = _compare_leaves(record["base"], _fingerprint(base), saved_name="saved base",
                             have_name="given base")
  if problems:
    raise LoraError(problems, header=(
        f"jlora: the adapters at {path} were trained on a different base tree; "
        "load them onto the same model (same config and dtype) they were saved from"))
  types = _method_types()
  unknown = sorted({m["type"] for m in record["methods"]} - set(types))
  if unknown:
    raise LoraError([f"{path}: method {t!r}" for t in unknown],
                    header="jlora: unknown adapter method; upgrade jlora")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  values = _read_arrays(path, record["arrays"], lambda i: device,
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


# -- training state -----------------------------------------------------------------

def _is_key(x: Any) -> bool:
  return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


class Checkpoints:
  """Full training state every ``every`` steps, keeping the last ``keep``.

  Wraps an ``orbax.checkpoint.CheckpointManager``. Each checkpoint holds a
  `TrainState` (adapters, optimizer state, step, PRNG key), never the frozen
  weights, plus a JSON-able ``data`` value for the data iterator's position.
  Saves are asynchronous: training continues while orbax writes, and a crash
  mid-save leaves the previous checkpoints intact (orbax renames a finished
  temporary directory into place).

  Restoring takes a target state, such as a fresh one from
  ``trainer.init``: its shapes, dtypes and shardings say what to restore onto,
  so a run saved on 8 devices resumes on 1, or with FSDP on another mesh. The
  state of the ``pmap`` form carries a leading device axis and restores only
  onto the same local device count.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jlora, tempfile
    >>> params = jlora.lorify({"d": {"kernel": jnp.ones((4, 4))}}, 2, key=jax.random.key(0))
    >>> loss = lambda p, b: jlora.lora(lambda p, x: x @ p["d"]["kernel"])(p, b).sum()
    >>> trainer = jlora.train_step(loss, optax.sgd(0.1), params)
    >>> state, frozen = trainer.init(params)
    >>> with jlora.Checkpoints(tempfile.mkdtemp(), every=2, keep=2) as ckpts:
    ...   for i in range(5):
    ...     state, _ = trainer.step(state, frozen, jnp.ones((2, 4)))
    ...     saved = ckpts.save(state, data={"next_batch": i + 1})
    ...   ckpts.wait()
    ...   fresh, _ = trainer.init(params)
    ...   restored, data = ckpts.restore(fresh)
    ...   ckpts.all_steps(), int(restored.step), data
    ([2, 4], 4, {'next_batch': 4})
  """

  def __init__(self, directory: str | os.PathLike, *, every: int = 1, keep: int | None = 3,
               async_save: bool = True):
    problems = Problems("jlora: cannot open checkpoints")
    for name, value, none_ok in (("every", every, False), ("keep", keep, True)):
      if value is None and none_ok:
        continue
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.add(f"{name} must be a positive integer, got {value!r}")
    problems.raise_if_any()
    self.directory = os.path.abspath(os.fspath(directory))
    ocp = _ocp()
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every, max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  # context manager: waits for pending saves and closes the manager
  def __enter__(self) -> Checkpoints:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def all_steps(self) -> list[int]:
    """Steps with a complete checkpoint, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or ``None``."""
    return self._manager.latest_step()

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.close()

  def save(self, state: Any, *, data: Any = None, force: bool = False) -> bool:
    """Saves ``state`` if its step is a multiple of ``every`` (or ``force``).

    Args:
      state: a `TrainState` (from ``trainer.step``).
      data: a JSON-serialisable value to restore with it, such as the data
        iterator's position.
      force: save regardless of ``every``.

    Returns:
      Whether a save was started.
    """
    step = int(np.asarray(_host(state.step)).reshape(-1)[0])
    if not force and not self._manager.should_save(step):
      return False
    try:
      json.dumps(data)
    except (TypeError, ValueError) as e:
      raise LoraError([f"data: {e}"], header="jlora: the data position must be "
                      "JSON-serialisable (numbers, strings, lists, dicts)") from None
    flat, leaves = [], []
    for kp, x in jax.tree_util.tree_flatten_with_path(state)[0]:
      impl = None
      if _is_key(x):
        impl = str(jax.random.key_impl(x))
        x = jax.random.key_data(x)
      h = _host(x)
      # Host copies: the next step donates the state's device buffers.
      flat.append(h if h is not None else x)
      leaves.append({"path": jax.tree_util.keystr(kp), "shape": list(x.shape),
                     "dtype": jnp.dtype(x.dtype).name, "key_impl": impl,
                     "sha256": _sha(h)})
    record = {"format": _STATE, "version": _VERSION, "step": step, "leaves": leaves,
              "data": data}
    record["checksum"] = _digest(record)
    items = {f"{i:05d}": x for i, x in enumerate(flat)}
    ocp = _ocp()
    return self._manager.save(step, args=ocp.args.Composite(**{
        _ARRAYS_ITEM: ocp.args.StandardSave(items),
        _RECORD_ITEM: ocp.args.JsonSave(record)}), force=force)

  def restore(self, like: Any, *, step: int | None = None) -> tuple[Any, Any]:
    """Restores a saved state onto the layout of ``like``.

    Args:
      like: a state of the same structure, e.g. ``trainer.init(params)[0]``
        (its values are not used; its shapes, dtypes and shardings are).
      step: the step to restore (default: the newest).

    Returns:
      ``(state, data)``.

    Raises:
      LoraError: no checkpoint; or one written for another model, rank or
        optimizer; or a truncated or corrupted one. Nothing is loaded
        partially.
    """
    self.wait()
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise LoraError([f"{self.directory}: no complete checkpoint"], header=(
            "jlora: nothing to restore; check `latest_step()` is not None first"))
      step = steps[-1]
    where = os.path.join(self.directory, str(step))
    if step not in steps:
      raise LoraError([f"{where}: not a complete checkpoint; complete: {steps}"],
                      header="jlora: no checkpoint at that step; pick one of all_steps()")
    earlier = [s for s in steps if s < step]
    fix = (f"pass step={earlier[-1]} (or delete {where}) to resume from the previous "
           "checkpoint" if earlier else "start the run afresh (no earlier checkpoint)")
    record = _read_record(where, kind=_STATE, what="training checkpoint", fix=fix)
    kps, treedef = jax.tree_util.tree_flatten_with_path(like)
    template = []
    for kp, x in kps:
      impl = str(jax.random.key_impl(x)) if _is_key(x) else None
      shape = jax.eval_shape(jax.random.key_data, x).shape if impl else x.shape
      dtype = "uint32" if impl else jnp.dtype(x.dtype).name
      template.append((jax.tree_util.keystr(kp), tuple(shape), dtype, impl,
                       getattr(x, "sharding", None)))
    saved = [[[e["path"]], e["shape"], e["dtype"]] for e in record["leaves"]]
    have = [[[p], list(s), d] for p, s, d, _, _ in template]
    problems = _compare_leaves(saved, have, saved_name="checkpoint", have_name="target")
    problems += [f"{t[0]}: key implementation {e['key_impl']!r} saved, "
                 f"{t[3]!r} in the target" for e, t in zip(record["leaves"], template)
                 if e["key_impl"] != t[3]]
    if problems:
      raise LoraError(problems, header=(
          f"jlora: the checkpoint at {where} was written for another state (model, "
          "rank, targets or optimizer); restore with the trainer it was saved with, "
          "or start a new checkpoint directory"))
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    values = _read_arrays(where, record["leaves"],
                          lambda i: template[i][4] or default,
                          what="training checkpoint", fix=fix)
    values = [jax.random.wrap_key_data(v, impl=t[3]) if t[3] else v
              for v, t in zip(values, template)]
    return jax.tree_util.tree_unflatten(treedef, values), record["data"]
