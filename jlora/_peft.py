"""PEFT interop: LoRA adapters as ``adapter_config.json`` + ``adapter_model.safetensors``.

The files Hugging Face PEFT writes with ``save_pretrained`` and reads with
``PeftModel.from_pretrained``: one ``LoraConfig`` as JSON, and per adapted
``nn.Linear`` the tensors ``base_model.model.<module>.lora_A.weight``
``(r, in)`` and ``.lora_B.weight`` ``(out, r)`` in torch's ``(out, in)``
layout, i.e. ``Aᵀ`` and ``Bᵀ`` of jlora's ``(in, r)`` / ``(r, out)``.

``<module>`` is the torch module name of each adapted weight. jlora trees
name modules their own way, so a *module-path function* maps the path of the
mapping that holds a kernel (e.g. ``("encoder", "layer_0", "attention",
"query")``) to the torch name (``"encoder.layer.0.attention.self.query"``),
returning None for modules with no torch counterpart. `bert_module_path`
and `llama_module_path` cover the project's ports (experiments/models);
a plain ``{"jlora/path": "torch.name"}`` dict works too.

Scope: LoRA adapters (any name) on 2-D kernels (``Dense``); per-module ranks
and alphas become PEFT's ``rank_pattern`` / ``alpha_pattern``. Stacked,
multi-axis, embedding and conv adapters, and other methods, are reported as
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
from jlora._method import DEFAULT_NAME
from jlora._tree import Path, path_str

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."

ModulePath = Callable[[Path], "str | None"] | Mapping[str, str]

_SKIP = ("params",)  # collection names, not modules


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


def _adapters(params: Any, name: str, problems: Problems):
  base, entries, trained = _structure.read(params, what="the tree to export")
  found = []
  for wpath in sorted(entries, key=path_str):
    for adapter in entries[wpath].adapters:
      m = adapter.method
      if m.adapter_name != name:
        continue
      where = path_str(wpath)
      if not isinstance(m, LoRA):
        problems.add(f"{where}: {m.describe()} has no PEFT LoRA form; export LoRA "
                     "adapters only (jlora.select them)")
      elif m.stack or m.inputs != 1 or entries[wpath].weight.ndim != 2:
        problems.add(f"{where}: weight of shape {tuple(entries[wpath].weight.shape)} "
                     "(stacked or multi-axis); PEFT's nn.Linear LoRA needs a 2-D "
                     "kernel (in, out)")
      elif m.init == "pissa":
        problems.add(f"{where}: a PiSSA adapter belongs to its residual base; export "
                     "the residual base too, or merge it")
      else:
        found.append((wpath, m, adapter.arrays))
  if trained:
    problems.add(f"leaves trained in full {sorted(map(path_str, trained))}: PEFT's "
                 "modules_to_save are not exported; save them separately")
  return base, found


def export_peft(params: Any, directory: str | os.PathLike, *, module_path: ModulePath,
                name: str = DEFAULT_NAME, base_model_name_or_path: str | None = None,
                task_type: str | None = None) -> dict:
  """Writes one adapter in PEFT's format: ``adapter_config.json`` and
  ``adapter_model.safetensors`` (loadable with ``PeftModel.from_pretrained``).

  Args:
    params: a jlora tree with LoRA adapters.
    directory: where to write (created if missing).
    module_path: maps a module's jlora path to its torch name (see the
      module docstring), e.g. `bert_module_path`.
    name: which adapter to export (``"default"``: the unnamed one).
    base_model_name_or_path, task_type: copied into the config.

  Returns:
    The config written, as a dict.

  Raises:
    LoraError: adapters with no PEFT form, or modules the mapping misses.
  """
  from safetensors.numpy import save_file

  problems = Problems("jlora: cannot export the adapter to PEFT")
  _, found = _adapters(params, name, problems)
  resolve = _resolver(module_path)
  if not found and not problems:
    names = sorted({a.method.adapter_name for e in _structure.read(params)[1].values()
                    for a in e.adapters})
    problems.add(f"the tree has no LoRA adapter named {name!r}; adapter names: {names}")
  tensors, ranks, alphas, modules = {}, {}, {}, []
  dropouts, rslora = set(), set()
  for wpath, m, (a, b) in found:
    module = resolve(wpath[:-1])
    if module is None:
      problems.add(f"{path_str(wpath)}: module_path maps {path_str(wpath[:-1])!r} to no "
                   "torch module; extend the mapping")
      continue
    modules.append(module)
    key = PREFIX + module
    tensors[key + ".lora_A.weight"] = np.ascontiguousarray(np.asarray(a).T)
    tensors[key + ".lora_B.weight"] = np.ascontiguousarray(np.asarray(b).T)
    ranks[module], alphas[module] = m.rank, m.alpha
    dropouts.add(m.dropout)
    rslora.add(m.rslora)
  if len(rslora) > 1:
    problems.add("some adapters use rslora and some don't; PEFT has one use_rslora")
  problems.raise_if_any()
  r = max(set(ranks.values()), key=list(ranks.values()).count)
  alpha = max(set(alphas.values()), key=list(alphas.values()).count)
  config = {
      "peft_type": "LORA", "task_type": task_type, "r": r, "lora_alpha": alpha,
      "target_modules": sorted(modules), "lora_dropout": max(dropouts),
      "bias": "none", "fan_in_fan_out": False, "use_rslora": bool(rslora.pop()),
      "use_dora": False, "init_lora_weights": True, "inference_mode": True,
      "modules_to_save": None, "base_model_name_or_path": base_model_name_or_path,
      "rank_pattern": {f"^{re.escape(k)}": v for k, v in ranks.items() if v != r},
      "alpha_pattern": {f"^{re.escape(k)}": v for k, v in alphas.items() if v != alpha},
  }
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


def import_peft(directory: str | os.PathLike, base_params: Any, *,
                module_path: ModulePath, name: str = DEFAULT_NAME, dtype=None) -> Any:
  """Loads a PEFT LoRA adapter onto a jlora base tree.

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
    LoraError: a config that is not plain LoRA (DoRA, bias, fan_in_fan_out),
      tensors that match no module, or shapes that don't fit.

  Example:
    >>> import jax, jax.numpy as jnp, jlora, tempfile
    >>> base = {"m": {"kernel": jnp.ones((4, 3))}}
    >>> p = jlora.lorify(base, 2, key=jax.random.key(0), alpha=4)
    >>> d = tempfile.mkdtemp()
    >>> _ = jlora.export_peft(p, d, module_path={"m": "layer.m"})
    >>> q = jlora.import_peft(d, base, module_path={"m": "layer.m"})
    >>> q["m"]["lora"], bool((q["m"]["lora_a"] == p["m"]["lora_a"]).all())
    (LoRA(rank=2, alpha=4), True)
  """
  from safetensors.numpy import load_file

  problems = Problems(f"jlora: cannot import the PEFT adapter at {directory}")
  with open(os.path.join(directory, CONFIG)) as f:
    config = json.load(f)
  tensors = load_file(os.path.join(directory, WEIGHTS))
  if config.get("peft_type") != "LORA":
    problems.add(f"{CONFIG}: peft_type {config.get('peft_type')!r}; only LORA imports")
  for field, ok in (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none")):
    if config.get(field, ok) != ok:
      problems.add(f"{CONFIG}: {field}={config.get(field)!r} is not supported (need {ok!r})")
  problems.raise_if_any()
  resolve = _resolver(module_path)
  used: set[str] = set()
  plan: dict[Path, tuple[LoRA, np.ndarray, np.ndarray]] = {}
  for mpath, mapping in _tree.iter_mappings(base_params):
    w = mapping.get("kernel")
    if w is None or not _tree.is_array(w) or w.ndim != 2:
      continue
    module = resolve(mpath)
    if module is None:
      continue
    key = PREFIX + module
    ka, kb = key + ".lora_A.weight", key + ".lora_B.weight"
    if ka not in tensors:
      continue
    used.update((ka, kb))
    a, b = tensors[ka].T, tensors[kb].T
    rank = _pattern(config.get("rank_pattern") or {}, module, config["r"])
    alpha = _pattern(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    where = path_str(mpath + ("kernel",))
    if a.shape != (w.shape[0], rank) or b.shape != (rank, w.shape[1]):
      problems.add(f"{where}: lora_A {tensors[ka].shape} / lora_B {tensors[kb].shape} do "
                   f"not fit kernel {tuple(w.shape)} at rank {rank}; the adapter belongs "
                   "to another model")
      continue
    method = LoRA(rank=int(rank), alpha=float(alpha), rslora=bool(config.get("use_rslora")),
                  dropout=float(config.get("lora_dropout") or 0.0), name=name)
    plan[mpath] = (method, a, b)
  unused = sorted(k for k in tensors if k not in used)
  if unused:
    problems.add(f"{len(unused)} tensors match no kernel through module_path, e.g. "
                 f"{unused[:3]}; extend the mapping or use the right base model")
  problems.raise_if_any()

  existing = {p: len(_structure.specs_in(m)) for p, m in _tree.iter_mappings(base_params)}

  def add(mpath: Path, mapping):
    if mpath not in plan:
      return mapping
    method, a, b = plan[mpath]
    w = mapping["kernel"]
    method = dataclasses.replace(method, order=existing.get(mpath, 0))
    items = dict(mapping)
    if method.spec_key in items:
      raise LoraError([f"{path_str(mpath)}: already has {method.spec_key!r}"],
                      header="jlora: import_peft would overwrite an adapter; pass another name")
    items[method.spec_key] = method
    dt = dtype or w.dtype
    items.update(zip(method.leaf_keys, (jnp.asarray(a, dt), jnp.asarray(b, dt))))
    return _tree.rebuild_mapping(mapping, items)

  return _tree.map_mappings(base_params, add)
