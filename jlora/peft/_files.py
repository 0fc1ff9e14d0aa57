"""Reading and writing a PEFT adapter directory: one ``adapter_config.json``
and one ``adapter_model.safetensors``. Reads turn every damage into a
problem; writes are atomic (a temporary directory beside the target, then a
swap), so a failed export leaves the previous adapter as it was."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def read(directory: Any, problems) -> tuple[Any, dict[str, np.ndarray] | None]:
  """``(config, tensors)`` of an adapter directory; None where unreadable."""
  from safetensors.numpy import load_file

  if not isinstance(directory, (str, os.PathLike)):
    problems.add(f"directory must be a path (str or os.PathLike), got {directory!r}")
    return None, None
  if not os.path.isdir(directory):
    what = "is a file, not a directory" if os.path.exists(directory) else "does not exist"
    problems.add(f"{directory}: {what}; pass the directory PEFT's save_pretrained wrote")
    return None, None
  config = tensors = None
  path = os.path.join(directory, CONFIG)
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except FileNotFoundError:
    problems.add(f"{path}: missing; a PEFT adapter directory holds {CONFIG} and {WEIGHTS}")
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    problems.add(f"{path}: not valid JSON ({e}); the file is damaged, save it again")
  except OSError as e:
    problems.add(f"{path}: cannot be read ({e})")
  path = os.path.join(directory, WEIGHTS)
  if not os.path.exists(path):
    legacy = os.path.exists(os.path.join(directory, "adapter_model.bin"))
    problems.add(f"{path}: missing" + (
        "; only adapter_model.bin (a pickle) is there, which jlora never loads: save it "
        "again with save_pretrained(..., safe_serialization=True)" if legacy else
        f"; a PEFT adapter directory holds {CONFIG} and {WEIGHTS}"))
    return config, None
  try:
    tensors = load_file(path)
  except Exception as e:  # safetensors raises its own error types, and OSError
    problems.add(f"{path}: not a valid safetensors file ({type(e).__name__}: {e}); the "
                 "file is damaged, save it again")
    return config, None
  if not tensors:
    problems.add(f"{path}: holds no tensors; the adapter is empty, save it again")
  return config, tensors


def is_adapter_dir(path: str) -> bool:
  """Whether ``path`` is a directory that PEFT or jlora wrote an adapter into."""
  if not os.path.isdir(path):
    return False
  names = set(os.listdir(path))
  return CONFIG in names and bool(names & {WEIGHTS, "adapter_model.bin"})


def write(directory: str | os.PathLike, config: dict, tensors: dict[str, np.ndarray],
          *, force: bool, problems) -> None:
  """Writes the adapter atomically; replaces only an adapter directory (``force``)
  or an empty one."""
  from safetensors.numpy import save_file

  directory = os.path.abspath(os.fspath(directory))
  if os.path.lexists(directory):
    if os.path.isdir(directory) and not os.path.islink(directory) and not os.listdir(directory):
      pass  # an empty directory: nothing to lose
    elif not is_adapter_dir(directory) or os.path.islink(directory):
      problems.add(f"{directory}: exists and is not a PEFT adapter directory; export "
                   "into a new path (jlora replaces only an adapter directory)")
    elif not force:
      problems.add(f"{directory}: already holds a PEFT adapter; pass force=True to "
                   "replace it, or export into a new path")
  problems.raise_if_any()
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}.tmp-")
  try:
    with open(os.path.join(tmp, CONFIG), "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(tmp, WEIGHTS), "rb") as f:
      os.fsync(f.fileno())
    _swap(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _exchange(a: str, b: str) -> bool:
  """Swaps two directories in one step (Linux ``renameat2(RENAME_EXCHANGE)``);
  False where the system cannot."""
  try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = libc.renameat2
  except (OSError, AttributeError):
    return False
  at_fdcwd, rename_exchange = -100, 2
  return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _swap(new: str, target: str) -> None:
  """Puts ``new`` at ``target``; the old ``target`` is removed only after.

  Where the system can exchange two directories atomically, a process killed
  at any point leaves either the old adapter or the new one at ``target``.
  """
  if not os.path.lexists(target):
    os.rename(new, target)
    return
  if _exchange(new, target):
    shutil.rmtree(new, ignore_errors=True)  # now the old adapter
    return
  old = tempfile.mkdtemp(dir=os.path.dirname(target),
                         prefix=f".{os.path.basename(target)}.old-")
  os.rmdir(old)
  os.rename(target, old)
  try:
    os.rename(new, target)
  except BaseException:
    os.rename(old, target)
    raise
  shutil.rmtree(old, ignore_errors=True)
