"""Adding adapters to a parameter tree."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jlora import _structure, _targets, _tree
from jlora._errors import Problems
from jlora._lora import LoRA
from jlora._method import Method
from jlora._targets import Axes, Targets
from jlora._tree import Path, path_str

_INITS = ("kaiming", "gaussian", "pissa")


def _check_key(key: Any, problems: Problems) -> None:
  ok = isinstance(key, jax.Array) and (
      jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
      or (key.dtype == jnp.uint32 and key.shape == (2,)))
  if not ok:
    problems.add(f"key must be a PRNG key such as jax.random.key(0), got {key!r}")


def _candidates(params: Any, problems: Problems) -> list[tuple[Path, Any]]:
  """Every array leaf that is not itself an adapter; non-arrays are problems."""
  out = []
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  adapter_leaves = set()
  for path, mapping in _tree.iter_mappings(params):
    adapter_leaves.update(path + (k,) for k in _structure.adapter_keys(mapping))
  for kp, leaf in leaves:
    path = _tree.keypath_to_path(kp)
    if path in adapter_leaves:
      continue
    if not _tree.is_array(leaf):
      problems.add(f"{path_str(path)}: leaf of type {type(leaf).__name__} is not an "
                   "array; lorify needs a tree of arrays, e.g. from model.init")
      continue
    out.append((path, leaf))
  return out


def add_methods(params: Any, make: Callable[[Path, Any], Method], *, key: jax.Array,
                targets: Targets, trainable: Targets = None, dtype=None,
                what: str = "adapters") -> Any:
  """Adds the method ``make(path, weight)`` to every weight ``targets`` picks.

  The generic engine behind `lorify` and every other method's entry point:
  validation (collected, raised once), target selection, keys, and the tree
  rebuild. ``make`` may raise ``ValueError``; its message becomes a problem.
  """
  problems = Problems(f"jlora: cannot add {what}")
  _check_key(key, problems)
  candidates = _candidates(params, problems)
  chosen = _targets.select(candidates, targets, what="weight to adapt",
                           problems=problems)
  existing = {}
  for path, mapping in _tree.iter_mappings(params):
    for k, m in _structure.specs_in(mapping):
      existing[(path + (m.weight,), m.spec_key)] = m
  full: dict[Path, tuple[str, ...]] = {}
  if trainable is not None:
    picked = _trainable_leaves(candidates, trainable, problems)
    for p in picked:
      full.setdefault(p[:-1], ())
      full[p[:-1]] += (p[-1],)
  methods: dict[Path, Method] = {}
  for path, leaf in chosen:
    where = path_str(path)
    if not isinstance(path[-1], str):
      problems.add(f"{where}: adapters are stored beside their weight in a mapping; "
                   "this leaf is not held in a dict")
      continue
    if path[:-1] in full and path[-1] in full[path[:-1]]:
      problems.add(f"{where}: selected both for adapters and for full training; "
                   "remove it from `trainable` or from `targets`")
      continue
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      problems.add(f"{where}: dtype {leaf.dtype} is not floating point; only float "
                   "weights can be adapted, exclude this path from targets")
      continue
    if leaf.ndim < 2:
      problems.add(f"{where}: shape {tuple(leaf.shape)} has rank {leaf.ndim}; adapters "
                   "need a weight with input and output axes, exclude this path")
      continue
    try:
      method = make(path, leaf)
    except (ValueError, KeyError) as e:
      problems.add(str(e.args[0]) if e.args else str(e))
      continue
    if (path, method.spec_key) in existing:
      problems.add(f"{where}: already has {existing[(path, method.spec_key)].describe()} "
                   f"adapters ('{method.spec_key}'); merge them first "
                   "(jlora.merge) or adapt another weight")
      continue
    order = sum(1 for (p, _) in existing if p == path)
    methods[path] = dataclasses.replace(method, order=order)
  problems.raise_if_any()

  keys = dict(zip(sorted(methods, key=path_str),
                  jax.random.split(key, max(len(methods), 1))))

  def add(path: Path, mapping: Mapping) -> Mapping:
    items = dict(mapping)
    for k, leaf in mapping.items():
      method = methods.get(path + (k,))
      if method is None:
        continue
      arrays, new_weight = method.create(keys[path + (k,)], leaf,
                                         dtype=dtype or leaf.dtype)
      items[k] = new_weight
      items[method.spec_key] = method
      items.update(zip(method.leaf_keys, arrays))
    if path in full:
      marker = items.get(_structure.TRAINABLE_KEY)
      keys_ = tuple(sorted(set(full[path]) | set(getattr(marker, "keys", ()))))
      items[_structure.TRAINABLE_KEY] = _structure.FullyTrainable(keys_)
    return _tree.rebuild_mapping(mapping, items)

  return _tree.map_mappings(params, add)


def _trainable_leaves(candidates, trainable: Targets, problems: Problems) -> list[Path]:
  if isinstance(trainable, str):
    trainable = (trainable,)
  if isinstance(trainable, (list, tuple)):
    names = list(trainable)
    picked = [p for p, _ in candidates if len(p) >= 2 and p[-2] in names]
    found = {p[-2] for p in picked}
    missing = [n for n in names if n not in found]
    if missing:
      available = sorted({str(p[-2]) for p, _ in candidates if len(p) >= 2})
      problems.add(f"trainable {missing} matched no module; available module "
                   f"names: {available}")
    return picked
  chosen = _targets.select(candidates, trainable, what="trainable leaf",
                           problems=problems)
  return [p for p, _ in chosen]


def lorify(params: Any, rank: int | Mapping[str, int], *, key: jax.Array,
           targets: Targets = None, alpha: float | Mapping[str, float] | None = None,
           axes: Axes | Mapping[str, Axes] | None = None,
           trainable: Targets = None, rslora: bool = False,
           init: str = "kaiming", dropout: float = 0.0, name: str = "default",
           dtype=None) -> Any:
  """Adds LoRA adapters beside the chosen weights of a parameter tree.

  Pure: returns a new tree and leaves ``params`` untouched. Each adapted weight
  gains sibling leaves ``lora_a`` (its input axes + ``(rank,)``) and
  ``lora_b`` (``(rank,)`` + its output axes), plus a static ``lora`` entry,
  a `LoRA` record of the rank, alpha and layout, which carries no arrays. ``B``
  starts at zero, so the model's function is unchanged; ``A`` is
  Kaiming-uniform as in PEFT.

  Args:
    params: a tree of arrays: Linen variables, a pure-dict NNX state, a dict.
    rank: the rank ``r``, or ``{regex: rank}`` matched against the
      ``/``-joined path (first match wins).
    key: a PRNG key for ``A``.
    targets: ``None`` for every ``kernel``/``embedding``; a sequence of module
      names (the key of the dict that holds the weight, e.g.
      ``("query", "value")``); a compiled regex searched in the path; or a
      predicate ``(path, leaf) -> bool``.
    alpha: the scaling numerator (default: ``rank``, i.e. scale 1), or
      ``{regex: alpha}``. The update is scaled by ``alpha / rank``.
    axes: `Axes` for stacked layers or multi-axis kernels, or
      ``{regex: Axes}``; by default inferred (no stacked axes; balanced
      input/output split).
    trainable: leaves to train in full, like PEFT's ``modules_to_save``
      (e.g. ``("classifier",)``): same forms as ``targets``, but names select
      every leaf of the named module.
    rslora: scale by ``alpha / sqrt(rank)`` instead.
    init: ``"kaiming"`` or ``"gaussian"`` for ``A``, or ``"pissa"``: ``A``
      and ``B`` from the top-``rank`` SVD of the weight, which becomes the
      residual (see `LoRA`).
    dropout: PEFT's ``lora_dropout`` on the adapter input; active only when
      `lora` is given an ``rng``.
    name: the adapter's name; a name other than ``"default"`` stores it under
      ``lora@name`` keys, so several named adapters can share a weight (see
      `select`).
    dtype: dtype of the adapters (default: the weight's dtype).

  Returns:
    The lorified tree.

  Raises:
    LoraError: listing every problem: a bad rank or alpha, a rank above
      ``min(in, out)``, targets that match nothing, non-array leaves, a weight
      that already has LoRA adapters.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"dense": {"kernel": jnp.ones((16, 32)), "bias": jnp.zeros(32)}}
    >>> lorified = jlora.lorify(params, 4, key=jax.random.key(0), alpha=8)
    >>> jax.tree.map(jnp.shape, lorified)
    {'dense': {'bias': (32,), 'kernel': (16, 32), 'lora': LoRA(rank=4, alpha=8), 'lora_a': (16, 4), 'lora_b': (4, 32)}}
  """
  pre = Problems("jlora: cannot add LoRA adapters")
  if init not in _INITS:
    pre.add(f"init must be one of {_INITS}, got {init!r}")
  if axes is not None and not isinstance(axes, (Axes, Mapping)):
    pre.add(f"axes must be jlora.Axes or a {{regex: Axes}} mapping, got {axes!r}")
  if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
    pre.add(f"dropout must be a number in [0, 1), got {dropout!r}")
  check_name(name, pre)
  for field, value, integer in (("rank", rank, True), ("alpha", alpha, False)):
    if value is None:
      continue
    values = value.items() if isinstance(value, Mapping) else [(None, value)]
    for pattern, v in values:
      label = field if pattern is None else f"{field}[{pattern!r}]"
      msg = _targets.check_number(v, label, integer=integer)
      if msg:
        pre.add(msg + ("; use a positive integer rank such as 8" if integer else
                       "; alpha scales the update by alpha/rank, e.g. alpha=2*rank"))
  pre.raise_if_any()

  def make(path: Path, leaf) -> LoRA:
    where = path_str(path)
    r = _targets.per_path(rank, where, name="rank")
    a = r if alpha is None else _targets.per_path(alpha, where, name="alpha")
    ax = Axes() if axes is None else _targets.per_path(axes, where, name="axes")
    stack = ax.stack
    if stack >= leaf.ndim - 1:
      raise ValueError(f"{where}: Axes(stack={stack}) leaves fewer than 2 axes of "
                       f"shape {tuple(leaf.shape)}; lower `stack`")
    inputs = ax.inputs or _targets.infer_inputs(leaf.shape, stack)
    if not 1 <= inputs < leaf.ndim - stack:
      raise ValueError(f"{where}: Axes(inputs={inputs}) does not fit shape "
                       f"{tuple(leaf.shape)} with stack={stack}")
    method = LoRA(rank=int(r), alpha=float(a), weight=path[-1], stack=stack,
                  inputs=inputs, rslora=rslora, init=init, dropout=float(dropout),
                  name=name)
    n_in = math.prod(leaf.shape[stack:stack + inputs])
    n_out = math.prod(leaf.shape[stack + inputs:])
    if r > min(n_in, n_out):
      raise ValueError(f"{where}: rank {r} > min(in={n_in}, out={n_out}); lower the "
                       "rank or exclude this path")
    return method

  return add_methods(params, make, key=key, targets=targets, trainable=trainable,
                     dtype=dtype, what="LoRA adapters")


def check_name(name: Any, problems: Problems) -> None:
  """Adapter names become part of tree keys (``lora@name``)."""
  if not isinstance(name, str) or not name or not all(
      c.isalnum() or c in "-_." for c in name):
    problems.add(f"name must be a non-empty string of letters, digits, '-', '_' "
                 f"or '.', got {name!r}")
