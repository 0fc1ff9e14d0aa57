"""Writing a directory beside its target, then swapping it in.

A save never deletes what it replaces before the new directory is complete:
it writes into a temporary directory in the same parent (so the final step
is a rename on one file system), then exchanges the two in one
``renameat2(RENAME_EXCHANGE)`` call where Linux offers it (elsewhere: rename
the old aside, rename the new in), and only then deletes the old one. A save
that fails or is killed at any point leaves the previous directory where it
was, or, killed between the two renames of the fallback, in the temporary
directory beside it, where `interrupted` finds it. The next successful save
of the same path removes what killed saves left beside it.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import os
import shutil
import tempfile
from collections.abc import Callable

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _work_prefix(path: str) -> str:
  return f".{os.path.basename(path)}.jlora-tmp-"


def _exchange(a: str, b: str) -> bool:
  """Swaps ``a`` and ``b`` atomically; False where the OS cannot."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = libc.renameat2
  except (OSError, AttributeError):
    return False
  renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                        ctypes.c_uint]
  if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
               _RENAME_EXCHANGE) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
    return False  # a file system or kernel without RENAME_EXCHANGE
  raise OSError(err, os.strerror(err), b)


def write_beside(path: str, write: Callable[[str], None], *, replace: bool) -> None:
  """Calls ``write(tmp)`` for a fresh ``tmp`` beside ``path``, then moves it to
  ``path``; with ``replace``, swaps it with the directory already there.

  Raises:
    Whatever ``write`` or the file system raises; ``path`` is then as before.
  """
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  work = tempfile.mkdtemp(prefix=_work_prefix(path), dir=parent)
  try:
    new = os.path.join(work, "new")
    write(new)
    if not replace:
      os.rename(new, path)
    elif not _exchange(new, path):
      old = os.path.join(work, "old")
      os.rename(path, old)
      try:
        os.rename(new, path)
      except BaseException:
        os.rename(old, path)  # put the previous directory back before cleaning up
        raise
  finally:
    shutil.rmtree(work, ignore_errors=True)  # after an exchange: the old directory
  # ``path`` is complete now: what killed saves of it left beside it can go.
  for stale in glob.glob(os.path.join(glob.escape(parent),
                                      glob.escape(_work_prefix(path)) + "*")):
    shutil.rmtree(stale, ignore_errors=True)


def interrupted(path: str, is_complete: Callable[[str], bool]) -> list[str]:
  """Complete directories that a killed save of ``path`` left beside it."""
  found = []
  for work in sorted(glob.glob(os.path.join(glob.escape(os.path.dirname(path)),
                                            glob.escape(_work_prefix(path)) + "*"))):
    for name in ("old", "new"):
      candidate = os.path.join(work, name)
      if os.path.isdir(candidate) and is_complete(candidate):
        found.append(candidate)
  return found
