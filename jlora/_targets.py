"""Choosing weights, and per-weight settings (rank, alpha, axes)."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import jax.numpy as jnp

from jlora._errors import LoraError
from jlora._tree import Path, path_str

STANDARD_WEIGHTS = ("kernel", "embedding")  # what the default targets adapt

Targets = Union[None, Sequence[str], "re.Pattern[str]", Callable[[str, Any], bool]]


def _is_int(x: Any) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_indices(x: Any) -> bool:
  return isinstance(x, (tuple, list)) and all(_is_int(k) for k in x)


@dataclasses.dataclass(frozen=True)
class Axes:
  """How a weight's axes split into stacked, input and output axes.

  Two forms. By count, for weights stored stack, inputs, outputs in that
  order (Flax's ``Dense``, ``Conv``, ``DenseGeneral``)::

    Axes(stack=1)             # an nn.scan stack: layer axis first
    Axes(inputs=2)            # (heads, head_dim, d): two input axes

  By axis index, for any layout (``A`` always gets the stacked + input axes +
  rank, ``B`` the stacked axes + rank + output axes, whatever their order in
  the kernel)::

    Axes(inputs=(1,), outputs=(0,))          # equinox Linear.weight (out, in)
    Axes(inputs=(1,), outputs=(0, 2))        # gemma q_einsum (N, D, H)
    Axes(stack=(0,), inputs=(2,), outputs=(1, 3))

  Attributes:
    stack: leading axes that index layers (``nn.scan`` / ``nn.vmap``-stacked
      kernels), a count; or a tuple of axis indices. They stay in front of
      both A and B.
    inputs: input axes after the stacked ones (the rest are outputs), a
      count; or a tuple of axis indices. ``None`` infers the count (see
      `infer_inputs`): right for ``Dense`` (1), ``Conv`` (window + in
      features), and ``DenseGeneral`` attention kernels ``(d, heads,
      head_dim)`` (1) and ``(heads, head_dim, d)`` (2) when ``heads *
      head_dim == d``. State it for anything else.
    outputs: with index form, the output axes (``None``: every axis that is
      neither stacked nor an input).
  """

  stack: int | tuple[int, ...] = 0
  inputs: int | tuple[int, ...] | None = None
  outputs: tuple[int, ...] | None = None

  def __post_init__(self):
    problems = []
    for name in ("stack", "inputs", "outputs"):
      value = getattr(self, name)
      if isinstance(value, list):
        object.__setattr__(self, name, tuple(value))
    stack, inputs, outputs = self.stack, self.inputs, self.outputs
    if not (_is_int(stack) and stack >= 0) and not _is_indices(stack):
      problems.append(f"stack must be an int >= 0 or a tuple of axis indices, got "
                      f"{stack!r}")
    if inputs is not None and not (_is_int(inputs) and inputs >= 1) \
        and not (_is_indices(inputs) and len(inputs) >= 1):
      problems.append(f"inputs must be None (infer), an int >= 1 or a non-empty tuple of "
                      f"axis indices, got {inputs!r}; a weight needs at least one input "
                      "axis")
    if outputs is not None and not (_is_indices(outputs) and len(outputs) >= 1):
      problems.append(f"outputs must be None or a non-empty tuple of axis indices, got "
                      f"{outputs!r}")
    if outputs is not None and not _is_indices(inputs):
      problems.append("outputs= needs inputs= as a tuple of axis indices too, e.g. "
                      "Axes(inputs=(1,), outputs=(0,))")
    if _is_indices(inputs) and _is_int(stack) and stack:
      problems.append(f"with inputs as axis indices, give stack as indices too, e.g. "
                      f"stack={tuple(range(stack))}")
    if problems:
      raise LoraError(problems, header="jlora: bad Axes")

  @property
  def by_index(self) -> bool:
    return _is_indices(self.inputs)


def check_axes(axes: Any, problems) -> None:
  """Adds a problem unless ``axes`` is None, an `Axes` or ``{regex: Axes}``."""
  if axes is None or isinstance(axes, Axes):
    return
  if isinstance(axes, Mapping) and all(isinstance(v, Axes) for v in axes.values()):
    return
  problems.add(f"axes must be jlora.Axes or a {{regex: Axes}} mapping, got {axes!r}")


def placement(path: Path, leaf: Any, axes: Any) -> tuple[int, int, tuple[int, ...]]:
  """``(stack, inputs, layout)`` of one weight from ``axes``, inferred where
  unsaid; ``layout`` is as in `jlora.Method` (``()``: already in role order).

  Raises:
    ValueError: a layout that does not fit the weight's shape.
  """
  where = path_str(path)
  ax = Axes() if axes is None else per_path(axes, where, name="axes")
  if ax.by_index:
    return _placement_by_index(where, leaf, ax)
  if ax.stack >= leaf.ndim - 1:
    raise ValueError(f"{where}: Axes(stack={ax.stack}) leaves fewer than 2 axes of "
                     f"shape {tuple(leaf.shape)}; lower `stack`")
  inputs = infer_inputs(leaf.shape, ax.stack) if ax.inputs is None else ax.inputs
  if not 1 <= inputs < leaf.ndim - ax.stack:
    raise ValueError(f"{where}: Axes(inputs={inputs}) does not fit shape "
                     f"{tuple(leaf.shape)} with stack={ax.stack}: it needs at least one "
                     "output axis")
  return ax.stack, inputs, ()


def _placement_by_index(where: str, leaf: Any, ax: Axes) -> tuple[int, int, tuple[int, ...]]:
  n = leaf.ndim
  stack = tuple(range(ax.stack)) if _is_int(ax.stack) else tuple(ax.stack)
  given = stack + tuple(ax.inputs) + tuple(ax.outputs or ())
  normal = [k % n if -n <= k < n else None for k in given]
  if None in normal or len(set(normal)) != len(normal):
    raise ValueError(f"{where}: {ax} names axes outside range({n}) or twice, for shape "
                     f"{tuple(leaf.shape)}; name each axis once")
  stack = tuple(k % n for k in stack)
  inputs = tuple(k % n for k in ax.inputs)
  if ax.outputs is None:
    outputs = tuple(k for k in range(n) if k not in stack + inputs)
  else:
    outputs = tuple(k % n for k in ax.outputs)
  missing = sorted(set(range(n)) - set(stack + inputs + outputs))
  if missing:
    raise ValueError(f"{where}: {ax} leaves axes {missing} of shape {tuple(leaf.shape)} "
                     "without a role; add them to stack, inputs or outputs")
  if not outputs:
    raise ValueError(f"{where}: {ax} leaves no output axis of shape "
                     f"{tuple(leaf.shape)}; a weight needs one")
  layout = stack + inputs + outputs
  return len(stack), len(inputs), (() if layout == tuple(range(n)) else layout)


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

  A key equal to ``path`` itself (as `jlora.infer_axes` returns) wins over
  every pattern.

  Raises:
    KeyError: when a mapping has no pattern matching ``path``.
  """
  if isinstance(value, Mapping):
    if path in value:
      return value[path]
    for pattern, v in value.items():
      try:
        hit = re.search(pattern, path)
      except (re.error, TypeError) as e:
        raise ValueError(f"{name}[{pattern!r}]: not a valid regex ({e}); escape it with "
                         "re.escape, or fix the pattern") from None
      if hit:
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
  ``(path, leaf) -> bool`` picks exactly what it returns True for. Anything
  else (a number, an empty sequence, names that are not strings) is a
  problem: an empty selection is never silent.
  """
  def standard(p, leaf):
    return bool(p) and eligible_default(p[-1], leaf)

  def why_not() -> str:
    """Why the ``kernel``/``embedding`` leaves that exist were not eligible."""
    skipped = [f"{path_str(p)} ({f'dtype {l.dtype}' if l.ndim >= 2 else f'rank {l.ndim}'})"
               for p, l in candidates if p and p[-1] in STANDARD_WEIGHTS and not standard(p, l)]
    if not skipped:
      return ""
    return f"; not eligible (adapters need a floating weight of rank ≥ 2): {skipped[:8]}"

  if targets is None:
    chosen = [(p, l) for p, l in candidates if standard(p, l)]
    if not chosen:
      torch_style = any(p and p[-1] == "weight" and l.ndim >= 2 for p, l in candidates)
      hint = (" such as re.compile(r'weight$') for `weight` leaves (equinox, torch "
              "layouts: (out, in), so also axes=jlora.Axes(inputs=(1,), outputs=(0,)))"
              if torch_style else "")
      problems.add(f"no {what} found: the tree has no floating 'kernel' or 'embedding' "
                   f"leaf of rank ≥ 2{why_not()}; pass `targets=` (a regex or a "
                   f"predicate){hint}")
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
    chosen = []
    for p, l in candidates:
      try:
        picked = targets(path_str(p), l)
      except Exception as e:  # the user's predicate: say where it failed
        problems.add(f"{path_str(p)}: the targets predicate raised {type(e).__name__}: "
                     f"{e}; it is called as predicate(path: str, leaf)")
        return []
      if picked:
        chosen.append((p, l))
    if not chosen:
      problems.add("targets predicate selected no leaf; available paths: "
                   f"{[path_str(p) for p, _ in candidates]}")
    return chosen
  if isinstance(targets, str):
    targets = (targets,)
  if not isinstance(targets, (list, tuple, set, frozenset)) or not all(
      isinstance(n, str) for n in targets):
    problems.add(f"targets: got {targets!r}, expected None (every kernel and embedding), "
                 "a sequence of module names such as ('query', 'value'), a compiled "
                 "regex (re.compile) or a predicate (path, leaf) -> bool")
    return []
  names = list(targets)
  if not names:
    problems.add(f"targets: got an empty {type(targets).__name__}, which selects no "
                 f"{what}; pass None for every kernel and embedding, or name modules")
    return []
  chosen = [(p, l) for p, l in candidates
            if standard(p, l) and len(p) >= 2 and p[-2] in names]
  found = {p[-2] for p, _ in chosen}
  missing = [n for n in names if n not in found]
  if missing:
    available = sorted({str(p[-2]) for p, l in candidates if standard(p, l) and len(p) >= 2})
    problems.add(f"targets {missing} matched no module holding a kernel or "
                 f"embedding{why_not()}; available module names: {available}")
  return chosen
