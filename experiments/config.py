"""Settings files under ``configs/`` and ``--key=value`` command-line overrides.

A settings file is a Python module of plain assignments, as in nanoGPT::

    # configs/minilm_fortunes.py
    steps = 150         # optimizer steps
    lr = 2e-3           # peak learning rate of the adapters
    QUICK = dict(steps=4)   # overrides applied by --quick

Every lower-case name whose value is a bool, int, float, str, tuple or list
(or None) is a setting. The upper-case dict ``QUICK`` holds the overrides
that ``--quick`` applies (a CI-sized smoke run). Command-line arguments then
override single settings::

    python -m experiments.finetune --config=smollm2_mobydick --steps=10 --lr=1e-3

A value is parsed by the type of the setting's default: ``--targets=query,value``
gives a tuple, ``--ema=false`` a bool. An unknown key is rejected with the
list of valid keys.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Mapping, Sequence
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO_ROOT, "configs")
DEFAULT_CONFIG = "minilm_fortunes"
_SCALARS = (bool, int, float, str, type(None))


class ConfigError(ValueError):
  """A settings file or a command-line override is invalid."""


def config_path(name: str) -> str:
  """Returns the file of a named config (``minilm_fortunes``) or a path as is."""
  if name.endswith(".py") or os.sep in name:
    return os.path.abspath(name)
  return os.path.join(CONFIG_DIR, f"{name}.py")


def available() -> list[str]:
  """Names of the settings files under ``configs/``."""
  return sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                if f.endswith(".py") and not f.startswith("_"))


def _is_setting(name: str, value: Any) -> bool:
  if name.startswith("_") or not name.islower():
    return False
  if isinstance(value, (tuple, list)):
    return all(isinstance(v, _SCALARS) for v in value)
  return isinstance(value, _SCALARS)


def load_file(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads one settings file.

  Args:
      name: A config name under ``configs/`` or a path to a ``.py`` file.

  Returns:
      ``(settings, quick)``: the settings in file order and the ``QUICK``
      overrides.

  Raises:
      ConfigError: If the file does not exist, or ``QUICK`` names a key that
          is not a setting.
  """
  path = config_path(name)
  if not os.path.isfile(path):
    raise ConfigError(f"no config {name!r} at {path}; available: {', '.join(available())}")
  namespace: dict[str, Any] = {}
  with open(path) as f:
    exec(compile(f.read(), path, "exec"), namespace)  # noqa: S102 - our own files
  settings = {k: v for k, v in namespace.items() if _is_setting(k, v)}
  quick = dict(namespace.get("QUICK", {}))
  unknown = sorted(set(quick) - set(settings))
  if unknown:
    raise ConfigError(f"{path}: QUICK sets unknown keys {unknown}")
  return settings, quick


def _parse_bool(key: str, text: str) -> bool:
  low = text.strip().lower()
  if low in ("1", "true", "yes", "on"):
    return True
  if low in ("0", "false", "no", "off"):
    return False
  raise ConfigError(f"--{key}: expected true or false, got {text!r}")


def _parse_scalar(key: str, text: str, like: Any) -> Any:
  if isinstance(like, bool):
    return _parse_bool(key, text)
  if isinstance(like, int):
    try:
      return int(text)
    except ValueError:
      try:
        value = float(text)  # allows 1e3
      except ValueError:
        value = None
      if value is None or not value.is_integer():
        raise ConfigError(f"--{key}: expected an integer, got {text!r}") from None
      return int(value)
  if isinstance(like, float):
    try:
      return float(text)
    except ValueError:
      raise ConfigError(f"--{key}: expected a number, got {text!r}") from None
  if isinstance(like, str):
    return text
  if text.lower() in ("none", "null"):
    return None
  try:  # a default of None: take a Python literal, else the string
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_value(key: str, text: str, default: Any) -> Any:
  """Parses ``text`` as a value of the type of ``default``.

  Sequences are comma-separated (``query,value``; an empty string gives an
  empty tuple); each item takes the type of the default's first item.

  Raises:
      ConfigError: If ``text`` does not parse as that type.
  """
  if isinstance(default, (tuple, list)):
    like = default[0] if default else ""
    items = [t.strip() for t in text.split(",") if t.strip()]
    return type(default)(_parse_scalar(key, t, like) for t in items)
  return _parse_scalar(key, text, default)


def parse_overrides(argv: Sequence[str], settings: Mapping[str, Any]) -> dict[str, Any]:
  """Parses ``--key=value`` arguments against ``settings``.

  A bare ``--key`` sets a bool setting to true.

  Args:
      argv: The arguments.
      settings: The valid keys and their defaults.

  Returns:
      The overrides, parsed.

  Raises:
      ConfigError: For an argument that is not ``--key=value``, an unknown
          key (the message lists the valid keys) or a value of the wrong type.
  """
  out: dict[str, Any] = {}
  unknown = []
  for arg in argv:
    if not arg.startswith("--"):
      raise ConfigError(f"unexpected argument {arg!r}: settings are given as --key=value")
    key, eq, text = arg[2:].partition("=")
    key = key.replace("-", "_")
    if key not in settings:
      unknown.append(key)
      continue
    if not eq:
      if not isinstance(settings[key], bool):
        raise ConfigError(f"--{key} needs a value: --{key}=VALUE")
      text = "true"
    out[key] = parse_value(key, text, settings[key])
  if unknown:
    raise ConfigError(f"unknown setting(s) {', '.join('--' + k for k in unknown)}; "
                      f"valid keys: {', '.join(sorted(settings))}")
  return out


def _split_special(argv: Sequence[str]) -> tuple[str | None, bool, list[str]]:
  name, quick, rest = None, False, []
  for arg in argv:
    if arg.startswith("--config="):
      name = arg.split("=", 1)[1]
    elif arg == "--quick":
      quick = True
    else:
      rest.append(arg)
  return name, quick, rest


def load(argv: Sequence[str] = (), default: str = DEFAULT_CONFIG) -> dict[str, Any]:
  """Resolves a run's settings: file defaults, then ``QUICK``, then ``argv``.

  ``--config=NAME`` picks the settings file (default ``default``), and
  ``--quick`` applies its ``QUICK`` overrides.

  Args:
      argv: Command-line arguments (without the program name).
      default: The config used without ``--config``.

  Returns:
      The settings, plus ``config`` (the file's name) and ``quick``.

  Raises:
      ConfigError: As :func:`parse_overrides` and :func:`load_file`.
  """
  name, quick, rest = _split_special(argv)
  name = name or default
  settings, quick_overrides = load_file(name)
  if quick:
    settings.update(quick_overrides)
  settings.update(parse_overrides(rest, settings))
  return {"config": name, "quick": quick, **settings}


def resolve(defaults: Mapping[str, Any], argv: Sequence[str],
            quick: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Like :func:`load`, for settings defined in a script instead of a file.

  Args:
      defaults: The script's settings and their defaults.
      argv: Command-line arguments; ``--quick`` applies ``quick``.
      quick: The overrides of ``--quick``.

  Returns:
      The settings, plus ``quick``.
  """
  _, is_quick, rest = _split_special([a for a in argv if not a.startswith("--config=")])
  if any(a.startswith("--config=") for a in argv):
    raise ConfigError("this script takes no --config; its settings are its own")
  settings = dict(defaults)
  if is_quick:
    settings.update(quick or {})
  settings.update(parse_overrides(rest, settings))
  return {"quick": is_quick, **settings}


def run_main(main, argv: Sequence[str] | None) -> Any:
  """Calls ``main(argv)`` and turns a :class:`ConfigError` into a clean exit."""
  import sys

  try:
    return main(sys.argv[1:] if argv is None else list(argv))
  except ConfigError as e:
    raise SystemExit(f"error: {e}") from None
