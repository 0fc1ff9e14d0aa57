"""PEFT interop: LoRA, DoRA and IA3 adapters as ``adapter_config.json`` +
``adapter_model.safetensors``.

The files Hugging Face PEFT writes with ``save_pretrained`` and reads with
``PeftModel.from_pretrained``: one config as JSON, and per adapted
``nn.Linear`` tensors named ``base_model.model.<module>.<tensor>`` in torch's
``(out, in)`` layout (jlora kernels are ``(in, out)``):

* LoRA (``LoraConfig``, ``peft_type: "LORA"``): ``lora_A.weight`` ``(r, in)``
  and ``lora_B.weight`` ``(out, r)``, i.e. ``Aᵀ`` and ``Bᵀ`` of jlora's
  ``(in, r)`` / ``(r, out)``.
* DoRA (``"LORA"`` with ``use_dora: true``): the same two plus
  ``lora_magnitude_vector`` ``(out,)``, jlora's ``dora_m`` as it is. Both
  divide by the norm of ``W + s·A·B`` per output unit (PEFT: per row of its
  ``(out, in)`` weight; jlora: over the input axes).
* IA3 (``IA3Config``, ``peft_type: "IA3"``): ``ia3_l`` ``(out, 1)``, or
  ``(1, in)`` for the modules in ``feedforward_modules`` (jlora's
  ``IA3(feedforward=True)``, scaling the input). PEFT scales the bias of an
  output-side module too, jlora does not (see `jlora.IA3`): the two agree on
  modules without bias (LLaMA) and differ by ``(l − 1)·bias`` otherwise.

``<module>`` is the torch module name of each adapted weight. jlora trees
name modules their own way, so a *module-path function* maps the path of the
mapping that holds a kernel (e.g. ``("encoder", "layer_0", "attention",
"query")``) to the torch name (``"encoder.layer.0.attention.self.query"``),
returning None for modules with no torch counterpart. `bert_module_path`
and `llama_module_path` cover the project's ports (experiments/models);
a plain ``{"jlora/path": "torch.name"}`` dict works too.

Scope: one adapter (any name) of one method, LoRA, DoRA or IA3, on 2-D
kernels (``Dense``); per-module ranks and alphas become PEFT's
``rank_pattern`` / ``alpha_pattern``. A PEFT adapter holds a single method,
so an adapter name that mixes methods is exported one method at a time
(``method=``). Stacked, multi-axis, embedding and conv adapters, PiSSA, other
methods and fully trained leaves (``modules_to_save``) are reported as
problems.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jlora import _structure, _tree
from jlora._errors import LoraError, Problems
from jlora._lora import LoRA
from jlora._method import DEFAULT_NAME, Method
from jlora._methods import IA3, DoRA
from jlora._tree import Path, path_str

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."

ModulePath = Callable[[Path], "str | None"] | Mapping[str, str]

_SKIP = ("params",)  # collection names, not modules
# The methods a PEFT file can hold, by the `method=` value that selects them.
_METHODS: dict[str, type[Method]] = {"lora": LoRA, "dora": DoRA, "ia3": IA3}


def _strip(path: Path) -> list[str]:
  parts = [str(p) for p in path]
  while parts and parts[0] in _SKIP:
    parts = parts[1:]
  return parts


def bert_module_path(path: Path) -> str | None:
  """jlora path of a BERT-port module -> Hugging Face ``BertModel`` name.

  ``encoder/layer_3/attention/query`` -> ``encoder.layer.3.attention.self.query``;
  ``attention/out`` -> ``attention.output.dense``; ``intermediate`` ->
  ``intermediate.dense``; ``output`` -> ``output.dense``. A leading ``bert``
  (the classifier tree) stays: ``bert.encoder...``, as in
  ``BertForSequenceClassification``. Anything else (embeddings, the head):
  None.

  >>> bert_module_path(("params", "encoder", "layer_0", "attention", "out"))
  'encoder.layer.0.attention.output.dense'
  """
  parts = _strip(path)
  head = []
  if parts[:1] == ["bert"]:
    head, parts = ["bert"], parts[1:]
  if len(parts) < 3 or parts[0] != "encoder" or not re.fullmatch(r"layer_\d+", parts[1]):
    return None
  layer = f"encoder.layer.{parts[1][6:]}"
  rest = parts[2:]
  table = {("attention", "query"): "attention.self.query",
           ("attention", "key"): "attention.self.key",
           ("attention", "value"): "attention.self.value",
           ("attention", "out"): "attention.output.dense",
           ("intermediate",): "intermediate.dense",
           ("output",): "output.dense"}
  name = table.get(tuple(rest))
  return None if name is None else ".".join(head + [layer, name])


def llama_module_path(path: Path) -> str | None:
  """jlora path of a LLaMA-port module -> Hugging Face ``LlamaForCausalLM`` name.

  >>> llama_module_path(("params", "model", "layers_2", "self_attn", "q_proj"))
  'model.layers.2.self_attn.q_proj'
  """
  parts = _strip(path)
  if len(parts) != 4 or parts[0] != "model" or not re.fullmatch(r"layers_\d+", parts[1]):
    return None
  if parts[2] not in ("self_attn", "mlp"):
    return None
  return ".".join(["model", "layers", parts[1][7:], parts[2], parts[3]])


def _resolver(module_path: ModulePath) -> Callable[[Path], str | None]:
  if isinstance(module_path, Mapping):
    table = dict(module_path)
    return lambda p: table.get(path_str(p))
  return module_path


def _kind(m: Method) -> str:
  """The `method=` value of an exportable method: ``"lora"``, ``"dora"``, ``"ia3"``."""
  return next(k for k, cls in _METHODS.items() if type(m) is cls)


def _adapters(params: Any, name: str, method: str | None, problems: Problems):
  base, entries, trained = _structure.read(params, what="the tree to export")
  found = []
  for wpath in sorted(entries, key=path_str):
    for adapter in entries[wpath].adapters:
      m = adapter.method
      if m.adapter_name != name or (method is not None and type(m) is not _METHODS[method]):
        continue
      where = path_str(wpath)
      if type(m) not in _METHODS.values():
        problems.add(f"{where}: {m.describe()} has no PEFT form; export LoRA, DoRA or "
                     "IA3 adapters only (give this one another name)")
      elif m.stack or m.inputs != 1 or entries[wpath].weight.ndim != 2:
        problems.add(f"{where}: weight of shape {tuple(entries[wpath].weight.shape)} "
                     f"(stacked or multi-axis); PEFT's nn.Linear {m.describe()} needs a "
                     "2-D kernel (in, out)")
      elif isinstance(m, LoRA) and m.init == "pissa":
        problems.add(f"{where}: a PiSSA adapter belongs to its residual base; export "
                     "the residual base too, or merge it")
      else:
        found.append((wpath, m, adapter.arrays))
  if trained:
    problems.add(f"leaves trained in full {sorted(map(path_str, trained))}: PEFT's "
                 "modules_to_save are not exported; save them separately")
  return base, entries, found


def _check_one_method(found, name: str, problems: Problems) -> None:
  """One PEFT adapter holds one method; names the weights of each one found."""
  by_kind: dict[str, list[Path]] = {k: [] for k in _METHODS}
  for wpath, m, _ in found:
    by_kind[_kind(m)].append(wpath)
  by_kind = {k: paths for k, paths in by_kind.items() if paths}
  if len(by_kind) < 2:
    return
  parts = []
  for kind, paths in by_kind.items():
    more = f" and {len(paths) - 1} more" if len(paths) > 1 else ""
    parts.append(f"{_METHODS[kind].__name__} on {path_str(paths[0])}{more}")
  options = " / ".join(f"method={k!r}" for k in by_kind)
  problems.add(f"adapter {name!r} mixes methods ({'; '.join(parts)}), and a PEFT adapter "
               f"holds one method: export each into its own directory with {options}")


def _lora_config(found, modules: list[str], dora: bool, problems: Problems) -> dict:
  ranks = {mod: m.rank for mod, (_, m, _) in zip(modules, found)}
  alphas = {mod: m.alpha for mod, (_, m, _) in zip(modules, found)}
  rslora = {m.rslora for _, m, _ in found}
  if len(rslora) > 1:
    problems.add("some adapters use rslora and some don't; PEFT has one use_rslora")
  r = max(set(ranks.values()), key=list(ranks.values()).count)
  alpha = max(set(alphas.values()), key=list(alphas.values()).count)
  return {
      "peft_type": "LORA", "r": r, "lora_alpha": alpha,
      "target_modules": sorted(modules),
      "lora_dropout": max(m.dropout for _, m, _ in found),
      "bias": "none", "fan_in_fan_out": False, "use_rslora": bool(max(rslora)),
      "use_dora": dora, "init_lora_weights": True,
      "rank_pattern": {f"^{re.escape(k)}": v for k, v in ranks.items() if v != r},
      "alpha_pattern": {f"^{re.escape(k)}": v for k, v in alphas.items() if v != alpha},
  }


def _ia3_config(found, modules: list[str], problems: Problems) -> dict:
  feedforward = sorted(mod for mod, (_, m, _) in zip(modules, found) if m.feedforward)
  config = {"peft_type": "IA3", "target_modules": sorted(modules),
            "feedforward_modules": feedforward, "fan_in_fan_out": False,
            "init_ia3_weights": True}
  for mod, (wpath, m, _) in zip(modules, found):
    if _is_feedforward(config, mod) != m.feedforward:
      problems.add(f"{path_str(wpath)}: PEFT would scale {mod!r} on the "
                   f"{'input' if not m.feedforward else 'output'} side (it matches "
                   "feedforward_modules by name suffix, and the torch names clash); map "
                   "the modules to their full, distinct torch names")
  return config


def export_peft(params: Any, directory: str | os.PathLike, *, module_path: ModulePath,
                name: str = DEFAULT_NAME, method: str | None = None,
                base_model_name_or_path: str | None = None,
                task_type: str | None = None) -> dict:
  """Writes one adapter in PEFT's format: ``adapter_config.json`` and
  ``adapter_model.safetensors`` (loadable with ``PeftModel.from_pretrained``).

  A LoRA adapter becomes a ``LoraConfig``, a DoRA adapter a ``LoraConfig``
  with ``use_dora: true`` and an (IA)³ adapter an ``IA3Config`` (layouts in
  the module docstring). A PEFT adapter holds one method, so when the
  adapter ``name`` mixes methods, pick one with ``method`` and export each
  into its own directory.

  Args:
    params: a jlora tree with LoRA, DoRA or (IA)³ adapters.
    directory: where to write (created if missing).
    module_path: maps a module's jlora path to its torch name (see the
      module docstring), e.g. `bert_module_path`.
    name: which adapter to export (``"default"``: the unnamed one).
    method: ``"lora"``, ``"dora"`` or ``"ia3"``: export only that method's
      adapters (None: the adapter's only method).
    base_model_name_or_path, task_type: copied into the config.

  Returns:
    The config written, as a dict.

  Raises:
    LoraError: adapters with no PEFT form, an adapter that mixes methods
      with no ``method`` chosen, or modules the mapping misses.

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
  from safetensors.numpy import save_file

  problems = Problems("jlora: cannot export the adapter to PEFT")
  if method is not None and method not in _METHODS:
    problems.add(f"method={method!r}: choose one of {sorted(_METHODS)} (or None)")
    problems.raise_if_any()
  _, entries, found = _adapters(params, name, method, problems)
  resolve = _resolver(module_path)
  if not found and not problems:
    have = sorted({f"{a.method.adapter_name} ({a.method.describe()})"
                   for e in entries.values() for a in e.adapters})
    what = "LoRA, DoRA or IA3" if method is None else _METHODS[method].__name__
    problems.add(f"the tree has no {what} adapter named {name!r}; adapters: {have}")
  _check_one_method(found, name, problems)
  tensors, modules, kept = {}, [], []
  for wpath, m, arrays in found:
    module = resolve(wpath[:-1])
    if module is None:
      problems.add(f"{path_str(wpath)}: module_path maps {path_str(wpath[:-1])!r} to no "
                   "torch module; extend the mapping")
      continue
    modules.append(module)
    kept.append((wpath, m, arrays))
    key = PREFIX + module
    arrays = [np.asarray(x) for x in arrays]
    if isinstance(m, IA3):
      shape = (1, -1) if m.feedforward else (-1, 1)  # (1, in) / (out, 1)
      tensors[key + ".ia3_l"] = np.ascontiguousarray(arrays[0].reshape(shape))
      continue
    tensors[key + ".lora_A.weight"] = np.ascontiguousarray(arrays[0].T)
    tensors[key + ".lora_B.weight"] = np.ascontiguousarray(arrays[1].T)
    if isinstance(m, DoRA):
      tensors[key + ".lora_magnitude_vector"] = np.ascontiguousarray(arrays[2])
  problems.raise_if_any()
  if isinstance(kept[0][1], IA3):
    config = _ia3_config(kept, modules, problems)
  else:
    config = _lora_config(kept, modules, isinstance(kept[0][1], DoRA), problems)
  problems.raise_if_any()
  config.update({"task_type": task_type, "inference_mode": True, "modules_to_save": None,
                 "base_model_name_or_path": base_model_name_or_path})
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, CONFIG), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  save_file(tensors, os.path.join(directory, WEIGHTS), metadata={"format": "pt"})
  return config


def _pattern(patterns: Mapping[str, Any], module: str, default):
  """PEFT's ``get_pattern_key``: a key matching the end of the module name."""
  for key, value in patterns.items():
    if re.match(rf"(.*\.)?({key})$", module):
      return value
  return default


def _is_feedforward(config: Mapping[str, Any], module: str) -> bool:
  """PEFT's IA3 rule: a regex string must match the whole name, a list entry
  its end."""
  feedforward = config.get("feedforward_modules") or []
  if isinstance(feedforward, str):
    return re.fullmatch(feedforward, module) is not None
  return any(module.endswith(t) for t in feedforward)


def _read_config(config: Mapping[str, Any], problems: Problems) -> str | None:
  """The method a PEFT config holds (``"lora"``, ``"dora"``, ``"ia3"``)."""
  peft_type = config.get("peft_type")
  if peft_type == "LORA":
    kind = "dora" if config.get("use_dora") else "lora"
    fields = (("fan_in_fan_out", False), ("bias", "none"), ("lora_bias", False))
  elif peft_type == "IA3":
    kind, fields = "ia3", (("fan_in_fan_out", False),)
  else:
    problems.add(f"{CONFIG}: peft_type {peft_type!r}; only LORA (plain or use_dora) and "
                 "IA3 import")
    return None
  for field, ok in fields:
    if config.get(field, ok) != ok:
      problems.add(f"{CONFIG}: {field}={config.get(field)!r} is not supported (need {ok!r})")
  return kind


def import_peft(directory: str | os.PathLike, base_params: Any, *,
                module_path: ModulePath, name: str = DEFAULT_NAME, dtype=None) -> Any:
  """Loads a PEFT LoRA, DoRA or IA3 adapter onto a jlora base tree.

  ``peft_type: "LORA"`` becomes `jlora.LoRA` adapters (``lora_a``,
  ``lora_b``), with ``use_dora: true`` `jlora.DoRA` ones (``dora_a``,
  ``dora_b``, ``dora_m``), and ``"IA3"`` `jlora.IA3` vectors (``ia3_l``, on
  the input side for PEFT's ``feedforward_modules``), as `jlora.lorify`,
  `jlora.dora` and `jlora.ia3` would create them.

  Args:
    directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``.
    base_params: the base tree (may hold other adapters; the new one is
      added after them).
    module_path: as in `export_peft`.
    name: the name to give the adapter.
    dtype: adapter dtype (default: each weight's).

  Returns:
    ``base_params`` with the adapter added.

  Raises:
    LoraError: another PEFT method, a config jlora cannot follow (bias,
      lora_bias, fan_in_fan_out), tensors that match no module, or shapes
      that don't fit.

  Example:
    >>> import jax, jax.numpy as jnp, jlora, tempfile
    >>> base = {"m": {"kernel": jnp.ones((4, 3))}}
    >>> p = jlora.lorify(base, 2, key=jax.random.key(0), alpha=4)
    >>> d = tempfile.mkdtemp()
    >>> _ = jlora.export_peft(p, d, module_path={"m": "layer.m"})
    >>> q = jlora.import_peft(d, base, module_path={"m": "layer.m"})
    >>> q["m"]["lora"], bool((q["m"]["lora_a"] == p["m"]["lora_a"]).all())
    (LoRA(rank=2, alpha=4), True)
    >>> p = jlora.dora(base, 2, key=jax.random.key(0))
    >>> _ = jlora.export_peft(p, d, module_path={"m": "layer.m"})
    >>> q = jlora.import_peft(d, base, module_path={"m": "layer.m"})
    >>> q["m"]["dora"], q["m"]["dora_m"]
    (DoRA(rank=2, alpha=2.0, ...), Array([2., 2., 2.], dtype=float32))
  """
  from safetensors.numpy import load_file

  problems = Problems(f"jlora: cannot import the PEFT adapter at {directory}")
  with open(os.path.join(directory, CONFIG)) as f:
    config = json.load(f)
  tensors = load_file(os.path.join(directory, WEIGHTS))
  kind = _read_config(config, problems)
  problems.raise_if_any()
  resolve = _resolver(module_path)
  used: set[str] = set()
  plan: dict[Path, tuple[Method, tuple[np.ndarray, ...]]] = {}
  for mpath, mapping in _tree.iter_mappings(base_params):
    w = mapping.get("kernel")
    if w is None or not _tree.is_array(w) or w.ndim != 2:
      continue
    module = resolve(mpath)
    if module is None:
      continue
    key = PREFIX + module
    where = path_str(mpath + ("kernel",))
    n_in, n_out = w.shape
    if kind == "ia3":
      kl = key + ".ia3_l"
      if kl not in tensors:
        continue
      used.add(kl)
      ff = _is_feedforward(config, module)
      want = (1, n_in) if ff else (n_out, 1)
      if tensors[kl].shape != want:
        side = "a feedforward (input-side)" if ff else "an output-side"
        problems.add(f"{where}: ia3_l {tensors[kl].shape} does not fit kernel "
                     f"{tuple(w.shape)} as {side} module (expected {want}); the adapter "
                     "belongs to another model, or feedforward_modules does not match")
        continue
      plan[mpath] = (IA3(feedforward=ff, name=name), (tensors[kl].reshape(-1),))
      continue
    ka, kb, km = key + ".lora_A.weight", key + ".lora_B.weight", key + ".lora_magnitude_vector"
    if ka not in tensors:
      continue
    needed = (ka, kb, km) if kind == "dora" else (ka, kb)
    used.update(needed)
    missing = [k for k in needed if k not in tensors]
    if missing:
      problems.add(f"{where}: {missing} missing beside {ka}; the file is incomplete")
      continue
    rank = _pattern(config.get("rank_pattern") or {}, module, config["r"])
    alpha = _pattern(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    a, b = tensors[ka].T, tensors[kb].T
    if a.shape != (n_in, rank) or b.shape != (rank, n_out):
      problems.add(f"{where}: lora_A {tensors[ka].shape} / lora_B {tensors[kb].shape} do "
                   f"not fit kernel {tuple(w.shape)} at rank {rank}; the adapter belongs "
                   "to another model")
      continue
    options = dict(rank=int(rank), alpha=float(alpha), rslora=bool(config.get("use_rslora")),
                   dropout=float(config.get("lora_dropout") or 0.0), name=name)
    if kind == "lora":
      plan[mpath] = (LoRA(**options), (a, b))
      continue
    m = tensors[km]
    if m.shape != (n_out,):
      problems.add(f"{where}: lora_magnitude_vector {m.shape} does not fit kernel "
                   f"{tuple(w.shape)} (expected ({n_out},), one per output); the adapter "
                   "belongs to another model")
      continue
    plan[mpath] = (DoRA(**options), (a, b, m))
  unused = sorted(k for k in tensors if k not in used)
  if unused:
    problems.add(f"{len(unused)} tensors match no kernel through module_path, e.g. "
                 f"{unused[:3]}; extend the mapping or use the right base model")
  problems.raise_if_any()

  existing = {p: len(_structure.specs_in(m)) for p, m in _tree.iter_mappings(base_params)}

  def add(mpath: Path, mapping):
    if mpath not in plan:
      return mapping
    method, arrays = plan[mpath]
    w = mapping["kernel"]
    method = dataclasses.replace(method, order=existing.get(mpath, 0))
    items = dict(mapping)
    if method.spec_key in items:
      raise LoraError([f"{path_str(mpath)}: already has {method.spec_key!r}"],
                      header="jlora: import_peft would overwrite an adapter; pass another name")
    items[method.spec_key] = method
    dt = dtype or w.dtype
    items.update(zip(method.leaf_keys, (jnp.asarray(x, dt) for x in arrays)))
    return _tree.rebuild_mapping(mapping, items)

  return _tree.map_mappings(base_params, add)
