"""Counting trainable and frozen parameters."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from jlora import _structure, _tree
from jlora._tree import keypath_to_path, path_str


@dataclasses.dataclass(frozen=True)
class Row:
  path: str
  method: str
  weight_shape: tuple[int, ...]
  weight_params: int
  adapter_params: int


@dataclasses.dataclass(frozen=True)
class Summary:
  """Trainable vs total parameters and bytes of a jlora tree.

  Attributes:
    rows: one `Row` per adapted weight (and method).
    trainable_params / total_params: counts over the whole tree; ``total``
      includes the adapters.
    trainable_bytes / total_bytes: the same in bytes.
  """

  rows: tuple[Row, ...]
  trainable_params: int
  total_params: int
  trainable_bytes: int
  total_bytes: int

  @property
  def trainable_fraction(self) -> float:
    return self.trainable_params / max(self.total_params, 1)

  def __str__(self) -> str:
    width = max([len(r.path) for r in self.rows] + [6])
    lines = [f"{'weight':<{width}}  {'method':<24} {'shape':<18} {'weight':>11} {'adapter':>9}"]
    for r in self.rows:
      lines.append(f"{r.path:<{width}}  {r.method:<24} {str(r.weight_shape):<18} "
                   f"{r.weight_params:>11,} {r.adapter_params:>9,}")
    lines.append(f"trainable {self.trainable_params:,} of {self.total_params:,} "
                 f"parameters ({100 * self.trainable_fraction:.3f}%), "
                 f"{self.trainable_bytes:,} of {self.total_bytes:,} bytes")
    return "\n".join(lines)


def summary(params: Any) -> Summary:
  """Reports trainable vs total parameters and bytes, per adapted weight.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"q": {"kernel": jnp.ones((100, 100))}}
    >>> s = jlora.summary(jlora.lorify(params, 2, key=jax.random.key(0)))
    >>> s.rows[0].adapter_params, s.rows[0].weight_params
    (400, 10000)
  """
  _, entries, _ = _structure.read(params, what="the tree passed to summary")
  trainable = _structure.trainable_paths(params)
  rows = []
  for path in sorted(entries, key=path_str):
    entry = entries[path]
    for adapter in entry.adapters:
      rows.append(Row(path_str(path), adapter.method.describe(), tuple(entry.weight.shape),
                      math.prod(entry.weight.shape),
                      sum(math.prod(a.shape) for a in adapter.arrays)))
  counts = {"tp": 0, "n": 0, "tb": 0, "b": 0}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if not _tree.is_array(leaf):  # an equinox Module's activation function, a flag
      continue
    n = math.prod(leaf.shape)
    nbytes = n * leaf.dtype.itemsize
    counts["n"] += n
    counts["b"] += nbytes
    if keypath_to_path(kp) in trainable:
      counts["tp"] += n
      counts["tb"] += nbytes
  return Summary(tuple(rows), counts["tp"], counts["n"], counts["tb"], counts["b"])
