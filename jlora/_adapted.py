"""The labelled value of an adapted weight: its entry from the tree, the
shape-only operations on it, and its folding into a dense weight.

An adapted weight in flight is the frozen ``W`` (possibly reshaped, cast or
sliced) plus, per method on it, a `Term`: the method's arrays, every axis
labelled (see `jlora._labels`). `enter` builds it from a tree entry;
`Adapted.materialize` folds every method in, which is all `jlora.merge`
needs, and what the runtime (`jlora.lora`) falls back to for uses with no
factored form. Reshapes, slices and casts of ``W`` move the labels along
(and, where needed, the adapter arrays) so that later uses stay factored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jlora import _labels, _structure
from jlora._labels import Labels
from jlora.quant import _lazy
from jlora._tree import Path
from jlora.methods.base import Method


class Term:
  """One method's arrays on a weight in flight, each axis labelled."""

  __slots__ = ("method", "arrays", "labels")

  def __init__(self, method: Method, arrays: Sequence[jax.Array],
               labels: Sequence[Labels]):
    self.method = method
    self.arrays = tuple(arrays)
    self.labels = tuple(tuple(l) for l in labels)


@jax.tree_util.register_pytree_node_class
class Adapted:
  """A frozen weight (possibly reshaped, cast, sliced) plus its adapters."""

  __slots__ = ("w", "labels", "terms", "path")

  def __init__(self, w, labels: Sequence[str], terms: Sequence[Term], path: Path):
    self.w = w
    self.labels = tuple(labels)
    self.terms = tuple(terms)
    self.path = path

  def tree_flatten(self):
    children = (self.w,) + tuple(a for t in self.terms for a in t.arrays)
    aux = (self.labels, tuple((t.method, t.labels) for t in self.terms), self.path)
    return children, aux

  @classmethod
  def tree_unflatten(cls, aux, children):
    labels, metas, path = aux
    w, rest = children[0], list(children[1:])
    terms = []
    for method, arr_labels in metas:
      n = len(arr_labels)
      terms.append(Term(method, rest[:n], arr_labels))
      rest = rest[n:]
    return cls(w, labels, terms, path)

  def with_arrays(self, fn: Callable[[jax.Array, Labels], tuple[jax.Array, Labels]]):
    terms = []
    for t in self.terms:
      pairs = [fn(a, l) for a, l in zip(t.arrays, t.labels)]
      terms.append(Term(t.method, [p[0] for p in pairs], [p[1] for p in pairs]))
    return terms

  def materialize(self) -> jax.Array:
    """The dense effective weight: every method folded in, in order."""
    w = _lazy.materialize(self.w)
    for t in self.terms:
      w = t.method.fold(w, self.labels, t.arrays, t.labels)
    return w


def enter(weight: jax.Array, entry: _structure.Entry) -> Adapted:
  """The in-flight value of one adapted weight, with fresh labels."""
  tag = _labels.fresh("")
  # One label per kernel axis; the method's layout tells which are stacked,
  # inputs and outputs (`Method.weight_labels`).
  labels = tuple(f"w{k}_{tag}" for k in range(weight.ndim))
  # The base weight is frozen by definition: no dense gradient is ever formed.
  weight = _lazy.stop_gradient(_lazy.enter(weight))
  terms: list[Term] = []
  for n, adapter in enumerate(entry.adapters):
    method = adapter.method
    wl = method.weight_labels(labels)

    def inner_weight(_below=tuple(terms)):
      w = _lazy.materialize(weight)
      for t in _below:
        w = t.method.fold(w, labels, t.arrays, t.labels)
      return w

    arrays, arr_labels = method.prepare(labels, adapter.arrays,
                                        method.labels(wl, f"{tag}_{n}"), inner_weight)
    terms.append(Term(method, arrays, arr_labels))
  return Adapted(weight, labels, terms, entry.path)


# ----------------------------------------------------------------------------
# Shape-only operations on an adapted weight.


def _drop_label(array, labels: Labels, label: str):
  if label not in labels:
    return array, labels
  k = labels.index(label)
  return lax.index_in_dim(array, 0, k, keepdims=False), labels[:k] + labels[k + 1:]


def reshape(ad: Adapted, new_shape: Sequence[int]) -> Adapted | None:
  """Reshape an adapted weight by regrouping labels, or None if impossible."""
  old_shape = ad.w.shape
  # 1. Squeeze size-1 axes away.
  terms = ad.terms
  labels = ad.labels
  ones = [l for l, n in zip(labels, old_shape) if n == 1]
  for one in ones:
    terms = [Term(t.method, *zip(*(_drop_label(a, l, one) for a, l in zip(t.arrays, t.labels))))
             for t in terms]
  old = [(l, n) for l, n in zip(labels, old_shape) if n != 1]
  new = [n for n in new_shape if n != 1]
  # 2. Group the remaining axes by matching cumulative products.
  groups: list[tuple[list[str], list[int]]] = []
  i = j = 0
  while i < len(old) or j < len(new):
    g_old, g_new = [old[i]], [new[j]]
    i, j = i + 1, j + 1
    po, pn = g_old[0][1], g_new[0]
    while po != pn:
      if po < pn:
        g_old.append(old[i]); po *= old[i][1]; i += 1
      else:
        g_new.append(new[j]); pn *= new[j]; j += 1
    groups.append(([l for l, _ in g_old], g_new))
  new_labels: list[str] = []
  for g_labels, g_sizes in groups:
    if len(g_labels) == 1 and len(g_sizes) == 1:
      new_labels.append(g_labels[0])
      continue
    fresh = [_labels.fresh() for _ in g_sizes]
    new_terms = []
    for t in terms:
      arrays, arr_labels = [], []
      for a, l in zip(t.arrays, t.labels):
        present = [x for x in l if x in g_labels]
        if not present:
          arrays.append(a); arr_labels.append(l)
          continue
        if present != g_labels:
          return None  # the group is split across arrays or reordered
        k = l.index(g_labels[0])
        if tuple(l[k:k + len(g_labels)]) != tuple(g_labels):
          return None
        arrays.append(a.reshape(a.shape[:k] + tuple(g_sizes) + a.shape[k + len(g_labels):]))
        arr_labels.append(l[:k] + tuple(fresh) + l[k + len(g_labels):])
      new_terms.append(Term(t.method, arrays, arr_labels))
    terms = new_terms
    new_labels.extend(fresh)
  # 3. Insert the new size-1 axes; each term's first array carries them.
  it = iter(new_labels)
  final_labels = []
  for n in new_shape:
    if n == 1:
      one = _labels.fresh()
      final_labels.append(one)
      terms = [Term(t.method, (t.arrays[0][..., None],) + t.arrays[1:],
                    ((*t.labels[0], one),) + t.labels[1:]) for t in terms]
    else:
      final_labels.append(next(it))
  return Adapted(ad.w.reshape(tuple(new_shape)), final_labels, terms, ad.path)


def slice_(ad: Adapted, w_new, starts: Sequence[Any], sizes: Sequence[int]) -> Adapted:
  """Slice every array along the labels that the weight was sliced on."""
  def one(a, l):
    for label, start, size, full in zip(ad.labels, starts, sizes, ad.w.shape):
      if label in l and size != full:
        a = lax.dynamic_slice_in_dim(a, start, size, l.index(label))
    return a, l
  return Adapted(w_new, ad.labels, ad.with_arrays(one), ad.path)


def cast(ad: Adapted, w_new, dtype) -> Adapted:
  """``ad`` with its weight replaced by ``w_new`` and float arrays cast."""
  def one(a, l):
    return (lax.convert_element_type(a, dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a), l
  return Adapted(w_new, ad.labels, ad.with_arrays(one), ad.path)
