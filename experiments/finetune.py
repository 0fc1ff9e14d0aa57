"""python -m experiments.finetune [--config=minilm_fortunes|smollm2_mobydick] [--quick] [--key=value ...]

The main job (``make run``). With the default config (``configs/minilm_fortunes.py``)
it fine-tunes all-MiniLM-L6-v2 with LoRA on Wq, Wv plus a trainable
classification head on the 8-way fortune task, and compares it with a
head-only probe of the frozen encoder. With ``--config=smollm2_mobydick`` it
fine-tunes SmolLM2-135M with LoRA on Moby Dick chapters and reports held-out
perplexity and greedy samples before and after.

Either way it shows a progress bar, evaluates every ``eval_every`` steps,
saves orbax checkpoints of the training state (holding the settings) under
``runs/<run_name>/checkpoints`` and the final adapters under
``runs/<run_name>/adapters`` (with ``config.json`` beside them), checks that the
merged tree (`jlora.merge`) predicts what the factored model predicts, and
prints a final table.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import numpy as np

import jlora
from experiments import config as config_lib
from experiments import utils
from experiments.config import REPO_ROOT


def run_dir(cfg: dict[str, Any]) -> str:
  """A fresh run directory (a previous run's directory of the same name is replaced)."""
  name = cfg["run_name"] or f"{cfg['config']}-{cfg['method']}"
  root = cfg["out_dir"] if os.path.isabs(cfg["out_dir"]) else os.path.join(REPO_ROOT, cfg["out_dir"])
  path = os.path.join(root, name)
  if os.path.isdir(path):
    if not os.path.isfile(os.path.join(path, "config.json")):
      raise SystemExit(f"error: {path} exists and is not a run directory; pick --run_name")
    shutil.rmtree(path)
  os.makedirs(path)
  utils.write_json(os.path.join(path, "config.json"), cfg)
  return path


def _log(cfg, msg: str) -> None:
  print(msg, flush=True)


# --------------------------------------------------------------------------- fortunes


def run_fortunes(cfg: dict[str, Any], out: str) -> dict[str, Any]:
  from experiments import fortunes

  t0 = time.perf_counter()
  task = fortunes.task_from(cfg)
  _log(cfg, f"fortunes: {len(task.train)} train / {len(task.val)} val / {len(task.test)} test "
            f"quotes, {len(task.label_names)} classes, max_len {cfg['max_len']}")
  _log(cfg, "head-only probe on frozen MiniLM features ...")
  probe = fortunes.train_probe(task, cfg, cfg["seed"])
  _log(cfg, f"probe: test accuracy {probe['test_acc']:.4f}")
  result: dict[str, Any] = {"probe": probe}
  if cfg["method"] == "probe":
    print(utils.table(["method", "test acc", "trainable / total params"],
                      [["probe", f"{probe['test_acc']:.4f}",
                        f"{probe['trainable_params']:,} / {probe['total_params']:,}"]]))
    return result

  with jlora.Checkpoints(os.path.join(out, "checkpoints"), every=cfg["ckpt_every"],
                         keep=cfg["ckpt_keep"]) as ckpts:
    run = fortunes.train(task, cfg, cfg["seed"], ckpts=ckpts, progress=cfg["progress"],
                         on_eval=lambda s, m: None if cfg["progress"] else _log(
                             cfg, f"step {s}: loss {m['loss']:.4f} val acc {m['val_acc']:.4f}"))
    ckpt_steps = ckpts.all_steps()
  for e in run["evals"]:
    _log(cfg, f"eval step {e['step']:>4}: loss {e['loss']:.4f}  val acc {e['val_acc']:.4f}")
  result[cfg["method"]] = {k: v for k, v in run.items() if k not in ("params", "test_logits")}

  if cfg["method"] == "lora":
    check = fortunes.merge_check(task, cfg, run["params"], run["test_logits"])
    result["merge_check"] = check
    _log(cfg, f"merge check: merged vs factored on {check['n']} test quotes: max |Δlogit| "
              f"{check['max_abs_logit_diff']:.2e}, {check['agree']}/{check['n']} predictions "
              f"agree, merged test accuracy {check['merged_test_acc']:.4f}")
    assert check["same_structure_as_base"], "merged tree differs in structure from the base"
    assert check["max_abs_logit_diff"] < 1e-3, check
    assert check["unexplained_disagreements"] == 0, check
    jlora.save_adapters(os.path.join(out, "adapters"), run["params"])

  mem = run["memory"]
  rows = [["head-only probe", f"{probe['test_acc']:.4f}",
           f"{probe['trainable_params']:,} / {probe['total_params']:,}",
           "(cached features)", "-", utils.mib(probe["opt_state_bytes"])],
          [cfg["method"] if cfg["method"] != "lora" else
           f"LoRA r={cfg['rank']} on {'+'.join(cfg['targets'])} + head",
           f"{run['test_acc']:.4f}",
           f"{run['trainable_params']:,} / {run['total_params']:,} "
           f"({100 * run['trainable_params'] / run['total_params']:.2f}%)",
           f"{1000 * run['step_time_s']:.0f} ms", utils.mib(mem.get("peak", 0)),
           utils.mib(run["opt_state_bytes"])]]
  print()
  print(utils.table(["method", "test acc", "trainable / total params", "step time",
                     "step peak mem (XLA)", "optimizer state"], rows))
  print(f"\nsteps {cfg['steps']} x batch {cfg['batch_size']} x {cfg['max_len']} tokens; "
        f"first step (compile) {run['first_step_s']:.1f} s; process max RSS "
        f"{utils.mib(utils.max_rss_bytes())}; wall {time.perf_counter() - t0:.0f} s")
  print(f"checkpoints (training state + config) at steps {ckpt_steps} in {out}/checkpoints")
  return result


# --------------------------------------------------------------------------- Moby Dick


def run_mobydick(cfg: dict[str, Any], out: str) -> dict[str, Any]:
  import jax

  from experiments import lm

  t0 = time.perf_counter()
  corpus = lm.corpus_from(cfg)
  _log(cfg, f"Moby Dick: {corpus.train.shape[0]} training rows of {cfg['seq_len'] + 1} tokens, "
            f"{corpus.heldout.size} held-out tokens scored; {corpus.config.num_hidden_layers} layers")
  plain_nll = jax.jit(lm._nll(lm.apply_fn(corpus.config)))
  base_ppl = lm.perplexity(plain_nll, corpus.params, corpus.heldout, cfg["eval_batch"])
  _log(cfg, f"base model: held-out perplexity {base_ppl:.2f}")
  before = lm.samples(corpus, corpus.params, cfg["prompts"], cfg["sample_tokens"])
  with jlora.Checkpoints(os.path.join(out, "checkpoints"), every=cfg["ckpt_every"],
                         keep=cfg["ckpt_keep"]) as ckpts:
    run = lm.train(corpus, cfg, ckpts=ckpts, progress=cfg["progress"])
    ckpt_steps = ckpts.all_steps()
  for e in run["evals"]:
    _log(cfg, f"eval step {e['step']:>4}: loss {e['loss']:.4f}  held-out ppl {e['heldout_ppl']:.2f}")
  trained = run["params"]
  result = {"base_ppl": base_ppl, **{k: v for k, v in run.items() if k not in ("params", "nll_fn")}}
  if cfg["method"] == "lora":
    merged = jlora.merge(trained)
    merged_ppl = lm.perplexity(plain_nll, merged, corpus.heldout, cfg["eval_batch"])
    rows = corpus.heldout[: cfg["eval_batch"]]
    apply = lm.apply_fn(corpus.config)
    factored = np.asarray(jax.jit(jlora.lora(apply))(trained, rows[:, :-1]))
    plain = np.asarray(jax.jit(apply)(merged, rows[:, :-1]))
    diff = float(np.max(np.abs(factored - plain)))
    same = float(np.mean(factored.argmax(-1) == plain.argmax(-1)))
    result["merge_check"] = {"max_abs_logit_diff": diff, "argmax_agreement": same,
                             "merged_ppl": merged_ppl}
    _log(cfg, f"merge check: merged vs factored logits max |Δ| {diff:.2e}, next-token argmax "
              f"agreement {100 * same:.2f}%, merged held-out perplexity {merged_ppl:.2f}")
    assert abs(merged_ppl - run["heldout_ppl"]) <= 1e-3 * run["heldout_ppl"], result["merge_check"]
    assert diff < 1e-2, result["merge_check"]
    jlora.save_adapters(os.path.join(out, "adapters"), trained)
  else:
    merged = trained
  after = lm.samples(corpus, merged, cfg["prompts"], cfg["sample_tokens"])
  result["samples"] = [{"prompt": p, "before": b, "after": a}
                       for p, b, a in zip(cfg["prompts"], before, after)]
  print()
  for s in result["samples"]:
    print(f"prompt: {s['prompt']!r}\n  before: {s['before']!r}\n  after:  {s['after']!r}")
  mem = run["memory"]
  print()
  print(utils.table(
      ["model", "held-out ppl", "trainable / total params", "step time", "step peak mem (XLA)",
       "optimizer state"],
      [["base SmolLM2-135M", f"{base_ppl:.2f}", "-", "-", "-", "-"],
       [f"{cfg['method']}" + (f" r={cfg['rank']} on {'+'.join(cfg['targets'])}"
                              if cfg["method"] == "lora" else ""),
        f"{run['heldout_ppl']:.2f}",
        f"{run['trainable_params']:,} / {run['total_params']:,} "
        f"({100 * run['trainable_params'] / run['total_params']:.2f}%)",
        f"{1000 * run['step_time_s']:.0f} ms", utils.mib(mem.get("peak", 0)),
        utils.mib(run["opt_state_bytes"])]]))
  print(f"\nsteps {cfg['steps']} x batch {cfg['batch_size']} x {cfg['seq_len']} tokens; first "
        f"step (compile) {run['first_step_s']:.1f} s; process max RSS "
        f"{utils.mib(utils.max_rss_bytes())}; wall {time.perf_counter() - t0:.0f} s")
  print(f"checkpoints (training state + config) at steps {ckpt_steps} in {out}/checkpoints")
  return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Runs the main job; returns its results (also written to ``runs/<run>/results.json``)."""
  cfg = config_lib.load(argv or [])
  utils.setup_jax(cfg["compile_cache"])
  out = run_dir(cfg)
  print(f"config {cfg['config']}{' (--quick)' if cfg['quick'] else ''}: "
        + json.dumps({k: v for k, v in cfg.items() if k not in ("config", "quick")}))
  if cfg["task"] == "fortunes":
    result = run_fortunes(cfg, out)
  elif cfg["task"] == "mobydick":
    result = run_mobydick(cfg, out)
  else:
    raise config_lib.ConfigError(f"task must be 'fortunes' or 'mobydick', got {cfg['task']!r}")
  utils.write_json(os.path.join(out, "results.json"), {"config": cfg, **result})
  return result


if __name__ == "__main__":
  config_lib.run_main(main, None)
