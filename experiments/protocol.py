"""python -m experiments.protocol [--methods=lora,full] [--quick] [--key=value ...]

The paper's protocol (issue 15), in one place, for MiniLM + fortunes:

1. **Select** each method's learning rate on the validation split: one run
   (seed ``select_seed``) at every rate of its grid (``GRIDS``: 4 or more
   rates spanning at least 10x), scored by the validation accuracy at the end
   of training. Test accuracy plays no part in the choice.
2. **Report** at the selected rate: ``seeds`` seeds (the selection run is
   one of them), test accuracy as mean ± sample std, and a paired
   comparison of every method against ``reference`` on the same seeds (same
   head initialisation, same batches).
3. **Budget check**: validation accuracy every ``eval_every`` steps. A run has
   converged when the best validation accuracy of its last third is within
   ``plateau`` of its best before that (it has stopped improving).

Methods: ``lora`` (r, alpha, targets from the config), ``lora_all`` (the
same rank on q, k, v, attention out and both feed-forward layers), ``qlora``
(``lora`` on an NF4 base with double quantization), ``ia3``, ``dora`` (as in
`experiments.methods_compare`) and ``full`` (every weight). The head is
trained in full next to every method, at ``head_lr``; only the body's rate
is swept.

Every finished run is a JSON under ``experiments/results/protocol/`` (its
settings, the validation curve, test accuracy, date, load and versions),
keyed by its settings, so an interrupted protocol resumes and every number
it reports is a committed file. The summary goes to
``experiments/results/protocol_fortunes.json``. ``--quick``: a smoke run
under ``runs/quick`` whose numbers mean nothing.

Examples::

  python -m experiments.protocol --methods=lora,full          # experiment 2's verdict
  python -m experiments.protocol --methods=lora --select_only # the sweep alone
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import numpy as np

from experiments import config as config_lib
from experiments import finetune, fortunes, methods_compare, utils
from experiments.config import REPO_ROOT

# Body learning rates tried per method: 4 or more, spanning at least 10x,
# centred on the rate each method ran at before.
GRIDS = {
    "lora": (5e-4, 1e-3, 2e-3, 5e-3, 1e-2),
    "lora_all": (5e-4, 1e-3, 2e-3, 5e-3),
    "qlora": (5e-4, 1e-3, 2e-3, 5e-3),
    "dora": (5e-4, 1e-3, 2e-3, 5e-3),
    "ia3": (3e-3, 1e-2, 3e-2, 1e-1),
    "full": (1e-5, 3e-5, 1e-4, 3e-4),
}
ALL_LINEAR = ("query", "key", "value", "out", "intermediate", "output")
OWN = {
    "methods": (("lora", "full"), f"methods, from {tuple(GRIDS)}"),
    "reference": ("lora", "the method the others are compared with, seed by seed"),
    "select_seed": (0, "seed of the learning-rate selection runs"),
    "seeds": (3, "seeds at the selected rate (0..N-1; the selection seed is one of them)"),
    "plateau": (0.01, "converged: best val acc of the last third within this of the best before"),
    "select_only": (False, "run the learning-rate sweeps only (no further seeds)"),
}
OVER = dict(eval_every=25)  # a validation curve for the budget check
QUICK = dict(steps=4, eval_every=2, seeds=2, train_size=128, test_size=64)
QUICK_GRID = (1e-3, 1e-2)
# The settings that make a run's result (the cache key), beside method, rate and seed.
RUN_KEYS = ("rank", "alpha", "targets", "head", "head_lr", "warmup", "steps", "weight_decay",
            "batch_size", "max_len", "split_seed", "test_fraction", "val_size", "train_size",
            "test_size", "eval_every", "eval_batch", "ia3_lr")


def run_folder(quick: bool) -> str:
  return (os.path.join(REPO_ROOT, "runs", "quick", "protocol") if quick
          else os.path.join(REPO_ROOT, "experiments", "results", "protocol"))


def _body(task, cfg: dict[str, Any], method: str, seed: int, lr: float) -> dict[str, Any]:
  """Trains one (method, rate, seed): the fortunes loop of every experiment."""
  if method == "full":
    return fortunes.train(task, dict(cfg, method="full"), seed, lr=lr, measure_memory=False)
  variant = dict(cfg, method="lora")
  if method == "lora_all":
    variant["targets"] = ALL_LINEAR
  name = "lora" if method == "lora_all" else method
  return fortunes.train(task, variant, seed, lr=lr, measure_memory=False,
                        params=methods_compare.add_method(task, variant, name, seed))


def run(task, cfg: dict[str, Any], method: str, seed: int, lr: float) -> dict[str, Any]:
  """One run, from its committed JSON if it exists, else trained and written."""
  key = {k: cfg[k] for k in RUN_KEYS if k in cfg}
  key.update(method=method, seed=seed, lr=lr)
  digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=list).encode()).hexdigest()[:10]
  path = os.path.join(run_folder(cfg["quick"]), f"{method}-lr{lr:g}-s{seed}-{digest}.json")
  if os.path.isfile(path):
    with open(path) as f:
      return dict(json.load(f), file=os.path.basename(path))
  t0 = time.perf_counter()
  res = _body(task, cfg, method, seed, lr)
  row = {"method": method, "lr": lr, "seed": seed, "test_acc": res["test_acc"],
         "val_acc": res["val_acc"], "evals": res["evals"], "losses": res["losses"],
         "trainable_params": res["trainable_params"], "total_params": res["total_params"],
         "train_s": time.perf_counter() - t0, "settings": key, "provenance": utils.provenance()}
  utils.write_json(path, row)
  row["file"] = os.path.basename(path)
  print(f"  {method:<8} lr {lr:<7g} seed {seed}: val acc {row['val_acc']:.4f}  test acc "
        f"{row['test_acc']:.4f}  ({row['train_s']:.0f} s)", flush=True)
  return row


def converged(evals: list[dict[str, Any]], tolerance: float) -> dict[str, Any]:
  """Whether validation accuracy stopped improving: the last third against the rest."""
  accs = [e["val_acc"] for e in evals]
  cut = max(1, len(accs) - max(1, len(accs) // 3))
  before, last = max(accs[:cut]), max(accs[cut:]) if accs[cut:] else max(accs[:cut])
  best_step = evals[int(np.argmax(accs))]["step"]
  return {"converged": bool(last <= before + tolerance), "best_val_step": best_step,
          "best_val_before_last_third": before, "best_val_last_third": last}


def select(task, cfg: dict[str, Any], method: str) -> dict[str, Any]:
  """The grid at ``select_seed``; the rate with the best final validation accuracy."""
  grid = QUICK_GRID if cfg["quick"] else GRIDS[method]
  rows = [run(task, cfg, method, cfg["select_seed"], lr) for lr in grid]
  best = max(rows, key=lambda r: (r["val_acc"], -r["lr"]))  # ties: the smaller rate
  return {"grid": list(grid), "val_acc": [r["val_acc"] for r in rows], "lr": best["lr"],
          "edge": best["lr"] in (min(grid), max(grid)),
          "budget": converged(best["evals"], cfg["plateau"]), "runs": [r["file"] for r in rows]}


def paired(mine: dict[int, float], ref: dict[int, float]) -> dict[str, Any]:
  seeds = sorted(set(mine) & set(ref))
  diffs = [mine[s] - ref[s] for s in seeds]
  return {"seeds": seeds, "diffs": diffs, "mean": float(np.mean(diffs)) if diffs else None,
          "ahead": sum(d > 0 for d in diffs), "behind": sum(d < 0 for d in diffs)}


def plot(out: dict[str, Any], path: str) -> int:
  """Validation curves: per method, the sweep at the selection seed (thin) and
  every seed at the selected rate (thick); accuracy axes from 0 to 100."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  folder = run_folder(bool(out["smoke_test"]))
  methods = list(out["methods"])
  fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.6), squeeze=False)
  drawn = 0
  for ax, method in zip(axes[0], methods):
    entry = out["methods"][method]
    chosen = entry["selection"]["lr"]
    rows = []
    for name in dict.fromkeys(entry["selection"]["runs"] + entry.get("runs", [])):
      with open(os.path.join(folder, name)) as f:
        rows.append(json.load(f))
    for r in sorted(rows, key=lambda r: (r["lr"] == chosen, r["lr"], r["seed"])):
      drawn += 1
      steps = [e["step"] for e in r["evals"]]
      accs = [100 * e["val_acc"] for e in r["evals"]]
      if r["lr"] == chosen:
        ax.plot(steps, accs, "o-", lw=2, ms=3, label=f"lr {r['lr']:g}, seed {r['seed']}")
      elif r["seed"] == out["settings"]["select_seed"]:
        ax.plot(steps, accs, lw=0.8, alpha=0.6, label=f"lr {r['lr']:g} (sweep)")
    ax.set(title=method, xlabel="step", ylabel="validation accuracy %", ylim=(0, 100))
    ax.legend(fontsize=7)
  title = "validation curves, learning-rate sweeps and selected rates"
  fig.suptitle(title + (" (SMOKE TEST: meaningless)" if out["smoke_test"] else ""), y=1.02)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return drawn


def main(argv: list[str] | None = None) -> dict[str, Any]:
  cfg = config_lib.load(argv or [], default="minilm_fortunes", own=OWN, own_quick=QUICK,
                        over=OVER, fixed=True, usage=__doc__)
  cfg = dict(cfg, ia3_lr=None, progress=False)
  unknown = [m for m in cfg["methods"] if m not in GRIDS]
  if unknown:
    raise config_lib.ConfigError(f"--methods: unknown {unknown}; valid: {list(GRIDS)}")
  if cfg["reference"] not in GRIDS:
    raise config_lib.ConfigError(f"--reference: {cfg['reference']!r} is not one of {list(GRIDS)}")
  cfg["targets"] = tuple(cfg["targets"])
  finetune.validate(dict(cfg, method="lora"))  # before any data: targets, rank, ...
  utils.setup_jax(cfg["compile_cache"])
  with utils.phase("loading MiniLM and tokenizing the fortunes"):
    task = fortunes.task_from(cfg)
  out: dict[str, Any] = {"settings": cfg, "provenance": utils.provenance(),
                         "smoke_test": utils.SMOKE_TEST if cfg["quick"] else False,
                         "methods": {}}
  seeds = range(cfg["seeds"])
  for method in cfg["methods"]:
    print(f"[{method}] learning-rate selection on the validation split", flush=True)
    chosen = select(task, cfg, method)
    entry = {"selection": chosen}
    if not cfg["select_only"]:
      rows = [run(task, cfg, method, s, chosen["lr"]) for s in seeds]
      accs = [r["test_acc"] for r in rows]
      entry.update(runs=[r["file"] for r in rows], test_acc={r["seed"]: r["test_acc"] for r in rows},
                   mean=float(np.mean(accs)), std=float(np.std(accs, ddof=1)) if len(accs) > 1
                   else None, trainable_params=rows[0]["trainable_params"])
    out["methods"][method] = entry
  ref = out["methods"].get(cfg["reference"], {}).get("test_acc")
  lines = []
  for method, e in out["methods"].items():
    s = e["selection"]
    grid = ", ".join(f"{lr:g}: {100 * v:.1f}" for lr, v in zip(s["grid"], s["val_acc"]))
    lines.append(f"{method}: val acc by rate ({grid}) -> lr {s['lr']:g}"
                 f"{' (at the edge of the grid)' if s['edge'] else ''}; budget "
                 f"{'converged' if s['budget']['converged'] else 'NOT converged'} "
                 f"(best val at step {s['budget']['best_val_step']})")
    if "test_acc" in e:
      lines.append(f"  test acc over {len(e['test_acc'])} seeds: "
                   f"{utils.pm(list(e['test_acc'].values()), 100, 2)}")
      if ref and method != cfg["reference"]:
        e["paired_vs_reference"] = p = paired(e["test_acc"], ref)
        lines.append(f"  {method} - {cfg['reference']}, paired: {100 * p['mean']:+.2f} points, "
                     f"ahead in {p['ahead']}, behind in {p['behind']} of {len(p['seeds'])} seeds")
  path = utils.out_path(cfg["quick"], "protocol_fortunes.json")
  out["plot"] = {"file": os.path.basename(path[:-5] + ".png"),
                 "curves": plot(out, path[:-5] + ".png")}
  utils.write_json(path, out)
  if cfg["quick"]:
    print(utils.SMOKE_TEST)
  print("\n".join(lines))
  return out


if __name__ == "__main__":
  config_lib.run_main(main, None)
