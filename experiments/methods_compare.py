"""IA3 vs LoRA vs DoRA on MiniLM + fortunes: trainable parameters and accuracy.

Each method trains its adapters plus the classification head with the same
loop, optimizer and schedule as ``experiments/fortunes.py`` (the fortunes
config, ``configs/minilm_fortunes.py``), over several seeds:

* ``lora``: `jlora.lorify` on query/value, rank/alpha from the config.
* ``dora``: `jlora.dora`, same targets, rank and alpha.
* ``ia3``: `jlora.ia3` with PEFT's BERT defaults: keys, values and the
  feed-forward down projection (``output``), the latter on its input side;
  learning rate ``ia3_lr`` (IA3 vectors want a larger step than LoRA's).

Usage::

  python -m experiments.methods_compare                  # seeds 0, 1, 2; full config
  python -m experiments.methods_compare --quick --seeds=1
  python -m experiments.methods_compare --methods=ia3,dora --seeds=1,2

``--seeds=N`` means seeds 0..N-1; ``--seeds=1,2`` lists them. Each finished
run is cached as ``runs/methods/<method>-s<seed>-<hash of settings>.json``, so
runs made by separate invocations add up: the table covers every cached run
of the current settings. Writes ``runs/methods_compare.json`` and prints the
table (mean ± sample std).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

import jlora
from experiments import config as config_lib
from experiments import fortunes, utils

IA3_TARGETS = ("key", "value", "output")
IA3_FEEDFORWARD = ("output",)


def add_method(task, cfg, method: str, seed: int):
  base = fortunes.base_params(task, seed)
  key = jax.random.key(seed + 10_000)
  head = tuple(cfg["head"]) or None
  if method == "lora":
    return jlora.lorify(base, cfg["rank"], key=key, targets=tuple(cfg["targets"]),
                        alpha=cfg["alpha"], trainable=head)
  if method == "dora":
    return jlora.dora(base, cfg["rank"], key=key, targets=tuple(cfg["targets"]),
                      alpha=cfg["alpha"], trainable=head)
  if method == "ia3":
    return jlora.ia3(base, targets=IA3_TARGETS, feedforward=IA3_FEEDFORWARD, trainable=head)
  raise ValueError(f"unknown method {method!r}")


def count(tree) -> tuple[int, int]:
  mask = jlora.trainable_mask(tree)
  sizes = [(int(np.size(x)), m) for x, m in zip(jax.tree.leaves(tree), jax.tree.leaves(mask))]
  head = sum(n for n, m in sizes if m)
  return head, sum(n for n, _ in sizes)


def run(task, cfg, method: str, seed: int) -> dict:
  params = add_method(task, cfg, method, seed)
  apply = jlora.lora(fortunes.apply_fn(task))
  lr = cfg["ia3_lr"] if method == "ia3" else cfg["lr"]
  runner = fortunes.Runner("lora", fortunes._loss(apply), fortunes.make_tx(cfg, lr), params)
  fwd = jax.jit(apply)
  state, frozen = runner.init(params)
  it = fortunes.batches(len(task.train), cfg["batch_size"], seed)
  t0 = time.perf_counter()
  losses = []
  for _ in range(cfg["steps"]):
    state, metrics = runner.step(state, frozen, fortunes._batch(task.train, next(it)))
    losses.append(float(metrics["loss"]))
  trained = runner.params(state, frozen)
  logits = fortunes.predict(fwd, trained, task.test, cfg["eval_batch"])
  merged = fortunes.predict(jax.jit(fortunes.apply_fn(task)), jlora.merge(trained), task.test,
                            cfg["eval_batch"])
  trainable, total = count(trained)
  head = sum(int(np.size(x)) for x in jax.tree.leaves(trained["classifier"]))
  return {"method": method, "seed": seed, "test_acc": fortunes.accuracy(logits, task.test.labels),
          "trainable_params": trainable, "adapter_params": trainable - head,
          "total_params": total, "final_loss": losses[-1], "train_s": time.perf_counter() - t0,
          "merged_max_abs_logit_diff": float(np.max(np.abs(merged - logits)))}


def seed_list(spec: str) -> list[int]:
  """``"3"`` -> [0, 1, 2]; ``"1,2"`` -> [1, 2]."""
  return [int(x) for x in spec.split(",")] if "," in spec else list(range(int(spec)))


def cache_path(cfg, method: str, seed: int) -> str:
  keys = {k: v for k, v in cfg.items() if k not in ("seed", "progress", "run_name", "out_dir",
                                                    "compile_cache", "eval_every", "ckpt_every",
                                                    "ckpt_keep", "method")}
  digest = hashlib.sha1(json.dumps(keys, sort_keys=True, default=list).encode()).hexdigest()[:12]
  return os.path.join(cfg["out_dir"], "methods", f"{method}-s{seed}-{digest}.json")


def main(argv=None) -> list[dict]:
  argv = list(sys.argv[1:] if argv is None else argv)
  extra = {"methods": "lora,ia3,dora", "seeds": "3", "ia3_lr": "1e-2"}
  rest = []
  for a in argv:
    k = a.lstrip("-").split("=", 1)[0]
    if k in extra and "=" in a:
      extra[k] = a.split("=", 1)[1]
    else:
      rest.append(a)
  cfg = config_lib.load(rest, default="minilm_fortunes")
  cfg["ia3_lr"] = float(extra["ia3_lr"])
  task = fortunes.task_from(cfg)
  rows = []
  methods = extra["methods"].split(",")
  for method in methods:
    for seed in seed_list(extra["seeds"]):
      path = cache_path(cfg, method, seed)
      if not os.path.isfile(path):
        row = run(task, cfg, method, seed)
        utils.write_json(path, row)
        print(json.dumps(row), flush=True)
  for method in methods:  # every cached run of these settings, seeds in order
    for seed in range(1000):
      path = cache_path(cfg, method, seed)
      if os.path.isfile(path):
        with open(path) as f:
          rows.append(json.load(f))
  os.makedirs(cfg["out_dir"], exist_ok=True)
  with open(os.path.join(cfg["out_dir"], "methods_compare.json"), "w") as f:
    json.dump({"config": {k: v for k, v in cfg.items() if isinstance(v, (int, float, str, list, tuple))},
               "rows": rows}, f, indent=2)
  print(f"\n{'method':6} {'adapter params':>15} {'test acc (mean ± std)':>24}  seeds")
  for method in methods:
    accs = [r["test_acc"] for r in rows if r["method"] == method]
    sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
    n = next(r["adapter_params"] for r in rows if r["method"] == method)
    print(f"{method:6} {n:>15,} {statistics.mean(accs):>17.4f} ± {sd:.4f}  {len(accs)}")
  return rows


if __name__ == "__main__":
  main()
