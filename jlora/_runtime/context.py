"""What one `jlora.lora` call carries through the interpreter.

A `Context` is created per call and handed to every rule explicitly (no
module globals), so two calls, nested calls or threads never share state:

* ``rng``: the PRNG key of ``lora(fn, rng=key)`` (None: no dropout); control
  flow rules replace it per iteration (each scan layer and while iteration
  draws its own masks);
* ``uses``: how often each weight has been used in this trace, so that every
  use of every weight draws its own dropout mask;
* ``fuse``: whether shared-input fusion is on;
* ``warned``: the ``(primitive, path)`` fallbacks already reported in this
  call. Repeats across calls are left to Python's ``warnings`` filters, so
  ``warnings.simplefilter("always")`` and ``pytest.warns`` see every call.
"""

from __future__ import annotations

import dataclasses
import warnings
import zlib
from typing import Any

import jax

from jlora._tree import Path, path_str


class FactoredFallbackWarning(UserWarning):
  """A use of an adapted weight ran on the dense merged weight instead."""


@dataclasses.dataclass
class Context:
  rng: Any = None
  fuse: bool = True
  uses: dict[str, int] = dataclasses.field(default_factory=dict)
  warned: set[tuple[str, str]] = dataclasses.field(default_factory=set)

  def with_rng(self, rng: Any) -> Context:
    """The same call's context with another key (one loop iteration's)."""
    return dataclasses.replace(self, rng=rng)

  def site_rng(self, path: Path):
    """A key for one use of the weight at ``path``, or None without a key."""
    if self.rng is None:
      return None
    name = path_str(path)
    n = self.uses.get(name, 0)
    self.uses[name] = n + 1
    return jax.random.fold_in(jax.random.fold_in(self.rng, zlib.crc32(name.encode())), n)

  def warn_fallback(self, primitive: str, path: Path) -> None:
    key = (primitive, path_str(path))
    if key in self.warned:
      return
    self.warned.add(key)
    warnings.warn(
        f"jlora: {path_str(path)} is used by `{primitive}`, which has no factored "
        "form; this use runs on the merged weight W + ΔW (correct, but it forms "
        "the dense update). This warning is shown once per weight and primitive "
        "in each call.", FactoredFallbackWarning, stacklevel=2)
