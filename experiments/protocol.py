"""python -m experiments.protocol [--config=minilm_fortunes|smollm2_mobydick] [--methods=lora,full] [--quick] [--key=value ...]

The paper's protocol (issue 15), in one place, for MiniLM + fortunes
(classification, scored by accuracy) and SmolLM2 + Moby Dick (language
modelling, scored by held-out perplexity):

1. **Select** each method's learning rate on the validation split: one run
   (seed ``select_seed``) at every rate of its grid (``SETUPS[...].grids``:
   4 or more rates spanning at least 10x), scored on validation at the end
   of training. The test split plays no part in the choice.
2. **Report** at the selected rate: ``seeds`` seeds (the selection run is
   one of them), the test metric as mean ± sample std, and a paired
   comparison of every method against ``reference`` on the same seeds (same
   initialisation, same batches).
3. **Budget check**: step 1 runs again at twice the budget (``steps``, the
   probe's ``probe_steps``), up to ``doublings`` times. A budget is enough
   when doubling it did not raise the selected validation score by more
   than ``plateau``: training twice as long did not help. Step 2 runs at the
   first budget that is enough, else at the last one tried. A doubled grid
   leaves out the rates above the selected one that scored more than
   ``drop`` below it: a longer schedule moves the best peak rate down, not
   up, so a rate already too large does not come back. It runs nearest the
   selected rate first, so a sweep stopped partway holds the likeliest winners
   (its run files are reused when it is run again). A grid whose best rate is
   its smallest or its largest says nothing of the rates beyond it, so the
   rate one step further out runs too (the step: the ratio of that edge to its
   neighbour; one significant digit), up to ``extend`` times a budget, until
   the best rate is inside the grid. The score is
   accuracy for fortunes and minus the log perplexity (the mean NLL in nats)
   for Moby Dick, so ``plateau`` 0.01 is one accuracy point or 1% of
   perplexity. ``doublings_for`` sets a method's own number of doublings
   (``lora_all:0`` keeps it at its first budget). A last budget that was
   not doubled has only the in-run check: the best
   validation score (every ``eval_every`` steps) of the run's last third
   within ``plateau`` of its best before. That check alone is weak under a
   cosine schedule, whose decayed rate flattens every curve's end, which is
   why the doubling decides where it can.

Moby Dick has no validation split of its own: the held-out chapters' first
``eval_tokens`` tokens are the validation rows and the next ``eval_tokens``
the test rows, both scored in windows of ``seq_len + 1``. Its methods are
``lora`` (the config's targets) and ``full``.

Methods: ``probe`` (the head alone on the frozen encoder's features,
``probe_steps`` steps), ``lora`` (r, alpha, targets from the config),
``lora_all`` (the same rank on q, k, v, attention out and both feed-forward
layers), ``qlora`` (``lora`` on an NF4 base with double quantization),
``ia3``, ``dora`` (as in `experiments.methods_compare`) and ``full`` (every
weight). The head is trained in full next to every method, at ``head_lr``;
only the body's rate is swept (the probe has no body: its grid is the
head's rate).

Experiments 3-5 (`experiments.fortunes_sweeps`) run at the rates this
selects for ``lora`` and ``full``.

Every finished run is a JSON under ``experiments/results/protocol/`` (for
Moby Dick ``protocol_mobydick/``: its settings, the validation curve, the
test metric, date, load and versions), keyed by its settings, so an
interrupted protocol resumes and every number it reports is a committed
file. The summary goes to ``experiments/results/protocol_fortunes.json``
(``protocol_mobydick.json``) with the curves in a PNG of the same name and
the table of `experiments/RESULTS.md` in a ``.md`` of the same name
(``--summary=NAME`` writes ``NAME.json`` etc. instead). A run that would
overwrite a summary and lose what it holds (a method left out of
``--methods``, or under ``--select_only`` a method's seeds) stops before
it trains, and says how to keep it.
``--quick``: a smoke run under ``runs/quick`` whose numbers mean nothing.

Examples::

  python -m experiments.protocol --methods=probe,lora,full,lora_all,ia3,dora,qlora \
      --doublings_for=full:2,lora:2,ia3:2,lora_all:1,dora:2,qlora:2  # experiment 2
  python -m experiments.protocol --methods=lora --select_only --summary=protocol_lora_sweep
  python -m experiments.protocol --config=smollm2_mobydick \
      --doublings_for=lora:3,full:2                            # LoRA vs full on Moby Dick
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from experiments import config as config_lib
from experiments import finetune, fortunes, lm, methods_compare, utils
from experiments.config import REPO_ROOT

ALL_LINEAR = ("query", "key", "value", "out", "intermediate", "output")
OWN = {
    "methods": (("lora", "full"), "methods: probe, lora, lora_all, qlora, ia3, dora, full "
                "(Moby Dick: lora, full)"),
    "reference": ("lora", "the method the others are compared with, seed by seed"),
    "select_seed": (0, "seed of the learning-rate selection runs"),
    "seeds": (3, "seeds at the selected rate (0..N-1; the selection seed is one of them)"),
    "plateau": (0.01, "a budget is enough when doubling it gains at most this in val score"),
    "doublings": (1, "the selection runs again at twice the budget (steps; the probe's "
                  "probe_steps), up to this many times, until doubling stops helping"),
    "doublings_for": ((), "method:N, a method's own doublings in place of doublings "
                      "(lora_all:0 keeps it at its first budget: only the in-run check)"),
    "drop": (0.05, "a doubled grid leaves out the rates above the selected one that "
             "scored more than this below it"),
    "extend": (2, "a grid whose best rate is its smallest or largest runs the rate one "
               "step beyond it, up to this many times a budget (0: never)"),
    "select_only": (False, "run the learning-rate sweeps only (no further seeds)"),
    "summary": ("", "the summary's file name, without .json (default protocol_fortunes or "
                "protocol_mobydick)"),
}
QUICK_GRID = (1e-3, 1e-2)


def budget_of(method: str) -> str:
  """The setting that is a method's training budget."""
  return "probe_steps" if method == "probe" else "steps"


def doublings_of(cfg: dict[str, Any], method: str) -> int:
  """How many times a method's budget may double: its ``doublings_for`` entry, else
  ``doublings``."""
  own = dict(item.split(":") for item in cfg["doublings_for"])
  return int(own[method]) if method in own else cfg["doublings"]


def _check_doublings_for(items: tuple[str, ...], methods) -> list[str]:
  """The problems of ``--doublings_for``: every item ``method:N``, a known method, N >= 0,
  each method once."""
  problems = []
  names = [item.partition(":")[0] for item in items]
  for item, name in zip(items, names):
    n = item.partition(":")[2]
    if name not in methods or not n.isdigit():
      problems.append(f"{item!r}" + ("" if n.isdigit() else " (N must be an integer >= 0)")
                      + ("" if name in methods else f" (unknown method {name!r})"))
  twice = [name for name in dict.fromkeys(names) if names.count(name) > 1]
  problems += [f"{name!r} given {names.count(name)} times (give each method once)"
               for name in twice]
  return problems


# --------------------------------------------------------------------------- the two tasks


def _fortunes_body(task, cfg: dict[str, Any], method: str, seed: int, lr: float) -> dict[str, Any]:
  """Trains one (method, rate, seed): the fortunes loop of every experiment."""
  if method == "probe":  # the rate is the head's: the body is frozen
    return fortunes.train_probe(task, dict(cfg, head_lr=lr), seed,
                                eval_every=max(1, cfg["probe_steps"] // 8))
  if method == "full":
    return fortunes.train(task, dict(cfg, method="full"), seed, lr=lr, measure_memory=False)
  variant = dict(cfg, method="lora")
  if method == "lora_all":
    variant["targets"] = ALL_LINEAR
  name = "lora" if method == "lora_all" else method
  return fortunes.train(task, variant, seed, lr=lr, measure_memory=False,
                        params=methods_compare.add_method(task, variant, name, seed))


def _mobydick_data(cfg: dict[str, Any]) -> dict[str, Any]:
  """The corpus with validation rows as its held-out rows, and the test rows beside it."""
  corpus = lm.load_corpus(cfg["seq_len"], cfg["n_heldout"], 2 * cfg["eval_tokens"],
                          cfg["layers"])
  n = corpus.heldout.shape[0] // 2
  return {"corpus": dataclasses.replace(corpus, heldout=corpus.heldout[:n]),
          "test": corpus.heldout[n:2 * n]}


def _mobydick_body(data, cfg: dict[str, Any], method: str, seed: int, lr: float) -> dict[str, Any]:
  """Trains SmolLM2 (LoRA or full) for one (rate, seed); validation and test perplexity."""
  run_cfg = dict(cfg, method=method, seed=seed, **{"lr" if method == "lora" else "full_lr": lr})
  res = lm.train(data["corpus"], run_cfg, measure_memory=False)
  nll = lm.nll_fn(data["corpus"].config, factored=method == "lora")
  return {"val_ppl": res["heldout_ppl"],
          "test_ppl": lm.perplexity(nll, res["params"], data["test"], cfg["eval_batch"]),
          "evals": [{"step": e["step"], "val_ppl": e["heldout_ppl"]} for e in res["evals"]],
          "losses": res["losses"], "trainable_params": res["trainable_params"],
          "total_params": res["total_params"]}


@dataclasses.dataclass(frozen=True)
class Setup:
  """One task under the protocol: its config, rate grids, data, training and metric."""

  config: str
  name: str  # the summary's name and the per-run folder's
  grids: dict[str, tuple[float, ...]]  # body learning rates tried per method
  run_keys: tuple[str, ...]  # the settings that make a run's result (its cache key)
  over: dict[str, Any]
  quick: dict[str, Any]
  data: Callable[[dict[str, Any]], Any]
  body: Callable[..., dict[str, Any]]
  metric: str  # "acc" or "ppl": the row keys are val_<metric> and test_<metric>
  score: Callable[[float], float]  # higher is better
  show: Callable[[float], str]

  def folder(self, quick: bool) -> str:
    return os.path.join(REPO_ROOT, *(("runs", "quick") if quick else ("experiments", "results")),
                        "protocol" if self.name == "fortunes" else f"protocol_{self.name}")


SETUPS = {
    "minilm_fortunes": Setup(
        config="minilm_fortunes", name="fortunes",
        # 4 or more rates spanning at least 10x, centred on the rate each method ran at before
        # lora chose 5e-4, its smallest rate, at 300 steps (tied with 2e-3 and 5e-3), so 2e-4
        # was added
        grids={"probe": (5e-4, 2e-3, 5e-3, 2e-2), "lora": (2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2),
               "lora_all": (5e-4, 1e-3, 2e-3, 5e-3),
               # qlora and dora chose 5e-3, their largest rate, so 1e-2 was added (as lora's)
               # dora chose 1e-2, then the largest, so 2e-2 was added
               "qlora": (5e-4, 1e-3, 2e-3, 5e-3, 1e-2),
               "dora": (5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2),
               "ia3": (3e-3, 1e-2, 3e-2, 1e-1),
               # full chose 3e-4, its largest rate, at 300 steps, so 1e-3 was added
               "full": (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)},
        run_keys=("rank", "alpha", "targets", "head", "head_lr", "warmup", "steps",
                  "weight_decay", "batch_size", "max_len", "split_seed", "test_fraction",
                  "val_size", "train_size", "test_size", "eval_every", "eval_batch", "ia3_lr"),
        over=dict(eval_every=25),  # a validation curve for the budget check
        quick=dict(steps=4, eval_every=2, seeds=2, train_size=128, test_size=64, doublings=0,
                   extend=0),
        data=fortunes.task_from, body=_fortunes_body, metric="acc", score=float,
        show=lambda v: f"{100 * v:.1f}"),
    "smollm2_mobydick": Setup(
        config="smollm2_mobydick", name="mobydick",
        # full chose 5e-5, then its largest rate, so 1e-4 was added; it chose 1e-4 in turn,
        # so 2e-4 and 5e-4 were added
        grids={"lora": (3e-4, 1e-3, 3e-3, 1e-2),
               "full": (5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4)},
        run_keys=("rank", "alpha", "targets", "head", "warmup", "steps", "weight_decay",
                  "batch_size", "seq_len", "n_heldout", "eval_tokens", "eval_every",
                  "eval_batch", "layers"),
        over=dict(eval_every=10),
        quick=dict(eval_every=1, seeds=2, doublings=0, extend=0),
        data=_mobydick_data, body=_mobydick_body, metric="ppl", score=lambda v: -math.log(v),
        show=lambda v: f"{v:.2f}"),
}


# --------------------------------------------------------------------------- the protocol


def run(setup: Setup, data, cfg: dict[str, Any], method: str, seed: int,
        lr: float) -> dict[str, Any]:
  """One run, from its committed JSON if it exists, else trained and written."""
  key = {k: cfg[k] for k in setup.run_keys if k in cfg}
  key.update(method=method, seed=seed, lr=lr)
  if method == "probe":
    key.update(probe_steps=cfg["probe_steps"])
  digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=list).encode()).hexdigest()[:10]
  path = os.path.join(setup.folder(cfg["quick"]), f"{method}-lr{lr:g}-s{seed}-{digest}.json")
  if os.path.isfile(path):
    with open(path) as f:
      return dict(json.load(f), file=os.path.basename(path))
  t0 = time.perf_counter()
  res = setup.body(data, cfg, method, seed, lr)
  val, test = f"val_{setup.metric}", f"test_{setup.metric}"
  row = {"method": method, "lr": lr, "seed": seed, test: res[test], val: res[val],
         "evals": res["evals"], "losses": res["losses"],
         "trainable_params": res["trainable_params"], "total_params": res["total_params"],
         "train_s": time.perf_counter() - t0, "settings": key, "provenance": utils.provenance()}
  utils.write_json(path, row)
  row["file"] = os.path.basename(path)
  print(f"  {method:<8} lr {lr:<7g} seed {seed}: {val} {setup.show(row[val])}  {test} "
        f"{setup.show(row[test])}  ({row['train_s']:.0f} s)", flush=True)
  return row


def converged(evals: list[dict[str, Any]], tolerance: float, key: str,
              score: Callable[[float], float]) -> dict[str, Any]:
  """Whether the validation score stopped improving: the last third against the rest."""
  scores = [score(e[key]) for e in evals]
  cut = max(1, len(scores) - max(1, len(scores) // 3))
  before = max(scores[:cut])
  last = max(scores[cut:]) if scores[cut:] else before
  return {"converged": bool(last <= before + tolerance),
          "best_val_step": evals[int(np.argmax(scores))]["step"],
          "best_val_score_before_last_third": before, "best_val_score_last_third": last}


def beyond(rates, *, down: bool) -> float:
  """The rate one step beyond the smallest (``down``) or largest of ``rates``: the step
  is the ratio of that edge to its neighbour, the rate rounded outward to one
  significant digit, so the step is never shorter than the grid's.

  >>> beyond([5e-4, 1e-3, 2e-3], down=True), beyond([1e-5, 3e-5, 1e-4], down=True)
  (0.0002, 3e-06)
  >>> beyond([5e-4, 1e-3, 2e-3], down=False), beyond([3e-3, 1e-2, 3e-2, 1e-1], down=False)
  (0.004, 0.4)
  """
  rates = sorted(rates)
  edge, near = (rates[0], rates[1]) if down else (rates[-1], rates[-2])
  x = edge * edge / near
  e = math.floor(math.log10(x) + 1e-9)
  digit = math.floor(x / 10**e + 1e-9) if down else math.ceil(x / 10**e - 1e-9)
  return float(f"{digit}e{e}") if digit < 10 else float(f"1e{e + 1}")


def select(setup: Setup, data, cfg: dict[str, Any], method: str) -> list[dict[str, Any]]:
  """The grid at ``select_seed``; the rate with the best final validation score.

  A best rate at the smallest or largest rate tried so far runs the rate one step
  beyond it (`beyond`), up to ``extend`` times a budget. Then the grid again at twice
  the budget (less the rates above the selected one that scored more than ``drop``
  below it), up to ``doublings_of`` times, until doubling no longer raises the
  selected score by more than ``plateau``. A doubled grid runs nearest the selected
  rate first (in log rate; ties: the smaller), so a sweep stopped partway holds its
  likeliest winners. Returns one selection per budget tried; ``final`` marks the one
  the seeds run at, ``extended`` the rates added at that budget.
  """
  grid = list(QUICK_GRID if cfg["quick"] else setup.grids[method])
  whole = list(grid)  # every rate of the method's grid so far, extensions included
  budget, val = budget_of(method), f"val_{setup.metric}"
  tried = []

  def pick(ran):  # the best final validation score; ties: the smaller rate
    return max(ran.values(), key=lambda r: (setup.score(r[val]), -r["lr"]))

  for doubling in range(1 + doublings_of(cfg, method)):
    at = dict(cfg, **{budget: cfg[budget] * 2 ** doubling})
    order = grid
    if doubling:  # rates above the selected one, far behind it, stay out
      last = tried[-1]
      best_score = setup.score(last[val][last["grid"].index(last["lr"])])
      grid = [lr for lr, v in zip(last["grid"], last[val])
              if lr <= last["lr"] or setup.score(v) >= best_score - cfg["drop"]]
      # nearest the selected rate first: a run stopped partway has the likeliest winners
      order = sorted(grid, key=lambda lr: (abs(math.log(lr / last["lr"])), lr))
    ran = {lr: run(setup, data, at, method, cfg["select_seed"], lr) for lr in order}
    extended, best = [], pick(ran)
    while len(extended) < cfg["extend"] and best["lr"] in (min(whole), max(whole)):
      down = best["lr"] == min(whole)
      lr = beyond(whole, down=down)
      grid, whole = ([lr, *grid], [lr, *whole]) if down else ([*grid, lr], [*whole, lr])
      extended.append(lr)
      ran[lr] = run(setup, data, at, method, cfg["select_seed"], lr)
      best = pick(ran)
    rows = [ran[lr] for lr in grid]
    check = dict(converged(best["evals"], cfg["plateau"], val, setup.score),
                 rule="in-run", doubling_gain=None)
    tried.append({"grid": grid, val: [r[val] for r in rows], "lr": best["lr"],
                  "edge": best["lr"] in (min(whole), max(whole)), "extended": extended,
                  budget: at[budget], "budget": check, "final": False,
                  "runs": [r["file"] for r in rows]})
    if doubling:
      shorter = tried[-2]
      gain = setup.score(best[val]) - setup.score(
          shorter[val][shorter["grid"].index(shorter["lr"])])
      shorter["budget"].update(rule="doubling", doubling_gain=gain,
                               in_run_converged=shorter["budget"]["converged"],
                               converged=bool(gain <= cfg["plateau"]))
      if shorter["budget"]["converged"]:
        shorter["final"] = True
        return tried
  tried[-1]["final"] = True
  return tried


def _rate(lr: float) -> str:
  """A learning rate as the tables write it: 5e-4, 1e-2."""
  return f"{lr:.0e}".replace("e-0", "e-").replace("e+0", "e")


def tried_budgets(method: str, entry: dict[str, Any]) -> list[dict[str, Any]]:
  """A method's selections in a summary, one per budget tried, shortest first."""
  return sorted(entry["other_budgets"] + [entry["selection"]], key=lambda s: s[budget_of(method)])


def verdict(setup: Setup, method: str, tried: list[dict[str, Any]], i: int) -> str:
  """The budget check of ``tried[i]`` (`tried_budgets`) in words, as the table and the
  printed summary give it: what doubling the budget gained, or, for the last budget,
  the in-run check alone."""
  s, budget = tried[i], budget_of(method)
  check = s["budget"]
  if check["rule"] == "doubling":
    longer = tried[i + 1][budget] if i + 1 < len(tried) else 2 * s[budget]
    gain = 100 * check["doubling_gain"]
    words = (f"{'enough' if check['converged'] else 'not enough'}: {longer} {budget} gained "
             + (f"{gain:+.2f} points" if setup.metric == "acc" else
                f"{gain:+.2f}% in -log perplexity"))
  else:  # the last budget: nothing longer was run
    words = (f"not doubled; in-run check only: "
             f"{'flat over' if check['converged'] else 'still improving in'} its last third "
             f"(best at step {check['best_val_step']})")
  added = ", ".join(_rate(lr) for lr in s.get("extended", []))
  return (words + (f"; {added} added beyond the grid's edge" if added else "")
          + ("; chosen rate at the grid's edge" if s["edge"] else ""))


def table(setup: Setup, cfg: dict[str, Any], out: dict[str, Any]) -> str:
  """The summary as a markdown table, one row per (method, budget), chosen budget and
  rate in bold; test metric, seeds and paired differences on the chosen budget's row.
  Needs the ``paired`` entries `report` adds."""
  val, test = f"val_{setup.metric}", f"test_{setup.metric}"
  scale = 100 if setup.metric == "acc" else 1
  refs = list(dict.fromkeys((cfg["reference"], "full")))
  rows = []
  for method, e in out["methods"].items():
    budget = budget_of(method)
    tried = tried_budgets(method, e)
    for i, s in enumerate(tried):
      chosen = s is e["selection"]
      grid = ", ".join((f"**{_rate(lr)}: {setup.show(v)}**" if chosen and lr == s["lr"] else
                        f"{_rate(lr)}: {setup.show(v)}") for lr, v in zip(s["grid"], s[val]))
      trainable = f"{e['trainable_params']:,}" if "trainable_params" in e else ""
      cells = [method if i == 0 else "", trainable if i == 0 else "",
               f"**{s[budget]}**" if chosen else str(s[budget]), grid,
               verdict(setup, method, tried, i)]
      if chosen and test in e:
        values = list(e[test].values())
        cells += [f"**{utils.pm(values, scale, 2)}**",
                  " / ".join(f"{scale * v:.2f}" for v in values)]
        for ref in refs:
          p = e.get("paired", {}).get(ref)
          cells.append("–" if p is None else
                       f"{scale * p['mean']:+.2f}; ahead {p['ahead']}, behind {p['behind']} "
                       f"of {len(p['seeds'])}"
                       + (f", p = {p['p']:.3f}" if p["p"] is not None else ""))
      else:
        cells += [""] * (2 + len(refs))
      rows.append(cells)
  return utils.table(["method", "trainable", budget, f"{val} by rate (seed "
                      f"{cfg['select_seed']})", "budget", f"{test} ({cfg['seeds']} seeds)",
                      "per seed", *(f"− {r}, paired" for r in refs)], rows)


def paired(mine: dict[int, float], ref: dict[int, float],
           score: Callable[[float], float] = float) -> dict[str, Any]:
  """``mine - ref`` seed by seed; "ahead" = the better score (higher accuracy, lower
  perplexity); ``p``: the two-sided paired t-test's p-value (None under 2 seeds)."""
  from scipy import stats

  seeds = sorted(set(mine) & set(ref))
  diffs = [mine[s] - ref[s] for s in seeds]
  p = (float(stats.ttest_rel([mine[s] for s in seeds], [ref[s] for s in seeds]).pvalue)
       if len(seeds) > 1 and np.std(diffs) > 0 else None)
  return {"seeds": seeds, "diffs": diffs, "mean": float(np.mean(diffs)) if diffs else None,
          "std": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None, "p": p,
          "ahead": sum(score(mine[s]) > score(ref[s]) for s in seeds),
          "behind": sum(score(mine[s]) < score(ref[s]) for s in seeds)}


def plot(setup: Setup, out: dict[str, Any], path: str) -> int:
  """Validation curves: per method, the sweep at the selection seed (thin) and
  every seed at the selected rate (thick); accuracy axes from 0 to 100, perplexity up
  to 1.3x the highest final value (so that a rate whose curve spiked on the way does
  not flatten the others)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  folder = setup.folder(bool(out["smoke_test"]))
  val = f"val_{setup.metric}"
  methods = list(out["methods"])
  cols = min(4, len(methods))
  rows_n = -(-len(methods) // cols)
  fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.6 * rows_n), squeeze=False,
                           layout="constrained")
  for ax in axes.flat[len(methods):]:
    ax.set_visible(False)

  def curve(r):
    return ([e["step"] for e in r["evals"]],
            [100 * e[val] if setup.metric == "acc" else e[val] for e in r["evals"]])

  drawn = 0
  for ax, method in zip(axes.flat, methods):
    entry = out["methods"][method]
    chosen = entry["selection"]["lr"]
    budget = budget_of(method)
    rows = []
    for name in dict.fromkeys(entry["selection"]["runs"] + entry.get("runs", [])):
      with open(os.path.join(folder, name)) as f:
        rows.append(json.load(f))
    for other in entry["other_budgets"]:  # the other budgets' selected runs, dashed
      with open(os.path.join(folder, other["runs"][other["grid"].index(other["lr"])])) as f:
        r = json.load(f)
      drawn += 1
      why = ("not enough" if other[budget] < entry["selection"][budget] else
             "doubled: no gain")
      ax.plot(*curve(r), "k--" if why == "not enough" else "k:", lw=1,
              label=f"lr {r['lr']:g}, {other[budget]} {budget} ({why})")
    for r in sorted(rows, key=lambda r: (r["lr"] == chosen, r["lr"], r["seed"])):
      drawn += 1
      if r["lr"] == chosen:
        ax.plot(*curve(r), "o-", lw=2, ms=3, label=f"lr {r['lr']:g}, seed {r['seed']}")
      elif r["seed"] == out["settings"]["select_seed"]:
        ax.plot(*curve(r), lw=0.8, alpha=0.6, label=f"lr {r['lr']:g} (sweep)")
    if setup.metric == "acc":
      ax.set(ylabel="validation accuracy %", ylim=(0, 100))
    else:
      finals = [r["evals"][-1][val] for r in rows if math.isfinite(r["evals"][-1][val])]
      ax.set(ylabel="validation perplexity",  # a spiking rate's peak is cut off
             ylim=(None, 1.3 * max(finals)) if finals else (None, None))
    ax.set(title=method, xlabel="step")
    ax.legend(fontsize=7)
  title = f"{setup.name}: validation curves, learning-rate sweeps and selected rates"
  fig.suptitle(title + (" (SMOKE TEST: meaningless)" if out["smoke_test"] else ""))
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return drawn


def _config_name(argv: list[str]) -> str:
  names = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  name = names[-1] if names else "minilm_fortunes"
  if name not in SETUPS:
    raise config_lib.ConfigError(f"--config={name}: the protocol runs {list(SETUPS)}")
  return name


def main(argv: list[str] | None = None) -> dict[str, Any]:
  argv = list(argv or [])
  setup = SETUPS[_config_name(argv)]
  cfg = config_lib.load(argv, default=setup.config, own=OWN, own_quick=setup.quick,
                        over=setup.over, fixed=True, usage=__doc__)
  cfg = dict(cfg, progress=False, **({"ia3_lr": None} if setup.name == "fortunes" else {}))
  cfg["targets"] = tuple(cfg["targets"])
  # before any data: the protocol's own settings, and targets, rank, ... in one error
  finetune.validate(dict(cfg, method="lora"), also=check(setup, cfg))
  path = summary_path(setup, cfg)
  utils.setup_jax(cfg["compile_cache"])
  with utils.phase(f"loading the data of {setup.config}"):
    data = setup.data(cfg)
  out: dict[str, Any] = {"settings": cfg, "provenance": utils.provenance(),
                         "smoke_test": utils.SMOKE_TEST if cfg["quick"] else False,
                         "methods": {}}
  test = f"test_{setup.metric}"
  for method in cfg["methods"]:
    print(f"[{method}] learning-rate selection on the validation split", flush=True)
    tried = select(setup, data, cfg, method)
    chosen = next(s for s in tried if s["final"])
    entry = {"selection": chosen, "other_budgets": [s for s in tried if s is not chosen]}
    if not cfg["select_only"]:
      budget = budget_of(method)
      at = dict(cfg, **{budget: chosen[budget]})
      rows = [run(setup, data, at, method, s, chosen["lr"]) for s in range(cfg["seeds"])]
      values = [r[test] for r in rows]
      entry.update(runs=[r["file"] for r in rows], **{test: {r["seed"]: r[test] for r in rows}},
                   mean=float(np.mean(values)),
                   std=float(np.std(values, ddof=1)) if len(values) > 1 else None,
                   trainable_params=rows[0]["trainable_params"])
    out["methods"][method] = entry
  lines = report(setup, cfg, out)
  out["plot"] = {"file": os.path.basename(path[:-5] + ".png"),
                 "curves": plot(setup, out, path[:-5] + ".png")}
  utils.write_json(path, out)
  utils.write_text(path[:-5] + ".md", table(setup, cfg, out) + "\n")  # RESULTS.md's table
  if cfg["quick"]:
    print(utils.SMOKE_TEST)
  print("\n".join(lines))
  return out


def check(setup: Setup, cfg: dict[str, Any]) -> list[str]:
  """Every problem of the protocol's own settings, so that one error names them all
  before any data is loaded."""
  problems = []
  unknown = [m for m in cfg["methods"] if m not in setup.grids]
  if unknown:
    problems.append(f"--methods: unknown {unknown} for {setup.config}; valid: "
                    f"{list(setup.grids)}")
  bad = _check_doublings_for(cfg["doublings_for"], setup.grids)
  if bad:
    problems.append(f"--doublings_for: {', '.join(bad)}; write method:N, N >= 0, with methods "
                    f"from {list(setup.grids)} (e.g. --doublings_for=lora_all:0,full:2)")
  at_least = {"doublings": 0, "extend": 0, "seeds": 1, "select_seed": 0, "plateau": 0,
              "drop": 0}
  problems += [f"--{key}: must be >= {low}, got {cfg[key]}" for key, low in at_least.items()
               if cfg[key] < low]
  if cfg["quantize"]:  # not in the cache keys: each method sets its own base
    problems.append(f"--quantize={cfg['quantize']}: the protocol sets each method's base "
                    "itself (method qlora is LoRA on an NF4 base); leave --quantize unset")
  if cfg["reference"] not in setup.grids:
    problems.append(f"--reference: {cfg['reference']!r} is not one of {list(setup.grids)}")
  return problems


def summary_path(setup: Setup, cfg: dict[str, Any]) -> str:
  """Where the summary goes; raises ``ConfigError`` before any training if writing it
  would lose what the committed summary there holds: a method that ``--methods`` leaves
  out, or, under ``--select_only``, a method's test results over seeds. (``--quick``
  summaries are scratch and are overwritten.)"""
  name = cfg["summary"] or f"protocol_{setup.name}"
  if not name.replace("_", "").replace("-", "").isalnum():
    raise config_lib.ConfigError(f"--summary={name!r}: give a file name without a folder or "
                                 "extension, of letters, digits, '_' and '-'")
  path = utils.out_path(cfg["quick"], f"{name}.json")
  if cfg["quick"] or not os.path.exists(path):
    return path
  shown = os.path.relpath(path, REPO_ROOT)
  try:
    with open(path) as f:
      held = dict(json.load(f)["methods"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise config_lib.ConfigError(
        f"{shown}: not a protocol summary ({type(e).__name__}: "
        f"{e}); move it away, or write elsewhere with --summary=NAME") from None
  test = f"test_{setup.metric}"
  lost = [f"{m} (not in --methods)" for m in held if m not in cfg["methods"]]
  if cfg["select_only"]:
    lost += [f"{m}'s {test} over seeds (--select_only)" for m in cfg["methods"]
             if test in held.get(m, {})]
  if lost:
    raise config_lib.ConfigError(
        f"{shown} holds what this run would overwrite: "
        f"{', '.join(lost)}. Run every method it holds (--methods={','.join(held)}; their "
        "recorded runs are reused, not trained again), or write elsewhere with "
        "--summary=NAME")
  return path


def report(setup: Setup, cfg: dict[str, Any], out: dict[str, Any]) -> list[str]:
  """The printed summary; adds to ``out`` each method's paired comparisons (``paired``:
  against the reference and against full)."""
  val, test = f"val_{setup.metric}", f"test_{setup.metric}"
  scale, unit = (100, " points") if setup.metric == "acc" else (1, "")
  refs = {r: out["methods"][r][test] for r in dict.fromkeys((cfg["reference"], "full"))
          if test in out["methods"].get(r, {})}  # paired against the reference and full
  lines = []
  for method, e in out["methods"].items():
    budget = budget_of(method)
    tried = tried_budgets(method, e)
    for i, s in enumerate(tried):
      grid = ", ".join(f"{lr:g}: {setup.show(v)}" for lr, v in zip(s["grid"], s[val]))
      lines.append(f"{'*' if s is e['selection'] else ' '} {method}, {s[budget]} {budget}: "
                   f"{val} by rate ({grid}) -> lr {s['lr']:g}; "
                   f"{verdict(setup, method, tried, i)}")
    if test in e:
      lines.append(f"  {test} over {len(e[test])} seeds: "
                   f"{utils.pm(list(e[test].values()), scale, 2)}")
      for name, ref in refs.items():
        if name == method:
          continue
        p = e.setdefault("paired", {})[name] = paired(e[test], ref, setup.score)
        lines.append(f"  {method} - {name}, paired: {scale * p['mean']:+.2f}{unit}, "
                     f"ahead in {p['ahead']}, behind in {p['behind']} of {len(p['seeds'])} seeds"
                     + (f", paired t-test p = {p['p']:.3f}" if p["p"] is not None else ""))
  return lines


if __name__ == "__main__":
  config_lib.run_main(main, None)
