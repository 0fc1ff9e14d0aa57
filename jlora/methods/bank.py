"""Banks of LoRA adapters: one batch, a different adapter per example.

A `Bank` stacks ``K`` LoRA adapters of one weight along a leading axis:
``bank_a`` is ``(K, *stack, *inputs, r_max)``, ``bank_b`` is
``(K, *stack, r_max, *outputs)``. Adapters of a lower rank are zero-padded to
``r_max`` (padded columns of ``A`` and rows of ``B`` are zero, get zero
gradients, and so stay zero under any optimizer); each keeps its own scale
``alpha_k / r_k`` in ``Bank.scales``.

Which adapter each example uses is a leaf, ``bank_index``, set by `route`:
an int array of shape ``(batch,)`` (one adapter per example) or ``()`` (one
adapter for the whole batch). Being a leaf, it is traced: one compiled
function serves every routing. The example axis is the first axis of the
activations ``x`` entering each use of the weight that is not one of the
weight's axes (the leading batch axis of a ``Dense`` input ``(batch, ...,
in)``); its size must equal the index's. One forward pass serves the whole
batch, and ``jax.grad`` sends gradients back into every bank member that was
used. How each use picks its adapters (`jlora.methods.routing`): ``grouped``
scatters each example into a slot of its adapter and runs two matmuls
batched over the bank as stored (chosen for few rows an example, as in
decode), ``onehot`` runs ``x`` against all ``K`` adapters in two dense
matmuls and masks by the index (chosen for more rows while ``K·r <=
ONEHOT_MAX_WIDTH``), ``gather`` gathers ``A[index]``, ``B[index]`` per
example and runs one batched ``x·A·B`` (chosen beyond, and for stacked
layers), ``segment`` sorts the rows by adapter for ``jax.lax.ragged_dot``
(never chosen on CPU, where XLA lowers it as ``K`` masked dense dots; force
it with `routing`). On CPU, decoding SmolLM2 with a bank of K = 16 / 64 /
256 adapters, grouped ran at 0.83–0.87 / 0.76–0.80 / 0.76–0.77 of merged's
tokens/s over two runs, the fastest path at each K (BENCHMARKS.md, "Serving");
given `route`'s ``capacity`` (the busiest adapter's examples, known before
tracing), at 0.87–0.90 / 0.84–0.92 / 0.78–0.83 over three later runs on
another host (without it, 0.85–0.86 / 0.77–0.88 / 0.80–0.87 in the same runs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _labels, _structure, _tree
from jlora._errors import LoraError, Problems
from jlora.methods.base import DEFAULT_NAME, Method, WeightLabels
from jlora.methods.lora import LoRA
from jlora.methods.routing import (ROUTINGS, choose_path, current_routing, grouped_path,
                                   onehot_path, plan_of, routing, segment_path)
from jlora._tree import Path, path_str


@dataclasses.dataclass(frozen=True)
class Bank(Method):
  """``K`` stacked LoRA adapters of one weight, routed per example.

  Attributes:
    ranks: each adapter's rank ``r_k`` (the arrays hold ``max(ranks)``).
    scales: each adapter's scale ``alpha_k / r_k``.
    weight, stack, inputs, order, name: as in `LoRA`.
    dropouts: each adapter's ``LoRA.dropout``: in training (`lora` with an
      ``rng``) every example's input to ``A`` is dropped at the rate of the
      adapter it is routed to. Empty: no dropout.
    capacity: set by `route`: the most examples routed to any one adapter, if
      known when tracing (``None``: found at run time).
  """

  ranks: tuple[int, ...]
  scales: tuple[float, ...]
  dropouts: tuple[float, ...] = ()
  capacity: int | None = None

  prefix = "bank"
  leaves = ("a", "b", "index")

  def __post_init__(self):  # tuples, also when rebuilt from JSON lists
    super().__post_init__()
    object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
    object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
    object.__setattr__(self, "dropouts", tuple(float(p) for p in self.dropouts))
    if self.capacity is not None:  # an int, also when given as a NumPy integer
      object.__setattr__(self, "capacity", int(self.capacity))

  @property
  def trainable_leaves(self) -> tuple[str, ...]:
    return ("a", "b")

  def describe(self) -> str:
    return f"Bank(K={len(self.ranks)}, ranks={list(self.ranks)})"

  def shapes(self, weight_shape):
    s, i, o = self.split_shape(weight_shape)
    k, r = len(self.ranks), max(self.ranks)
    return ((k,) + s + i + (r,), (k,) + s + (r,) + o, None)

  def create(self, key, weight, *, dtype):
    raise NotImplementedError("build banks with jlora.stack_adapters")

  def labels(self, weight: WeightLabels, tag: str):
    k, r = f"k{tag}", f"r{tag}"
    return ((k,) + weight.stack + weight.inputs + (r,),
            (k,) + weight.stack + (r,) + weight.outputs, (f"e{tag}",))

  def prepare(self, w_labels, arrays, labels, inner_weight):
    index = arrays[2]
    if index.ndim > 1 or not jnp.issubdtype(index.dtype, jnp.integer):
      raise LoraError([f"bank_index: shape {tuple(index.shape)} dtype {index.dtype}"],
                      header="jlora: a bank's index must be an int array of shape "
                      "(batch,) or (); set it with jlora.route(params, index)")
    return arrays, labels[:2] + (labels[2][:index.ndim],)

  def _scale_of(self, index):
    return jnp.asarray(self.scales, jnp.float32)[index]

  def fold(self, w, w_labels, arrays, labels):
    a, b, index = arrays
    if index.ndim:
      raise LoraError([f"the bank's index has shape {tuple(index.shape)}"], header=(
          "jlora: a bank routed per example was used where it has no factored form "
          "(merge, or an op other than a matmul on the weight); route it to one "
          "adapter, jlora.route(params, k), to merge it"))
    (al, bl) = labels[:2]
    k = al[0]
    a, b = jnp.take(a, index, axis=al.index(k)), jnp.take(b, index, axis=bl.index(k))
    al, bl = tuple(l for l in al if l != k), tuple(l for l in bl if l != k)
    dtype = jnp.promote_types(w.dtype, a.dtype)
    delta = _labels.einsum(w_labels, (a.astype(dtype), al), (b.astype(dtype), bl))
    return (w.astype(dtype) + delta * self._scale_of(index).astype(dtype)).astype(w.dtype)

  def _dropout(self, use, index, example_labels):
    """``use.x`` with each example dropped at its adapter's rate (training only)."""
    x = use.x
    if use.rng is None or not any(self.dropouts):
      return x
    rate = jnp.asarray(self.dropouts, jnp.float32)[index]
    rate = _labels.broadcast_to(rate, example_labels, use.x_labels)
    keep = jax.random.uniform(use.rng, x.shape) >= rate
    return jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros((), x.dtype))

  def down(self, arrays, labels, *, training):
    """All ``K`` down factors at once, when this use routes one-hot (fusion).

    Weights that share ``x`` (q, k, v) then run ``x·A`` of every adapter of
    every weight as one matmul; `dot` masks the result by the index.
    """
    a, b, index = arrays
    al, bl = labels[:2]
    if (index.ndim != 1 or (training and any(self.dropouts)) or set(al[1:-1]) & set(bl)
        or choose_path(None, len(self.ranks), max(self.ranks)) != "onehot" or not FUSE_ONEHOT):
      return None
    return a, al, 1.0

  def _dot_down(self, use, arrays, labels, inner):
    """The one-hot path given ``use.down = (x·A_all, labels)`` (None: no fit)."""
    a, b, index = arrays
    al, bl = labels[:2]
    t, t_labels = use.down
    k, r = al[0], al[-1]
    free = [l for l in t_labels if l not in (k, r)]
    if not free or t.shape[t_labels.index(free[0])] != index.shape[0]:
      return None
    weight = jax.nn.one_hot(index, len(self.ranks), dtype=jnp.float32) * self._scale_of(index)[:, None]
    t = t * _labels.broadcast_to(weight, (free[0], k), t_labels).astype(t.dtype)
    delta = _labels.contract(use.out_labels, (t, t_labels), (b, bl), precision=use.precision,
                             preferred_element_type=use.preferred_element_type)
    base = inner(use.x)
    return base + delta.astype(base.dtype)

  def dot(self, use, arrays, labels, inner):
    a, b, index = arrays
    if use.down is not None:
      out = self._dot_down(use, arrays, labels, inner)
      if out is not None:
        return out
    al, bl = labels[:2]
    k = al[0]
    weight_axes = set(al) | set(bl)
    if index.ndim == 0:
      e = k
      lab_a, lab_b = tuple(l for l in al if l != k), tuple(l for l in bl if l != k)
      scale_labels: tuple[str, ...] = ()
    else:
      free = [l for l in use.x_labels if l not in weight_axes]
      if not free or use.x.shape[use.x_labels.index(free[0])] != index.shape[0]:
        return None
      e = free[0]
      x = self._dropout(use, index, (e,))
      plan = plan_of(x, use.x_labels, (a, al), (b, bl), use.out_labels, e)
      path = choose_path(plan, len(self.ranks), max(self.ranks)) if plan else "gather"
      if path != "gather":
        kw = {"capacity": self.capacity} if path == "grouped" else {}
        delta = {"onehot": onehot_path, "grouped": grouped_path, "segment": segment_path}[path](
            plan, x, index, self._scale_of(index), len(self.ranks), precision=use.precision,
            preferred_element_type=use.preferred_element_type, **kw)
        base = inner(use.x)
        return base + delta.astype(base.dtype)
      lab_a = tuple(e if l == k else l for l in al)
      lab_b = tuple(e if l == k else l for l in bl)
      scale_labels = (e,)
    a_e = jnp.take(a, index, axis=al.index(k))
    b_e = jnp.take(b, index, axis=bl.index(k))
    delta = _labels.chain(self._dropout(use, index, scale_labels), use.x_labels, [(a_e, lab_a), (b_e, lab_b)], use.out_labels,
                          precision=use.precision,
                          preferred_element_type=use.preferred_element_type)
    scale = _labels.broadcast_to(self._scale_of(index), scale_labels, use.out_labels)
    base = inner(use.x)
    return base + (delta * scale.astype(delta.dtype)).astype(base.dtype)


# Whether one-hot banks join the shared-input fusion (`Bank.down`; see
# jlora/methods/routing.py).
FUSE_ONEHOT = False


# -----------------------------------------------------------------------------


def _loras(params: Any, what: str, problems: Problems) -> tuple[Any, dict[Path, LoRA], dict]:
  base, entries, trained = _structure.read(params, what=what)
  found, arrays = {}, {}
  for path, entry in entries.items():
    for adapter in entry.adapters:
      if not isinstance(adapter.method, LoRA):
        problems.add(f"{path_str(path)}: {what} holds {adapter.method.describe()}; "
                     "banks stack LoRA adapters only (lorify)")
        continue
      if path in found:
        problems.add(f"{path_str(path)}: {what} holds several LoRA adapters on this "
                     "weight; select one with jlora.select first")
        continue
      found[path] = adapter.method
      arrays[path] = adapter.arrays
  if trained:
    problems.add(f"{what}: leaves trained in full ({sorted(map(path_str, trained))}) "
                 "cannot be banked; bank the adapters of trees without `trainable`")
  return base, found, arrays


def stack_adapters(trees: Sequence[Any], *, name: str = DEFAULT_NAME) -> Any:
  """Stacks ``K`` LoRA trees of one base model into a bank tree.

  Every tree must have LoRA adapters on the same weights (ranks, alphas and
  dropout rates may differ: lower ranks are zero-padded, each adapter keeps
  its scale and its dropout rate).
  The result is the base tree with, beside each adapted weight, a `Bank`
  entry and leaves ``bank_a``, ``bank_b`` and ``bank_index`` (``0``: route it
  with `route` before use).

  Args:
    trees: lorified trees over one base (e.g. adapters trained per task).
    name: the bank's adapter name.

  Returns:
    The bank tree.

  Raises:
    LoraError: trees that hold other methods, or adapt different weights.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> base = {"dense": {"kernel": jnp.ones((4, 3))}}
    >>> t1 = jlora.lorify(base, 1, key=jax.random.key(1))
    >>> t2 = jlora.lorify(base, 2, key=jax.random.key(2), alpha=4)
    >>> bank = jlora.stack_adapters([t1, t2])
    >>> bank["dense"]["bank"], bank["dense"]["bank_a"].shape
    (Bank(ranks=(1, 2), scales=(1.0, 2.0)), (2, 4, 2))
  """
  problems = Problems("jlora: cannot stack adapters into a bank")
  if len(trees) < 1:
    problems.add("trees is empty; pass a list of lorified trees")
    problems.raise_if_any()
  read = [_loras(t, f"trees[{n}]", problems) for n, t in enumerate(trees)]
  problems.raise_if_any()
  base0, methods0, _ = read[0]
  base_def = jax.tree.structure(base0)
  for n, (base, methods, _) in enumerate(read[1:], 1):
    if jax.tree.structure(base) != base_def:
      problems.add(f"trees[{n}]: its base tree differs in structure from trees[0]'s")
    if set(methods) != set(methods0):
      diff = sorted(map(path_str, set(methods) ^ set(methods0)))
      problems.add(f"trees[{n}]: adapts different weights than trees[0] (differing: "
                   f"{diff}); lorify every tree with the same targets")
  problems.raise_if_any()
  banks: dict[Path, tuple[Bank, jax.Array, jax.Array]] = {}
  for path, m0 in methods0.items():
    ms = [r[1][path] for r in read]
    layouts = {(m.stack, m.inputs, m.layout, m.weight) for m in ms}
    if len(layouts) > 1:
      problems.add(f"{path_str(path)}: the trees split this weight's axes differently "
                   f"({sorted(layouts)}); use the same axes in every lorify")
      continue
    rmax = max(m.rank for m in ms)
    a_list, b_list = [], []
    for m, (_, _, arrs) in zip(ms, read):
      a, b = arrs[path]
      r_axis_a = m.stack + m.inputs
      pad_a = [(0, 0)] * a.ndim
      pad_a[r_axis_a] = (0, rmax - m.rank)
      pad_b = [(0, 0)] * b.ndim
      pad_b[m.stack] = (0, rmax - m.rank)
      a_list.append(jnp.pad(a, pad_a))
      b_list.append(jnp.pad(b, pad_b))
    bank = Bank(ranks=tuple(m.rank for m in ms), scales=tuple(m.scale for m in ms),
                weight=m0.weight, stack=m0.stack, inputs=m0.inputs, layout=m0.layout,
                name=name,
                dropouts=tuple(m.dropout for m in ms) if any(m.dropout for m in ms) else ())
    banks[path] = (bank, jnp.stack(a_list), jnp.stack(b_list))
  problems.raise_if_any()

  def add(mpath: Path, mapping):
    items = dict(mapping)
    for k in list(mapping):
      if mpath + (k,) in banks:
        bank, a, b = banks[mpath + (k,)]
        items[bank.spec_key] = bank
        items.update(zip(bank.leaf_keys, (a, b, jnp.zeros((), jnp.int32))))
    return _tree.rebuild_mapping(mapping, items)

  return _tree.map_mappings(base0, add)


def route(params: Any, index: Any, *, capacity: int | None = None) -> Any:
  """Sets which bank adapter each example uses (every bank in the tree).

  Pure and traceable: call it inside ``jit``/``grad`` with a traced index.

  Args:
    params: a tree holding banks (from `stack_adapters`).
    index: an int array ``(batch,)``, adapter per example, or an int for the
      whole batch. Indices must lie in ``[0, K)`` (out-of-range ones gather
      NaNs, as ``jnp.take`` does).
    capacity: the most examples ``index`` routes to any one adapter, when the
      caller knows it before tracing (a server that builds its batches does).
      The grouped path (decode) then sizes its slots when tracing, with no
      run-time choice between sizes (a ``lax.cond`` per adapted weight).
      Static: one compilation per value. A concrete ``index`` is checked
      against it; with a traced one, an example beyond its adapter's
      ``capacity`` gets NaN outputs, never another example's adapter.
      ``None``: found at run time.

  Returns:
    The tree with every ``bank_index`` leaf replaced.

  Raises:
    LoraError: an index of the wrong shape or dtype, a tree with no bank, a
      capacity that is not a positive int, given for a single-adapter index,
      or below the count of a concrete index.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> base = {"dense": {"kernel": jnp.eye(3)}}
    >>> trees = [jlora.lorify(base, 1, key=jax.random.key(k)) for k in range(2)]
    >>> trees = [jax.tree.map(lambda x: x + 1.0 if x.shape == (1, 3) else x, t)
    ...          for t in trees]  # B = 1
    >>> fn = jlora.lora(lambda p, x: x @ p["dense"]["kernel"])
    >>> bank = jlora.stack_adapters(trees)
    >>> x = jnp.ones((2, 3))
    >>> mixed = fn(jlora.route(bank, jnp.array([1, 0])), x)
    >>> bool(jnp.allclose(mixed[0], fn(trees[1], x[:1])[0]))
    True
    >>> known = fn(jlora.route(bank, jnp.array([1, 0]), capacity=1), x)  # one each
    >>> bool(jnp.allclose(known, mixed))
    True
  """
  index = jnp.asarray(index)
  problems = Problems("jlora: cannot route the banks")
  bad_index = index.ndim > 1 or not jnp.issubdtype(index.dtype, jnp.integer)
  if bad_index:
    problems.add(f"index: shape {tuple(index.shape)} dtype {index.dtype}; pass an int "
                 "array of shape (batch,) or an int")
  if capacity is not None:
    _check_capacity(capacity, None if bad_index else index, problems)
  found = []

  def set_index(mpath: Path, mapping):
    banks = [m for _, m in _structure.specs_in(mapping) if isinstance(m, Bank)]
    if not banks:
      return mapping
    items = dict(mapping)
    for bank in banks:
      found.append(mpath)
      items[bank.spec_key] = dataclasses.replace(bank, capacity=capacity)
      items[bank.leaf_key("index")] = index.astype(jnp.int32)
    return _tree.rebuild_mapping(mapping, items)

  out = _tree.map_mappings(params, set_index)
  if not found:
    problems.add("params holds no bank; build one with jlora.stack_adapters")
  problems.raise_if_any()
  return out


def _check_capacity(capacity: Any, index: jax.Array | None, problems: Problems) -> None:
  """``route``'s capacity against its index (``None``: an index already reported)."""
  if not isinstance(capacity, (int, np.integer)) or isinstance(capacity, bool) or capacity < 1:
    problems.add(f"capacity={capacity!r}; pass a positive int, the most examples the "
                 "index routes to one adapter (or None)")
  elif index is None:
    return
  elif index.ndim == 0:
    problems.add(f"capacity={capacity} with a single adapter for the whole batch "
                 f"(index {index}); pass capacity only with an index per example")
  elif not isinstance(index, jax.core.Tracer) and index.size and np.asarray(index).min() >= 0:
    counts = np.bincount(np.asarray(index))  # concrete: checked now
    if counts.max() > capacity:
      busy = np.flatnonzero(counts > capacity)
      problems.add(f"capacity={capacity}, but the index routes {counts.max()} examples to "
                   f"adapter {int(counts.argmax())} ({busy.size} adapter(s) over capacity: "
                   f"{busy[:8].tolist()}); pass capacity={counts.max()} or None")


__all__ = ("Bank", "stack_adapters", "route", "routing", "current_routing", "ROUTINGS")
