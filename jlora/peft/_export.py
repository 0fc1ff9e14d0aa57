"""`export_peft`: one adapter of a jlora tree as a PEFT adapter directory."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from jlora import _structure, _tree
from jlora._add import check_name
from jlora._errors import Problems
from jlora._tree import Path, path_str
from jlora.methods.base import DEFAULT_NAME, Method
from jlora.peft import _arrays, _files, _map


# PEFT task types whose model class saves the head as a module to save.
_HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")


def peft_methods() -> dict[str, type[Method]]:
  """Every method class with a PEFT form, by its prefix (``"lora"``, ...)."""
  found, todo = {}, list(Method.__subclasses__())
  while todo:
    cls = todo.pop()
    todo.extend(cls.__subclasses__())
    if cls.peft_type is not None and "prefix" in cls.__dict__:
      found[cls.prefix] = cls
  return dict(sorted(found.items()))


def _names(methods: dict[str, type[Method]]) -> str:
  """``"DoRA, IA3 or LoRA"``: the methods with a PEFT form, for messages."""
  names = [cls.__name__ for cls in methods.values()]
  return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]


def _per_layer(found, resolve, problems):
  """``(path, method, arrays, weight, target)`` per torch module: a stacked
  weight (``nn.scan``) under a ``{layer}`` rule gives one per layer."""
  for wpath, m, arrays, weight in found:
    target = resolve(wpath)
    if target is None:
      problems.add(f"{path_str(wpath)}: module_path maps {path_str(wpath[:-1])!r} to no "
                   "torch module; extend the mapping")
      continue
    if not m.stack and not target.stacked:
      yield wpath, m, arrays, weight, target
      continue
    layout = target.layout
    if not target.stacked or m.stack != 1 or getattr(m, "layout", ()) or layout.fused \
        or layout.split or layout.order:
      problems.add(f"{path_str(wpath)}: weight of shape {tuple(weight.shape)} with "
                   f"{m.stack} stacked axes; PEFT holds one module per layer: map it with "
                   "a {layer} rule (one stacked axis in front, e.g. \"model.layers.{layer}."
                   "self_attn.q_proj\") or unstack the layers first")
      continue
    one = dataclasses.replace(m, stack=0)
    for layer in range(weight.shape[0]):
      module = target.module.replace("{layer}", str(layer))
      yield (wpath, one, tuple(np.asarray(a)[layer] for a in arrays), weight[layer],
             dataclasses.replace(target, module=module, stacked=False))


def _get(tree: Any, path: Path) -> Any:
  for k in path:
    tree = tree[k]
  return tree


def _select(entries, name, method, methods, problems):
  found = []
  for wpath in sorted(entries, key=path_str):
    weight = entries[wpath].weight
    for adapter in entries[wpath].adapters:
      m = adapter.method
      if m.adapter_name != name or (method is not None and type(m) is not methods[method]):
        continue
      where = path_str(wpath)
      if type(m).peft_type is None:
        problems.add(f"{where}: {m.describe()} has no PEFT form; export "
                     f"{_names(methods)} adapters only (give this one another name)")
      else:
        found.append((wpath, m, adapter.arrays, weight))
  return found


def _check_one_method(found, name, methods, problems) -> None:
  by_kind: dict[str, list[Path]] = {}
  for wpath, m, _, _ in found:
    by_kind.setdefault(m.prefix, []).append(wpath)
  if len(by_kind) < 2:
    return
  parts = []
  by_kind = dict(sorted(by_kind.items(), key=lambda kv: (kv[0] != "lora", kv[0])))
  for kind, paths in by_kind.items():
    more = f" and {len(paths) - 1} more" if len(paths) > 1 else ""
    parts.append(f"{methods[kind].__name__} on {path_str(paths[0])}{more}")
  options = " / ".join(f"method={k!r}" for k in by_kind)
  problems.add(f"adapter {name!r} mixes methods ({'; '.join(parts)}), and a PEFT adapter "
               f"holds one method: export each into its own directory with {options}")


def _fused_parts(base: Any, resolve, module: str, layout, problems):
  """``{part: (path, weight)}`` of every weight of ``base`` in a fused module."""
  parts = {}
  for path, mapping in _tree.iter_mappings(base):
    for k, leaf in mapping.items():
      if not _tree.is_array(leaf) or getattr(leaf, "ndim", 0) < 2:
        continue
      target = resolve(path + (k,))
      if target is not None and target.module == module:
        parts[target.layout.part] = (path + (k,), leaf)
  missing = [p for p in range(layout.parts) if p not in parts]
  if missing:
    problems.add(f"{module}: a fused module of {layout.parts} parts, but the tree has no "
                 f"weight for part(s) {missing}; a PEFT adapter of it needs every part's "
                 "size: map them all")
    return None
  return parts


def export_peft(params: Any, directory: str | os.PathLike, *, module_path: Any,
                name: str = DEFAULT_NAME, method: str | None = None,
                base_model_name_or_path: str | None = None,
                task_type: str | None = None, force: bool = False) -> dict:
  """Writes one adapter in PEFT's format: ``adapter_config.json`` and
  ``adapter_model.safetensors`` (loadable with ``PeftModel.from_pretrained``).

  A LoRA adapter becomes a ``LoraConfig``, a DoRA adapter a ``LoraConfig``
  with ``use_dora: true`` and an (IA)³ adapter an ``IA3Config`` (the layouts
  are in `jlora.peft`). Each method writes its own tensors (its PEFT hooks,
  see `jlora.Method`). Leaves trained in full (``trainable=``) travel as
  PEFT's ``modules_to_save``. A PEFT adapter holds one method, so when the
  adapter ``name`` mixes methods, pick one with ``method`` and export each
  into its own directory. The write is atomic: into a temporary directory
  beside ``directory``, then swapped in.

  One difference to mind: on a model that ties its output projection to the
  embedding (the LLaMA port, Gemma), jlora's embedding adapter changes both
  uses, while PEFT applies a ``lora_embedding`` adapter to the lookup only;
  leave such an embedding out of the adapted weights for a faithful export.

  Args:
    params: a jlora tree with LoRA, DoRA or (IA)³ adapters.
    directory: where to write. It must not exist, be empty, or (with
      ``force=True``) hold a PEFT adapter, which is then replaced.
    module_path: a `jlora.peft.ModuleMap` (e.g. ``jlora.peft.maps.LLAMA``),
      or a function or ``{"jlora/path": "torch.name"}`` dict naming the torch
      module of each jlora module (the mapping that holds the weight).
    name: which adapter to export (``"default"``: the unnamed one).
    method: ``"lora"``, ``"dora"`` or ``"ia3"``: export only that method's
      adapters (None: the adapter's only method).
    base_model_name_or_path: copied into the config.
    task_type: PEFT's task type (default: the map's, if it has one).
    force: replace a PEFT adapter already at ``directory``.

  Returns:
    The config written, as a dict.

  Raises:
    LoraError: adapters with no PEFT form, an adapter that mixes methods
      with no ``method`` chosen, modules the map misses, fused modules it
      cannot write exactly, or a ``directory`` it may not replace.

  Example:
    >>> import jax, jax.numpy as jnp, jlora, tempfile
    >>> base = {"k": {"kernel": jnp.ones((4, 6))}, "ff": {"kernel": jnp.ones((6, 4))}}
    >>> p = jlora.ia3(base, targets=("k", "ff"), feedforward=("ff",))
    >>> p = jlora.lorify(p, 2, key=jax.random.key(0), targets=("k",))
    >>> names = {"k": "layer.k", "ff": "layer.ff"}
    >>> c = jlora.export_peft(p, tempfile.mkdtemp(), module_path=names, method="ia3")
    >>> c["peft_type"], c["target_modules"], c["feedforward_modules"]
    ('IA3', ['layer.ff', 'layer.k'], ['layer.ff'])
    >>> c = jlora.export_peft(p, tempfile.mkdtemp(), module_path=names, method="lora")
    >>> c["peft_type"], c["use_dora"], c["target_modules"]
    ('LORA', False, ['layer.k'])
  """
  params, directory = _tree.params_first(params, directory, fn="export_peft",
                                         tree="params", path="directory")
  problems = Problems("jlora: cannot export the adapter to PEFT")
  methods = peft_methods()
  if method is not None and method not in methods:
    problems.add(f"method={method!r}: choose one of {sorted(methods)} (or None)")
  _map.check_module_path(module_path, problems)
  check_name(name, problems)
  if not isinstance(directory, (str, os.PathLike)):
    problems.add(f"directory must be a path (str or os.PathLike), got {directory!r}")
  if not isinstance(force, bool):
    problems.add(f"force must be True or False, got {force!r}")
  for field, value in (("task_type", task_type),
                       ("base_model_name_or_path", base_model_name_or_path)):
    if value is not None and not isinstance(value, str):
      problems.add(f"{field} must be a string or None, got {value!r}")
  problems.raise_if_any()
  base, entries, trained = _structure.read(params, what="the tree to export")
  found = _select(entries, name, method, methods, problems)
  resolve = _map.as_map(module_path)
  if not found and not problems:
    have = sorted({f"{a.method.adapter_name} ({a.method.describe()})"
                   for e in entries.values() for a in e.adapters})
    what = _names(methods) if method is None else methods[method].__name__
    problems.add(f"the tree has no {what} adapter named {name!r}; adapters: {have}")
  _check_one_method(found, name, methods, problems)
  problems.raise_if_any()

  cls = type(found[0][1])
  modules: dict[str, tuple[Method, tuple, Any]] = {}
  fused: dict[str, dict[int, tuple]] = {}
  for wpath, m, arrays, weight, target in _per_layer(found, resolve, problems):
    layout = target.layout
    if layout.order or layout.inputs:
      have = tuple(getattr(m, "layout", ()) or range(weight.ndim))
      want = tuple(layout.order or range(weight.ndim))
      if have != want or (layout.inputs and m.inputs != layout.inputs):
        ins = list(want[:layout.inputs or m.inputs])
        outs = list(want[layout.inputs or m.inputs:])
        problems.add(f"{path_str(wpath)}: adapted with axes in role order {have} and "
                     f"{m.inputs} input axes, but {target.module} takes axes {want} with "
                     f"{layout.inputs or m.inputs} inputs; add the adapter with "
                     f"axes=jlora.Axes(inputs={tuple(ins)}, outputs={tuple(outs)})")
        continue
    arrays2 = _arrays.to_2d(m, weight.shape, arrays)
    if layout.split:
      n_out = _arrays.weight_2d(_arrays.role_order(m, weight), m.inputs).shape[1]
      k = len(target.parts)
      for module, piece in zip(target.parts, m.peft_split(arrays2, (n_out // k,) * k)):
        modules[module] = (*piece, _map.Layout())
      continue
    if target.layout.fused:
      fused.setdefault(target.module, {})[target.layout.part] = (m, arrays2)
      continue
    if target.module in modules:
      problems.add(f"{path_str(wpath)}: maps to {target.module!r} like another weight; "
                   "each torch module needs its own rule (or a fused layout)")
    modules[target.module] = (m, arrays2, target.layout)
  for module, adapted in fused.items():
    layout = resolve(next(w for w, m, _, _ in found if resolve(w) and
                          resolve(w).module == module)).layout
    parts = _fused_parts(base, resolve, module, layout, problems)
    if parts is None:
      continue
    rows = []
    for p in range(layout.parts):
      path, weight = parts[p]
      m, arrays2 = adapted.get(p, (None, None))
      inputs = m.inputs if m is not None else 1
      w2 = _arrays.weight_2d(_arrays.role_order(m, weight), inputs)
      rows.append((m, arrays2, w2.shape[1], w2))
    try:
      modules[module] = (*cls.peft_fuse(rows), layout)
    except ValueError as e:
      problems.add(f"{module}: cannot write one exact PEFT adapter for this fused module "
                   f"from its parts: {e}")
  problems.raise_if_any()

  tensors = {}
  for module, (m, arrays2, layout) in sorted(modules.items()):
    try:
      for suffix, t in m.peft_tensors(arrays2, embedding=layout.embedding).items():
        tensors[f"{_files.PREFIX}{module}.{suffix}"] = np.ascontiguousarray(np.asarray(t))
    except ValueError as e:
      problems.add(f"{module}: {e}")
  try:
    config = cls.peft_config({module: m for module, (m, _, _) in modules.items()})
  except ValueError as e:
    problems.add(str(e))
    config = {}
  config["target_modules"] = sorted(modules)
  config["fan_in_fan_out"] = any(l.fan_in_fan_out for _, _, l in modules.values())
  saved = _modules_to_save(base, trained, resolve, tensors, problems)
  problems.raise_if_any()
  if task_type is None:
    task_type = getattr(module_path, "task_type", None)
  if task_type in _HEAD_TASKS and not saved:
    problems.add(f"task_type={task_type!r}: PEFT then loads the head from the file "
                 "(modules_to_save), and the tree trains none; train the head "
                 "(trainable=...) or export with task_type=None")
    problems.raise_if_any()
  config.update({"task_type": task_type, "inference_mode": True,
                 "modules_to_save": saved or None,
                 "base_model_name_or_path": base_model_name_or_path})
  _files.write(directory, config, tensors, force=force, problems=problems)
  return config


def _modules_to_save(base, trained: set[Path], resolve, tensors, problems) -> list[str]:
  """PEFT's ``modules_to_save`` tensors for the leaves trained in full."""
  by_mapping: dict[Path, list[str]] = {}
  for path in trained:
    by_mapping.setdefault(path[:-1], []).append(path[-1])
  saved = []
  for mpath, keys in sorted(by_mapping.items(), key=lambda kv: path_str(kv[0])):
    mapping = _get(base, mpath)
    found = next(((k, t) for k in sorted(mapping) if _tree.is_array(mapping[k])
                  and getattr(mapping[k], "ndim", 0) >= 2
                  for t in [resolve(mpath + (k,))] if t is not None), None)
    weight_key, target = found if found else (None, None)
    if target is None or target.layout.fused or target.layout.split:
      problems.add(f"leaves trained in full {sorted(path_str(mpath + (k,)) for k in keys)}: "
                   "module_path maps their module to no (unfused) torch module, so they "
                   "cannot travel as modules_to_save; extend the mapping")
      continue
    names = {weight_key: "weight", "bias": "bias"}
    for k in sorted(keys):
      leaf = np.asarray(mapping[k])
      if k not in names:
        problems.add(f"{path_str(mpath + (k,))}: trained in full, but a "
                     f"{target.layout!r} module has no torch parameter for {k!r}; "
                     "train only its weight and bias")
        continue
      value = target.layout.to_torch(leaf.reshape(-1, leaf.shape[-1])) if leaf.ndim >= 2 \
          else leaf
      tensors[f"{_files.PREFIX}{target.module}.{names[k]}"] = np.ascontiguousarray(value)
    saved.append(target.module)
  return saved
