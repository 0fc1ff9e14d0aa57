"""PEFT's ``adapter_config.json``: the fields it may hold, which of them jlora
follows, and the checks an imported config goes through.

The rule: a field that jlora does not implement may only hold its default
(PEFT 0.21.2's ``LoraConfig`` / ``IA3Config``); any other value is refused,
naming the field. Fields that only choose modules (``target_modules``,
``layers_to_transform``, ...) are followed through the tensors in the file.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from typing import Any

try:  # Python >= 3.11: the sre_* modules are deprecated aliases
  from re import _constants as sre_constants
  from re import _parser as sre_parse
except ImportError:  # pragma: no cover
  import sre_constants
  import sre_parse

# Fields every PEFT config has; none changes what the adapter computes.
COMMON = ("task_type", "peft_type", "auto_mapping", "peft_version",
          "base_model_name_or_path", "revision", "inference_mode", "target_modules",
          "exclude_modules", "modules_to_save")

# PEFT 0.21.2 defaults of the fields jlora does not implement (refused unless
# default). `None`-valued entries accept None and a missing field.
UNSUPPORTED = {
    "LORA": {"bias": "none", "lora_bias": False, "megatron_config": None,
             "trainable_token_indices": None, "loftq_config": {}, "eva_config": None,
             "corda_config": None, "lora_ga_config": None, "velora_config": None,
             "alora_invocation_tokens": None, "use_qalora": False,
             "monteclora_config": None, "layer_replication": None,
             "target_parameters": None, "use_bdlora": None, "arrow_config": None,
             "kasa_config": None, "ensure_weight_tying": False},
    "IA3": {},
}
# Fields read elsewhere or harmless at any value (per type), beyond COMMON.
FOLLOWED = {
    "LORA": ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "rank_pattern",
             "alpha_pattern", "init_lora_weights", "layers_to_transform", "layers_pattern",
             "fan_in_fan_out", "megatron_core", "runtime_config", "qalora_group_size"),
    "IA3": ("feedforward_modules", "fan_in_fan_out", "init_ia3_weights",
            "layers_to_transform", "layers_pattern"),
}
# init_lora_weights values that only initialise the adapter; the others
# ("pissa", "olora", "corda", "loftq", "lora_ga", "mica") change the base
# model or need state the file does not hold.
ADAPTER_ONLY_INITS = (True, False, "gaussian", "eva", "orthogonal")


def _number(value: Any, *, integer: bool, low: float, low_open: bool,
            high: float | None = None) -> bool:
  kind = numbers.Integral if integer else numbers.Real
  if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
    return False
  if value < low or (low_open and value == low):
    return False
  return high is None or value < high


def check_pattern(pattern: Any) -> str | None:
  """A problem with a regex from a config, or None.

  Patterns come from a file, so they are untrusted: beyond compiling, a
  quantifier over a group that itself repeats or alternates (``(a+)+``,
  ``(.|.)*``) is refused, since it can take exponential time on a long
  module name.

  >>> check_pattern(r"model\\.layers\\.(0|1)\\.self_attn\\..*")
  >>> check_pattern("(.|.)*;")
  "'(.|.)*;' repeats a group that itself repeats or alternates (exponential matching time); write it without the nested repeat"
  """
  if not isinstance(pattern, str):
    return f"{pattern!r} is not a string"
  try:
    parsed = sre_parse.parse(pattern)
  except (re.error, sre_constants.error, RecursionError, OverflowError) as e:
    return f"{pattern!r} is not a valid regex ({e})"
  if len(pattern) > 1000:
    return f"a pattern of {len(pattern)} characters is too long (at most 1000)"

  repeats = (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT,
             getattr(sre_constants, "POSSESSIVE_REPEAT", None))

  def risky(items, under_repeat: bool) -> bool:
    for op, arg in items:
      if op in repeats:
        lo, hi, sub = arg
        if under_repeat and hi != 1:
          return True
        inner = under_repeat or hi != 1
        if risky(sub, inner) or (inner and _branches(sub)):
          return True
      elif op == sre_constants.SUBPATTERN:
        if risky(arg[-1], under_repeat):
          return True
      elif op == sre_constants.BRANCH:
        if any(risky(b, under_repeat) for b in arg[1]):
          return True
      elif op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
        if risky(arg[1], under_repeat):
          return True
    return False

  if risky(parsed, False):
    return (f"{pattern!r} repeats a group that itself repeats or alternates "
            "(exponential matching time); write it without the nested repeat")
  return None


def _branches(items) -> bool:
  for op, arg in items:
    if op == sre_constants.BRANCH:
      return True
    if op == sre_constants.SUBPATTERN and _branches(arg[-1]):
      return True
  return False


def pattern_value(patterns: Mapping[str, Any], module: str, default):
  """PEFT's ``get_pattern_key``: the value of the first key whose regex matches
  the module name or a ``.``-separated tail of it, else ``default``.

  Same result as PEFT's ``re.match(rf"(.*\\.)?({key})$", module)``, matched
  tail by tail so that the only regex run is the (checked) key itself.
  """
  starts = [0] + [i + 1 for i, c in enumerate(module) if c == "."]
  for key, value in patterns.items():
    regex = re.compile(key)
    if any(regex.fullmatch(module, pos) for pos in starts):
      return value
  return default


def is_feedforward(config: Mapping[str, Any], module: str) -> bool:
  """PEFT's IA3 rule: a regex string must match the whole name, a list entry
  its end."""
  feedforward = config.get("feedforward_modules") or []
  if isinstance(feedforward, str):
    return re.fullmatch(feedforward, module) is not None
  return any(module.endswith(t) for t in feedforward)


def check(config: Any, where: str, problems) -> str | None:
  """Checks a loaded ``adapter_config.json``; returns its ``peft_type`` or None.

  Every problem is added to ``problems``: a config that is not an object, an
  unknown ``peft_type``, unsupported non-default fields, and values of the
  wrong type or out of range, as `jlora.lorify` would reject them.
  """
  if not isinstance(config, Mapping):
    problems.add(f"{where}: holds {type(config).__name__} {str(config)[:60]!r}, not a "
                 "JSON object; the file is not a PEFT adapter config")
    return None
  peft_type = config.get("peft_type")
  if peft_type not in UNSUPPORTED:
    problems.add(f"{where}: peft_type {peft_type!r}; only LORA (plain or use_dora) and "
                 "IA3 adapters import")
    return None
  known = set(COMMON) | set(FOLLOWED[peft_type]) | set(UNSUPPORTED[peft_type])
  for field, value in config.items():
    if field in UNSUPPORTED[peft_type]:
      default = UNSUPPORTED[peft_type][field]
      if value != default and not (default in (None, {}) and value in (None, {}, [])):
        problems.add(f"{where}: {field}={value!r} is not implemented by jlora (only "
                     f"its default {default!r}); this adapter cannot be imported")
    elif field not in known and value not in (None, False, {}, [], ""):
      problems.add(f"{where}: unknown field {field}={value!r} (not in PEFT 0.21.2's "
                   f"{'LoraConfig' if peft_type == 'LORA' else 'IA3Config'}); jlora "
                   "does not know what it does, so it refuses the adapter")
  for flag in ("inference_mode", "fan_in_fan_out") + (
      ("use_rslora", "use_dora") if peft_type == "LORA" else ("init_ia3_weights",)):
    if flag in config and not isinstance(config[flag], bool):
      problems.add(f"{where}: {flag} must be true or false, got {config[flag]!r}")
  for field in ("target_modules", "modules_to_save", "feedforward_modules"):
    value = config.get(field)
    if value is None:
      continue
    if isinstance(value, str):
      msg = check_pattern(value)
      if msg:
        problems.add(f"{where}: {field}: {msg}")
    elif not isinstance(value, list) or not all(isinstance(v, str) for v in value):
      problems.add(f"{where}: {field} must be a list of module names or a regex string, "
                   f"got {value!r}")
  if peft_type == "LORA":
    _check_lora(config, where, problems)
  return peft_type


def _check_lora(config: Mapping[str, Any], where: str, problems) -> None:
  if "r" not in config:
    problems.add(f"{where}: no 'r' (the rank); the file is not a complete LoraConfig")
  elif not _number(config["r"], integer=True, low=0, low_open=True):
    problems.add(f"{where}: r must be a positive int, got {config['r']!r}")
  if not _number(config.get("lora_alpha", 8), integer=False, low=0, low_open=True):
    problems.add(f"{where}: lora_alpha must be a positive finite number, got "
                 f"{config['lora_alpha']!r}; alpha scales the update by alpha/r")
  dropout = config.get("lora_dropout", 0.0)
  if dropout is not None and not _number(dropout, integer=False, low=0, low_open=False,
                                         high=1):
    problems.add(f"{where}: lora_dropout must be a number in [0, 1), got {dropout!r}")
  init = config.get("init_lora_weights", True)
  if not any(init is v if isinstance(v, bool) else init == v for v in ADAPTER_ONLY_INITS):
    problems.add(f"{where}: init_lora_weights={init!r} is not implemented by jlora: "
                 "PEFT changes the base weights when it loads such an adapter (PiSSA, "
                 "OLoRA, CorDA, LoftQ, LoRA-GA, MiCA); merge it in PEFT and import the "
                 "merged model, or train a plain LoRA adapter")
  for field, integer in (("rank_pattern", True), ("alpha_pattern", False)):
    patterns = config.get(field) or {}
    if not isinstance(patterns, Mapping):
      problems.add(f"{where}: {field} must be an object {{regex: value}}, got {patterns!r}")
      continue
    for key, value in patterns.items():
      msg = check_pattern(key)
      if msg:
        problems.add(f"{where}: {field}: {msg}")
      if not _number(value, integer=integer, low=0, low_open=True):
        problems.add(f"{where}: {field}[{key!r}] must be a positive "
                     f"{'int' if integer else 'finite number'}, got {value!r}")
