"""Naming modules: which weight of a jlora tree is which torch module of PEFT.

A `ModuleMap` is an ordered list of `Rule`\\ s, each a template over the
``/``-joined path of a weight in the jlora tree and a template of the torch
module name, with ``{name}`` placeholders shared by both (``{name}`` is one
path component; ``{name:a|b}`` one of the listed words), and a `Layout` that
says how the weight's axes sit in torch. The first rule that matches wins, and
a leading ``params/`` (Linen's collection) is optional.

>>> m = ModuleMap((Rule("model/layers_{i}/mlp/{proj:up|down}/kernel",
...                     "model.layers.{i}.mlp.{proj}_proj"),))
>>> t = m.resolve(("params", "model", "layers_3", "mlp", "up", "kernel"))
>>> t.module, t.layout
('model.layers.3.mlp.up_proj', Linear())
>>> m.tree_path("model.layers.3.mlp.down_proj", "weight")
('model', 'layers_3', 'mlp', 'down', 'kernel')
>>> m.resolve(("model", "layers_3", "mlp", "gate", "kernel")) is None
True
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jlora._tree import Path, path_str

_PLACEHOLDER = re.compile(r"\{(\w+)(?::([^}]*))?\}")


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a weight of the jlora tree sits in its torch module.

  Attributes:
    embedding: the torch module is an ``nn.Embedding`` (PEFT's
      ``lora_embedding_A``/``lora_embedding_B``), not a linear layer.
    fan_in_fan_out: the torch weight is stored ``(in, out)``, as
      ``transformers``' ``Conv1D`` (GPT-2) does; PEFT's ``fan_in_fan_out``.
    part, parts: this weight is output slice ``part`` of ``parts`` of one
      fused torch module (``qkv_proj``, ``c_attn``, ``gate_up_proj``), in
      order; all parts must be in the tree. ``parts=1``: not fused.
    order, inputs: for a kernel whose axes are not inputs-then-outputs (the
      Gemma library's einsums, ``(heads, d, head_dim)``): its axes in role
      order, inputs first (as `jlora.Method`'s ``layout``, e.g. ``(1, 0, 2)``),
      and how many are inputs. Adapters on it must have this layout
      (``jlora.Axes(inputs=(1,), outputs=(0, 2))``); import gives them it.
    split: the reverse of fused: this one weight is several torch modules,
      one per slice of its first output axis, named by the ``{part}``
      placeholder of the torch template (``("k_proj", "v_proj")``).
  """

  embedding: bool = False
  fan_in_fan_out: bool = False
  part: int = 0
  parts: int = 1
  order: tuple[int, ...] = ()
  inputs: int = 0
  split: tuple[str, ...] = ()

  def __repr__(self):
    name = "Embedding" if self.embedding else "Conv1D" if self.fan_in_fan_out else "Linear"
    fields = [f"part={self.part}, parts={self.parts}"] if self.parts > 1 else []
    fields += [f"order={self.order}"] if self.order else []
    fields += [f"inputs={self.inputs}"] if self.inputs else []
    fields += [f"split={self.split}"] if self.split else []
    return f"{name}({', '.join(fields)})"

  @property
  def fused(self) -> bool:
    return self.parts > 1

  def to_torch(self, weight2d: np.ndarray) -> np.ndarray:
    """The torch weight of a 2-D ``(in, out)`` jlora weight."""
    return weight2d if self.embedding or self.fan_in_fan_out else weight2d.T

  def from_torch(self, weight: np.ndarray) -> np.ndarray:
    """The 2-D ``(in, out)`` weight of a torch weight."""
    return weight if self.embedding or self.fan_in_fan_out else weight.T

  @property
  def params(self) -> dict[str, str]:
    """The jlora leaf name of each torch parameter name."""
    return {"weight": "embedding" if self.embedding else "kernel", "bias": "bias"}


def Linear(*, part: int = 0, parts: int = 1, order: tuple[int, ...] = (), inputs: int = 0,
           split: tuple[str, ...] = ()) -> Layout:  # noqa: N802 - a layout name
  """``nn.Linear``: torch weight ``(out, in)``; the jlora kernel ``(*in, *out)``
  (or any axis order, with ``order`` and ``inputs``; see `Layout`)."""
  return Layout(part=part, parts=parts, order=tuple(order), inputs=inputs, split=tuple(split))


def Conv1D(*, part: int = 0, parts: int = 1) -> Layout:  # noqa: N802
  """``transformers``' ``Conv1D`` (GPT-2): torch weight ``(in, out)``."""
  return Layout(fan_in_fan_out=True, part=part, parts=parts)


def Embedding() -> Layout:  # noqa: N802
  """``nn.Embedding``: torch weight ``(vocab, features)``, as Flax's ``embedding``."""
  return Layout(embedding=True)


@dataclasses.dataclass(frozen=True)
class Target:
  """Where one jlora leaf lives in torch: module name, layout, parameter."""

  module: str
  layout: Layout
  param: str = "weight"
  parts: tuple[str, ...] = ()  # the torch modules of a split layout, in order
  stacked: bool = False  # ``module`` has a ``{layer}``: the weight's first axis


def _choices(*templates: str) -> dict[str, str]:
  """``{placeholder: "a|b"}`` for the placeholders restricted in any template."""
  return {m.group(1): m.group(2) for t in templates for m in _PLACEHOLDER.finditer(t)
          if m.group(2)}


def _compile(template: str, sep: str, restricted: dict[str, str]) -> tuple[re.Pattern, list[str]]:
  names, out, pos = [], [], 0
  for m in _PLACEHOLDER.finditer(template):
    out.append(re.escape(template[pos:m.start()]))
    name = m.group(1)
    choices = m.group(2) or restricted.get(name)
    names.append(name)
    if choices:
      alts = "|".join(re.escape(c) for c in choices.split("|"))
      out.append(f"(?P<{name}>{alts})")
    else:
      out.append(f"(?P<{name}>[^{re.escape(sep)}]+)")
    pos = m.end()
  out.append(re.escape(template[pos:]))
  return re.compile("".join(out)), names


@dataclasses.dataclass(frozen=True)
class Rule:
  """One line of a `ModuleMap`: a jlora weight path <-> a torch module name.

  Attributes:
    tree: template of the weight's ``/``-joined path in the jlora tree
      (without ``params/``), e.g. ``"model/layers_{i}/self_attn/{p}/kernel"``.
    torch: template of the torch module name, e.g.
      ``"model.layers.{i}.self_attn.{p}"``; every placeholder of ``tree``.
      A ``{layer}`` that ``tree`` lacks marks a stacked weight (``nn.scan``):
      its first axis is the layer, one torch module per entry.
    layout: `Linear` (the default), `Conv1D`, `Embedding`, or a fused part.
  """

  tree: str
  torch: str
  layout: Layout = Layout()

  def __post_init__(self):
    restricted = _choices(self.tree, self.torch)
    if self.layout.split:
      restricted["part"] = "|".join(self.layout.split)
    tree_re, tree_names = _compile(self.tree, "/", restricted)
    torch_re, torch_names = _compile(self.torch, ".", restricted)
    if self.layout.split and "part" not in torch_names:
      raise ValueError(f"Rule({self.tree!r}, {self.torch!r}): a split layout names its "
                       "torch modules with a {part} placeholder in the torch template")
    if self.layout.split:
      torch_names = [n for n in torch_names if n != "part"]
    stacked = "layer" in torch_names and "layer" not in tree_names
    if stacked:
      torch_names = [n for n in torch_names if n != "layer"]
    object.__setattr__(self, "stacked", stacked)
    if sorted(set(tree_names)) != sorted(set(torch_names)):
      raise ValueError(f"Rule({self.tree!r}, {self.torch!r}): both templates must use "
                       f"the same placeholders, got {tree_names} and {torch_names}")
    object.__setattr__(self, "_tree_re", tree_re)
    object.__setattr__(self, "_torch_re", torch_re)

  def match_tree(self, path: str) -> str | None:
    m = self._tree_re.fullmatch(path)  # type: ignore[attr-defined]
    if m is None:
      return None
    keep = ("part", "layer") if self.stacked else ("part",)
    fill = lambda p: "{%s}" % p.group(1) if p.group(1) in keep else m.group(p.group(1))  # noqa: E731
    return _PLACEHOLDER.sub(fill, self.torch)

  def match_torch(self, module: str) -> str | None:
    m = self._torch_re.fullmatch(module)  # type: ignore[attr-defined]
    return None if m is None else _PLACEHOLDER.sub(lambda p: m.group(p.group(1)), self.tree)


@dataclasses.dataclass(frozen=True)
class ModuleMap:
  """An ordered list of `Rule`\\ s, plus what export can fill into the config.

  Attributes:
    rules: the rules, first match wins.
    task_type: PEFT's ``task_type`` for an export with this map (e.g.
      ``"CAUSAL_LM"``), unless `export_peft` is given one.
    name: a short name, for messages.
  """

  rules: tuple[Rule, ...]
  task_type: str | None = None
  name: str = "module map"

  def resolve(self, path: Path) -> Target | None:
    """The torch target of the weight at ``path`` (a tuple of keys), or None."""
    parts = [str(p) for p in path]
    if parts[:1] == ["params"]:
      parts = parts[1:]
    where = "/".join(parts)
    for rule in self.rules:
      module = rule.match_tree(where)
      if module is not None:
        parts = tuple(module.replace("{part}", p) for p in rule.layout.split)
        return Target(parts[0] if parts else module, rule.layout, parts=parts,
                      stacked=rule.stacked)
    return None

  def tree_path(self, module: str, param: str = "weight") -> Path | None:
    """The jlora path of a torch module's ``param`` (``"weight"``/``"bias"``)."""
    for rule in self.rules:
      path = rule.match_torch(module)
      if path is not None:
        parts = tuple(path.split("/"))
        if param == "weight":  # the rule names the weight itself
          return parts
        return parts[:-1] + (param,) if param in rule.layout.params else None
    return None

  def prefixed(self, tree: str, torch: str, *, rules: Sequence[Rule] = (),
               task_type: str | None = None) -> "ModuleMap":
    """This map under a prefix (``"bert"``, ``"bert"``), plus extra ``rules``.

    >>> from jlora.peft import maps
    >>> m = maps.BERT.prefixed("bert", "bert")
    >>> m.resolve(("bert", "encoder", "layer_0", "intermediate", "dense", "kernel")).module
    'bert.encoder.layer.0.intermediate.dense'
    """
    moved = tuple(Rule(f"{tree}/{r.tree}", f"{torch}.{r.torch}", r.layout) for r in self.rules)
    return ModuleMap(moved + tuple(rules), task_type=task_type or self.task_type,
                     name=f"{self.name} under {tree!r}")


ModulePath = ModuleMap | Callable[[Path], "str | None"] | Mapping[str, str]


def as_map(module_path: Any) -> Callable[[Path], Target | None]:
  """A resolver ``weight path -> Target`` from any accepted ``module_path``.

  A function or a ``{"jlora/module/path": "torch.name"}`` dict names the
  *module* (the mapping that holds the weight); the weight is then a
  ``Linear`` (a ``kernel``) or an ``Embedding`` (an ``embedding``).
  """
  if isinstance(module_path, ModuleMap):
    return module_path.resolve
  if isinstance(module_path, Mapping):
    table = dict(module_path)
    name_of = lambda p: table.get(path_str(p))  # noqa: E731
  else:
    name_of = module_path

  def resolve(path: Path) -> Target | None:
    module = name_of(path[:-1])
    if module is None:
      return None
    return Target(module, Embedding() if path[-1] == "embedding" else Linear())

  return resolve


def check_module_path(module_path: Any, problems) -> None:
  """Adds a problem unless ``module_path`` is a map, a function or a dict."""
  ok = isinstance(module_path, (ModuleMap, Mapping)) or callable(module_path)
  if not ok:
    problems.add(f"module_path must be a jlora.peft.ModuleMap (e.g. "
                 f"jlora.peft.maps.LLAMA), a function (jlora path -> torch module name) "
                 f"or a {{'jlora/path': 'torch.name'}} dict, got {module_path!r}")
  elif isinstance(module_path, Mapping) and not all(
      isinstance(k, str) and isinstance(v, str) for k, v in module_path.items()):
    problems.add("module_path dict must map '/'-joined jlora paths to torch module "
                 f"names (str -> str), got {dict(module_path)!r}")
