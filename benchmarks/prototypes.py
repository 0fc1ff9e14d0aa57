"""python -m benchmarks.prototypes [--rounds N] [--targets all|qv] [--json PATH] [--quick]

The forms of the adapted dot that issue 14 weighed, on the reference model
(`benchmarks.reference`), each traced by swapping one piece of the library
while its function is jitted:

* steps ``jlora`` / ``unfused``: the library (``x·W + t·B`` as one matmul
  ``[x | t]·[W ; B]`` under a ``custom_jvp``, `jlora._labels.fold_into_matmul`);
* ``jlora_two_dots`` / ``unfused_two_dots``: the form before it (two dots and
  an ``add``, which XLA:CPU re-adds in each consumer, keeping both halves);
* forwards ``unmerged``: the library (no differentiation: two dots and an
  ``add``); ``unmerged_one_matmul``: the one-matmul form as the primal too;
  ``unmerged_unrolled``: the up-projection ``t·B`` as ``r`` broadcast
  multiply-adds (``Σ_j t[:, j] ⊗ B[j]``) instead of a dot, which XLA can fuse
  with the ``add`` into one loop, so ``t·B`` is never written out on its own.

Reports XLA FLOPs, temporaries, dots, fusions and interleaved median wall
times (ratios to ``full`` or ``base`` of the same run), and writes them with
the command, the date, the load before and after and the versions to
``benchmarks/results/prototypes_<targets>.json`` (``--quick``: a tiny
config, no file unless ``--json``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import statistics
import sys

import jax
import optax

from benchmarks import reference as R
from benchmarks.model import QUICK, Config
from jlora import _labels


@contextlib.contextmanager
def two_dots():
  """The adapted dot as before: `fold_into_matmul` declines every use."""
  orig = _labels.fold_into_matmul
  _labels.fold_into_matmul = lambda *args, **kwargs: None
  try:
    yield
  finally:
    _labels.fold_into_matmul = orig


@contextlib.contextmanager
def one_matmul_primal():
  """The one-matmul form also without differentiation (forward only)."""
  orig = _labels._stacked_matmul
  _labels._stacked_matmul = _labels._one_matmul
  try:
    yield
  finally:
    _labels._stacked_matmul = orig


@contextlib.contextmanager
def unrolled_up_primal():
  """The up-projection as ``r`` broadcast multiply-adds fused with the add (forward only)."""
  orig = _labels._stacked_matmul

  def stacked(x, t, w, b, weight_first, precision, preferred):
    y = _labels._matmul(x, w, weight_first, precision, preferred)
    for j in range(t.shape[1]):
      y = y + (b[j][:, None] * t[:, j][None, :] if weight_first else
               t[:, j][:, None] * b[j][None, :]).astype(y.dtype)
    return y

  _labels._stacked_matmul = stacked
  try:
    yield
  finally:
    _labels._stacked_matmul = orig


def compiled_with(patch, fn, args) -> dict:
  with patch():
    return R.analyse(lambda *a: fn(*a), args)  # a fresh function: jit caches by identity


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=None, help="step rounds (default 11; forwards 3x)")
  p.add_argument("--targets", choices=sorted(R.TARGETS), default="all")
  p.add_argument("--quick", action="store_true", help="tiny config, 2 rounds: a smoke test")
  p.add_argument("--json", default=None)
  p.add_argument("--note", default="", help="a note stored in the JSON")
  argv = sys.argv[1:] if argv is None else list(argv)
  args = p.parse_args(argv)
  from experiments.utils import provenance
  prov = provenance()
  prov["command"] = shlex.join(["python", "-m", "benchmarks.prototypes", *argv])
  prov["versions"]["python"] = prov["python"]

  cfg = QUICK if args.quick else Config()
  rounds = args.rounds or (2 if args.quick else 11)
  s = R.build(cfg, R.TARGETS[args.targets])
  steps = R.train_steps(s, optax.adam(1e-3))
  fwds = R.forwards(s)
  step_stats = {n: R.analyse(*steps[n]) for n in ("full", "jlora", "unfused")}
  for n in ("jlora", "unfused"):
    step_stats[f"{n}_two_dots"] = compiled_with(two_dots, *steps[n])
  fwd_stats = {n: R.analyse(*fwds[n]) for n in ("base", "merged", "unmerged")}
  fwd_stats["unmerged_one_matmul"] = compiled_with(one_matmul_primal, *fwds["unmerged"])
  fwd_stats["unmerged_unrolled"] = compiled_with(unrolled_up_primal, *fwds["unmerged"])
  with unrolled_up_primal():  # the same function as the library's, to the rounding
    delta = float(abs(jax.jit(lambda *a: fwds["unmerged"][0](*a))(*fwds["unmerged"][1])
                      - fwds["unmerged"][0](*fwds["unmerged"][1])).max())
  print(f"# unmerged_unrolled against unmerged: max |logit difference| {delta:.2e}")

  def args_of(n, table):
    for suffix in ("_two_dots", "_one_matmul", "_unrolled"):
      n = n.removesuffix(suffix)
    return table[n][1]

  load_before = os.getloadavg()
  times = R.interleaved({n: R.jax_call(st["compiled"], args_of(n, steps))
                         for n, st in step_stats.items()}, rounds)
  times.update(R.interleaved({n: R.jax_call(st["compiled"], args_of(n, fwds))
                              for n, st in fwd_stats.items()}, 3 * rounds))
  load_after = os.getloadavg()
  med = {n: statistics.median(v) for n, v in times.items()}

  rows = {}
  for group, ref in ((step_stats, "full"), (fwd_stats, "base")):
    for n, st in group.items():
      rows[n] = {"flops": st["flops"], "temp": st["temp"], "dot": st["dot"],
                 "fusion": st["fusion"], "median_s": med[n],
                 "flops_ratio": st["flops"] / group[ref]["flops"],
                 "temp_ratio": st["temp"] / group[ref]["temp"],
                 "wall_ratio": med[n] / med[ref], "reference": ref}
  print(f"# load {load_before[0]:.2f} -> {load_after[0]:.2f}, {rounds} step rounds, "
        f"{3 * rounds} forward rounds\n")
  print("| variant | GFLOP | temp MiB | dots | fusions | ms (median) | ratio |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for n, r in rows.items():
    print(f"| {n} | {r['flops'] / 1e9:.3f} | {r['temp'] / 2**20:.2f} | {r['dot']} | "
          f"{r['fusion']} | {r['median_s'] * 1e3:.1f} | {r['wall_ratio']:.3f} × {r['reference']} |")

  path = args.json or (None if args.quick else
                       os.path.join(R.RESULTS, f"prototypes_{args.targets}.json"))
  if path:
    out = {**prov, "note": args.note, "quick": args.quick,
           "load_before_timing": list(load_before), "load_after_timing": list(load_after),
           "config": cfg.__dict__, "targets": R.TARGETS[args.targets], "rounds": rounds,
           "forward_rounds": 3 * rounds, "variants": rows, "times_s": times,
           "unrolled_max_abs_logit_difference": delta}
    from experiments.utils import write_json

    write_json(path, out)
    print(f"\n# wrote {os.path.relpath(path)}")


if __name__ == "__main__":
  main()
