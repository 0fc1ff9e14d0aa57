"""Shared helpers of the experiments: JAX setup, timing, memory, tables, output."""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from experiments.config import REPO_ROOT

RESULTS_DIR = os.path.join(REPO_ROOT, "experiments", "results")


def setup_jax(compile_cache: str = "") -> None:
  """Enables the persistent compilation cache (relative paths: repo root).

  Repeated runs (the tests, the sweeps, ``make run``) then skip most XLA
  compilation, which dominates short runs on a small CPU.
  """
  if not compile_cache:
    return
  path = compile_cache if os.path.isabs(compile_cache) else os.path.join(REPO_ROOT, compile_cache)
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def tree_bytes(tree: Any) -> int:
  """Bytes of every array leaf of ``tree``."""
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)
                 if hasattr(x, "dtype")))


def tree_size(tree: Any) -> int:
  """Number of elements of every array leaf of ``tree``."""
  return int(sum(x.size for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


def compiled_memory(jitted, *args) -> dict[str, int]:
  """XLA's memory analysis of ``jitted`` compiled for ``args``.

  Returns:
      Bytes of the arguments, outputs, aliased (donated) buffers and
      temporaries, and ``peak``: arguments + outputs - aliased + temporaries
      (the live set XLA plans for one call). Empty if the backend gives no
      analysis.
  """
  stats = jitted.lower(*args).compile().memory_analysis()
  if stats is None:
    return {}
  out = {
      "arguments": int(stats.argument_size_in_bytes),
      "outputs": int(stats.output_size_in_bytes),
      "aliased": int(stats.alias_size_in_bytes),
      "temporaries": int(stats.temp_size_in_bytes),
  }
  out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
  return out


def max_rss_bytes() -> int:
  """Peak resident memory of this process so far (``getrusage`` maxrss)."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss if sys.platform == "darwin" else rss * 1024)


class StepTimer:
  """Wall time of each training step; the first (compiling) step is kept apart."""

  def __init__(self):
    self.times: list[float] = []
    self._t = None

  def start(self) -> None:
    self._t = time.perf_counter()

  def stop(self) -> None:
    self.times.append(time.perf_counter() - self._t)

  @property
  def first(self) -> float:
    """The first step: tracing and compilation included."""
    return self.times[0] if self.times else float("nan")

  @property
  def median(self) -> float:
    """Median of the steps after the first (steady state)."""
    rest = self.times[1:] or self.times
    return statistics.median(rest) if rest else float("nan")


def mib(n: float) -> str:
  """Bytes as MiB (KiB below 0.1 MiB)."""
  if 0 < n < 0.1 * 2**20:
    return f"{n / 2**10:,.1f} KiB"
  return f"{n / 2**20:,.1f} MiB"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def pm(values: Sequence[float], scale: float = 1.0, digits: int = 1) -> str:
  """``mean ± std`` of ``values`` times ``scale`` (just the value for one run)."""
  m, s = mean_std([x * scale for x in values])
  if len(values) == 1:
    return f"{m:.{digits}f}"
  return f"{m:.{digits}f} ± {s:.{digits}f}"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
  """A GitHub-markdown table (also readable as plain text)."""
  rows = [[str(c) for c in r] for r in rows]
  widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
  line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
  return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                   + [line(r) for r in rows])


def write_text(path: str, text: str) -> None:
  """Writes ``text`` to ``path``, creating the directory.

  Written to a temporary file and renamed, so an interrupted run never
  leaves a truncated file (the run caches treat an existing file as done).
  """
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as indented JSON (`write_text`: beside, then renamed)."""
  write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(x: Any) -> Any:
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def out_path(quick: bool, *parts: str) -> str:
  """Where an experiment writes: ``experiments/results`` or, with --quick, runs/quick."""
  root = os.path.join(REPO_ROOT, "runs", "quick") if quick else RESULTS_DIR
  path = os.path.join(root, *parts)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  return path


SMOKE_TEST = ("SMOKE TEST (--quick): a few steps on a tiny subset, to show the job runs; "
              "these numbers mean nothing")


def settings_table(cfg: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> str:
  """The settings as a two-column table (a third marks values that differ from ``defaults``)."""
  def show(v: Any) -> str:
    text = ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
    return text if text else '""'

  def changed(k: str, v: Any) -> str:
    return "" if k not in defaults or defaults[k] == v else f"default {show(defaults[k])}"

  rows = [[k, show(v)] + ([changed(k, v)] if defaults is not None else []) for k, v in cfg.items()]
  return table(["setting", "value"] + (["changed"] if defaults is not None else []), rows)


class phase:
  """``with phase("loading data", enabled):`` prints the phase and its wall time."""

  def __init__(self, what: str, enabled: bool = True):
    self.what, self.enabled = what, enabled

  def __enter__(self) -> phase:
    self.t = time.perf_counter()
    if self.enabled:
      print(f"{self.what} ...", flush=True)
    return self

  def __exit__(self, *exc) -> None:
    if self.enabled and exc[0] is None:
      print(f"{self.what}: done in {time.perf_counter() - self.t:.1f} s", flush=True)


def plot_curves(path: str, losses: Sequence[float], evals: Sequence[Mapping[str, Any]], *,
                metric: str, label: str, title: str) -> None:
  """Training loss per step and ``metric`` per evaluation, side by side; y-axes from 0."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.5))
  ax_loss.plot(range(1, len(losses) + 1), losses, lw=1)
  ax_loss.set(xlabel="step", ylabel="training loss", title="loss", ylim=(0, None))
  ax_metric.plot([e["step"] for e in evals], [e[metric] for e in evals], "o-")
  top = 1.0 if metric.endswith("acc") else None
  ax_metric.set(xlabel="step", ylabel=label, title=label, ylim=(0, top))
  fig.suptitle(title, y=1.03)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def cpu_model() -> str:
  """The CPU's model name (``/proc/cpuinfo`` on Linux): timings differ across hosts."""
  import platform

  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def provenance() -> dict[str, Any]:
  """When and where a result was made: date, machine load, CPU and the versions."""
  import datetime
  import platform
  from importlib import metadata

  versions = {}
  for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "jlora"):
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "load_average_1_5_15": list(os.getloadavg()), "cpus": os.cpu_count(),
          "machine": platform.platform(), "cpu_model": cpu_model(),
          "python": platform.python_version(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "backend": jax.default_backend(), "versions": versions}
