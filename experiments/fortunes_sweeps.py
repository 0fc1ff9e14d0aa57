"""python -m experiments.fortunes_sweeps [--quick] [--sections=compare,rank,matrices,structure] [--key=value ...]

Experiments 2-5 on MiniLM + the 8-way fortune task, sharing one tokenized
data set, cached probe features and cached runs:

2. ``compare``: LoRA (r=8 on Wq, Wv, + head) vs full fine-tuning vs the
   head-only probe, over ``seeds`` seeds: test accuracy (mean ± std),
   trainable parameters, wall time per step, optimizer-state memory.
3. ``rank``: LoRA on Wq + Wv at every rank in ``ranks`` (paper Table 6).
4. ``matrices``: which weights to adapt at a fixed budget of trainable
   adapter parameters: one matrix at r=8, two at r=4, four at r=2 (Table 5).
5. ``structure``: normalized subspace similarity φ between the learned A of
   the r=8 and r=64 adapters (paper Fig. 3) as heatmaps, and the singular
   values of full fine-tuning's ΔW against a random Gaussian matrix of the
   same shape and norm.

Each run has the settings of ``configs/minilm_fortunes.py`` (the main job's
budget; the sweep evaluates only at the end) at the learning rates
`experiments.protocol` selected on the validation split for LoRA and full
fine-tuning (``--rates=config`` keeps ``lr`` and ``full_lr``), beside the sweep's own
(``OWN``; ``--help`` lists them all), then the command line. Each finished
run is cached under ``runs/sweeps`` (keyed by its settings), so an
interrupted sweep resumes and sections share runs (the rank sweep's r=8
seed-0 run is the comparison's LoRA seed-0 run); a run that a committed
``experiments/results/fortunes_sweeps*.json`` records with the same settings
is reused from there (`recorded`), so a sweep extends on a fresh clone. Writes
``experiments/results/fortunes_sweeps[-SECTIONS].{md,json}`` and PNG plots there
(``--quick``: under ``runs/quick``). ``--plot`` only redraws compare.png,
rank.png and matrices.png from that JSON, with no training.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import time
from typing import Any

import numpy as np

from experiments import config as config_lib
from experiments import finetune, fortunes, protocol, utils
from experiments.config import REPO_ROOT

# The sweeps' own settings, beside those of configs/minilm_fortunes.py (which
# set each run: the main job's budget, 150 steps x 32 quotes x 64 tokens).
OWN = {
    "sections": (("compare", "structure", "rank", "matrices"), "the experiments to run, in order"),
    "seeds": (3, "seeds of the comparison (experiment 2)"),
    "sweep_seeds": (3, "seeds of the rank and matrix sweeps"),
    "rates": ("protocol", "'protocol': lr and full_lr are the rates experiments.protocol selected "
              "on validation for lora and full at this budget (steps; "
              "results/protocol_fortunes.json); 'config': as set"),
    "ranks": ((1, 2, 4, 8, 16, 64), "ranks of the rank sweep (LoRA on Wq, Wv)"),
    "budget_rank": (8, "rank of one adapted matrix; 2 matrices get budget/2, 4 get budget/4"),
    "matrices": (("query", "key", "value", "out", "query+key", "query+value",
                  "query+key+value+out"), "weight sets of the matrix sweep"),
    "structure_ranks": ((8, 64), "the two ranks compared by φ"),
    "structure_layer": (5, "the layer shown in the φ heatmaps (all layers are averaged too)"),
    "plot": (False, "only redraw compare/rank/matrices.png from the results JSON (no training)"),
}
OVER = dict(eval_every=150)  # the sweep's runs evaluate once, at the end
# --quick: 5 trainings (LoRA r=1, r=2 at seeds 0, 1; full), every other run shared
# through the cache.
QUICK = dict(seeds=1, sweep_seeds=2, rank=2, ranks=(1, 2), budget_rank=2,
             matrices=("query+value",), structure_ranks=(1, 2), steps=3, eval_every=3,
             train_size=128, test_size=64)
CACHE = os.path.join(REPO_ROOT, "runs", "sweeps")
RECORDS = utils.RESULTS_DIR  # the committed results, whose runs are reused (`recorded`)
_RUN_KEYS = ("method", "rank", "alpha", "targets", "head", "lr", "full_lr", "head_lr", "warmup",
             "steps", "weight_decay", "batch_size", "max_len", "split_seed", "test_fraction",
             "val_size", "train_size", "test_size", "probe_steps")


def run_cfg(sweep: dict[str, Any], **overrides) -> dict[str, Any]:
  """The settings of one run: the sweep's settings, then ``overrides``."""
  cfg = {k: v for k, v in sweep.items() if k not in OWN}
  cfg.update(progress=False, **overrides)
  cfg["targets"] = tuple(cfg["targets"])
  return cfg


def cached_run(cfg: dict[str, Any], seed: int, *, memory: bool = False,
               arrays: bool = False) -> dict[str, Any]:
  """Trains (or loads the cached result of) one run.

  Seed-0 and seed-1 runs keep A (LoRA) or ΔW (full) on disk; ``arrays`` requires them.
  """
  key = run_key({k: cfg[k] for k in _RUN_KEYS} | {"seed": seed})
  path = os.path.join(CACHE, _name(key) + ".json")
  if os.path.isfile(path) and (not arrays or os.path.isfile(path[:-5] + ".npz")):
    with open(path) as f:
      return json.load(f)
  if not arrays and key in recorded(RECORDS):
    res = recorded(RECORDS)[key]
    print(f"  {cfg['method']:<5} {_label(cfg):<28} seed {seed}: test acc {res['test_acc']:.4f} "
          f"(recorded in {res['recorded_in']})", flush=True)
    return res
  task = fortunes.task_from(cfg)
  t0 = time.perf_counter()
  if cfg["method"] == "probe":
    res = fortunes.train_probe(task, cfg, seed)
  else:
    res = fortunes.train(task, cfg, seed, measure_memory=memory)
    if seed in (0, 1):
      os.makedirs(CACHE, exist_ok=True)  # a LoRA or full run can be the first one cached
      np.savez(path[:-5] + ".npz", **_arrays(task, res["params"], cfg["method"]))
    res = {k: v for k, v in res.items() if k not in ("params", "test_logits")}
  res.update(wall_s=time.perf_counter() - t0, key=json.loads(key))
  utils.write_json(path, res)
  print(f"  {cfg['method']:<5} {_label(cfg):<28} seed {seed}: test acc {res['test_acc']:.4f} "
        f"({res['wall_s']:.0f} s)", flush=True)
  return res


def run_key(settings: dict[str, Any]) -> str:
  """A run's identity: its settings (`_RUN_KEYS` and the seed) as canonical JSON."""
  return json.dumps(settings, sort_keys=True, default=list)


def _name(key: str) -> str:
  settings = json.loads(key)
  return (f"{settings['method']}-s{settings['seed']}-"
          f"{hashlib.sha1(key.encode()).hexdigest()[:12]}")


def _label(cfg: dict[str, Any]) -> str:
  return f"r={cfg['rank']} {'+'.join(cfg['targets'])}" if cfg["method"] == "lora" else ""


@functools.cache
def recorded(folder: str) -> dict[str, dict[str, Any]]:
  """The runs that the ``fortunes_sweeps*.json`` of ``folder`` record, by `run_key`.

  A run with the same settings and seed as a recorded one is that run: a sweep
  reuses it (``recorded_in`` names the file; its date and machine are that
  file's ``provenance``) instead of training it again, so that a sweep can be
  extended on a machine whose ``runs/sweeps`` is empty. Runs whose arrays are
  needed (``structure``) are trained, as the JSON does not keep them.
  """
  found = {}
  for path in sorted(glob.glob(os.path.join(folder, "fortunes_sweeps*.json"))):
    with open(path) as f:
      out = json.load(f)
    where = os.path.relpath(path, REPO_ROOT)
    for section in ("compare", "rank", "matrices"):
      for rs in out.get(section, {}).values():
        for r in rs:
          if "key" in r:
            found.setdefault(run_key(r["key"]), dict(r, recorded_in=r.get("recorded_in", where)))
  return found


def _arrays(task, params, method: str) -> dict[str, np.ndarray]:
  """A of every adapter (LoRA) or ΔW of every attention kernel (full)."""
  out = {}
  layers = params["bert"]["encoder"]
  for name, layer in layers.items():
    for m, d in layer["attention"].items():
      if method == "lora" and "lora_a" in d:
        out[f"{name}/{m}/lora_a"] = np.asarray(d["lora_a"])
      elif method == "full":
        base = task.encoder["encoder"][name]["attention"][m]["kernel"]
        out[f"{name}/{m}/delta"] = np.asarray(d["kernel"]) - np.asarray(base)
  return out


def _npz(res: dict[str, Any]) -> dict[str, np.ndarray]:
  with np.load(os.path.join(CACHE, _name(run_key(res["key"])) + ".npz")) as f:
    return dict(f)


# --------------------------------------------------------------------------- sections


def compare(sweep: dict[str, Any], out: dict[str, Any]) -> list[str]:
  runs = {m: [cached_run(run_cfg(sweep, method=m), s, memory=m != "probe",
                         arrays=m == "full" and s == 0 and "structure" in sweep["sections"])
              for s in range(sweep["seeds"])] for m in ("probe", "lora", "full")}
  out["compare"] = runs
  names = _compare_names(sweep["rank"])
  rows = []
  for m, rs in runs.items():
    acc = [r["test_acc"] for r in rs]
    step = [r["step_time_s"] for r in rs] if m != "probe" else None
    peak = rs[0].get("memory", {}).get("peak") if m != "probe" else None
    rows.append([names[m], utils.pm(acc, 100), f"{rs[0]['trainable_params']:,}",
                 f"{rs[0]['trainable_params'] / rs[0]['total_params'] * 100:.2f}%",
                 utils.pm(step, 1000, 0) + " ms" if step else "(cached features)",
                 utils.mib(rs[0]["opt_state_bytes"]), utils.mib(peak) if peak else "-"])
  plot_compare(out, utils.out_path(sweep["quick"], "compare.png"))
  return ["## 2. LoRA vs full fine-tuning vs head-only probe\n",
          f"{sweep['seeds']} seeds (head init, adapter init, batch order); test accuracy % as "
          "mean ± sample std; step time as median over steps 2.., mean ± std over seeds.\n",
          utils.table(["method", "test acc %", "trainable params", "of total", "step time",
                       "optimizer state", "step peak mem (XLA)"], rows), "",
          *_reused(runs, lambda m: names[m]), "![compare](compare.png)", ""]


def rank(sweep: dict[str, Any], out: dict[str, Any]) -> list[str]:
  structure_ranks = sweep["structure_ranks"] if "structure" in sweep["sections"] else ()
  runs = {r: [cached_run(run_cfg(sweep, rank=r), s, arrays=s == 0 and r in structure_ranks)
              for s in range(sweep["sweep_seeds"])] for r in sweep["ranks"]}
  out["rank"] = runs
  out["rank_paired"] = vs = _paired(runs, sweep["rank"])
  rows = [[r, f"{rs[0]['trainable_params']:,}", utils.pm([x["test_acc"] for x in rs], 100),
           _paired_cell(vs.get(r)), utils.pm([x["step_time_s"] for x in rs], 1000, 0) + " ms"]
          for r, rs in runs.items()]
  plot_rank(out, utils.out_path(sweep["quick"], "rank.png"))
  return ["## 3. Rank sweep (LoRA on Wq + Wv, paper Table 6)\n",
          f"{sweep['sweep_seeds']} seed(s) per rank; alpha fixed at 16 (scale 16/r, as the paper "
          f"fixes alpha); trainable = adapters + head; paired = this rank minus r={sweep['rank']} "
          "on the same seeds (points; two-sided paired t-test).\n",
          utils.table(["rank", "trainable params", "test acc %", f"paired vs r={sweep['rank']}",
                       "step time"], rows), "",
          *_reused(runs, lambda r: f"r={r}"), "![rank](rank.png)", ""]


def matrices(sweep: dict[str, Any], out: dict[str, Any]) -> list[str]:
  runs = {}
  for spec in sweep["matrices"]:
    targets = tuple(spec.split("+"))
    r = max(sweep["budget_rank"] // len(targets), 1)
    runs[spec] = [cached_run(run_cfg(sweep, targets=targets, rank=r), s)
                  for s in range(sweep["sweep_seeds"])]
  out["matrices"] = runs
  out["matrices_paired"] = vs = _paired(runs, "query+value")
  names = [_weights_name(spec) for spec in runs]
  rows = [[n, rs[0]["rank"], f"{rs[0]['trainable_params']:,}",
           utils.pm([x["test_acc"] for x in rs], 100), _paired_cell(vs.get(spec))]
          for n, (spec, rs) in zip(names, runs.items())]
  plot_matrices(out, utils.out_path(sweep["quick"], "matrices.png"))
  return ["## 4. Which weight matrices (fixed budget, paper Table 5)\n",
          f"{sweep['sweep_seeds']} seed(s) per setting; 1 matrix at r={sweep['budget_rank']}, 2 at "
          f"r={sweep['budget_rank'] // 2}, 4 at r={sweep['budget_rank'] // 4} (the same number of "
          "adapter parameters), alpha 16; paired = this setting minus Wq+Wv on the same seeds "
          "(points; two-sided paired t-test).\n",
          utils.table(["weights", "rank", "trainable params", "test acc %", "paired vs Wq+Wv"],
                      rows), "",
          *_reused(runs, _weights_name), "![matrices](matrices.png)", ""]


def _reused(runs: dict, label) -> list[str]:
  """A line naming the runs taken from committed results (`recorded`), if any: their
  step times come from that file's machine and load, not this run's."""
  by_file: dict[str, dict[str, list[int]]] = {}
  for k, rs in runs.items():
    for r in rs:
      if "recorded_in" in r:
        by_file.setdefault(r["recorded_in"], {}).setdefault(label(k), []).append(r["seed"])
  return [f"Reused from `{f}` (same settings and seeds; step times are that file's): "
          + ", ".join(f"{name} (seeds {', '.join(map(str, seeds))})"
                      for name, seeds in found.items()) + ".\n"
          for f, found in by_file.items()]


def _paired(runs: dict, ref) -> dict:
  """Each setting's test accuracy minus ``ref``'s, seed by seed (`protocol.paired`)."""
  if ref not in runs:
    return {}
  acc = lambda rs: {x["seed"]: x["test_acc"] for x in rs}  # noqa: E731
  return {k: protocol.paired(acc(rs), acc(runs[ref])) for k, rs in runs.items() if k != ref}


def _paired_cell(p: dict | None) -> str:
  if not p or not p["seeds"]:
    return "-"
  return (f"{100 * p['mean']:+.2f} ({p['ahead']}/{len(p['seeds'])} ahead"
          + (f", p = {p['p']:.2f}" if p["p"] is not None else "") + ")")


def phi(a1: np.ndarray, a2: np.ndarray) -> np.ndarray:
  """φ(A1, A2, i, j) = ||U1[:, :i]ᵀ U2[:, :j]||_F² / min(i, j) for all i, j.

  ``a1``, ``a2`` are jlora's A, shape (in, r): the paper's A is r x in, and
  its right-singular vectors are the left-singular vectors of ours (the
  column space). Returns an (r1, r2) array, entry [i-1, j-1].
  """
  u1 = np.linalg.svd(a1.astype(np.float64), full_matrices=False)[0]
  u2 = np.linalg.svd(a2.astype(np.float64), full_matrices=False)[0]
  overlap = (u1.T @ u2) ** 2  # (r1, r2)
  cum = overlap.cumsum(0).cumsum(1)
  i = np.arange(1, a1.shape[1] + 1)[:, None]
  j = np.arange(1, a2.shape[1] + 1)[None, :]
  return cum / np.minimum(i, j)


def structure(sweep: dict[str, Any], out: dict[str, Any]) -> list[str]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  r1, r2 = sweep["structure_ranks"]
  a1 = _npz(cached_run(run_cfg(sweep, rank=r1), 0, arrays=True))
  a2 = _npz(cached_run(run_cfg(sweep, rank=r2), 0, arrays=True))
  b1 = _npz(cached_run(run_cfg(sweep, rank=r1), 1, arrays=True))  # same rank, another seed
  b2 = _npz(cached_run(run_cfg(sweep, rank=r2), 1, arrays=True))
  full = _npz(cached_run(run_cfg(sweep, method="full"), 0, arrays=True))
  # the two ranks' A before training (seed 0 both): does the init alone share directions?
  task = fortunes.task_from(run_cfg(sweep))
  i1, i2 = (_arrays(task, fortunes.lorify(task, run_cfg(sweep, rank=r), 0), "lora")
            for r in (r1, r2))
  layers = sorted({k.split("/")[0] for k in a1})
  layer = layers[min(sweep["structure_layer"], len(layers) - 1)]
  rng = np.random.default_rng(0)
  lines = ["## 5. Low-rank structure\n"]
  stats = {}
  fig, axes = plt.subplots(1, 3, figsize=(15, 3.2))
  for ax, m in zip(axes[:2], ("query", "value")):
    p = phi(a1[f"{layer}/{m}/lora_a"], a2[f"{layer}/{m}/lora_a"])
    im = ax.imshow(p, aspect="auto", vmin=0, vmax=1, cmap="viridis", origin="upper",
                   extent=(0.5, r2 + 0.5, r1 + 0.5, 0.5))
    ax.set(title=f"φ(A r={r1}, A r={r2}), {layer} W{m[0]}", xlabel="j", ylabel="i")
    per_layer = [phi(a1[f"{l}/{m}/lora_a"], a2[f"{l}/{m}/lora_a"])[0, 0] for l in layers]
    # the same two ranks from different seeds (another head init and batch order too)
    cross = [phi(a1[f"{l}/{m}/lora_a"], b2[f"{l}/{m}/lora_a"])[0, 0] for l in layers]
    shape = a1[f"{layer}/{m}/lora_a"].shape
    rand = phi(rng.standard_normal((shape[0], r1)), rng.standard_normal((shape[0], r2)))
    seeds = [phi(a1[f"{l}/{m}/lora_a"], b1[f"{l}/{m}/lora_a"]) for l in layers]
    seeds2 = [phi(a2[f"{l}/{m}/lora_a"], b2[f"{l}/{m}/lora_a"]) for l in layers]
    rand_same = phi(rng.standard_normal((shape[0], r1)), rng.standard_normal((shape[0], r1)))
    rand_same2 = phi(rng.standard_normal((shape[0], r2)), rng.standard_normal((shape[0], r2)))
    stats[m] = {"phi_1_1_shown_layer": float(p[0, 0]),
                # the paper's Fig. 4: two seeds at the same rank
                "phi_1_1_seeds_mean_over_layers": float(np.mean([q[0, 0] for q in seeds])),
                "phi_r1_r1_seeds_mean_over_layers": float(np.mean([q[-1, -1] for q in seeds])),
                "phi_1_1_random_same_rank": float(rand_same[0, 0]),
                "phi_r1_r1_random_same_rank": float(rand_same[-1, -1]),
                "phi_1_1_seeds_r2_mean_over_layers": float(np.mean([q[0, 0] for q in seeds2])),
                "phi_r1_r1_seeds_r2_mean_over_layers": float(np.mean([q[r1 - 1, r1 - 1]
                                                                      for q in seeds2])),
                "phi_r2_r2_seeds_r2_mean_over_layers": float(np.mean([q[-1, -1] for q in seeds2])),
                "phi_1_1_random_r2": float(rand_same2[0, 0]),
                "phi_r1_r1_random_r2": float(rand_same2[r1 - 1, r1 - 1]),
                "phi_r2_r2_random_r2": float(rand_same2[-1, -1]),
                "phi_1_1_mean_over_layers": float(np.mean(per_layer)),
                "phi_1_1_cross_seed_mean_over_layers": float(np.mean(cross)),
                "phi_1_1_init_mean_over_layers": float(np.mean(
                    [phi(i1[f"{l}/{m}/lora_a"], i2[f"{l}/{m}/lora_a"])[0, 0] for l in layers])),
                "phi_r1_r2": float(p[-1, -1]), "phi_1_1_random": float(rand[0, 0]),
                "phi_r1_r2_random": float(rand[-1, -1])}
  # zoomed: i, j <= r1 for both, as the paper's right-hand panels
  p = phi(a1[f"{layer}/value/lora_a"], a2[f"{layer}/value/lora_a"])[:, : r1]
  axes[2].imshow(p, vmin=0, vmax=1, cmap="viridis", extent=(0.5, r1 + 0.5, r1 + 0.5, 0.5))
  axes[2].set(title=f"zoom j ≤ {r1}, {layer} Wv", xlabel="j", ylabel="i")
  fig.colorbar(im, ax=axes.tolist(), label="φ")
  fig.savefig(utils.out_path(sweep["quick"], "phi.png"), dpi=110, bbox_inches="tight")
  plt.close(fig)
  lines += [f"Learned A of the r={r1} and r={r2} runs (seed 0 both: each from its own random "
            "init, but the same head init and batch order), φ(i, j) as in the paper's Fig. 3; "
            f"heatmaps of {layer}, numbers also averaged over the 6 layers, next to the same φ "
            f"for two random Gaussian matrices of those shapes, and φ(1,1) of r={r1} seed 0 "
            f"against r={r2} seed 1 (a different head init and batch order as well) and of the "
            "two seed-0 adapters before training.\n",
            utils.table(["weight", f"φ(1,1) {layer}", "φ(1,1) mean of layers",
                         f"φ({r1},{r2}) {layer}", "φ(1,1) random", f"φ({r1},{r2}) random",
                         f"φ(1,1) mean, r={r2} of seed 1", "φ(1,1) mean, at init"],
                        [[f"W{m[0]}", f"{s['phi_1_1_shown_layer']:.3f}",
                          f"{s['phi_1_1_mean_over_layers']:.3f}", f"{s['phi_r1_r2']:.3f}",
                          f"{s['phi_1_1_random']:.3f}", f"{s['phi_r1_r2_random']:.3f}",
                          f"{s['phi_1_1_cross_seed_mean_over_layers']:.3f}",
                          f"{s['phi_1_1_init_mean_over_layers']:.3f}"]
                         for m, s in stats.items()]),
            "",
            f"Two seeds at the same rank, r={r1} and r={r2} (seeds 0 and 1: another adapter "
            "init, head init and batch order), as the paper's Fig. 4, averaged over the 6 "
            "layers, against two random Gaussian matrices of the same shape: shared top "
            "directions show as φ(1,1) far above the random value; φ(r,r) near the random value "
            "says the rest of the subspace is seed noise.\n",
            utils.table(["weight", "rank", "φ(1,1) seeds", "φ(1,1) random",
                         f"φ({r1},{r1}) seeds", f"φ({r1},{r1}) random", "φ(r,r) seeds",
                         "φ(r,r) random"],
                        [row for m, s in stats.items() for row in (
                            [f"W{m[0]}", r1, f"{s['phi_1_1_seeds_mean_over_layers']:.3f}",
                             f"{s['phi_1_1_random_same_rank']:.3f}",
                             f"{s['phi_r1_r1_seeds_mean_over_layers']:.3f}",
                             f"{s['phi_r1_r1_random_same_rank']:.3f}", "(same)", "(same)"],
                            [f"W{m[0]}", r2, f"{s['phi_1_1_seeds_r2_mean_over_layers']:.3f}",
                             f"{s['phi_1_1_random_r2']:.3f}",
                             f"{s['phi_r1_r1_seeds_r2_mean_over_layers']:.3f}",
                             f"{s['phi_r1_r1_random_r2']:.3f}",
                             f"{s['phi_r2_r2_seeds_r2_mean_over_layers']:.3f}",
                             f"{s['phi_r2_r2_random_r2']:.3f}"])]),
            "", "![phi](phi.png)", ""]

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
  spec = {}
  for ax, m in zip(axes, ("query", "value")):
    d = full[f"{layer}/{m}/delta"].astype(np.float64)
    g = rng.standard_normal(d.shape)
    g *= np.linalg.norm(d) / np.linalg.norm(g)
    sd, sg = np.linalg.svd(d, compute_uv=False), np.linalg.svd(g, compute_uv=False)
    energy = lambda s: int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), 0.9) + 1)  # noqa: E731
    spec[m] = {"r90_delta": energy(sd), "r90_random": energy(sg),
               "top8_energy_delta": float(np.sum(sd[:8]**2) / np.sum(sd**2)),
               "top8_energy_random": float(np.sum(sg[:8]**2) / np.sum(sg**2)),
               "fro_norm": float(np.linalg.norm(d))}
    ax.semilogy(sd, label="full fine-tuning ΔW")
    ax.semilogy(sg, label="Gaussian, same shape and norm")
    ax.set(title=f"singular values, {layer} W{m[0]} ({d.shape[0]}x{d.shape[1]})",
           xlabel="index", ylabel="σ")
    ax.legend()
  fig.savefig(utils.out_path(sweep["quick"], "spectrum.png"), dpi=110, bbox_inches="tight")
  plt.close(fig)
  out["structure"] = {"phi": stats, "spectrum": spec, "layer": layer}
  lines += [f"Singular values of ΔW = W_finetuned − W_pretrained from full fine-tuning (seed 0), "
            f"{layer}, against a Gaussian matrix scaled to the same Frobenius norm. r90 = number "
            "of singular values holding 90% of the squared norm.\n",
            utils.table(["weight", "r90 ΔW", "r90 random", "top-8 energy ΔW", "top-8 energy random"],
                        [[f"W{m[0]}", s["r90_delta"], s["r90_random"],
                          f"{100 * s['top8_energy_delta']:.1f}%",
                          f"{100 * s['top8_energy_random']:.1f}%"] for m, s in spec.items()]),
            "", "![spectrum](spectrum.png)", ""]
  return lines


# --------------------------------------------------------------------------- plots
#
# Drawn from the results JSON alone (``--plot`` redraws them from the committed
# experiments/results/fortunes_sweeps.json): accuracy axes from 0 to 100,
# error bars (sample std) only on bars with several seeds, the rank on every
# bar where it varies.


def _compare_names(rank: int) -> dict[str, str]:
  return {"probe": "head-only probe", "lora": f"LoRA r={rank} Wq,Wv + head",
          "full": "full fine-tuning"}


def _weights_name(spec: str) -> str:
  label = {"query": "Wq", "key": "Wk", "value": "Wv", "out": "Wo"}
  return "+".join(label[t] for t in spec.split("+"))


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _accuracy_axes(plt, x, values, *, width: float):
  """Mean test accuracy % per x; error bars only where there are several seeds."""
  means = [100 * float(np.mean(v)) for v in values]
  fig, ax = plt.subplots(figsize=(width, 3.8))
  for xi, v, m in zip(x, values, means):
    if len(v) > 1:
      ax.errorbar(xi, m, yerr=100 * float(np.std(v, ddof=1)), color="black", capsize=4)
  seeds = sorted({len(v) for v in values})
  ax.set(ylim=(0, 100), ylabel="test accuracy % (" + (
      f"{seeds[0]} seed{'s' if seeds[0] > 1 else ''}" if len(seeds) == 1 else
      f"{seeds[0]}-{seeds[-1]} seeds") + (", mean ± sample std)" if seeds[-1] > 1 else
                                          ", no error bars)"))
  return fig, ax, means


def _bars(path: str, labels, values, title: str) -> None:
  plt = _pyplot()
  x = list(range(len(labels)))
  fig, ax, means = _accuracy_axes(plt, x, values, width=max(5, 1.3 * len(labels)))
  ax.bar(x, means, color="tab:blue", zorder=0)
  for xi, m, v in zip(x, means, values):
    top = m + (100 * float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)  # above the error bar
    ax.annotate(f"{m:.1f}", (xi, top), xytext=(0, 3), textcoords="offset points", ha="center",
                fontsize=8)
  multiline = any("\n" in label for label in labels)
  ax.set_xticks(x, labels, rotation=0 if multiline else 20, ha="center" if multiline else "right",
                fontsize=8 if multiline else None)
  ax.set_title(title)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def _runs(section: dict) -> dict:
  return {(int(k) if str(k).isdigit() else k): v for k, v in section.items()}


def plot_compare(out: dict[str, Any], path: str) -> None:
  """compare.png: probe vs LoRA vs full fine-tuning."""
  runs = _runs(out["compare"])
  names = _compare_names(runs["lora"][0]["rank"])
  _bars(path, [names[m] for m in runs], [[r["test_acc"] for r in rs] for rs in runs.values()],
        "MiniLM on fortunes: test accuracy")


def plot_rank(out: dict[str, Any], path: str) -> None:
  """rank.png: test accuracy against the rank of LoRA on Wq, Wv."""
  plt = _pyplot()
  runs = _runs(out["rank"])
  ranks = sorted(runs)
  values = [[x["test_acc"] for x in runs[r]] for r in ranks]
  fig, ax, means = _accuracy_axes(plt, ranks, values, width=5.5)
  ax.plot(ranks, means, "o-", zorder=0)
  for r, m in zip(ranks, means):
    ax.annotate(f"{m:.1f}", (r, m), xytext=(0, 6), textcoords="offset points", ha="center",
                fontsize=8)
  ax.set_xscale("log", base=2)
  ax.set_xticks(ranks, [str(r) for r in ranks])
  ax.set(xlabel="rank r", title="LoRA rank sweep (Wq, Wv + head)")
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def plot_matrices(out: dict[str, Any], path: str) -> None:
  """matrices.png: which weights to adapt at one adapter budget; each bar names its rank."""
  runs = _runs(out["matrices"])
  wrap = lambda name: name.replace("+Wv", "+\nWv") if name.count("+") > 2 else name  # noqa: E731
  _bars(path, [wrap(_weights_name(spec)) + f"\nr={rs[0]['rank']}" for spec, rs in runs.items()],
        [[x["test_acc"] for x in rs] for rs in runs.values()],
        "Which weights to adapt (same adapter budget)")


PLOTS = {"compare": plot_compare, "rank": plot_rank, "matrices": plot_matrices}


def redraw(results: str, folder: str) -> list[str]:
  """Redraws the accuracy plots of a results JSON into ``folder``; returns their paths."""
  with open(results) as f:
    out = json.load(f)
  done = []
  for name, plot in PLOTS.items():
    if name in out:
      plot(out, os.path.join(folder, f"{name}.png"))
      done.append(os.path.join(folder, f"{name}.png"))
  return done


def protocol_rates(sweep: dict[str, Any]) -> dict[str, float]:
  """``lr`` and ``full_lr`` as the protocol selected them for lora and full at the
  sweep's budget (``steps``: the selection of that budget, final or not), if
  ``rates`` asks for it."""
  if sweep["rates"] == "config" or sweep["quick"]:
    return {}
  if sweep["rates"] != "protocol":
    raise config_lib.ConfigError(f"--rates: {sweep['rates']!r}; valid: 'protocol', 'config'")
  path = os.path.join(utils.RESULTS_DIR, "protocol_fortunes.json")
  methods = {}
  if os.path.isfile(path):
    with open(path) as f:
      methods = json.load(f).get("methods", {})
  chosen, budgets = {}, {}
  for key, method in (("lr", "lora"), ("full_lr", "full")):
    entry = methods.get(method, {})
    tried = [entry["selection"], *entry.get("other_budgets", [])] if entry else []
    budgets[method] = sorted(s["steps"] for s in tried)
    chosen.update({key: s["lr"] for s in tried if s["steps"] == sweep["steps"]})
  if len(chosen) < 2:
    raise config_lib.ConfigError(
        f"--rates=protocol: {os.path.relpath(path, REPO_ROOT)} has no rate selected at "
        f"{sweep['steps']} steps for both lora and full (budgets selected: {budgets}); run "
        "`python -m experiments.protocol "
        f"--methods={','.join(dict.fromkeys(['lora', 'full', *methods]))}` first (every method "
        "the summary holds, or it refuses to overwrite it), pass one of those --steps, or "
        "pass --rates=config")
  return chosen


SECTIONS = {"compare": compare, "rank": rank, "matrices": matrices, "structure": structure}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  sweep = config_lib.load(argv or [], default="minilm_fortunes", own=OWN, own_quick=QUICK,
                          over=OVER, fixed=True, usage=__doc__)
  unknown = [s for s in sweep["sections"] if s not in SECTIONS]
  if unknown:
    raise config_lib.ConfigError(f"--sections: unknown {unknown}; valid: {list(SECTIONS)}")
  suffix = "" if set(sweep["sections"]) == set(SECTIONS) else "-" + "-".join(sweep["sections"])
  results = utils.out_path(sweep["quick"], f"fortunes_sweeps{suffix}.json")
  if sweep["plot"]:
    if not os.path.isfile(results):
      raise config_lib.ConfigError(f"--plot: no results at {results}; run the sweep first")
    for path in redraw(results, os.path.dirname(results)):
      print(f"redrew {path} from {results}")
    print("(phi.png and spectrum.png need the trained arrays of runs/sweeps: run the "
          "structure section to redraw them)")
    return {}
  sweep = dict(sweep, **protocol_rates(sweep))
  finetune.validate(run_cfg(sweep))  # before any data: targets, rank, ...
  utils.setup_jax(sweep["compile_cache"])
  t0 = time.perf_counter()
  out: dict[str, Any] = {"settings": sweep, "provenance": utils.provenance(),
                         "smoke_test": utils.SMOKE_TEST if sweep["quick"] else False}
  md = ([f"**{utils.SMOKE_TEST}.**\n"] if sweep["quick"] else []) + [
      "Settings:\n", utils.settings_table({k: v for k, v in sweep.items()
                                           if k not in ("compile_cache", "progress", "fresh")}), ""]
  for name in sweep["sections"]:  # results are written after every section
    print(f"[{name}]", flush=True)
    md += SECTIONS[name](sweep, out)
    out["wall_s"] = time.perf_counter() - t0
    utils.write_text(results[:-5] + ".md", "\n".join(md))
    utils.write_json(results, out)
  print("\n".join(md))
  return out


if __name__ == "__main__":
  config_lib.run_main(main, None)
