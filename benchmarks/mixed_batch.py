"""Mixed-task batches: one forward pass over a batch routed across a bank.

Three ways to run a batch of ``--batch`` sequences through the benchmark
decoder (`benchmarks.model.GPT`) with LoRA on q, k, v, o, fc1, fc2:

* ``single``: every example uses one adapter (`jlora.lora` on a lorified
  tree): the baseline.
* ``bank``: ``--adapters`` adapters stacked with `jlora.stack_adapters`,
  every example routed to its own (`jlora.route` with a per-example index);
  one jitted forward pass.
* ``loop``: the same mixed batch run as one forward per adapter over its
  sub-batch (a Python loop of jitted calls), then reassembled.

The three are timed interleaved (one call of each per round) so that load
on a shared machine hits them alike; medians are reported. The goal is
``bank / single ≤ 1.2``.

The figures, with the exact command, the date, the load average before and
after the timing and the versions, go to ``benchmarks/results/mixed_batch.json``
(``--json PATH`` elsewhere; ``--quick`` writes no file unless given one).

Usage::

  python -m benchmarks.mixed_batch            # d 384, 6 layers, seq 128
  python -m benchmarks.mixed_batch --quick    # a small model, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from benchmarks.model import GPT, Config
from benchmarks.reference import RESULTS, interleaved

TARGETS = ("q", "k", "v", "o", "fc1", "fc2")


def build(cfg: Config, adapters: int, rank: int):
  model = GPT(cfg)
  tokens = jax.random.randint(jax.random.key(0), (cfg.batch, cfg.seq), 0, cfg.vocab)
  base = model.init(jax.random.key(1), tokens[:1])

  def one(k):  # a trained-looking adapter: random A and B
    p = jlora.lorify(base, rank, key=jax.random.key(10 + k), targets=TARGETS, alpha=2 * rank)
    return jax.tree.map(lambda x: x + 0.01 * (k + 1) if x.ndim == 2 and x.shape[0] == rank else x, p)

  trees = [one(k) for k in range(adapters)]
  return model, tokens, base, trees


def block(x):
  return jax.tree.map(lambda a: a.block_until_ready(), x)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--adapters", type=int, default=16)
  ap.add_argument("--rank", type=int, default=8)
  ap.add_argument("--rounds", type=int, default=10)
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--seq", type=int, default=None)
  ap.add_argument("--json", default=None,
                  help="write the figures here (default: benchmarks/results/mixed_batch.json)")
  ap.add_argument("--note", default="", help="a note stored in the JSON")
  argv = sys.argv[1:] if argv is None else list(argv)
  args = ap.parse_args(argv)
  from experiments.utils import provenance
  prov = provenance()
  prov["command"] = shlex.join(["python", "-m", "benchmarks.mixed_batch", *argv])
  prov["versions"]["python"] = prov["python"]
  cfg = Config(layers=2, d=128, heads=4, mlp=512, vocab=1024, seq=32) if args.quick else Config()
  cfg = Config(**{**cfg.__dict__, "batch": args.batch, "seq": args.seq or cfg.seq})
  model, tokens, base, trees = build(cfg, args.adapters, args.rank)
  bank = jlora.stack_adapters(trees)
  index = jnp.arange(cfg.batch) % args.adapters
  apply = jlora.lora(model.apply)

  single = jax.jit(apply)
  mixed = jax.jit(lambda b, i, t: apply(jlora.route(b, i), t))
  groups = [np.flatnonzero(np.asarray(index) == k) for k in range(args.adapters)]
  order = np.argsort(np.concatenate(groups))

  def loop(tokens):
    outs = [single(trees[k], tokens[g]) for k, g in enumerate(groups) if len(g)]
    return jnp.concatenate(outs)[order]

  runs = {"single": lambda: single(trees[0], tokens),
          "bank": lambda: mixed(bank, index, tokens),
          "loop": lambda: loop(tokens)}
  # Correctness on the way: the bank equals the loop (each example, own adapter).
  got, want = block(runs["bank"]()), block(runs["loop"]())
  err = float(jnp.max(jnp.abs(got - want)))
  # Compile, warm up, then rounds in a rotating order (reference.interleaved).
  load_before = os.getloadavg()
  times = interleaved({k: (lambda fn=fn: block(fn())) for k, fn in runs.items()}, args.rounds)
  load_after = os.getloadavg()
  med = {k: statistics.median(v) for k, v in times.items()}
  result = {
      **prov, "note": args.note, "quick": args.quick,
      "load_before_timing": list(load_before), "load_after_timing": list(load_after),
      "config": {**cfg.__dict__, "adapters": args.adapters, "rank": args.rank,
                 "rounds": args.rounds, "targets": TARGETS},
      "device": str(jax.devices()[0]),
      "times_s": times,
      "median_ms": {k: round(1e3 * v, 2) for k, v in med.items()},
      "bank_over_single": round(med["bank"] / med["single"], 3),
      "loop_over_single": round(med["loop"] / med["single"], 3),
      "max_abs_bank_minus_loop": err,
  }
  print(json.dumps({k: v for k, v in result.items() if k != "times_s"}, indent=2))
  path = args.json or (None if args.quick else os.path.join(RESULTS, "mixed_batch.json"))
  if path:
    from experiments.utils import write_json

    write_json(path, result)
    print(f"# wrote {os.path.relpath(path)}")
  return result


if __name__ == "__main__":
  main()
