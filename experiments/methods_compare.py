"""python -m experiments.methods_compare [--quick] [--methods=lora,qlora,ia3,dora] [--seeds=3] [--key=value ...]

Experiment 7: IA3 vs LoRA vs DoRA, and QLoRA vs LoRA, on MiniLM + fortunes:
trainable parameters and accuracy.

Each method trains its adapters plus the classification head with the main
job's loop, optimizer and schedule (`fortunes.train`, the fortunes config
``configs/minilm_fortunes.py``), over several seeds:

* ``lora``: `jlora.lorify` on query/value, rank/alpha from the config.
* ``qlora``: the same LoRA on an NF4 base (QLoRA: every linear kernel of the
  encoder in NormalFloat-4, blocks of 64, double quantization; embeddings,
  norms and the head in f32; `training.quantize_base`). MiniLM's weights are
  true f32, so this is the paper's "4-bit QLoRA vs 16-bit LoRA" question.
* ``dora``: `jlora.dora`, same targets, rank and alpha.
* ``ia3``: `jlora.ia3` with PEFT's BERT defaults: keys, values and the
  feed-forward down projection (``output``), the latter on its input side;
  learning rate ``ia3_lr`` (IA3 vectors want a larger step than LoRA's).

Examples::

  python -m experiments.methods_compare                  # seeds 0, 1, 2; full config
  python -m experiments.methods_compare --methods=qlora,lora,ia3,dora   # what results/ holds
  python -m experiments.methods_compare --quick --seeds=1
  python -m experiments.methods_compare --methods=ia3,dora --seeds=1,2

``--seeds=N`` means seeds 0..N-1; ``--seeds=1,2`` lists them. Each finished
run is cached as ``<out_dir>/methods/<method>-s<seed>-<hash of settings>.json``,
so runs made by separate invocations add up: the table covers every cached
run of the current settings. Writes ``<out_dir>/methods_compare.json`` (and,
without ``--quick``, ``experiments/results/methods_compare.json``) and prints
the table (mean ± sample std).
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import jax

import jlora
from experiments import config as config_lib
from experiments import finetune, fortunes, utils

IA3_TARGETS = ("key", "value", "output")
IA3_FEEDFORWARD = ("output",)
OWN = {
    "methods": (("lora", "qlora", "ia3", "dora"), "methods compared (lora, qlora, ia3, dora)"),
    "seeds": ("3", "N: seeds 0..N-1, or a list such as 1,2"),
    "ia3_lr": (1e-2, "peak learning rate of the IA3 vectors"),
}
# Settings that do not change a run's result, left out of its cache key.
METHODS = ("lora", "qlora", "ia3", "dora")
_NOT_IN_KEY = ("seed", "progress", "run_name", "out_dir", "compile_cache", "eval_every",
               "ckpt_every", "ckpt_keep", "method", "fresh", "methods", "seeds")


def add_method(task, cfg, method: str, seed: int):
  """The base tree (head from ``seed``) with the adapters of ``method``."""
  base = fortunes.base_params(task, seed)
  key = jax.random.key(seed + 10_000)
  head = tuple(cfg["head"]) or None
  if method == "lora":
    return fortunes.lorify(task, cfg, seed)
  if method == "qlora":
    return fortunes.lorify(task, dict(cfg, quantize="nf4", double_quant=True), seed)
  if method == "dora":
    return jlora.dora(base, cfg["rank"], key=key, targets=tuple(cfg["targets"]),
                      alpha=cfg["alpha"], trainable=head)
  if method == "ia3":
    return jlora.ia3(base, targets=IA3_TARGETS, feedforward=IA3_FEEDFORWARD, trainable=head)
  raise config_lib.ConfigError(f"--methods: unknown method {method!r}; valid: {METHODS}")


def run(task, cfg, method: str, seed: int) -> dict:
  """Trains one method for one seed; accuracy, parameter counts and the merge check."""
  t0 = time.perf_counter()
  res = fortunes.train(task, dict(cfg, method="lora"), seed,
                       params=add_method(task, cfg, method, seed),
                       lr=cfg["ia3_lr"] if method == "ia3" else cfg["lr"], measure_memory=False)
  train_s = time.perf_counter() - t0
  check = fortunes.merge_check(task, cfg, res["params"], res["test_logits"])
  head = utils.tree_size(res["params"]["classifier"])
  return {"method": method, "seed": seed, "test_acc": res["test_acc"],
          "trainable_params": res["trainable_params"],
          "adapter_params": res["trainable_params"] - head, "total_params": res["total_params"],
          "final_loss": res["losses"][-1], "train_s": train_s,
          "merged_max_abs_logit_diff": check["max_abs_logit_diff"],
          "merged_agree": check["agree"], "provenance": utils.provenance()}


def seed_list(spec: str) -> list[int]:
  """``"3"`` -> [0, 1, 2]; ``"1,2"`` -> [1, 2]."""
  try:
    return [int(x) for x in spec.split(",")] if "," in spec else list(range(int(spec)))
  except ValueError:
    raise config_lib.ConfigError(
        f"--seeds: expected N or a list such as 1,2, got {spec!r}") from None


def cache_path(cfg, method: str, seed: int) -> str:
  keys = {k: v for k, v in cfg.items() if k not in _NOT_IN_KEY}
  digest = hashlib.sha1(json.dumps(keys, sort_keys=True, default=list).encode()).hexdigest()[:12]
  return os.path.join(cfg["out_dir"], "methods", f"{method}-s{seed}-{digest}.json")


def main(argv=None) -> list[dict]:
  cfg = config_lib.load(argv or [], default="minilm_fortunes", own=OWN, usage=__doc__)
  seeds = seed_list(cfg["seeds"])
  unknown = [f"--methods: unknown method {m!r}; valid: {METHODS}" for m in cfg["methods"]
             if m not in METHODS]
  finetune.validate(dict(cfg, method="lora"), also=unknown)  # before any data: targets, ...
  utils.setup_jax(cfg["compile_cache"])
  with utils.phase("loading MiniLM and tokenizing the fortunes"):
    task = fortunes.task_from(cfg)
  for method in cfg["methods"]:
    for seed in seeds:
      path = cache_path(cfg, method, seed)
      if not os.path.isfile(path):
        row = run(task, cfg, method, seed)
        utils.write_json(path, row)
        print(f"{method} seed {seed}: test acc {row['test_acc']:.4f} ({row['train_s']:.0f} s)",
              flush=True)
  rows = []
  for method in cfg["methods"]:  # every cached run of these settings, seeds in order
    for seed in range(1000):
      path = cache_path(cfg, method, seed)
      if os.path.isfile(path):
        with open(path) as f:
          rows.append(json.load(f))
  res = {"config": cfg, "smoke_test": utils.SMOKE_TEST if cfg["quick"] else False,
         "provenance": utils.provenance(), "rows": rows, "paired_vs_lora": paired(rows)}
  utils.write_json(os.path.join(cfg["out_dir"], "methods_compare.json"), res)
  if not cfg["quick"]:
    utils.write_json(utils.out_path(False, "methods_compare.json"), res)
  if cfg["quick"]:
    print(f"\n{utils.SMOKE_TEST}")
  table = []
  for method in cfg["methods"]:
    accs = [r["test_acc"] for r in rows if r["method"] == method]
    n = next(r["adapter_params"] for r in rows if r["method"] == method)
    table.append([method, f"{n:,}", utils.pm(accs, 100, 2), len(accs)])
  print()
  print(utils.table(["method", "adapter params", "test acc % (mean ± std)", "seeds"], table))
  for method, p in res["paired_vs_lora"].items():
    print(f"{method} - lora, paired over seeds {p['seeds']}: {100 * p['mean']:+.2f} points "
          f"(per seed {', '.join(f'{100 * d:+.2f}' for d in p['diffs'])}; {method} ahead in "
          f"{p['wins']} of {len(p['diffs'])})")
  return rows


def paired(rows: list[dict]) -> dict:
  """Per method, its test accuracy minus LoRA's on the same seeds (same head, same batches)."""
  lora = {r["seed"]: r["test_acc"] for r in rows if r["method"] == "lora"}
  out = {}
  for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "lora"):
    mine = {r["seed"]: r["test_acc"] for r in rows if r["method"] == method}
    seeds = sorted(set(mine) & set(lora))
    if seeds:
      diffs = [mine[s] - lora[s] for s in seeds]
      out[method] = {"seeds": seeds, "diffs": diffs, "mean": sum(diffs) / len(diffs),
                     "wins": sum(d > 0 for d in diffs)}
  return out


if __name__ == "__main__":
  config_lib.run_main(main, None)
