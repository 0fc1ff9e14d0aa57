"""Settings: files under ``configs/``, a script's own settings, and ``--key=value``.

The one command-line mechanism of every script in ``experiments/``. A
settings file is a Python module of plain assignments, each with its
comment, as in nanoGPT::

  # configs/smollm2_mobydick.py
  BASE = "base"       # the file whose settings this one overrides
  steps = 40          # optimizer steps
  QUICK = dict(steps=2)   # overrides applied by --quick

Every lower-case name whose value is a bool, int, float, str, tuple or list
(or None) is a setting; its trailing comment is its help. ``BASE`` names a
file read first (``configs/base.py`` holds the keys the experiments share),
so a variant holds only its overrides and its own keys. ``QUICK`` holds the
overrides of ``--quick`` (a CI-sized smoke run; a variant's ``QUICK`` adds to
its base's). A script without a settings file declares its settings as
``{key: (default, comment)}`` and passes them as ``own``. Command-line
arguments then override single settings::

  python -m experiments.finetune --config=smollm2_mobydick --steps=10 --lr=1e-3

A value is parsed by the type of the setting's default: ``--targets=query,value``
gives a tuple, ``--ema=false`` a bool, a bare ``--fresh`` sets a bool to true.
``--help`` prints every setting with its default and comment. An unknown key
is rejected with the list of valid keys.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import os
import sys
import tokenize
from collections.abc import Mapping, Sequence
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO_ROOT, "configs")
DEFAULT_CONFIG = "minilm_fortunes"
BASES = ("base",)  # settings files that are only read through BASE, never run
_SCALARS = (bool, int, float, str, type(None))

Own = Mapping[str, tuple[Any, str]]  # a script's settings: key -> (default, comment)


class ConfigError(ValueError):
  """A settings file or a command-line override is invalid."""


class ShowHelp(Exception):
  """``--help`` was given; the message is the help text."""


@dataclasses.dataclass
class Defaults:
  """The settings of a file (its base's first) or of a script, with their help.

  Attributes:
    settings: key -> default, in file order.
    quick: the overrides of ``--quick``.
    comments: key -> the comment on its line.
    sections: key -> the ``# -- section`` heading it stands under.
    source: where the settings come from (for the help text).
  """

  settings: dict[str, Any]
  quick: dict[str, Any]
  comments: dict[str, str]
  sections: dict[str, str]
  source: str

  def merged(self, other: Defaults, source: str = "", *, first: bool = False) -> Defaults:
    """``other`` over ``self``: its values win; its keys come after (``first``: before)."""
    keys = list(other.settings) + [k for k in self.settings if k not in other.settings] if first \
        else list(self.settings) + [k for k in other.settings if k not in self.settings]
    values = {**self.settings, **other.settings}
    return Defaults({k: values[k] for k in keys}, {**self.quick, **other.quick},
                    {**self.comments, **{k: v for k, v in other.comments.items() if v}},
                    {**self.sections, **{k: v for k, v in other.sections.items()
                                         if k not in self.sections}},
                    source or f"{other.source} (over {self.source})")


def config_path(name: str) -> str:
  """Returns the file of a named config (``minilm_fortunes``) or a path as is."""
  if name.endswith(".py") or os.sep in name:
    return os.path.abspath(name)
  return os.path.join(CONFIG_DIR, f"{name}.py")


def available() -> list[str]:
  """Names of the runnable settings files under ``configs/``."""
  return sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                if f.endswith(".py") and not f.startswith("_") and f[:-3] not in BASES)


def _is_setting(name: str, value: Any) -> bool:
  if name.startswith("_") or not name.islower():
    return False
  if isinstance(value, (tuple, list)):
    return all(isinstance(v, _SCALARS) for v in value)
  return isinstance(value, _SCALARS)


def _help_of(source: str) -> tuple[dict[str, str], dict[str, str]]:
  """The trailing comment and section heading of each top-level assignment."""
  comments = {t.start[0]: t.string.lstrip("#").strip()
              for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type == tokenize.COMMENT}
  headings = [(row, line.strip()[4:].strip())
              for row, line in enumerate(source.splitlines(), 1) if line.startswith("# --")]
  helps, sections = {}, {}
  for node in ast.parse(source).body:
    if isinstance(node, ast.Assign) and len(node.targets) == 1 \
        and isinstance(node.targets[0], ast.Name):
      name = node.targets[0].id
      helps[name] = comments.get(node.end_lineno, comments.get(node.lineno, ""))
      sections[name] = next((h for row, h in reversed(headings) if row < node.lineno), "")
  return helps, sections


def read(name: str, *, _seen: tuple[str, ...] = ()) -> Defaults:
  """Reads one settings file, its ``BASE`` first.

  Args:
    name: A config name under ``configs/`` or a path to a ``.py`` file.

  Returns:
    Its `Defaults`.

  Raises:
    ConfigError: If the file (or its base) does not exist, the bases form a
      cycle, or ``QUICK`` names a key that is not a setting.
  """
  path = config_path(name)
  if not os.path.isfile(path):
    raise ConfigError(f"no config {name!r} at {path}; available: {', '.join(available())}")
  if path in _seen:
    raise ConfigError(f"{path}: BASE forms a cycle: {' -> '.join(_seen + (path,))}")
  with open(path) as f:
    source = f.read()
  namespace: dict[str, Any] = {}
  exec(compile(source, path, "exec"), namespace)  # noqa: S102 - our own files
  helps, sections = _help_of(source)
  own = Defaults({k: v for k, v in namespace.items() if _is_setting(k, v)},
                 dict(namespace.get("QUICK", {})), {}, {}, os.path.relpath(path, REPO_ROOT))
  own.comments = {k: helps.get(k, "") for k in own.settings}
  own.sections = {k: sections.get(k, "") for k in own.settings}
  out = (read(namespace["BASE"], _seen=_seen + (path,)).merged(own, first=True)
         if "BASE" in namespace else own)
  unknown = sorted(set(out.quick) - set(out.settings))
  if unknown:
    raise ConfigError(f"{path}: QUICK sets unknown keys {unknown}")
  return out


def load_file(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """``(settings, quick)`` of a settings file (see `read`)."""
  d = read(name)
  return d.settings, d.quick


def from_own(own: Own, quick: Mapping[str, Any] | None = None, *,
             source: str = "the script") -> Defaults:
  """The `Defaults` of a script's own settings ``{key: (default, comment)}``."""
  return Defaults({k: v for k, (v, _) in own.items()}, dict(quick or {}),
                  {k: c for k, (_, c) in own.items()}, {k: "this script's own" for k in own},
                  source)


# --------------------------------------------------------------------------- parsing


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
                      f"valid keys: {', '.join(sorted(settings))} (--help explains each)")
  return out


def _show(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return ",".join(str(v) for v in value)
  if isinstance(value, bool):
    return str(value).lower()
  return str(value)


def help_text(defaults: Defaults, usage: str = "") -> str:
  """Every setting with its default, its ``--quick`` value and its comment."""
  lines = [usage.strip().splitlines()[0] if usage.strip() else "",
           f"settings of {defaults.source}; --quick applies the CI-sized values shown as "
           "[quick: ...], --help prints this:", ""]
  width = max([len(f"--{k}={_show(v)}") for k, v in defaults.settings.items()] + [0])
  width = min(width, 40)
  sections = list(dict.fromkeys(defaults.sections[k] for k in defaults.settings))
  order = sorted(defaults.settings, key=lambda k: sections.index(defaults.sections[k]))
  section = None
  for key in order:
    if defaults.sections[key] != section:
      section = defaults.sections[key]
      if section:
        lines.append(f"{section}:")
    flag = f"--{key}={_show(defaults.settings[key])}"
    note = defaults.comments.get(key, "")
    if key in defaults.quick:
      note += f" [quick: {_show(defaults.quick[key])}]"
    lines.append(f"  {flag:<{width}}  {note}".rstrip() if len(flag) <= width
                 else f"  {flag}\n  {'':<{width}}  {note}".rstrip())
  return "\n".join(lines)


# --------------------------------------------------------------------------- resolving


def _split_special(argv: Sequence[str]) -> tuple[str | None, bool, bool, list[str]]:
  name, quick, show, rest = None, False, False, []
  for arg in argv:
    if arg.startswith("--config="):
      name = arg.split("=", 1)[1]
    elif arg == "--quick":
      quick = True
    elif arg in ("--help", "-h"):
      show = True
    else:
      rest.append(arg)
  return name, quick, show, rest


def _resolve(defaults: Defaults, quick: bool, show: bool, rest: Sequence[str],
             usage: str) -> dict[str, Any]:
  if show:
    raise ShowHelp(help_text(defaults, usage))
  settings = dict(defaults.settings)
  if quick:
    settings.update(defaults.quick)
  settings.update(parse_overrides(rest, settings))
  return settings


def load(argv: Sequence[str] = (), default: str = DEFAULT_CONFIG, *, own: Own | None = None,
         own_quick: Mapping[str, Any] | None = None, over: Mapping[str, Any] | None = None,
         fixed: bool = False, usage: str = "") -> dict[str, Any]:
  """Resolves a run's settings: file defaults, then ``QUICK``, then ``argv``.

  ``--config=NAME`` picks the settings file (default ``default``), ``--quick``
  applies its ``QUICK`` overrides and ``--help`` raises `ShowHelp`.

  Args:
    argv: Command-line arguments (without the program name).
    default: The config used without ``--config``.
    own: The script's own settings beside the file's, ``{key: (default, comment)}``.
    own_quick: Their ``--quick`` overrides (they may also set the file's keys).
    over: The script's own defaults for some of the file's settings.
    fixed: The script runs ``default`` only (``--config`` is an error).
    usage: The script's docstring; its first line heads the help text.

  Returns:
    The settings, plus ``config`` (the file's name) and ``quick``.

  Raises:
    ConfigError: As `parse_overrides` and `read`.
    ShowHelp: For ``--help``.
  """
  name, quick, show, rest = _split_special(argv)
  if fixed and name not in (None, default):
    raise ConfigError(f"this script runs configs/{default}.py; it takes no --config")
  name = name or default
  defaults = read(name)
  if own:
    clash = sorted(set(own) & set(defaults.settings))
    if clash:
      raise ConfigError(f"the script's own settings {clash} are also in {defaults.source}")
    defaults = defaults.merged(from_own(own, own_quick),
                               source=f"{defaults.source} and the script's own")
  if over:
    unknown = sorted(set(over) - set(defaults.settings))
    if unknown:
      raise ConfigError(f"the script overrides unknown settings {unknown} of {defaults.source}")
    defaults.settings.update(over)
  settings = _resolve(defaults, quick, show, rest, usage)
  return {"config": name, "quick": quick, **settings}


def resolve(own: Own, argv: Sequence[str], quick: Mapping[str, Any] | None = None, *,
            usage: str = "") -> dict[str, Any]:
  """Like `load`, for a script whose settings are all its own (no file).

  Args:
    own: ``{key: (default, comment)}``.
    argv: Command-line arguments; ``--quick`` applies ``quick``.
    quick: The overrides of ``--quick``.
    usage: The script's docstring, for ``--help``.

  Returns:
    The settings, plus ``quick``.
  """
  name, is_quick, show, rest = _split_special(argv)
  if name is not None:
    raise ConfigError("this script takes no --config; its settings are its own (--help lists them)")
  return {"quick": is_quick, **_resolve(from_own(own, quick), is_quick, show, rest, usage)}


def run_main(main, argv: Sequence[str] | None) -> Any:
  """Calls ``main(argv)``: ``--help`` prints and exits 0, a `ConfigError` exits 2."""
  try:
    return main(sys.argv[1:] if argv is None else list(argv))
  except ShowHelp as e:
    try:
      print(e, flush=True)
    except BrokenPipeError:  # `--help | head`
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise SystemExit(0) from None
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
