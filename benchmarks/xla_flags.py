"""python -m benchmarks.xla_flags [--sets NAME,...] [--passes N] [--rounds N] [--json PATH] [--quick]

Can an XLA:CPU flag close issue 14's two wall-time gaps on the reference model
(`benchmarks.reference`): the LoRA train step at 0.73x full fine-tuning (goal
0.72, FLOPs 0.694x), and the unmerged forward at 1.07-1.10x base (goal 1.03,
FLOPs 1.024x), whose excess is the adapters' 60 extra small dots and ~100
fusions, a per-op cost?

Each flag set in ``SETS`` (none changes the arithmetic's precision: no fast
math) runs ``benchmarks.reference`` in a fresh process with ``XLA_FLAGS``
set, so that the flags reach the compiler. The sets run in rotation, ``--passes``
times (default 2), so that a drift of the machine's speed falls on every set.
Within a process the variants are interleaved, so the ratios ``jlora / full``
and ``unmerged / base`` are measured in one run; across sets the per-variant
medians (pooled over the passes) are compared with the ``default`` set's,
which is a comparison of separate processes and the noisier one.

Writes every set's figures with the flags, the command, the date, the load and
the versions to ``benchmarks/results/xla_flags.json`` (``--quick``: the tiny
config, no file unless ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

from benchmarks import reference as R

SETS = {
    "default": "",
    # XNNPACK for the dots (the adapters' rank-8 dots are the small ones), then for
    # the elementwise ops and reductions as well, then its greedy subgraph fusion.
    "xnn_dot": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "xnn_all": "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
    "xnn_graph": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    # oneDNN for matmul fusions in place of Eigen.
    "onednn": "--xla_cpu_use_onednn=true",
    # One thread per Eigen matmul: the two cores go to independent ops instead.
    "eigen_one_thread": "--xla_cpu_multi_thread_eigen=false",
}
VARIANTS = ("full", "jlora", "base", "unmerged")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_set(flags: str, args, path: str) -> dict:
  """One `benchmarks.reference` process under ``flags``; its JSON."""
  cmd = [sys.executable, "-m", "benchmarks.reference", f"--json={path}",
         f"--note=XLA_FLAGS={flags}"]
  cmd += ["--quick"] if args.quick else []
  cmd += [f"--rounds={args.rounds}"] if args.rounds else []
  env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(f"XLA_FLAGS={flags!r}: benchmarks.reference exited with "
                     f"{proc.returncode}:\n{proc.stderr[-2000:]}")
  with open(path) as f:
    return json.load(f)


def summarize(runs: list[dict]) -> dict:
  """Pools one set's passes: medians per variant, in-process ratios, FLOPs."""
  times = {n: [t for r in runs for t in r["times_s"][n]] for n in VARIANTS}
  med = {n: statistics.median(v) for n, v in times.items()}
  return {
      "median_s": med,
      "step_jlora_over_full": med["jlora"] / med["full"],
      "forward_unmerged_over_base": med["unmerged"] / med["base"],
      "per_pass": [{"median_s": {n: r["median_s"][n] for n in VARIANTS},
                    "step_jlora_over_full": r["ratios"]["jlora"]["wall"],
                    "forward_unmerged_over_base": r["ratios"]["unmerged"]["wall"],
                    "load_before_timing": r["load_before_timing"]} for r in runs],
      "recorded_xla_flags": [r["xla_flags"] for r in runs],
      "flops": {n: runs[0]["stats"][n]["flops"] for n in VARIANTS},
      "dots": {n: runs[0]["stats"][n]["dot"] for n in VARIANTS},
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sets", default=",".join(SETS),
                 help=f"flag sets to run, from {', '.join(SETS)} (default: all)")
  p.add_argument("--passes", type=int, default=2, help="rotations over the sets (default 2)")
  p.add_argument("--rounds", type=int, default=None,
                 help="benchmarks.reference's --rounds (default its own: 15 steps, 45 forwards)")
  p.add_argument("--json", default=None, help="write the figures here")
  p.add_argument("--quick", action="store_true", help="the tiny config: a smoke test")
  argv = sys.argv[1:] if argv is None else list(argv)
  args = p.parse_args(argv)
  names = args.sets.split(",")
  unknown = [n for n in names if n not in SETS]
  problems = [f"--sets: unknown {unknown}; choose from {', '.join(SETS)}"] if unknown else []
  if "default" not in names:
    problems.append("--sets: add default (the other sets are compared with it)")
  if args.passes < 1:
    problems.append(f"--passes: at least 1 (got {args.passes})")
  if problems:
    p.error("; ".join(problems))
  from experiments.utils import provenance, write_json
  prov = provenance()
  prov["command"] = shlex.join(["python", "-m", "benchmarks.xla_flags", *argv])

  runs: dict[str, list[dict]] = {n: [] for n in names}
  with tempfile.TemporaryDirectory() as tmp:
    for k in range(args.passes):
      for name in names[k % len(names):] + names[:k % len(names)]:
        out = run_set(SETS[name], args, os.path.join(tmp, f"{name}-{k}.json"))
        runs[name].append(out)
        print(f"# pass {k + 1}/{args.passes} {name}: step jlora/full "
              f"{out['ratios']['jlora']['wall']:.3f}, forward unmerged/base "
              f"{out['ratios']['unmerged']['wall']:.3f} (load "
              f"{out['load_before_timing'][0]:.2f})", flush=True)
  sets = {n: dict(flags=SETS[n], **summarize(r)) for n, r in runs.items()}
  ref = sets["default"]["median_s"]
  for s in sets.values():
    s["median_over_default"] = {n: s["median_s"][n] / ref[n] for n in VARIANTS}

  print("\n| set | step jlora / full | forward unmerged / base | full | jlora | base | "
        "unmerged (median / default's) |\n|---|---:|---:|---:|---:|---:|---:|")
  for n, s in sets.items():
    rel = s["median_over_default"]
    print(f"| {n} | {s['step_jlora_over_full']:.3f} | {s['forward_unmerged_over_base']:.3f} | "
          + " | ".join(f"{rel[v]:.3f}" for v in VARIANTS) + " |")
  path = args.json or (None if args.quick else os.path.join(R.RESULTS, "xla_flags.json"))
  if path:
    prov.update(load_after=list(os.getloadavg()), passes=args.passes, sets=sets)
    write_json(path, prov)
    print(f"\n# wrote {os.path.relpath(path)}")


if __name__ == "__main__":
  main()
