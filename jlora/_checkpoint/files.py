"""What both checkpoint formats share: orbax reads and writes, the JSON
record with its checksum, per-array SHA-256 digests, and comparing saved and
given trees."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._errors import LoraError
from jlora.methods.base import Method
from jlora._tree import Path, is_quantized, keypath_to_path, path_str

ADAPTERS = "jlora-adapters"
STATE = "jlora-train-state"
VERSION = 1
ARRAYS_ITEM = "arrays"
RECORD_ITEM = "jlora"
_SHOWN = 8  # mismatches listed per kind before "... and N more"


# -- helpers -------------------------------------------------------------------

def digest(record: Mapping) -> str:
  body = {k: v for k, v in record.items() if k != "checksum"}
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def host(x: Any) -> np.ndarray | None:
  """The full value of ``x`` on this host, or None if no host holds all of it."""
  if isinstance(x, np.ndarray):
    return x
  if x.is_fully_addressable:
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  return None


def sha(x: np.ndarray | None) -> str | None:
  if x is None:
    return None
  x = np.ascontiguousarray(x)
  return hashlib.sha256(str((x.shape, x.dtype.name)).encode() + x.tobytes()).hexdigest()


def json_path(path: Path) -> list:
  out = []
  for k in path:
    if not isinstance(k, (str, int)):
      raise LoraError([f"{path_str(path)}: key {k!r} of type {type(k).__name__}"],
                      header="jlora: checkpoints need tree keys that are strings or "
                      "integers; rename the keys")
    out.append(k)
  return out


def more(items: list[str]) -> list[str]:
  if len(items) <= _SHOWN:
    return items
  return items[:_SHOWN] + [f"... and {len(items) - _SHOWN} more"]


def ocp_module():
  """``orbax.checkpoint``, imported on first use: ``import jlora`` stays light."""
  import orbax.checkpoint as ocp
  return ocp


def checkpointer():
  ocp = ocp_module()
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def fingerprint(base: Any) -> list[list]:
  """``[path, shape, dtype]`` per leaf; a quantized weight is one leaf whose
  dtype names its format and layout too (e.g. ``nf4/64/-2 float32``)."""
  def dtype(x):
    if not hasattr(x, "dtype"):  # a non-array leaf (an equinox activation function)
      return f"static {type(x).__name__}"
    name = jnp.dtype(x.dtype).name
    return f"{x.format}/{x.block_size}/{x.axis} {name}" if is_quantized(x) else name
  return [[json_path(keypath_to_path(kp)), list(getattr(x, "shape", ())), dtype(x)]
          for kp, x in jax.tree_util.tree_flatten_with_path(base, is_leaf=is_quantized)[0]]


def compare_leaves(saved: list[list], have: list[list], *, saved_name: str,
                    have_name: str) -> list[str]:
  """Problems between two ``[path, shape, dtype]`` lists, by path."""
  s = {path_str(p): (tuple(sh), dt) for p, sh, dt in saved}
  h = {path_str(p): (tuple(sh), dt) for p, sh, dt in have}
  problems = []
  missing = [p for p in s if p not in h]
  extra = [p for p in h if p not in s]
  changed = [p for p in s if p in h and s[p] != h[p]]
  problems += more([f"{p}: in the {saved_name} but not in the {have_name}"
                     for p in missing])
  problems += more([f"{p}: in the {have_name} but not in the {saved_name}"
                     for p in extra])
  problems += more([f"{p}: {saved_name} has shape {s[p][0]} {s[p][1]}, "
                     f"{have_name} has {h[p][0]} {h[p][1]}" for p in changed])
  return problems


def read(directory: str, args: Any, *, what: str, fix: str) -> Any:
  try:
    return checkpointer().restore(directory, args)
  except LoraError:
    raise
  except Exception as e:  # orbax/tensorstore errors: missing or broken files
    raise LoraError([f"{directory}: {type(e).__name__}: {first_line(e)}"], header=(
        f"jlora: cannot read the {what}: it is truncated or corrupted; {fix}")) from e


def first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return text[0][:300] if text else repr(e)


def read_record(directory: str, *, kind: str, what: str, fix: str) -> dict:
  if not os.path.isdir(os.path.join(directory, RECORD_ITEM)):
    found = sorted(os.listdir(directory)) if os.path.isdir(directory) else None
    raise LoraError([f"{directory}: " + ("no such directory" if found is None else
                                         f"no '{RECORD_ITEM}' record (found {found})")],
                    header=f"jlora: {directory} is not a complete {what}; {fix}")
  ocp = ocp_module()
  record = read(directory, ocp.args.Composite(**{RECORD_ITEM: ocp.args.JsonRestore()}),
                 what=what, fix=fix)[RECORD_ITEM]
  if not isinstance(record, dict) or record.get("format") != kind:
    got = record.get("format") if isinstance(record, dict) else type(record).__name__
    raise LoraError([f"{directory}: format {got!r}, expected {kind!r}"],
                    header=f"jlora: {directory} is not a {what}; {fix}")
  if record.get("checksum") != digest(record):
    raise LoraError([f"{directory}/{RECORD_ITEM}: checksum mismatch"], header=(
        f"jlora: the record of the {what} is corrupted; {fix}"))
  if record.get("version", 0) > VERSION:
    raise LoraError([f"{directory}: version {record.get('version')}"], header=(
        f"jlora: the {what} was written by a newer jlora; upgrade jlora"))
  return record


def read_arrays(directory: str, entries: list[dict], sharding_of, *, what: str,
                 fix: str) -> list[jax.Array]:
  """Restores ``entries`` (path/shape/dtype/sha256) and checks every digest."""
  target = {f"{i:05d}": jax.ShapeDtypeStruct(tuple(e["shape"]), jnp.dtype(e["dtype"]),
                                             sharding=sharding_of(i))
            for i, e in enumerate(entries)}
  ocp = ocp_module()
  args = ocp.args.Composite(**{ARRAYS_ITEM: ocp.args.StandardRestore(target)})
  arrays = read(directory, args, what=what, fix=fix)[ARRAYS_ITEM]
  bad = []
  out = []
  for i, e in enumerate(entries):
    x = arrays.get(f"{i:05d}")
    if x is None:
      bad.append(f"{path_str(e['path'])}: missing from {directory}/{ARRAYS_ITEM}")
      continue
    digest = sha(host(x))
    if e.get("sha256") and digest is not None and digest != e["sha256"]:
      bad.append(f"{path_str(e['path'])}: contents do not match their checksum")
    out.append(x)
  if bad:
    raise LoraError(more(bad), header=(
        f"jlora: the {what} at {directory} is corrupted; nothing was loaded; {fix}"))
  return out


def method_types() -> dict[str, type]:
  found, todo = {}, [Method]
  while todo:
    cls = todo.pop()
    for sub in cls.__subclasses__():
      if "prefix" in sub.__dict__:
        found[sub.__name__] = sub
      todo.append(sub)
  return found


