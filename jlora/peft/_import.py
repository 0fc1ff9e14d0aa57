"""`import_peft`: a PEFT adapter directory onto a jlora base tree."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from jlora import _structure, _targets, _tree
from jlora._add import check_name
from jlora._errors import Problems
from jlora._tree import Path, path_str
from jlora.methods.base import DEFAULT_NAME
from jlora.peft import _arrays, _config, _files, _map
from jlora.peft._export import peft_methods

# Tensor name suffixes PEFT writes; anything else after a module is a
# parameter of a module to save (``weight``, ``bias``).
_ADAPTER_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_embedding_A",
                     "lora_embedding_B", "lora_magnitude_vector", "ia3_l")
_FULL_SUFFIXES = ("base_layer.weight", "weight", "bias")


def _split_key(key: str) -> tuple[str, str] | None:
  if not key.startswith(_files.PREFIX):
    return None
  rest = key[len(_files.PREFIX):]
  for suffix in _ADAPTER_SUFFIXES + _FULL_SUFFIXES:
    if rest.endswith("." + suffix):
      return rest[:-len(suffix) - 1], suffix
  return None


def _index(base: Any, resolve, layers: dict[str, int]) -> dict[str, list[tuple[Path, Any, Any]]]:
  """``{torch module: [(weight path, weight, layout)]}`` over the base tree;
  fills ``layers`` with the layer of each module of a stacked weight."""
  index: dict[str, list] = {}
  for path, mapping in _tree.iter_mappings(base):
    skip = _structure.adapter_keys(mapping)
    for k, leaf in mapping.items():
      if k in skip or not _tree.is_array(leaf) or getattr(leaf, "ndim", 0) < 2:
        continue
      target = resolve(path + (k,))
      if target is None:
        continue
      if target.stacked:
        for layer in range(leaf.shape[0]):
          module = target.module.replace("{layer}", str(layer))
          index.setdefault(module, []).append((path + (k,), leaf, target.layout))
          layers[module] = layer
        continue
      for module in target.parts or (target.module,):
        index.setdefault(module, []).append((path + (k,), leaf, target.layout))
  return index


def _view(weight, layout, tensors: dict) -> tuple[tuple[int, ...], int, tuple[int, int]]:
  """``(role order, inputs, (n_in, n_out))`` of a weight under its map layout."""
  order = tuple(layout.order)
  shape = tuple(weight.shape[k] for k in order) if order else tuple(weight.shape)
  inputs = layout.inputs or _inputs(shape, tensors)
  return order, inputs, (math.prod(shape[:inputs]), math.prod(shape[inputs:]))


def _inputs(shape, tensors: dict) -> int:
  """The number of input axes of a weight: the split whose size PEFT's A has."""
  for key in ("lora_A.weight", "lora_embedding_A"):
    if key in tensors and tensors[key].ndim == 2:
      n_in = tensors[key].shape[1]
      fits = [k for k in range(1, len(shape)) if math.prod(shape[:k]) == n_in]
      if fits:
        return fits[-1]
  return _targets.infer_inputs(shape, 0)


def import_peft(base_params: Any, directory: str | os.PathLike, *, module_path: Any,
                name: str = DEFAULT_NAME, dtype=None) -> Any:
  """Loads a PEFT LoRA, DoRA or IA3 adapter onto a jlora base tree.

  ``peft_type: "LORA"`` becomes `jlora.LoRA` adapters (``lora_a``,
  ``lora_b``), with ``use_dora: true`` `jlora.DoRA` ones (``dora_a``,
  ``dora_b``, ``dora_m``), and ``"IA3"`` `jlora.IA3` vectors (``ia3_l``, on
  the input side for PEFT's ``feedforward_modules``), as `jlora.lorify`,
  `jlora.dora` and `jlora.ia3` would create them; embeddings included
  (``lora_embedding_A``/``_B``). ``modules_to_save`` tensors replace the
  base leaves and are marked trainable (as ``trainable=`` does). A config
  field that jlora does not implement, with a non-default value, is refused
  by name, and every value is checked as `jlora.lorify` checks its own.

  Args:
    base_params: the base tree (may hold other adapters; the new one is
      added after them).
    directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``.
    module_path: as in `export_peft`.
    name: the name to give the adapter.
    dtype: adapter dtype (default: each weight's).

  Returns:
    ``base_params`` with the adapter added.

  Raises:
    LoraError: listing every problem: an unreadable directory or file,
      another PEFT method, config fields jlora cannot follow, bad values,
      tensors that match no module, or shapes that don't fit.

  Example:
    >>> import jax, jax.numpy as jnp, jlora, tempfile
    >>> base = {"m": {"kernel": jnp.ones((4, 3))}}
    >>> p = jlora.lorify(base, 2, key=jax.random.key(0), alpha=4)
    >>> d = tempfile.mkdtemp()
    >>> _ = jlora.export_peft(p, d, module_path={"m": "layer.m"})
    >>> q = jlora.import_peft(base, d, module_path={"m": "layer.m"})
    >>> q["m"]["lora"], bool((q["m"]["lora_a"] == p["m"]["lora_a"]).all())
    (LoRA(rank=2, alpha=4), True)
    >>> p = jlora.dora(base, 2, key=jax.random.key(0))
    >>> _ = jlora.export_peft(p, d, module_path={"m": "layer.m"}, force=True)
    >>> q = jlora.import_peft(base, d, module_path={"m": "layer.m"})
    >>> q["m"]["dora"], q["m"]["dora_m"]
    (DoRA(rank=2, alpha=2), Array([2., 2., 2.], dtype=float32))
  """
  base_params, directory = _tree.params_first(base_params, directory, fn="import_peft",
                                              tree="base_params", path="directory")
  problems = Problems(f"jlora: cannot import the PEFT adapter at {directory}")
  _map.check_module_path(module_path, problems)
  check_name(name, problems)
  if dtype is not None:
    try:
      jnp.dtype(dtype)
    except TypeError:
      problems.add(f"dtype must be a numpy/jax dtype such as jnp.float32, got {dtype!r}")
  config, tensors = _files.read(directory, problems)
  where = os.path.join(str(directory), _files.CONFIG) if isinstance(
      directory, (str, os.PathLike)) else _files.CONFIG
  peft_type = _config.check(config, where, problems) if config is not None else None
  problems.raise_if_any()
  cls = next(c for c in peft_methods().values() if c.peft_reads(config))
  resolve = _map.as_map(module_path)
  layers: dict[str, int] = {}
  index = _index(base_params, resolve, layers)

  by_module: dict[str, dict[str, np.ndarray]] = {}
  unused = []
  for key, t in tensors.items():
    split = _split_key(key)
    if split is None or split[0] not in index:
      unused.append(key)
      continue
    by_module.setdefault(split[0], {})[split[1]] = t

  plan: dict[Path, tuple[Any, tuple]] = {}   # weight path -> (method, arrays)
  full: dict[Path, np.ndarray] = {}          # leaf path -> new value
  trained: set[Path] = set()
  split: dict[Path, dict[str, dict]] = {}    # a split weight -> its modules' tensors
  stacks: dict[Path, dict[int, tuple]] = {}  # a stacked weight -> its layers' tensors
  for module, found in sorted(by_module.items()):
    entries = index[module]
    rest = dict(found)
    for suffix in _FULL_SUFFIXES:
      if suffix in rest:
        _full(module, suffix, rest.pop(suffix), entries, config, full, trained, problems)
    if not rest:
      continue
    wpath, weight, layout = entries[0]
    if module in layers:
      stacks.setdefault(wpath, {})[layers[module]] = (module, rest)
      continue
    if layout.split:
      split.setdefault(wpath, {})[module] = rest
      continue
    if layout.fused:
      _fused(cls, config, module, rest, entries, name, plan, problems)
    else:
      order, inputs, shape = _view(weight, layout, rest)
      try:
        method, arrays2 = cls.from_peft(config, module, rest, shape=shape,
                                        embedding=layout.embedding, name=name)
      except ValueError as e:
        problems.add(f"{path_str(wpath)}: {e}")
        continue
      _place(method, arrays2, wpath, weight, inputs, plan, order=order, problems=problems)
    unused.extend(f"{_files.PREFIX}{module}.{s}" for s in rest)
  for wpath, found in sorted(stacks.items(), key=lambda kv: path_str(kv[0])):
    weight = next(w for path, w, _ in index[found[min(found)][0]] if path == wpath)
    _stacked(cls, config, wpath, weight, found, name, plan, problems)
    unused.extend(f"{_files.PREFIX}{m}.{s}" for m, rest in found.values() for s in rest)
  for wpath, modules in sorted(split.items(), key=lambda kv: path_str(kv[0])):
    weight = next(w for path, w, _ in index[next(iter(modules))] if path == wpath)
    _split(cls, config, wpath, weight, modules, resolve(wpath), name, plan, problems)
    unused.extend(f"{_files.PREFIX}{m}.{s}" for m, rest in modules.items() for s in rest)
  if unused:
    problems.add(f"{len(unused)} tensors match no kernel through module_path, e.g. "
                 f"{sorted(unused)[:3]}; extend the mapping or use the right base model")
  if peft_type is not None and not plan and not full and not problems:
    problems.add("the file's tensors adapt nothing in the tree")
  problems.raise_if_any()
  return _apply(base_params, plan, full, trained, dtype)


def _full(module, suffix, t, entries, config, full, trained, problems) -> None:
  """A whole parameter in the file: a module to save, or a saved embedding."""
  wpath, weight, layout = entries[0]
  if layout.fused or layout.split or layout.order:
    problems.add(f"{module}.{suffix}: a full parameter of a fused module; jlora cannot "
                 "split it over its parts")
    return
  param = "weight" if suffix == "base_layer.weight" else suffix
  path = wpath if param == "weight" else wpath[:-1] + ("bias",)
  if param == "weight":
    value = layout.from_torch(t)
    want = _arrays.weight_2d(np.empty(weight.shape, np.int8), 1).shape
    if value.shape != want and value.size == weight.size:
      value = value.reshape(weight.shape)
    elif value.shape == want:
      value = value.reshape(weight.shape)
    else:
      problems.add(f"{path_str(path)}: {module}.{suffix} {t.shape} does not fit "
                   f"{tuple(weight.shape)}; the adapter belongs to another model")
      return
  else:
    value = t
  full[path] = value
  if suffix != "base_layer.weight":
    saved = config.get("modules_to_save") or []
    if not any(module == s or module.endswith("." + s) for s in saved):
      problems.add(f"{module}.{suffix}: a full parameter of a module not in "
                   f"modules_to_save {saved}; the file is inconsistent")
    trained.add(path)


def _fused(cls, config, module, rest, entries, name, plan, problems) -> None:
  parts = sorted(entries, key=lambda e: e[2].part)
  have = [e[2].part for e in parts]
  if have != list(range(parts[0][2].parts)):
    problems.add(f"{module}: a fused module of {parts[0][2].parts} parts, but the tree "
                 f"maps parts {have} to it; map every part")
    return
  inputs = [_inputs(w.shape, rest) for _, w, _ in parts]
  shapes = [_arrays.weight_2d(np.empty(w.shape, np.int8), k).shape
            for (_, w, _), k in zip(parts, inputs)]
  if len({s[0] for s in shapes}) > 1:
    problems.add(f"{module}: the parts' weights have different input sizes {shapes}")
    return
  sizes = tuple(s[1] for s in shapes)
  try:
    method, arrays2 = cls.from_peft(config, module, rest, shape=(shapes[0][0], sum(sizes)),
                                    embedding=False, name=name)
    pieces = method.peft_split(arrays2, sizes)
  except ValueError as e:
    problems.add(f"{path_str(parts[0][0])} (part of {module}): {e}")
    return
  for (wpath, weight, _), k, (m, arrays) in zip(parts, inputs, pieces):
    _place(m, arrays, wpath, weight, k, plan, problems=problems)


def _split(cls, config, wpath, weight, modules, target, name, plan, problems) -> None:
  """One weight that is several torch modules (``kv_einsum`` -> k_proj, v_proj):
  their adapters, fused into one exact adapter on it."""
  layout, names = target.layout, list(target.parts)
  order, inputs, (n_in, n_out) = _view(weight, layout, next(iter(modules.values())))
  size = n_out // len(names)
  w2 = _arrays.weight_2d(np.asarray(weight).transpose(order) if order else weight, inputs)
  rows = []
  for j, module in enumerate(names):
    part = w2[:, j * size:(j + 1) * size]
    if module not in modules:
      rows.append((None, None, size, part))
      continue
    try:
      m, arrays = cls.from_peft(config, module, modules[module], shape=(n_in, size),
                                embedding=False, name=name)
    except ValueError as e:
      problems.add(f"{path_str(wpath)} ({module}): {e}")
      return
    rows.append((m, arrays, size, part))
  try:
    method, arrays2 = cls.peft_fuse(rows)
  except ValueError as e:
    problems.add(f"{path_str(wpath)}: cannot hold the adapters of {names} as one exact "
                 f"adapter: {e}")
    return
  _place(method, arrays2, wpath, weight, inputs, plan, order=order, problems=problems)


def _stacked(cls, config, wpath, weight, found, name, plan, problems) -> None:
  """One adapter per layer (``model.layers.{layer}...``) -> one adapter on the
  stacked weight; every layer must have one, with the same settings."""
  n_layers = weight.shape[0]
  missing = [l for l in range(n_layers) if l not in found]
  if missing:
    problems.add(f"{path_str(wpath)}: the file adapts layers {sorted(found)} of this "
                 f"stacked weight's {n_layers}, and a stacked adapter needs all; import "
                 "onto an unstacked tree, or adapt every layer")
    return
  layer_shape = tuple(weight.shape[1:])
  inputs = _inputs(layer_shape, found[0][1])
  n_in, n_out = math.prod(layer_shape[:inputs]), math.prod(layer_shape[inputs:])
  methods, arrays = [], []
  for layer in range(n_layers):
    module, rest = found[layer]
    try:
      m, arrays2 = cls.from_peft(config, module, rest, shape=(n_in, n_out), embedding=False,
                                 name=name)
    except ValueError as e:
      problems.add(f"{path_str(wpath)} (layer {layer}): {e}")
      return
    m = dataclasses.replace(m, weight=wpath[-1], stack=0, inputs=inputs)
    methods.append(m)
    arrays.append(_arrays.from_2d(m, layer_shape, arrays2))
  if any(m != methods[0] for m in methods):
    problems.add(f"{path_str(wpath)}: the layers' adapters differ "
                 f"({sorted({m.describe() for m in methods})}), and one stacked adapter "
                 "has one rank and alpha; import onto an unstacked tree")
    return
  method = dataclasses.replace(methods[0], stack=1)
  plan[wpath] = (method, tuple(np.stack(a) for a in zip(*arrays)))


def _place(method, arrays2, wpath, weight, inputs, plan, *, order=(), problems=None) -> None:
  changes = dict(weight=wpath[-1], stack=0, inputs=inputs)
  if order:
    changes["layout"] = tuple(order)
  try:
    method = dataclasses.replace(method, **changes)
  except TypeError:
    problems.add(f"{path_str(wpath)}: the map gives this weight the axis order {order}, "
                 "and this jlora's methods have no axis layout")
    return
  plan[wpath] = (method, _arrays.from_2d(method, weight.shape, arrays2))


def _apply(base_params, plan, full, trained, dtype):
  existing = {p: len(_structure.specs_in(m)) for p, m in _tree.iter_mappings(base_params)}
  clashes = []

  def add(mpath: Path, mapping):
    items = dict(mapping)
    changed = False
    for k, value in list(items.items()):
      if mpath + (k,) in full:
        old = items[k]
        items[k] = jnp.asarray(full[mpath + (k,)], getattr(old, "dtype", None))
        changed = True
    keys = tuple(sorted(k for k in items if mpath + (k,) in trained))
    if keys:
      marker = items.get(_structure.TRAINABLE_KEY)
      keys = tuple(sorted(set(keys) | set(getattr(marker, "keys", ()))))
      items[_structure.TRAINABLE_KEY] = _structure.FullyTrainable(keys)
      changed = True
    for k in list(mapping):
      if mpath + (k,) not in plan:
        continue
      method, arrays = plan[mpath + (k,)]
      method = dataclasses.replace(method, order=existing.get(mpath, 0))
      if method.spec_key in items:
        clashes.append(f"{path_str(mpath)}: already has {method.spec_key!r}; import "
                       "under another name=")
        continue
      items[method.spec_key] = method
      dt = dtype or mapping[k].dtype
      items.update(zip(method.leaf_keys, (jnp.asarray(x, dt) for x in arrays)))
      changed = True
    return _tree.rebuild_mapping(mapping, items) if changed else mapping

  out = _tree.map_mappings(base_params, add)
  if clashes:
    problems = Problems("jlora: import_peft would overwrite an adapter")
    for c in clashes:
      problems.add(c)
    problems.raise_if_any()
  return out
