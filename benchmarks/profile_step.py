"""python -m benchmarks.profile_step [--quick] [--steps full,jlora,naive] [--by_shape] [--dump DIR] [--peak] [--loss standard|explicit]

Per-op wall time of the reference train steps on XLA:CPU (and of its forwards:
``--steps base,unmerged`` takes any name of `benchmarks.reference.train_steps`
or `benchmarks.reference.forwards`). Each program is
compiled, run under ``jax.profiler.trace`` (XLA:CPU records one event per
thunk, named after its HLO instruction), and every instruction of the
optimised HLO's entry computation is put in a class:

* ``dot dense``: a dot (alone or inside a fusion) with no dimension <= 16;
* ``dot rank-r``: a dot with a dimension <= 16 (x·A, (x·A)·B, dA, dB, ...);
* ``dot attention``: a batched dot (q·kᵀ, att·v and their gradients);
* ``transpose/copy``: copy or transpose fusions (layout changes);
* ``other``: elementwise, reductions, softmax, Adam, gathers, ...

and the table gives, per class: count, ms per step, share and GFLOP/s. With
``--dump DIR`` XLA also writes its HLO (``--xla_dump_to``) there.

``--by_shape`` adds a table of the dots grouped by class and shape (output
dimensions, then the contracted size). ``--peak`` profiles memory instead of time (no timing, so no quiet machine
needed): for each step, the buffers XLA's live-range analysis finds live at
the step's peak (``*-live-range.txt``, "Live ranges at N (peak)"), grouped by
shape, arguments left out, next to ``memory_analysis().temp_size_in_bytes``;
``two_dots`` adds the jlora step with the adapted dot in its form before
issue 14 (`benchmarks.prototypes.two_dots`). Written to
``benchmarks/results/peak_<targets>.json`` (``--json PATH`` elsewhere).

``--loss explicit``: every step minimises `benchmarks.model.next_token_loss_explicit`
(the same cross-entropy, its backward written out) instead of the standard
``log_softmax`` + ``take_along_axis``, to separate the loss's buffers from
the model's.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shlex
import sys
import tempfile


def parse_hlo(text: str):
  """(entry instructions, {computation: body}, {value name: shape})."""
  comps, cur, entry = {}, None, None
  for line in text.splitlines():
    m = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m and not line.startswith(" "):
      cur = m.group(2)
      comps[cur] = []
      if m.group(1):
        entry = cur
      continue
    if cur is not None and line.startswith("  "):
      comps[cur].append(line)
  shapes = dict(re.findall(r"%([\w.\-]+) = (\w+\[[0-9,]*\])", text))
  return entry, comps, shapes


def dims(shape: str) -> list[int]:
  inner = re.search(r"\[([0-9,]*)\]", shape).group(1)
  return [int(v) for v in inner.split(",")] if inner else []


def dot_info(line: str, shapes: dict):
  m = re.search(r"= (\w+\[[0-9,]*\])\S* dot\(%([\w.\-]+), %([\w.\-]+)\)(.*)", line)
  if not m:
    return None
  out, lhs, _, rest = m.groups()
  lc = [int(v) for v in re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", rest).group(1).split(",")]
  batched = "lhs_batch_dims" in rest
  ld = dims(shapes[lhs])
  k = 1
  for d in lc:
    k *= ld[d]
  od = dims(out)
  n_out = 1
  for d in od:
    n_out *= d
  return {"flops": 2 * n_out * k, "dims": od + [k], "batched": batched}


def classify(entry, comps, shapes):
  """{instruction name: (class, flops, dot dims)} for the entry computation; dot dims
  (the output's, then the contracted size) are None for an op that is not a dot."""
  out = {}
  for line in comps[entry]:
    m = re.match(r"\s*(ROOT )?%([\w.\-]+) = \S+ (\w[\w\-]*)\(", line)
    if not m:
      continue
    name, op = m.group(2), m.group(3)
    body = [line]
    called = re.search(r"calls=%([\w.\-]+)", line)
    if called and called.group(1) in comps:
      body = comps[called.group(1)]
    infos = [i for i in (dot_info(l, shapes) for l in body) if i]
    if infos:
      i = infos[0]
      cls = ("dot attention" if i["batched"] else
             "dot rank-r" if min(i["dims"]) <= 16 else "dot dense")
      out[name] = (cls, sum(x["flops"] for x in infos), tuple(i["dims"]))
    elif op in ("parameter", "constant", "tuple", "get-tuple-element", "bitcast"):
      continue
    elif "transpose" in name or "copy" in name or op in ("copy", "transpose"):
      out[name] = ("transpose/copy", 0, None)
    else:
      out[name] = ("other", 0, None)
  return out


def profile(compiled, args, steps: int = 3):
  import jax
  for _ in range(2):
    jax.block_until_ready(compiled(*args))
  d = tempfile.mkdtemp(prefix="jlora_trace_")
  with jax.profiler.trace(d, create_perfetto_trace=True):
    for _ in range(steps):
      jax.block_until_ready(compiled(*args))
  (path,) = glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)
  events = json.load(gzip.open(path))
  events = events["traceEvents"] if isinstance(events, dict) else events
  dur = collections.Counter()
  for e in events:
    if e.get("ph") == "X":
      dur[e["name"]] += e.get("dur", 0) / 1e3 / steps  # ms per step
  return dur


def report(name, compiled, args, steps, *, by_shape: bool = False):
  entry, comps, shapes = parse_hlo(compiled.as_text())
  cls = classify(entry, comps, shapes)
  dur = profile(compiled, args, steps)
  rows = collections.defaultdict(lambda: [0, 0.0, 0])
  dots = collections.defaultdict(lambda: [0, 0.0, 0])
  per_op = []
  for op, (c, fl, dot_dims) in cls.items():
    t = dur.get(op, 0.0)
    rows[c][0] += 1
    rows[c][1] += t
    rows[c][2] += fl
    per_op.append((t, op, c, fl))
    if dot_dims:
      row = dots[(c, dot_dims)]
      row[0] += 1
      row[1] += t
      row[2] += fl
  total = sum(r[1] for r in rows.values())
  print(f"\n### {name}: {total:.0f} ms per call in traced ops\n")
  print("| class | ops | ms/call | share | GFLOP | GFLOP/s |")
  print("|---|---:|---:|---:|---:|---:|")
  for c in ("dot dense", "dot rank-r", "dot attention", "transpose/copy", "other"):
    n, t, fl = rows.get(c, (0, 0.0, 0))
    rate = f"{fl / t / 1e6:.1f}" if fl and t else "-"
    print(f"| {c} | {n} | {t:.0f} | {t / total:.1%} | {fl / 1e9:.2f} | {rate} |")
  if by_shape:
    print("\n| dot class | output dims, contracted size | ops | ms/call | µs/op | GFLOP/s |")
    print("|---|---|---:|---:|---:|---:|")
    for (c, dot_dims), (n, t, fl) in sorted(dots.items(), key=lambda kv: -kv[1][1]):
      rate = f"{fl / t / 1e6:.1f}" if t else "-"
      print(f"| {c} | {' x '.join(map(str, dot_dims[:-1]))}, {dot_dims[-1]} | {n} | {t:.2f} | "
            f"{1e3 * t / n:.0f} | {rate} |")
  print("\ntop ops:")
  for t, op, c, fl in sorted(per_op, reverse=True)[:12]:
    print(f"  {t:7.1f} ms  {c:15s} {op}  {fl / 1e6:.0f} MFLOP")
  return rows


def live_at_peak(dump_dir: str, before: set[str], hlo: str) -> dict:
  """The buffers live at the peak of the module compiled since ``before``."""
  lr_path = max(set(glob.glob(f"{dump_dir}/*live-range.txt")) - before, key=os.path.getsize)
  ba_path = lr_path.replace("live-range.txt", "buffer-assignment.txt")
  lr, ba = open(lr_path).read(), open(ba_path).read()
  shape = dict(re.findall(r"value: <\d+ ([\w.\-]+) @0> \(size=\d+,offset=\d+\): (\w+\[[0-9,]*\])", ba))
  entry = hlo[hlo.index("\nENTRY"):]
  params = set(re.findall(r"%([\w.\-]+) = \S+ parameter\(", entry))
  peak = int(re.search(r"Live ranges at (\d+) \(peak\)", lr).group(1))
  section = lr[lr.index("(peak):"):]
  by_shape: dict[str, dict[str, int]] = {}
  for name, size in re.findall(r"^\s+([\w.\-]+)\{[^}]*\}: (\d+) bytes", section, re.M):
    if name in params:
      continue
    row = by_shape.setdefault(shape.get(name, "?"), {"count": 0, "bytes": 0})
    row["count"] += 1
    row["bytes"] += int(size)
  by_shape = dict(sorted(by_shape.items(), key=lambda kv: -kv[1]["bytes"]))
  return {"peak_instruction": peak, "live_bytes": sum(r["bytes"] for r in by_shape.values()),
          "by_shape": by_shape}


def peak_report(a, argv):
  import jax
  import optax
  from benchmarks import prototypes
  from benchmarks import reference as R
  from benchmarks.model import LOSSES, QUICK, Config
  from experiments.utils import provenance, write_json
  prov = provenance()
  prov["command"] = shlex.join(["python", "-m", "benchmarks.profile_step", *argv])
  prov["versions"]["python"] = prov["python"]
  cfg = QUICK if a.quick else Config()
  s = R.build(cfg, R.TARGETS[a.targets])
  steps = R.train_steps(s, optax.adam(1e-3), loss=LOSSES[a.loss])
  out = {}
  for name in a.steps.split(","):
    before = set(glob.glob(f"{a.dump}/*live-range.txt"))
    if name == "two_dots":
      st = prototypes.compiled_with(prototypes.two_dots, *steps["jlora"])
    else:
      st = R.analyse(*steps[name])
    out[name] = {"temp": st["temp"], **live_at_peak(a.dump, before, st["compiled"].as_text())}
    print(f"\n### {name}: temp {st['temp'] / 2**20:.2f} MiB, live at the peak (instruction "
          f"{out[name]['peak_instruction']}) {out[name]['live_bytes'] / 2**20:.2f} MiB\n")
    for shp, row in list(out[name]["by_shape"].items())[:12]:
      print(f"  {shp:22s} {row['count']:4d} x  {row['bytes'] / 2**20:8.2f} MiB")
  path = a.json or (None if a.quick else os.path.join(R.RESULTS, f"peak_{a.targets}.json"))
  if path:
    write_json(path, {**prov, "config": cfg.__dict__, "targets": R.TARGETS[a.targets],
                      "loss": a.loss, "steps": out})
    print(f"\n# wrote {os.path.relpath(path)}")


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true")
  p.add_argument("--steps", default="full,jlora")
  p.add_argument("--targets", default="all")
  p.add_argument("--traced", type=int, default=3, help="steps run under the profiler")
  p.add_argument("--dump", default=None, help="also --xla_dump_to this folder")
  p.add_argument("--peak", action="store_true",
                 help="the buffers live at each step's memory peak, by shape (no timing)")
  p.add_argument("--json", default=None, help="with --peak: write here")
  p.add_argument("--loss", choices=("standard", "explicit"), default="standard",
                 help="the steps' cross-entropy (explicit: its backward written out)")
  p.add_argument("--by_shape", action="store_true",
                 help="also the dots grouped by class and shape: count, time, GFLOP/s")
  argv = sys.argv[1:] if argv is None else list(argv)
  a = p.parse_args(argv)
  if a.peak:
    a.dump = a.dump or tempfile.mkdtemp(prefix="jlora_peak_")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={a.dump}"
                               " --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=^$"
                               " --xla_dump_hlo_module_re=jit_(full|step|_lambda)").strip()
    return peak_report(a, argv)
  if a.dump:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_dump_to={a.dump} --xla_dump_hlo_as_text").strip()
  import jax
  import optax
  from benchmarks import reference as R
  from benchmarks.model import LOSSES, QUICK, Config
  cfg = QUICK if a.quick else Config()
  s = R.build(cfg, R.TARGETS[a.targets])
  programs = {**R.train_steps(s, optax.adam(1e-3), loss=LOSSES[a.loss]), **R.forwards(s)}
  unknown = [n for n in a.steps.split(",") if n not in programs]
  if unknown:
    p.error(f"--steps: unknown {unknown}; choose from {', '.join(programs)}")
  print(f"# per-op profile, jax {jax.__version__}, load {os.getloadavg()[0]:.2f}, {cfg}")
  for name in a.steps.split(","):
    fn, args = programs[name]
    compiled = jax.jit(fn).lower(*args).compile()
    report(name, compiled, args, a.traced, by_shape=a.by_shape)


if __name__ == "__main__":
  sys.exit(main())
