"""Named adapters: several on one base, choosing some, combining them.

An adapter's name is part of its keys: ``lorify(params, 8, key=k,
name="task1")`` stores ``lora@task1`` (the `LoRA` record), ``lora@task1_a``
and ``lora@task1_b`` beside the weight; the unnamed adapter is
``"default"`` with the plain ``lora`` keys. Every method takes a ``name``, so
``ia3@task1`` or ``dora@style`` work the same way. All adapters in a tree
are active in `lora` and `merge` (applied in order); `select` keeps some,
`disable` none, and `weighted_adapter` builds a new LoRA adapter out of
named ones (PEFT's ``add_weighted_adapter``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jlora import _structure, _tree
from jlora._errors import Problems
from jlora._add import check_name
from jlora.methods.base import Method
from jlora.methods.lora import LoRA
from jlora._tree import Path, path_str

COMBINATIONS = ("linear", "cat", "svd", "ties")


def adapter_names(params: Any) -> list[str]:
  """The names of the adapters in a tree, sorted.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> base = {"dense": {"kernel": jnp.ones((4, 4))}}
    >>> p = jlora.lorify(base, 2, key=jax.random.key(0), name="task1")
    >>> jlora.adapter_names(jlora.lorify(p, 2, key=jax.random.key(1)))
    ['default', 'task1']
  """
  _, entries, _ = _structure.read(params)
  return sorted({a.method.adapter_name for e in entries.values() for a in e.adapters})


def select(params: Any, names: str | Iterable[str]) -> Any:
  """Keeps only the adapters with the given names; removes the others.

  Pure, and cheap enough to call inside a jitted step: the result is the
  tree without the other adapters' entries and leaves (so ``grad`` and the
  optimizer see only the selected ones).

  Args:
    params: a tree with (named) adapters.
    names: a name or names, e.g. ``"task1"`` or ``("default", "task2")``.

  Returns:
    The tree with only those adapters.

  Raises:
    LoraError: a name that no adapter in the tree has.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> base = {"dense": {"kernel": jnp.ones((4, 4))}}
    >>> p = jlora.lorify(base, 2, key=jax.random.key(0), name="task1")
    >>> p = jlora.lorify(p, 2, key=jax.random.key(1), name="task2")
    >>> sorted(jlora.select(p, "task2")["dense"])
    ['kernel', 'lora@task2', 'lora@task2_a', 'lora@task2_b']
  """
  problems = Problems("jlora: cannot select adapters")
  if isinstance(names, str):
    names = (names,)
  elif isinstance(names, (list, tuple, set, frozenset)):
    names = tuple(names)
  if not isinstance(names, tuple) or not names or not all(isinstance(n, str)
                                                          for n in names):
    problems.add(f"names: got {names!r}, expected an adapter name or a non-empty "
                 "sequence of names such as ('default', 'task2')")
    problems.raise_if_any()
  have = adapter_names(params)
  missing = [n for n in names if n not in have]
  if missing:
    problems.add(f"names {missing} match no adapter; the tree has {have}")
  problems.raise_if_any()
  return _drop(params, lambda m: m.adapter_name not in names)


def disable(params: Any) -> Any:
  """The tree with every adapter removed: the base model (fully-trained
  leaves keep their trained values).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> base = {"dense": {"kernel": jnp.ones((4, 4))}}
    >>> jlora.disable(jlora.lorify(base, 2, key=jax.random.key(0)))
    {'dense': {'kernel': Array([[1., 1., 1., 1.],
           [1., 1., 1., 1.],
           [1., 1., 1., 1.],
           [1., 1., 1., 1.]], dtype=float32)}}
  """
  return _drop(params, lambda m: True)


def _drop(params: Any, drop) -> Any:
  def strip(path: Path, mapping: Mapping) -> Mapping:
    specs = _structure.specs_in(mapping)
    gone = set()
    for key, method in specs:
      if drop(method):
        gone.add(key)
        gone.update(method.leaf_keys)
    if not gone:
      return mapping
    kept = {k: v for k, v in mapping.items() if k not in gone}
    if isinstance(mapping, _tree.Holder) and len(kept) == 1:
      return next(iter(kept.values()))  # no adapters left: the bare weight again
    return _tree.rebuild_mapping(mapping, kept)

  return _tree.map_mappings(params, strip)


def _matrix(method: Method, x: jax.Array, kind: str) -> jax.Array:
  """A or B of one adapter as ``(S, n, r)`` / ``(S, r, n)`` float32 stacks."""
  s = math.prod(x.shape[:method.stack])
  r = x.shape[method.stack + method.inputs] if kind == "a" else x.shape[method.stack]
  x = x.astype(jnp.float32)
  return x.reshape((s, -1, r)) if kind == "a" else x.reshape((s, r, -1))


def _prune(t: jax.Array, density: float) -> jax.Array:
  """Keeps the ``density`` fraction of largest magnitudes of each ``t[s]``."""
  flat = t.reshape((t.shape[0], -1))
  k = int(density * flat.shape[1])
  if k <= 0:
    return jnp.zeros_like(t)
  threshold = jax.lax.top_k(jnp.abs(flat), k)[0][:, -1:]
  # Ties at the threshold may keep a few more than k; PEFT's topk breaks them
  # arbitrarily.
  return jnp.where(jnp.abs(flat) >= threshold, flat, 0.0).reshape(t.shape)


def ties(deltas: list[jax.Array], weights: list[float], *, density: float,
         majority_sign: str = "total") -> jax.Array:
  """TIES-merging (Yadav et al., 2023) of stacked ``(S, ...)`` task deltas:
  trim each to its top ``density`` magnitudes, elect a sign per entry (by the
  summed trimmed deltas, ``"total"``, or by a vote, ``"frequency"``), and
  average the weighted deltas that agree with it (PEFT's ``ties``)."""
  pruned = jnp.stack([_prune(d, density) for d in deltas])
  if majority_sign == "total":
    mass = pruned.sum(axis=0)
  else:
    mass = jnp.sign(pruned).sum(axis=0)
  elected = jnp.where(mass >= 0, 1.0, -1.0)
  agree = jnp.sign(pruned) == elected
  w = jnp.asarray(weights, jnp.float32).reshape((-1,) + (1,) * (pruned.ndim - 1))
  total = jnp.sum(jnp.where(agree, pruned * w, 0.0), axis=0)
  return total / jnp.maximum(jnp.sum(agree, axis=0), 1).astype(jnp.float32)


def _svd_factors(delta: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
  """``(S, n_in, n_out)`` -> A ``(S, n_in, r)``, B ``(S, r, n_out)`` with A·B ≈ delta."""
  u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
  rank = min(rank, s.shape[-1])
  return u[:, :, :rank], s[:, :rank, None] * vt[:, :rank, :]


def weighted_adapter(params: Any, weights: Mapping[str, float], *, name: str,
                     combination: str = "svd", rank: int | None = None,
                     density: float = 0.5, majority_sign: str = "total") -> Any:
  """Adds a new LoRA adapter ``name`` combining named LoRA adapters.

  PEFT's ``add_weighted_adapter``, on every weight where any of the named
  adapters sits (one that is missing counts as zero there). With ``ΔW_i =
  s_i·A_i·B_i`` and weights ``w_i``:

  * ``"linear"``: ``A = Σ sign(w_i)·sqrt(|w_i s_i|)·A_i``,
    ``B = Σ sqrt(|w_i s_i|)·B_i`` (all ranks equal). As in PEFT this mixes
    the factors, not the updates: ``A·B`` also holds the cross terms
    ``A_i·B_j``; for exactly ``Σ w_i ΔW_i`` use ``"cat"``.
  * ``"cat"``: ``A = [w_1 s_1 A_1, ...]``, ``B = [B_1; ...]``: exactly
    ``Σ w_i ΔW_i`` at rank ``Σ r_i``.
  * ``"svd"``: ``Σ w_i ΔW_i`` formed densely, then truncated to ``rank``
    (default: the largest rank; at most ``min(in, out)`` per weight) by SVD.
  * ``"ties"``: TIES-merging (`ties`) of the dense ``ΔW_i`` with
    ``density``, then SVD to ``rank`` (PEFT's ``ties_svd``).

  The new adapter has ``alpha = rank`` (scale 1) and applies after the
  existing ones; `select` it to use it alone. ``"svd"``/``"ties"`` form each
  dense ``ΔW`` once: a one-off cost, outside training.

  Args:
    params: a tree holding the named LoRA adapters.
    weights: ``{adapter name: weight}``.
    name: the new adapter's name.
    combination: one of ``"linear"``, ``"cat"``, ``"svd"``, ``"ties"``.
    rank: target rank for ``"svd"``/``"ties"``.
    density: fraction of entries TIES keeps per weight.
    majority_sign: TIES sign election, ``"total"`` or ``"frequency"``.

  Returns:
    The tree with the new adapter added.

  Raises:
    LoraError: unknown names or combination, a name already in use, unequal
      ranks for ``"linear"``, adapters that are not LoRA.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> base = {"dense": {"kernel": jnp.zeros((4, 4))}}
    >>> p = jlora.lorify(base, 1, key=jax.random.key(0), name="x")
    >>> p = jlora.lorify(p, 2, key=jax.random.key(1), name="y")
    >>> p = jax.tree.map(lambda v: v + 0.5, p)  # non-zero B
    >>> p = jlora.weighted_adapter(p, {"x": 1.0, "y": 2.0}, name="xy", combination="cat")
    >>> p["dense"]["lora@xy"]
    LoRA(rank=3, alpha=3, order=2, name='xy')
  """
  problems = Problems("jlora: cannot combine adapters")
  check_name(name, problems)
  if combination not in COMBINATIONS:
    problems.add(f"combination must be one of {COMBINATIONS}, got {combination!r}")
  if majority_sign not in ("total", "frequency"):
    problems.add(f"majority_sign must be 'total' or 'frequency', got {majority_sign!r}")
  if isinstance(density, bool) or not isinstance(density, numbers.Real) or \
      not 0 < density <= 1:
    problems.add(f"density must be in (0, 1], got {density!r}")
  if not isinstance(weights, Mapping):
    problems.add(f"weights: got {weights!r}, expected {{adapter name: weight}}")
    problems.raise_if_any()
  for n, w in weights.items():
    try:
      ok = not isinstance(w, (bool, str, bytes)) and math.isfinite(float(w))
    except (TypeError, ValueError):
      ok = False
    if not ok:
      problems.add(f"weights[{n!r}]: got {w!r}, expected a finite number")
  if rank is not None and (not isinstance(rank, int) or rank < 1):
    problems.add(f"rank must be a positive int, got {rank!r}")
  have = adapter_names(params)
  if name in have:
    problems.add(f"name {name!r} is already an adapter in this tree; choose a new one")
  missing = [n for n in weights if n not in have]
  if missing or not weights:
    problems.add(f"weights names {missing or '{}'} match no adapter; the tree has {have}")
  problems.raise_if_any()

  _, entries, _ = _structure.read(params)
  new: dict[Path, tuple[LoRA, jax.Array, jax.Array]] = {}
  for wpath in sorted(entries, key=path_str):
    entry = entries[wpath]
    chosen = [(a.method, a.arrays, float(weights[a.method.adapter_name]))
              for a in entry.adapters if a.method.adapter_name in weights]
    if not chosen:
      continue
    where = path_str(wpath)
    bad = [m.describe() for m, _, _ in chosen if not isinstance(m, LoRA)]
    if bad:
      problems.add(f"{where}: {bad} are not LoRA adapters; only LoRA adapters combine")
      continue
    m0 = chosen[0][0]
    if {(m.stack, m.inputs, m.layout) for m, _, _ in chosen} != {
        (m0.stack, m0.inputs, m0.layout)}:
      problems.add(f"{where}: the adapters split this weight's axes differently")
      continue
    stack_shape, in_shape, out_shape = m0.split_shape(entry.weight.shape)
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    As = [_matrix(m, arrs[0], "a") for m, arrs, _ in chosen]
    Bs = [_matrix(m, arrs[1], "b") for m, arrs, _ in chosen]
    if combination == "linear":
      ranks = {m.rank for m, _, _ in chosen}
      if len(ranks) > 1:
        problems.add(f"{where}: 'linear' needs equal ranks, got {sorted(ranks)}; use "
                     "'cat' or 'svd'")
        continue
      ws = [w * m.scale for m, _, w in chosen]
      a = sum(math.copysign(math.sqrt(abs(w)), w) * x for w, x in zip(ws, As))
      b = sum(math.sqrt(abs(w)) * x for w, x in zip(ws, Bs))
    elif combination == "cat":
      a = jnp.concatenate([w * m.scale * x for (m, _, w), x in zip(chosen, As)], axis=2)
      b = jnp.concatenate(Bs, axis=1)
    else:
      deltas = [m.scale * jnp.einsum("sir,sro->sio", x, y)
                for (m, _, _), x, y in zip(chosen, As, Bs)]
      ws = [w for _, _, w in chosen]
      if combination == "svd":
        delta = sum(w * d for w, d in zip(ws, deltas))
      else:
        delta = ties(deltas, ws, density=density, majority_sign=majority_sign)
      target = min(rank or max(m.rank for m, _, _ in chosen), n_in, n_out)
      a, b = _svd_factors(delta, target)
    r = a.shape[2]
    dtype = chosen[0][1][0].dtype
    method = LoRA(rank=r, alpha=float(r), weight=m0.weight, stack=m0.stack,
                  inputs=m0.inputs, layout=m0.layout, order=max(x.method.order for x in entry.adapters) + 1,
                  name=name)
    new[wpath] = (method, a.reshape(stack_shape + in_shape + (r,)).astype(dtype),
                  b.reshape(stack_shape + (r,) + out_shape).astype(dtype))
  problems.raise_if_any()

  def add(mpath: Path, mapping: Mapping) -> Mapping:
    items = dict(mapping)
    for k in list(mapping):
      if mpath + (k,) in new:
        method, a, b = new[mpath + (k,)]
        items[method.spec_key] = method
        items.update(zip(method.leaf_keys, (a, b)))
    return _tree.rebuild_mapping(mapping, items)

  return _tree.map_mappings(params, add)
