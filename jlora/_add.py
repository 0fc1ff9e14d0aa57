"""Adding adapters to a parameter tree: the engine behind every method's
entry point (`jlora.lorify`, `jlora.dora`, `jlora.ia3`, a custom method's)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jlora import _structure, _targets, _tree
from jlora._errors import Problems
from jlora._targets import Targets
from jlora._tree import Path, path_str
from jlora.methods.base import Method


def _check_key(key: Any, problems: Problems) -> None:
  ok = isinstance(key, jax.Array) and (
      jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
      or (key.dtype == jnp.uint32 and key.shape == (2,)))
  if not ok:
    problems.add(f"key must be a PRNG key such as jax.random.key(0), got {key!r}")


def _candidates(params: Any, problems: Problems) -> list[tuple[Path, Any]]:
  """Every array leaf that is not itself an adapter. A non-array leaf in a
  mapping is a problem; one in another node (an ``equinox.Module``'s
  activation function, a NamedTuple's flag) is skipped."""
  out = []
  leaves, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_tree.is_quantized)
  adapter_leaves, in_mapping = set(), set()
  for path, mapping in _tree.iter_mappings(params):
    adapter_leaves.update(path + (k,) for k in _structure.adapter_keys(mapping))
    in_mapping.update(path + (k,) for k in mapping)
  for kp, leaf in leaves:
    path = _tree.keypath_to_path(kp)
    if path in adapter_leaves:
      continue
    if not _tree.is_array(leaf):
      if path in in_mapping:
        problems.add(f"{path_str(path)}: leaf of type {type(leaf).__name__} is not an "
                     "array; lorify needs a tree of arrays, e.g. from model.init")
      continue
    out.append((path, leaf))
  return out


def check_params(params: Any, problems: Problems) -> bool:
  """Adds a problem unless ``params`` is a tree (not None, not one array)."""
  if params is None or _tree.is_array(params):
    got = "None" if params is None else f"one array of shape {tuple(params.shape)}"
    problems.add(f"params: got {got}, expected a tree of arrays such as "
                 "{'dense': {'kernel': W}} (e.g. model.init(key, x)); pass the tree, "
                 "or wrap a lone weight: {'layer': {'kernel': W}}")
    return False
  return True


def check_dtype(dtype: Any, problems: Problems, *, name: str = "dtype",
                none: str = "each weight's dtype") -> None:
  """``dtype`` is None (meaning ``none``) or a floating dtype."""
  if dtype is None:
    return
  try:
    ok = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
  except TypeError:
    ok = False
  if not ok:
    problems.add(f"{name}: got {dtype!r}, expected None ({none}) or a floating dtype "
                 "such as jnp.float32 or jnp.bfloat16")


def check_patterns(value: Any, name: str, problems: Problems) -> None:
  """The keys of a ``{regex: value}`` option compile (and are strings)."""
  if not isinstance(value, Mapping):
    return
  if not value:
    problems.add(f"{name}: got an empty mapping, expected a value or {{regex: value}} "
                 "with a pattern for every adapted path (e.g. a '.*' default)")
  for pattern in value:
    if not isinstance(pattern, str):
      problems.add(f"{name}[{pattern!r}]: a pattern must be a str regex, got "
                   f"{type(pattern).__name__}")
      continue
    try:
      re.compile(pattern)
    except re.error as e:
      problems.add(f"{name}[{pattern!r}]: not a valid regex ({e}); escape it with "
                   "re.escape, or fix the pattern")


def _reserved(mapping: Mapping, path: Path, method: Method, problems: Problems) -> bool:
  """Adds a problem when keys ``method`` would write are the user's own."""
  record = mapping.get(method.spec_key)
  if isinstance(record, Method):
    return False  # jlora's own: "already has adapters" below
  taken = [k for k in (method.spec_key,) + method.leaf_keys if k in mapping]
  if taken:
    where = path_str(path)
    problems.add(f"{where}: {type(method).__name__} would store its adapters under "
                 f"{list((method.spec_key,) + method.leaf_keys)}, but the tree already "
                 f"uses {taken} there; rename those leaves, or adapt another weight")
    return True
  return False


def add_adapters(params: Any, make: Callable[[Path, Any], Method], *,
                 key: jax.Array, targets: Targets = None, trainable: Targets = None,
                 dtype=None, what: str = "adapters",
                 problems: Problems | None = None) -> Any:
  """Adds the method ``make(path, weight)`` to every weight ``targets`` picks.

  The engine behind `lorify` and every other method's entry point, a custom
  `Method`'s included (see `jlora.methods.base`): validation (collected,
  raised once), target selection, keys, and the tree rebuild.

  Args:
    params: a tree of arrays (may already hold other adapters): dicts, and
      any pytree node (NamedTuples, dataclasses, ``equinox.Module``\\ s). A
      weight whose holder is not a mapping is replaced by a
      `jlora._tree.Holder` of it and its adapters, which `merge` and `lora`
      turn back into the bare weight. Non-array leaves outside mappings (an
      equinox activation function) are left alone.
    make: ``make(path, weight) -> Method`` for each chosen weight; it may raise
      ``ValueError``, whose message becomes one of the collected problems.
    key: a PRNG key, split over the chosen weights for `Method.create`.
    targets: which weights, in any form `lorify` accepts.
    trainable: leaves to train in full, as in `lorify`.
    dtype: dtype of the new arrays (default: each weight's).
    what: what is being added, for error messages.
    problems: problems already found by the caller, raised with these.

  Returns:
    The tree with the adapters added.

  Raises:
    LoraError: every problem found, at once: bad options, targets that pick
      nothing, keys the method would write that the tree already uses.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> from typing import NamedTuple
    >>> class Layer(NamedTuple):
    ...   weight: jax.Array
    >>> tree = {"layer": Layer(jnp.ones((4, 3)))}
    >>> make = lambda path, w: jlora.LoRA(rank=2, alpha=2.0, weight=path[-1], inputs=1)
    >>> lorified = jlora.add_adapters(tree, make, key=jax.random.key(0),
    ...                               targets=lambda path, leaf: path.endswith("weight"))
    >>> jax.tree.map(jnp.shape, lorified)["layer"].weight
    Holder({'weight': (4, 3), 'weight_lora': LoRA(rank=2, alpha=2, weight='weight'), 'weight_lora_a': (4, 2), 'weight_lora_b': (2, 3)})
    >>> jax.tree.structure(jlora.merge(lorified)) == jax.tree.structure(tree)
    True
  """
  problems = Problems(f"jlora: cannot add {what}") if problems is None else problems
  callers = bool(problems)
  _check_key(key, problems)
  check_dtype(dtype, problems)
  if not callable(make):
    problems.add(f"make: got {make!r}, expected a function (path, weight) -> Method")
    callers = True
  if not check_params(params, problems):
    problems.raise_if_any()
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
  mappings = dict(_tree.iter_mappings(params))
  methods: dict[Path, Method] = {}
  for path, leaf in chosen:
    where = path_str(path)
    holder = mappings.get(path[:-1])
    in_mapping = holder is not None and path[-1] in holder
    if in_mapping and not isinstance(path[-1], str):
      problems.add(f"{where}: key {path[-1]!r} of type {type(path[-1]).__name__}; "
                   "adapter keys are built from the weight's key, so it must be a str: "
                   "rename the key")
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
    if callers:  # the options are bad; `make` would only repeat them
      continue
    try:
      method = make(path if in_mapping else path[:-1] + (str(path[-1]),), leaf)
    except (ValueError, KeyError) as e:
      problems.add(str(e.args[0]) if e.args else str(e))
      continue
    if not isinstance(method, Method):
      problems.add(f"{where}: make returned {type(method).__name__}, expected a "
                   "jlora.Method (such as jlora.LoRA)")
      continue
    if _reserved(holder if in_mapping else {}, path[:-1], method, problems):
      continue
    if (path, method.spec_key) in existing:
      problems.add(f"{where}: already has {existing[(path, method.spec_key)].describe()} "
                   f"adapters ('{method.spec_key}'); merge them first "
                   "(jlora.merge) or adapt another weight")
      continue
    order = sum(1 for (p, _) in existing if p == path)
    methods[path] = dataclasses.replace(method, order=order)
  for mpath in full:
    if mpath not in mappings:
      problems.add(f"{path_str(mpath)}: leaves to train in full must sit in a mapping "
                   "(jlora marks them beside them), and this holder is a "
                   f"{type(_holder_at(params, mpath)).__name__}; train it through "
                   "adapters (targets=) instead")
      continue
    marker = mappings.get(mpath, {}).get(_structure.TRAINABLE_KEY)
    if marker is not None and not isinstance(marker, _structure.FullyTrainable):
      problems.add(f"{path_str(mpath + (_structure.TRAINABLE_KEY,))}: jlora marks leaves "
                   f"trained in full under the key {_structure.TRAINABLE_KEY!r}, but the "
                   "tree already uses it; rename that leaf")
  problems.raise_if_any()

  keys = dict(zip(sorted(methods, key=path_str),
                  jax.random.split(key, max(len(methods), 1))))

  def add(path: Path, mapping: Mapping) -> Mapping:
    items = dict(mapping)
    for k, leaf in mapping.items():
      method = methods.get(path + (k,))
      if method is None:
        continue
      # A quantized weight: the method sees its values (DoRA's norms, PiSSA's
      # SVD); a weight it changes (PiSSA's residual) is quantized again alike.
      values = leaf.dequantize() if _tree.is_quantized(leaf) else leaf
      arrays, new_weight = method.create(keys[path + (k,)], values,
                                         dtype=dtype or leaf.dtype)
      if values is not leaf:
        from jlora.quant._transform import like
        new_weight = leaf if new_weight is values else like(leaf, new_weight)
      items[k] = new_weight
      items[method.spec_key] = method
      items.update(zip(method.leaf_keys, arrays))
    if path in full:
      marker = items.get(_structure.TRAINABLE_KEY)
      keys_ = tuple(sorted(set(full[path]) | set(getattr(marker, "keys", ()))))
      items[_structure.TRAINABLE_KEY] = _structure.FullyTrainable(keys_)
    return _tree.rebuild_mapping(mapping, items)

  def hold(kp, leaf):
    """A weight outside any mapping: a `Holder` of it and its adapters."""
    path = _tree.keypath_to_path(kp)
    method = methods.get(path)
    if method is None or (path[:-1] in mappings and path[-1] in mappings[path[:-1]]):
      return leaf
    arrays, new_weight = method.create(keys[path], leaf, dtype=dtype or leaf.dtype)
    return _tree.Holder({method.weight: new_weight, method.spec_key: method,
                         **dict(zip(method.leaf_keys, arrays))})

  held = jax.tree_util.tree_map_with_path(hold, params, is_leaf=_tree.is_quantized)
  return _tree.map_mappings(held, add)


def _holder_at(tree: Any, path: Path) -> Any:
  for k in path:
    node = _tree.node_children(tree) if not isinstance(tree, Mapping) else (
        list(tree), list(tree.values()), None)
    tree = dict(zip(node[0], node[1]))[k]
  return tree


def _trainable_leaves(candidates, trainable: Targets, problems: Problems) -> list[Path]:
  if isinstance(trainable, str):
    trainable = (trainable,)
  if isinstance(trainable, (list, tuple)):
    names = list(trainable)
    if not names or not all(isinstance(n, str) for n in names):
      problems.add(f"trainable: got {trainable!r}, expected None (nothing trained in "
                   "full), a non-empty sequence of module names such as ('classifier',), "
                   "a compiled regex or a predicate (path, leaf) -> bool")
      return []
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


def check_name(name: Any, problems: Problems) -> None:
  """Adapter names become part of tree keys (``lora@name``)."""
  if not isinstance(name, str) or not name or not all(
      c.isalnum() or c in "-_." for c in name):
    problems.add(f"name must be a non-empty string of letters, digits, '-', '_' "
                 f"or '.', got {name!r}")


def check_flag(value: Any, name: str, problems: Problems) -> None:
  """Flags are bools: ``rslora="yes"`` is a mistake, not a truthy value."""
  if not isinstance(value, bool):
    problems.add(f"{name} must be True or False, got {value!r}")
