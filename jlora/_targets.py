"""Choosing weights, and per-weight settings (rank, alpha, axes)."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import jax.numpy as jnp

from jlora._method import STANDARD_WEIGHTS
from jlora._tree import Path, path_str

Targets = Union[None, Sequence[str], "re.Pattern[str]", Callable[[str, Any], bool]]


@dataclasses.dataclass(frozen=True)
class Axes:
  """How a weight's axes split into stacked, input and output axes.

  Attributes:
    stack: leading axes that index layers (``nn.scan`` / ``nn.vmap``-stacked
      kernels); they stay in front of both A and B.
    inputs: input axes after the stacked ones (the rest are outputs). ``None``
      infers it (see `infer_inputs`): right for ``Dense`` (1), ``Conv``
      (window + in features), and ``DenseGeneral`` attention kernels
      ``(d, heads, head_dim)`` (1) and ``(heads, head_dim, d)`` (2) when
      ``heads * head_dim == d``. State it for anything else.
  """

  stack: int = 0
  inputs: int | None = None


def infer_inputs(shape: Sequence[int], stack: int) -> int:
  """The number of input axes of a weight whose layout nobody stated.

  If some split makes input and output sizes equal, take it (the last such
  split on a tie): that is right for ``DenseGeneral`` attention kernels,
  ``(d, heads, head_dim)`` has 1 input axis and ``(heads, head_dim, d)`` 2.
  Otherwise the last axis is the output, as in ``Dense`` and ``Conv``
  (``(*window, in_features, out_features)``).
  """
  dims = tuple(shape[stack:])
  exact = [k for k in range(1, len(dims)) if math.prod(dims[:k]) == math.prod(dims[k:])]
  return exact[-1] if exact else len(dims) - 1


def per_path(value: Any, path: str, *, name: str) -> Any:
  """A value given once or as ``{regex: value}``; the first match wins.

  Raises:
    KeyError: when a mapping has no pattern matching ``path``.
  """
  if isinstance(value, Mapping):
    for pattern, v in value.items():
      if re.search(pattern, path):
        return v
    raise KeyError(f"{path}: no pattern in `{name}` matches this path "
                   f"(patterns: {list(value)}); add one, or a '.*' default")
  return value


def eligible_default(key: Any, leaf: Any) -> bool:
  return (key in STANDARD_WEIGHTS and leaf.ndim >= 2
          and jnp.issubdtype(leaf.dtype, jnp.floating))


def select(candidates: list[tuple[Path, Any]], targets: Targets, *,
           what: str, problems) -> list[tuple[Path, Any]]:
  """The candidates that ``targets`` picks; adds a problem if it picks none.

  ``candidates`` are ``(path, array)`` for every array leaf. Names and the
  default pick ``kernel``/``embedding`` leaves of rank ≥ 2; a regex picks
  leaves of rank ≥ 2 whose ``/``-joined path it matches; a predicate
  ``(path, leaf) -> bool`` picks exactly what it returns True for.
  """
  def standard(p, leaf):
    return eligible_default(p[-1], leaf)

  if targets is None:
    chosen = [(p, l) for p, l in candidates if standard(p, l)]
    if not chosen:
      problems.add(f"no {what} found: the tree has no 'kernel' or 'embedding' "
                   "leaf of rank ≥ 2; pass `targets=` (a regex or a predicate)")
    return chosen
  if isinstance(targets, re.Pattern):
    chosen = [(p, l) for p, l in candidates
              if l.ndim >= 2 and targets.search(path_str(p))]
    if not chosen:
      paths = [path_str(p) for p, l in candidates if l.ndim >= 2]
      problems.add(f"targets regex {targets.pattern!r} matched no leaf of rank ≥ 2; "
                   f"available paths: {paths}")
    return chosen
  if callable(targets):
    chosen = [(p, l) for p, l in candidates if targets(path_str(p), l)]
    if not chosen:
      problems.add("targets predicate selected no leaf; available paths: "
                   f"{[path_str(p) for p, _ in candidates]}")
    return chosen
  if isinstance(targets, str):
    targets = (targets,)
  names = list(targets)
  chosen = [(p, l) for p, l in candidates
            if standard(p, l) and len(p) >= 2 and p[-2] in names]
  found = {p[-2] for p, _ in chosen}
  missing = [n for n in names if n not in found]
  if missing:
    available = sorted({str(p[-2]) for p, l in candidates if standard(p, l) and len(p) >= 2})
    problems.add(f"targets {missing} matched no module holding a kernel or "
                 f"embedding; available module names: {available}")
  return chosen


def check_number(value: Any, name: str, *, integer: bool) -> str | None:
  kind = numbers.Integral if integer else numbers.Real
  if isinstance(value, bool) or not isinstance(value, kind):
    return f"{name} must be {'an int' if integer else 'a number'}, got {value!r}"
  if not math.isfinite(value) or value <= 0:
    return f"{name} must be positive and finite, got {value!r}"
  return None
