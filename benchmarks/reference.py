"""python -m benchmarks.reference [--quick] [--targets all|qv] [--rounds N] [--peft] [--json PATH]

Reference benchmark of jlora on a GPT-2-style decoder (benchmarks/model.py:
6 layers, d 384, 6 heads, MLP 1536, vocab 8192, seq 128, batch 8, f32, tied
LM head, pre-LN, causal attention), LoRA r 8, alpha 16.

Four Adam train steps, each one ``jax.jit``-compiled function:

* ``full``:  full fine-tuning, gradient of every parameter.
* ``jlora``: ``partition`` -> grad w.r.t. the adapters only -> ``combine``,
  the model run with ``jlora.lora`` (``x·W + s·(x·A)·B``); the frozen half is
  a jit argument, not a closed-over constant.
* ``unfused``: ``jlora`` with ``jlora.lora(apply, fuse=False)``: one
  down-projection matmul per adapted weight instead of one per shared input.
* ``naive``: the same adapter-only gradient, but with ``jlora.merge`` inside
  the loss and the plain model (forms ``W + s·A·B`` and its dense gradient).

and four forwards: ``base`` (the plain model), ``merged`` (the plain model on
``jlora.merge(lorified)``), ``unmerged`` (``jlora.lora(model.apply)`` on the
lorified tree) and ``unmerged_unfused`` (the same with ``fuse=False``).

For each: XLA FLOPs (``compiled.cost_analysis()['flops']``), memory
(``compiled.memory_analysis()``), optimizer-state bytes (train steps), op
counts of the compiled HLO, and wall time: the variants are run round-robin
(the order rotates every round), each call ``block_until_ready``-ed, and the
median per variant is reported with its ratio to ``full`` (or ``base``) from
the same run. ``--peft`` adds a PyTorch + PEFT equivalent of the same model,
interleaved with the JAX steps (needs torch, peft and transformers, either in
this interpreter or in the one given by ``--peft-python``).

Every full run writes its figures, with the exact command, the date, the
load average before and after the timing, and the versions, to
``benchmarks/results/reference_<targets>.json`` (``reference_peft.json``
with ``--peft``); ``--json PATH`` writes elsewhere. BENCHMARKS.md quotes
these files.

Run it from the repository root. ``--quick`` is a CI smoke run on a tiny
config (seconds); its numbers mean nothing, and it writes no file unless
``--json`` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time

import jax
import optax

import jlora
from benchmarks.model import GPT, QUICK, Config, next_token_loss

TARGETS = {"all": ("q", "k", "v", "o", "fc1", "fc2"), "qv": ("q", "v")}
RANK, ALPHA = 8, 16.0

# The targets (ratios; "<=" unless stated): issue 2's FLOPs, optimizer state
# and q+v wall time; issue 14's step memory and wall time, unmerged forward.
GOALS = {
    "flops_step_all": 0.71,
    "flops_fwd_unmerged": 1.03,
    "opt_state": 0.03,
    "temp_step": 1.0,
    "wall_step_all": 0.72,
    "wall_step_qv": 0.75,
    "wall_fwd_unmerged": 1.03,
}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ----------------------------------------------------------------------------
# Setup.


@dataclasses.dataclass
class Setup:
  cfg: Config
  model: GPT
  tokens: jax.Array
  params: dict
  lorified: dict
  adapters: dict
  frozen: dict
  targets: tuple[str, ...]


def build(cfg: Config, targets: tuple[str, ...]) -> Setup:
  model = GPT(cfg)
  tokens = jax.random.randint(jax.random.key(1), (cfg.batch, cfg.seq), 0, cfg.vocab)
  params = model.init(jax.random.key(0), tokens)
  lorified = jlora.lorify(params, RANK, key=jax.random.key(2), targets=targets,
                          alpha=ALPHA)
  # Non-zero B, so the adapters do something (B = 0 at init).
  lorified = jax.tree_util.tree_map_with_path(
      lambda kp, x: (0.01 * jax.random.normal(jax.random.key(3), x.shape, x.dtype)
                     if str(kp[-1]) == "['lora_b']" else x), lorified)
  adapters, frozen = jlora.partition(lorified)
  return Setup(cfg, model, tokens, params, lorified, adapters, frozen, targets)


def train_steps(s: Setup, tx: optax.GradientTransformation, *, loss=next_token_loss):
  """``{name: (fn, args)}`` for the train steps, each minimising ``loss(logits, tokens)``."""
  apply = s.model.apply
  lora_apply = jlora.lora(apply)
  unfused_apply = jlora.lora(apply, fuse=False)

  def full(params, opt_state, tokens):
    value, g = jax.value_and_grad(lambda p: loss(apply(p, tokens), tokens))(params)
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  def adapter_step(loss_fn):
    def step(adapters, opt_state, frozen, tokens):
      value, g = jax.value_and_grad(loss_fn)(adapters, frozen, tokens)
      updates, opt_state = tx.update(g, opt_state, adapters)
      return optax.apply_updates(adapters, updates), opt_state, value
    return step

  def jlora_loss(adapters, frozen, tokens):
    logits = lora_apply(jlora.combine(adapters, frozen), tokens)
    return loss(logits, tokens)

  def unfused_loss(adapters, frozen, tokens):
    logits = unfused_apply(jlora.combine(adapters, frozen), tokens)
    return loss(logits, tokens)

  def naive_loss(adapters, frozen, tokens):
    logits = apply(jlora.merge(jlora.combine(adapters, frozen)), tokens)
    return loss(logits, tokens)

  lora_state = tx.init(s.adapters)
  return {
      "full": (full, (s.params, tx.init(s.params), s.tokens)),
      "jlora": (adapter_step(jlora_loss), (s.adapters, lora_state, s.frozen, s.tokens)),
      "unfused": (adapter_step(unfused_loss), (s.adapters, lora_state, s.frozen, s.tokens)),
      "naive": (adapter_step(naive_loss), (s.adapters, lora_state, s.frozen, s.tokens)),
  }


def forwards(s: Setup):
  apply = s.model.apply
  merged = jax.jit(jlora.merge)(s.lorified)
  return {
      "base": (apply, (s.params, s.tokens)),
      "merged": (apply, (merged, s.tokens)),
      "unmerged": (jlora.lora(apply), (s.lorified, s.tokens)),
      "unmerged_unfused": (jlora.lora(apply, fuse=False), (s.lorified, s.tokens)),
  }


# ----------------------------------------------------------------------------
# Measurements.


def nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def op_counts(hlo: str) -> dict[str, int]:
  """Counts in the optimised HLO: all dots (inside fusions too), top-level
  fusions and instructions of the entry computation."""
  entry = hlo[hlo.index("\nENTRY"):]
  entry = entry[: entry.index("\n}")]
  return {
      "dot": len(re.findall(r" dot\(", hlo)),
      "fusion": len(re.findall(r" fusion\(", entry)),
      "entry_ops": sum(1 for line in entry.splitlines()[1:] if " = " in line),
  }


def analyse(fn, args, *, donate: tuple[int, ...] = ()) -> dict:
  """XLA's FLOPs, memory and op counts of ``jax.jit(fn, donate_argnums=donate)``.

  ``footprint`` is what the call holds at once: arguments + outputs + temporaries
  − the outputs written into donated arguments (``alias``). Without donation XLA
  may park temporaries in the output buffers before the outputs are written,
  which ``temp`` then does not count (the full step's 158 MiB of new parameters
  and Adam state); donated, those buffers hold the live inputs and every
  temporary is in ``temp``.
  """
  compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX returned one dict per device
    cost = cost[0]
  return {
      "compiled": compiled,
      "flops": float(cost["flops"]),
      "temp": mem.temp_size_in_bytes,
      "argument": mem.argument_size_in_bytes,
      "output": mem.output_size_in_bytes,
      "alias": mem.alias_size_in_bytes,
      "footprint": (mem.argument_size_in_bytes + mem.output_size_in_bytes
                    + mem.temp_size_in_bytes - mem.alias_size_in_bytes),
      "donated": list(donate),
      **op_counts(compiled.as_text()),
  }


def interleaved(calls: dict, rounds: int, warmup: int = 2) -> dict[str, list[float]]:
  """Runs ``calls`` round-robin, rotating the order each round; seconds per call."""
  names = list(calls)
  for _ in range(warmup):
    for n in names:
      calls[n]()
  times = {n: [] for n in names}
  for r in range(rounds):
    k = r % len(names)
    for n in names[k:] + names[:k]:
      t0 = time.perf_counter()
      calls[n]()
      times[n].append(time.perf_counter() - t0)
  return times


def jax_call(compiled, args):
  def call():
    jax.block_until_ready(compiled(*args))
  return call


def analytic(s: Setup) -> dict[str, float]:
  """Matmul FLOPs of one train step, counted by hand (2·m·k·n per matmul).

  Full fine-tuning runs each linear layer and the tied LM head three times
  (forward, dx, dW), attention's two batched matmuls three times each. The
  ideal LoRA step drops every frozen dW and adds, per adapted layer, six skinny
  matmuls: forward x·A and (x·A)·B, backward dB, d(xA), dA and the dx term.
  """
  c = s.cfg
  t = c.batch * c.seq
  linear = {"q": (c.d, c.d), "k": (c.d, c.d), "v": (c.d, c.d), "o": (c.d, c.d),
            "fc1": (c.d, c.mlp), "fc2": (c.mlp, c.d)}
  fwd_lin = sum(2 * t * i * o for i, o in linear.values()) * c.layers
  head = 2 * t * c.d * c.vocab
  attn = 2 * 2 * c.batch * c.heads * c.seq * c.seq * (c.d // c.heads) * c.layers
  full = 3 * (fwd_lin + head + attn)
  adapter = sum(6 * t * RANK * (linear[n][0] + linear[n][1]) for n in s.targets) * c.layers
  lora = 2 * fwd_lin + 2 * head + 3 * attn + adapter
  return {"full": full, "lora": lora, "ratio": lora / full}


# ----------------------------------------------------------------------------
# PyTorch + PEFT, driven line by line over a pipe so it interleaves with JAX.


class TorchWorker:
  def __init__(self, python: str, cfg: Config, targets: tuple[str, ...]):
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_reference.py")
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    cmd = [python, script, "--config", json.dumps(dataclasses.asdict(cfg)),
           "--targets", ",".join(targets), "--rank", str(RANK), "--alpha", str(ALPHA)]
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, env=env)
    self.info = json.loads(self._read())

  def _read(self) -> str:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError("torch worker exited; see its stderr above")
    return line

  def call(self, name: str):
    def run():
      self.proc.stdin.write(name + "\n")
      self.proc.stdin.flush()
      self._read()
    return run

  def close(self):
    self.proc.stdin.close()
    self.proc.wait(timeout=60)


def find_torch_python(explicit: str | None) -> str | None:
  candidates = [explicit] if explicit else [sys.executable]
  for py in candidates:
    probe = subprocess.run([py, "-c", "import torch, peft, transformers"],
                           capture_output=True, text=True)
    if probe.returncode == 0:
      return py
  return None


# ----------------------------------------------------------------------------
# Report.


def fmt_bytes(n: float) -> str:
  return f"{n / 2**20:8.2f} MiB"


def table(rows: list[list[str]], header: list[str]) -> str:
  widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
  line = lambda r: "| " + " | ".join(str(c).rjust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
  sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
  return "\n".join([line(header), sep] + [line(r) for r in rows])


def check(name: str, value: float, goal: float, op: str = "<=") -> dict:
  ok = value <= goal if op == "<=" else abs(value - goal) < 1e-9
  return {"measure": name, "value": value, "goal": f"{op} {goal:g}", "met": bool(ok)}


def check_line(c: dict) -> str:
  return f"  {'PASS' if c['met'] else 'MISS'}  {c['measure']}: {c['value']:.3f} (target {c['goal']})"


def default_json(args) -> str | None:
  if args.json:
    return args.json
  if args.quick:
    return None
  name = f"reference_{'peft' if args.peft else args.targets}.json"
  if args.peft and args.targets != "all":
    name = f"reference_peft_{args.targets}.json"
  return os.path.join(RESULTS, name)


def provenance(argv: list[str]) -> dict:
  """The exact command, the date, the machine and the versions of this run."""
  from experiments.utils import provenance as base
  out = base()
  out["command"] = shlex.join(["python", "-m", "benchmarks.reference", *argv])
  out["versions"]["python"] = out["python"]
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="tiny config, 2 rounds: a smoke test")
  p.add_argument("--targets", choices=sorted(TARGETS), default="all",
                 help="all: q,k,v,o,fc1,fc2 (default); qv: the paper's q and v")
  p.add_argument("--rounds", type=int, default=None,
                 help="timing rounds per variant (default 15; 2 with --quick)")
  p.add_argument("--forward-rounds", type=int, default=None,
                 help="timing rounds per forward (default 3x --rounds: a forward is "
                      "a quarter of a step, and its ratios are the noisier)")
  p.add_argument("--no-time", action="store_true", help="FLOPs and memory only")
  p.add_argument("--peft", action="store_true", help="add a PyTorch + PEFT comparison")
  p.add_argument("--peft-python", default=None,
                 help="interpreter with torch, peft and transformers (default: this one)")
  p.add_argument("--json", default=None, help="also write the numbers to this file")
  p.add_argument("--note", default="",
                 help="a note stored in the JSON (e.g. what else ran on the machine)")
  argv = sys.argv[1:] if argv is None else list(argv)
  args = p.parse_args(argv)
  prov = provenance(argv)

  cfg = QUICK if args.quick else Config()
  rounds = args.rounds or (2 if args.quick else 15)
  forward_rounds = args.forward_rounds or 3 * rounds
  targets = TARGETS[args.targets]
  load = os.getloadavg()
  print(f"# jlora reference benchmark  {datetime.date.today()}  "
        f"jax {jax.__version__}  {jax.devices()[0].platform}  "
        f"{os.cpu_count()} cpus  load {load[0]:.2f}  {platform.machine()}")
  print(f"# model {cfg}  LoRA r={RANK} alpha={ALPHA:g} targets={','.join(targets)}")

  s = build(cfg, targets)
  tx = optax.adam(1e-3)
  steps = train_steps(s, tx)
  fwds = forwards(s)

  t0 = time.perf_counter()
  stats = {n: analyse(fn, a) for n, (fn, a) in {**steps, **fwds}.items()}
  # The steps as a training loop compiles them: parameters (or adapters) and the optimizer
  # state donated, as jlora.train_step does. Compile only; the timed calls stay undonated.
  donated = {n: analyse(*steps[n], donate=(0, 1)) for n in ("full", "jlora")}
  print(f"# compiled {len(stats) + len(donated)} functions in {time.perf_counter() - t0:.1f} s")
  opt_bytes = {n: nbytes(a[1]) for n, (_, a) in steps.items()}

  times: dict[str, list[float]] = {}
  torch_info = None
  load_before = load_after = None
  if not args.no_time:
    calls = {n: jax_call(stats[n]["compiled"], a) for n, (_, a) in steps.items()}
    worker = None
    if args.peft:
      py = find_torch_python(args.peft_python)
      if py is None:
        print("# --peft: torch, peft and transformers are not importable "
              f"({args.peft_python or sys.executable}); skipping the PEFT comparison. "
              "Pass --peft-python with a venv that has them.")
      else:
        worker = TorchWorker(py, cfg, targets)
        torch_info = worker.info
        calls.update({"torch_full": worker.call("full"), "torch_peft": worker.call("peft")})
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    times.update(interleaved(calls, rounds))
    if worker:
      worker.close()
    times.update(interleaved({n: jax_call(stats[n]["compiled"], a)
                              for n, (_, a) in fwds.items()}, forward_rounds))
    load_after = os.getloadavg()
    print(f"# timed {rounds} interleaved rounds of the steps, {forward_rounds} of the "
          f"forwards in {time.perf_counter() - t0:.1f} s, "
          f"load {load_before[0]:.2f} -> {load_after[0]:.2f}")

  med = {n: statistics.median(v) for n, v in times.items()}
  ideal = analytic(s)

  print("\n## Train step (Adam, jit)\n")
  rows = []
  for n in steps:
    st = stats[n]
    rows.append([n, f"{st['flops'] / 1e9:.2f}", f"{st['flops'] / stats['full']['flops']:.3f}",
                 fmt_bytes(st["temp"]), fmt_bytes(st["argument"]), fmt_bytes(st["output"]),
                 fmt_bytes(opt_bytes[n]), f"{opt_bytes[n] / opt_bytes['full']:.4f}",
                 f"{med[n] * 1e3:.1f}" if n in med else "-",
                 f"{med[n] / med['full']:.3f}" if n in med else "-",
                 st["dot"], st["fusion"], st["entry_ops"]])
  print(table(rows, ["step", "GFLOP", "x full", "temp", "args", "out", "opt state",
                     "x full", "ms (med)", "x full", "dots", "fusions", "ops"]))
  print(f"\nanalytic matmul FLOPs: full {ideal['full'] / 1e9:.2f} G, ideal LoRA "
        f"{ideal['lora'] / 1e9:.2f} G, ratio {ideal['ratio']:.3f}")

  print("\n## Train-step memory, undonated and donated (parameters and optimizer state)\n")
  rows = []
  for d, group in (("no", stats), ("yes", donated)):
    ref = group["full"]
    for n in ("full", "jlora"):
      st = group[n]
      rows.append([n, d, fmt_bytes(st["temp"]), f"{st['temp'] / ref['temp']:.3f}",
                   fmt_bytes(st["argument"]), fmt_bytes(st["output"]), fmt_bytes(st["alias"]),
                   fmt_bytes(st["footprint"]), f"{st['footprint'] / ref['footprint']:.3f}"])
  print(table(rows, ["step", "donated", "temp", "x full", "args", "out", "aliased",
                     "footprint", "x full"]))

  if "torch_full" in med:
    print("\n## PyTorch + PEFT (same model, same run, interleaved)\n")
    print(f"torch {torch_info['torch']}  peft {torch_info['peft']}  threads "
          f"{torch_info['threads']}  trainable {torch_info['trainable']:,} of "
          f"{torch_info['total']:,}")
    rows = [[n, f"{med[n] * 1e3:.1f}", f"{med[n] / med['full']:.3f}"]
            for n in ("full", "jlora", "naive", "torch_full", "torch_peft")]
    print(table(rows, ["step", "ms (med)", "x jax full"]))
    print(f"\njlora / PEFT step time: {med['jlora'] / med['torch_peft']:.3f}   "
          f"(jax full / torch full: {med['full'] / med['torch_full']:.3f})")

  print("\n## Forward (jit)\n")
  rows = []
  for n in fwds:
    st = stats[n]
    rows.append([n, f"{st['flops'] / 1e9:.3f}", f"{st['flops'] / stats['base']['flops']:.4f}",
                 fmt_bytes(st["temp"]), fmt_bytes(st["argument"]),
                 f"{med[n] * 1e3:.1f}" if n in med else "-",
                 f"{med[n] / med['base']:.3f}" if n in med else "-",
                 st["dot"], st["fusion"]])
  print(table(rows, ["forward", "GFLOP", "x base", "temp", "args", "ms (med)", "x base",
                     "dots", "fusions"]))

  print("\n## Against the targets\n")
  ratio = lambda a, b: stats[a]["flops"] / stats[b]["flops"]  # noqa: E731
  checks = [
      check("train-step FLOPs jlora / full", ratio("jlora", "full"),
            GOALS["flops_step_all"] if args.targets == "all" else 1.0),
      check("train-step FLOPs naive / full (for reference)", ratio("naive", "full"), 1.0),
      check("forward FLOPs unmerged / base", ratio("unmerged", "base"), GOALS["flops_fwd_unmerged"]),
      check("forward FLOPs merged / base", ratio("merged", "base"), 1.0, "=="),
      check("optimizer state jlora / full", opt_bytes["jlora"] / opt_bytes["full"], GOALS["opt_state"]),
      check("train-step temporaries jlora / full, state donated (as jlora.train_step)",
            donated["jlora"]["temp"] / donated["full"]["temp"], GOALS["temp_step"]),
      check("train-step temporaries jlora / full, undonated (for reference: full parks "
            "temporaries in its outputs)", stats["jlora"]["temp"] / stats["full"]["temp"],
            GOALS["temp_step"]),
      check("train-step footprint jlora / full, state donated",
            donated["jlora"]["footprint"] / donated["full"]["footprint"], 1.0),
  ]
  if med:
    goal = GOALS["wall_step_all" if args.targets == "all" else "wall_step_qv"]
    checks += [check("wall time step jlora / full", med["jlora"] / med["full"], goal),
               check("wall time forward unmerged / base", med["unmerged"] / med["base"],
                     GOALS["wall_fwd_unmerged"])]
  print("\n".join(check_line(c) for c in checks))
  if args.quick:
    print("\n(--quick: a smoke run on a tiny config; the numbers mean nothing)")

  path = default_json(args)
  if path:
    steps_ref = {n: "full" for n in steps} | {n: "full" for n in ("torch_full", "torch_peft")}
    ref_of = {**steps_ref, **{n: "base" for n in fwds}}
    out = {
        **prov, "note": args.note, "quick": args.quick,
        "load_before_timing": load_before, "load_after_timing": load_after,
        "config": dataclasses.asdict(cfg), "targets": targets, "rank": RANK,
        "alpha": ALPHA, "rounds": rounds, "forward_rounds": forward_rounds,
        "stats": {n: {k: v for k, v in st.items() if k != "compiled"}
                  for n, st in stats.items()},
        "donated": {n: {k: v for k, v in st.items() if k != "compiled"}
                    for n, st in donated.items()},
        "ratios": {n: {"flops": st["flops"] / stats[ref_of[n]]["flops"],
                       "temp": st["temp"] / stats[ref_of[n]]["temp"],
                       **({"wall": med[n] / med[ref_of[n]]} if n in med else {})}
                   for n, st in stats.items()},
        "opt_bytes": opt_bytes, "times_s": times, "median_s": med, "analytic": ideal,
        "torch": torch_info,
        "torch_ratios": ({"jlora_over_peft": med["jlora"] / med["torch_peft"],
                          "jax_full_over_torch_full": med["full"] / med["torch_full"]}
                         if "torch_full" in med else None),
        "checks": checks,
    }
    from experiments.utils import write_json

    write_json(path, out)
    print(f"\n# wrote {os.path.relpath(path)}")


if __name__ == "__main__":
  main()
