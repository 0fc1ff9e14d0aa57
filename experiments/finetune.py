"""python -m experiments.finetune [--config=minilm_fortunes|smollm2_mobydick] [--quick] [--fresh] [--key=value ...]

The main job (``make run``). With the default config (``configs/minilm_fortunes.py``)
it fine-tunes all-MiniLM-L6-v2 with LoRA on Wq, Wv plus a trainable
classification head on the 8-way fortune task, and compares it with a
head-only probe of the frozen encoder. With ``--config=smollm2_mobydick`` it
fine-tunes SmolLM2-135M with LoRA on Moby Dick chapters and reports held-out
perplexity and greedy samples before and after. ``--help`` lists every setting.

Every setting is checked (the targets against the model's module names,
from its shapes alone) before any data is loaded or any folder is made. The
run folder ``runs/<run_name>`` then holds:

* ``config.json``: the settings; ``base.json``: which pretrained base;
  ``labels.json``: the label names (fortunes);
* ``checkpoints/``: orbax checkpoints of the training state, each with the
  settings, the step, the losses and evaluations so far;
* ``adapters/``: the trained adapters and head (`jlora.save_adapters`), which
  ``python -m experiments.predict --run=runs/<run_name> "text"`` uses;
* ``results.json`` and ``curves.png`` (loss and accuracy or perplexity).

Run again, it resumes: from the latest checkpoint (same batches, so the
result is bit-identical to an uninterrupted run), or, when ``results.json``
is there, it prints the finished result at once. ``--fresh`` starts again;
changed settings against an existing run folder are an error naming them.
Along the way it checks that the merged tree (`jlora.merge`) predicts what
the factored model predicts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

import jlora
from experiments import config as config_lib
from experiments import training, utils
from experiments.config import REPO_ROOT

# Settings that do not change a run's result: they may differ on a resume.
NOT_RESULTS = ("fresh", "progress", "compile_cache")
TASKS = {"fortunes": ("lora", "full", "probe"), "mobydick": ("lora", "full")}


# --------------------------------------------------------------------------- settings


def _model_shapes(cfg: Mapping[str, Any]) -> Any:
  """The params tree of the run's model, shapes only (nothing loaded)."""
  if cfg["task"] == "fortunes":
    from experiments import data
    from experiments.models import bert

    return bert.classifier_shapes(bert.BertConfig(), len(data.FORTUNE_CATEGORIES))
  from experiments.models import llama

  config = llama.LlamaConfig()
  if cfg["layers"]:
    config = dataclasses.replace(config, num_hidden_layers=min(cfg["layers"],
                                                               config.num_hidden_layers))
  return llama.shapes(config)


def validate(cfg: Mapping[str, Any], *, also: Sequence[str] = ()) -> None:
  """Checks every setting of the main job; no data, no weights, no folder.

  Args:
    cfg: The settings.
    also: Problems a caller found in its own settings, reported in the same error.

  Raises:
    config_lib.ConfigError: Listing every problem, each with its setting.
  """
  problems = list(also) + problems_of(cfg)
  if problems:
    raise config_lib.ConfigError("invalid settings:\n  " + "\n  ".join(problems))


def problems_of(cfg: Mapping[str, Any]) -> list[str]:
  """Every problem of the main job's settings, each naming its setting.

  The targets, rank, alpha and head are checked by `jlora.lorify` itself, on
  a shape-only tree of the model (``jax.eval_shape``), so its messages name
  the module names that exist.
  """
  import jax

  problems = []
  task = cfg.get("task")
  if task not in TASKS:
    return [f"--task: expected one of {list(TASKS)}, got {task!r}"]
  if cfg["method"] not in TASKS[task]:
    problems.append(f"--method: for task {task!r} expected one of {list(TASKS[task])}, "
                    f"got {cfg['method']!r}")
  positive = ["rank", "steps", "batch_size", "eval_every", "eval_batch", "ckpt_every", "ckpt_keep",
              "lr", "full_lr", "alpha"]
  positive += ["probe_steps", "val_size", "max_len", "head_lr"] if task == "fortunes" else [
      "seq_len", "eval_tokens", "n_heldout"]
  for key in positive:
    if not cfg[key] > 0:
      problems.append(f"--{key}: must be > 0, got {cfg[key]}")
  for key in ["warmup", "weight_decay"] + (["train_size", "test_size"] if task == "fortunes"
                                           else ["layers", "sample_tokens"]):
    if cfg[key] < 0:
      problems.append(f"--{key}: must be >= 0, got {cfg[key]}")
  if task == "fortunes":
    if not 0 < cfg["test_fraction"] < 1:
      problems.append(f"--test_fraction: must be in (0, 1), got {cfg['test_fraction']}")
    if cfg["max_len"] > 512:
      problems.append(f"--max_len: MiniLM has 512 positions, got {cfg['max_len']}")
    if 0 < cfg["train_size"] < cfg["batch_size"]:
      problems.append(f"--train_size={cfg['train_size']} is smaller than one batch "
                      f"(--batch_size={cfg['batch_size']})")
  elif cfg["layers"] > 30:
    problems.append(f"--layers: SmolLM2-135M has 30 layers, got {cfg['layers']}")
  formats = training.QUANTIZE + (("gguf",) if task == "mobydick" else ())
  if cfg["quantize"] not in formats:
    problems.append(f"--quantize: for task {task!r} expected one of {list(formats)}, "
                    f"got {cfg['quantize']!r}")
  elif cfg["quantize"] and cfg["method"] != "lora":
    problems.append(f"--quantize={cfg['quantize']}: a quantized base is frozen, so it needs "
                    f"--method=lora (got --method={cfg['method']}); drop --quantize to train "
                    "every weight")
  if os.sep in cfg["run_name"] or cfg["run_name"] in (".", ".."):
    problems.append(f"--run_name: a folder name under --out_dir, got {cfg['run_name']!r}")
  if cfg["method"] == "lora" and not problems:
    try:
      jax.eval_shape(lambda t: training.add_lora(training.quantize_base(t, cfg), cfg,
                                                 key=jax.random.key(0)), _model_shapes(cfg))
    except jlora.LoraError as e:
      problems.append(f"--targets={','.join(cfg['targets'])} --rank={cfg['rank']} "
                      f"--head={','.join(cfg['head'])} --quantize={cfg['quantize']}: {e}")
  return problems


# --------------------------------------------------------------------------- the run folder


def run_path(cfg: Mapping[str, Any]) -> str:
  """``out_dir/run_name`` (default run name: config name + method)."""
  name = cfg["run_name"] or f"{cfg['config']}-{cfg['method']}"
  root = cfg["out_dir"] if os.path.isabs(cfg["out_dir"]) else os.path.join(REPO_ROOT, cfg["out_dir"])
  return os.path.join(root, name)


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _same(a: Any, b: Any) -> bool:
  return json.loads(json.dumps(a, default=list)) == json.loads(json.dumps(b, default=list))


def open_run(cfg: Mapping[str, Any]) -> tuple[str, dict[str, Any] | None]:
  """The run folder, made or reopened, and the finished result if there is one.

  Raises:
    config_lib.ConfigError: The folder exists but is not a run folder, or
      holds a run of other settings (the message names them).
  """
  path = run_path(cfg)
  if os.path.isdir(path) and cfg["fresh"]:
    if not os.path.isfile(os.path.join(path, "config.json")):
      raise config_lib.ConfigError(f"{path} exists and is not a run folder; "
                                   "pick another --run_name")
    shutil.rmtree(path)
  if os.path.isdir(path):
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
      raise config_lib.ConfigError(f"{path} exists and is not a run folder; "
                                   "pick another --run_name")
    saved = _read_json(config_file)
    # A setting added since the run was made counts as its default there.
    defaults = config_lib.load_file(cfg["config"])[0]
    saved = {**{k: defaults[k] for k in set(cfg) - set(saved) if k in defaults}, **saved}
    keys = sorted((set(saved) | set(cfg)) - set(NOT_RESULTS))
    changed = [k for k in keys if not _same(saved.get(k), cfg.get(k))]
    if changed:
      lines = [f"--{k}: the run has {saved.get(k)!r}, now {cfg.get(k)!r}" for k in changed]
      raise config_lib.ConfigError(
          f"{path} holds a run with other settings:\n  " + "\n  ".join(lines)
          + "\nresume it with its settings, start it again with --fresh, or pick a new --run_name")
    results = os.path.join(path, "results.json")
    if os.path.isfile(results):
      return path, _read_json(results)
    return path, None
  os.makedirs(path)
  utils.write_json(os.path.join(path, "config.json"), dict(cfg))
  return path, None


def _checkpoints(cfg: Mapping[str, Any], out: str) -> jlora.Checkpoints:
  return jlora.Checkpoints(os.path.join(out, "checkpoints"), every=cfg["ckpt_every"],
                           keep=cfg["ckpt_keep"])


def _resumed(run: Mapping[str, Any]) -> str:
  if run["resumed_from"]:
    return (f"resumed from the checkpoint of step {run['resumed_from']}, "
            f"trained {run['steps_run']} steps")
  return f"trained {run['steps_run']} steps"


# --------------------------------------------------------------------------- fortunes


def run_fortunes(cfg: dict[str, Any], out: str) -> dict[str, Any]:
  """Probe, then LoRA (or full) fine-tuning, the merge check and the run folder's files."""
  from experiments import fortunes
  from experiments.models import bert

  show = cfg["progress"]
  with utils.phase("loading MiniLM and tokenizing the fortunes"):
    task = fortunes.task_from(cfg)
  print(f"fortunes: {len(task.train)} train / {len(task.val)} val / {len(task.test)} test "
        f"quotes, {len(task.label_names)} classes, max_len {cfg['max_len']}", flush=True)
  utils.write_json(os.path.join(out, "labels.json"), list(task.label_names))
  utils.write_json(os.path.join(out, "base.json"), {**bert.base_record(), "task": "fortunes",
                                                    "num_labels": len(task.label_names),
                                                    "pooling": "mean",
                                                    "quantize": cfg["quantize"]})
  probe_file = os.path.join(out, "probe.json")
  if os.path.isfile(probe_file):
    probe = _read_json(probe_file)
    print(f"probe: test accuracy {probe['test_acc']:.4f} (from {probe_file})")
  else:
    with utils.phase("head-only probe on frozen MiniLM features (cached under runs/cache)"):
      probe = fortunes.train_probe(task, cfg, cfg["seed"], progress=show)
    utils.write_json(probe_file, probe)
    print(f"probe: test accuracy {probe['test_acc']:.4f}", flush=True)
  result: dict[str, Any] = {"probe": probe}
  if cfg["method"] == "probe":
    return result

  with _checkpoints(cfg, out) as ckpts:
    run = fortunes.train(task, cfg, cfg["seed"], ckpts=ckpts, progress=show)
    result["checkpoint_steps"] = ckpts.all_steps()
  print(_resumed(run), flush=True)
  for e in run["evals"]:
    print(f"eval step {e['step']:>4}: loss {e['loss']:.4f}  val acc {e['val_acc']:.4f}")
  result[cfg["method"]] = {k: v for k, v in run.items() if k not in ("params", "test_logits")}

  if cfg["method"] == "lora":
    with utils.phase("merge check: the merged tree with the plain model on the test set"):
      check = fortunes.merge_check(task, cfg, run["params"], run["test_logits"], progress=show)
    result["merge_check"] = check
    print(f"merge check: merged vs factored on {check['n']} test quotes: max |Δlogit| "
          f"{check['max_abs_logit_diff']:.2e}, {check['agree']}/{check['n']} predictions "
          f"agree, merged test accuracy {check['merged_test_acc']:.4f}")
    if not (check["same_structure_as_base"] and check["max_abs_logit_diff"] < 1e-3
            and check["unexplained_disagreements"] == 0):
      raise RuntimeError(f"the merged tree does not predict what the factored one does: {check}")
    jlora.save_adapters(params=run["params"], path=os.path.join(out, "adapters"), force=True)
  utils.plot_curves(os.path.join(out, "curves.png"), run["losses"], run["evals"],
                    metric="val_acc", label="validation accuracy",
                    title=_title(cfg, f"MiniLM on fortunes, {cfg['method']}"))
  return result


def _title(cfg: Mapping[str, Any], what: str) -> str:
  return f"{what} ({'SMOKE TEST, --quick: meaningless numbers' if cfg['quick'] else 'full run'})"


def _method_label(cfg: Mapping[str, Any], head: bool) -> str:
  if cfg["method"] != "lora":
    return f"{cfg['method']} fine-tuning"
  return f"LoRA r={cfg['rank']} on {'+'.join(cfg['targets'])}" + (" + head" if head else "")


def _params_cell(run: Mapping[str, Any]) -> str:
  return (f"{run['trainable_params']:,} / {run['total_params']:,} "
          f"({100 * run['trainable_params'] / run['total_params']:.2f}%)")


def report_fortunes(cfg: Mapping[str, Any], result: Mapping[str, Any]) -> list[str]:
  probe = result["probe"]
  first = "method" + (" (SMOKE TEST: meaningless)" if cfg["quick"] else "")
  rows = [["head-only probe", f"{probe['test_acc']:.4f}",
           f"{probe['trainable_params']:,} / {probe['total_params']:,}", "(cached features)", "-",
           utils.mib(probe["opt_state_bytes"])]]
  if cfg["method"] != "probe":
    run = result[cfg["method"]]
    rows.append([_method_label(cfg, head=True), f"{run['test_acc']:.4f}", _params_cell(run),
                 f"{1000 * run['step_time_s']:.0f} ms", utils.mib(run["memory"].get("peak", 0)),
                 utils.mib(run["opt_state_bytes"])])
  lines = [utils.table([first, "test acc", "trainable / total params", "step time",
                        "step peak mem (XLA)", "optimizer state"], rows)]
  if "merge_check" in result:
    c = result["merge_check"]
    lines.append(f"merged tree: {c['agree']}/{c['n']} test predictions agree with the factored "
                 f"model, max |Δlogit| {c['max_abs_logit_diff']:.2e}")
  return lines


# --------------------------------------------------------------------------- Moby Dick


def run_mobydick(cfg: dict[str, Any], out: str) -> dict[str, Any]:
  """Base perplexity, LoRA (or full) fine-tuning, the merge check, samples, the folder's files."""
  import jax

  from experiments import lm
  from experiments.models import llama

  show = cfg["progress"]
  with utils.phase("loading SmolLM2-135M and tokenizing Moby Dick"):
    corpus = lm.corpus_from(cfg)
  print(f"Moby Dick: {corpus.train.shape[0]} training rows of {cfg['seq_len'] + 1} tokens, "
        f"{corpus.heldout.size} held-out tokens scored; {corpus.config.num_hidden_layers} layers",
        flush=True)
  utils.write_json(os.path.join(out, "base.json"), {
      **llama.base_record(), "task": "mobydick", "layers": corpus.config.num_hidden_layers,
      "quantize": cfg["quantize"]})
  plain_nll = lm.nll_fn(corpus.config, factored=False)
  base = lm.frozen_base(corpus, cfg) if cfg["method"] == "lora" else corpus.params
  quantized = bool(cfg["quantize"])  # then only jlora.lora runs it: the plain model needs floats
  base_ppl = lm.perplexity(lm.nll_fn(corpus.config, factored=True) if quantized else plain_nll,
                           base, corpus.heldout, cfg["eval_batch"], progress=show,
                           desc="base model perplexity")
  what = f"base model ({cfg['quantize']} base)" if quantized else "base model"
  print(f"{what}: held-out perplexity {base_ppl:.2f}", flush=True)
  before = lm.samples(corpus, base, cfg["prompts"], cfg["sample_tokens"])
  with _checkpoints(cfg, out) as ckpts:
    run = lm.train(corpus, cfg, ckpts=ckpts, progress=show, base=base)
    checkpoint_steps = ckpts.all_steps()
  print(_resumed(run), flush=True)
  for e in run["evals"]:
    print(f"eval step {e['step']:>4}: loss {e['loss']:.4f}  held-out ppl {e['heldout_ppl']:.2f}")
  trained = run["params"]
  result = {"base_ppl": base_ppl, "layers": corpus.config.num_hidden_layers,
            "checkpoint_steps": checkpoint_steps,
            **{k: v for k, v in run.items() if k != "params"}}
  if cfg["method"] == "lora":
    with utils.phase("merge check: the merged tree with the plain model"):
      merged = jlora.merge(trained)
      merged_ppl = lm.perplexity(plain_nll, merged, corpus.heldout, cfg["eval_batch"],
                                 progress=show, desc="merged perplexity")
      rows = corpus.heldout[: cfg["eval_batch"]]
      apply = lm.apply_fn(corpus.config)
      factored = np.asarray(jax.jit(jlora.lora(apply))(trained, rows[:, :-1]))
      plain = np.asarray(jax.jit(apply)(merged, rows[:, :-1]))
    diff = float(np.max(np.abs(factored - plain)))
    same = float(np.mean(factored.argmax(-1) == plain.argmax(-1)))
    result["merge_check"] = {"max_abs_logit_diff": diff, "argmax_agreement": same,
                             "merged_ppl": merged_ppl}
    print(f"merge check: merged vs factored logits max |Δ| {diff:.2e}, next-token argmax "
          f"agreement {100 * same:.2f}%, merged held-out perplexity {merged_ppl:.2f}")
    if abs(merged_ppl - run["heldout_ppl"]) > 1e-3 * run["heldout_ppl"] or diff >= 1e-2:
      raise RuntimeError(f"the merged tree does not predict what the factored one does: "
                         f"{result['merge_check']}")
    jlora.save_adapters(params=trained, path=os.path.join(out, "adapters"), force=True)
  else:
    merged = trained
  after = lm.samples(corpus, merged, cfg["prompts"], cfg["sample_tokens"])
  result["samples"] = [{"prompt": p, "before": b, "after": a}
                       for p, b, a in zip(cfg["prompts"], before, after)]
  utils.plot_curves(os.path.join(out, "curves.png"), run["losses"], run["evals"],
                    metric="heldout_ppl", label="held-out perplexity",
                    title=_title(cfg, f"SmolLM2 on Moby Dick, {cfg['method']}"))
  return result


def base_label(layers: int) -> str:
  """The base model's name, saying when it is truncated (``--layers``)."""
  return ("base SmolLM2-135M" if layers >= 30
          else f"SmolLM2-135M truncated to {layers} of 30 layers (not the real model)")


def report_mobydick(cfg: Mapping[str, Any], result: Mapping[str, Any]) -> list[str]:
  lines = [f"prompt: {s['prompt']!r}\n  before: {s['before']!r}\n  after:  {s['after']!r}"
           for s in result["samples"]]
  first = "model" + (" (SMOKE TEST: meaningless)" if cfg["quick"] else "")
  lines.append(utils.table(
      [first, "held-out ppl", "trainable / total params", "step time", "step peak mem (XLA)",
       "optimizer state"],
      [[base_label(result["layers"]) + (f", {cfg['quantize']} base" if cfg["quantize"] else ""),
        f"{result['base_ppl']:.2f}", "-", "-", "-", "-"],
       [_method_label(cfg, head=False), f"{result['heldout_ppl']:.2f}", _params_cell(result),
        f"{1000 * result['step_time_s']:.0f} ms", utils.mib(result["memory"].get("peak", 0)),
        utils.mib(result["opt_state_bytes"])]]))
  return lines


# --------------------------------------------------------------------------- the job


def report(cfg: Mapping[str, Any], result: Mapping[str, Any], out: str) -> None:
  """The final summary: results, settings and where every file went."""
  lines = [""]
  if cfg["quick"]:
    lines += [utils.SMOKE_TEST, ""]
  lines += (report_fortunes if cfg["task"] == "fortunes" else report_mobydick)(cfg, result)
  defaults = config_lib.load_file(cfg["config"])[0]
  lines += ["", "settings:", utils.settings_table(cfg, defaults), "", f"run folder {out}:"]
  files = [("config.json", "the settings"), ("base.json", "which pretrained base"),
           ("labels.json", "the label names"),
           ("adapters", "the trained adapters (+ head), jlora.save_adapters"),
           ("results.json", "every number above, and more"),
           ("curves.png", "loss and evaluation curves"),
           ("checkpoints", f"training state at steps {result.get('checkpoint_steps')}")]
  lines += [f"  {os.path.join(out, name):<60} {what}" for name, what in files
            if os.path.exists(os.path.join(out, name))]
  if os.path.isdir(os.path.join(out, "adapters")) and cfg["task"] == "fortunes":
    rel = os.path.relpath(out, REPO_ROOT)
    rel = out if rel.startswith("..") else rel
    lines.append(f'classify a sentence: python -m experiments.predict --run={rel} "some text"')
  print("\n".join(lines), flush=True)


def run(cfg: dict[str, Any]) -> dict[str, Any]:
  """Runs (or resumes, or reports) the main job for resolved settings ``cfg``.

  Returns:
    The results, as written to ``runs/<run_name>/results.json``.
  """
  validate(cfg)
  t0 = time.perf_counter()
  out, done = open_run(cfg)
  if done is not None:
    print(f"{out} is complete (results.json with these settings); 0 training steps. "
          "--fresh trains it again.")
    report(cfg, done, out)
    return done
  utils.setup_jax(cfg["compile_cache"])
  print(f"config {cfg['config']}; run folder {out}", flush=True)
  if cfg["quick"]:
    print(utils.SMOKE_TEST, flush=True)
  result = (run_fortunes if cfg["task"] == "fortunes" else run_mobydick)(cfg, out)
  result = {"config": cfg, "smoke_test": utils.SMOKE_TEST if cfg["quick"] else False,
            **result, "wall_s": time.perf_counter() - t0, "provenance": utils.provenance()}
  utils.write_json(os.path.join(out, "results.json"), result)
  report(cfg, result, out)
  prov = result["provenance"]
  print(f"wall {result['wall_s']:.0f} s; process max RSS {utils.mib(utils.max_rss_bytes())}; "
        f"finished {prov['date']}, load average {' / '.join(f'{x:.2f}' for x in prov['load_average_1_5_15'])} "
        f"on {prov['cpus']} cpus, jax {prov['versions'].get('jax')}")
  return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """``python -m experiments.finetune [--key=value ...]``; returns the results."""
  return run(config_lib.load(argv or [], usage=__doc__))


if __name__ == "__main__":
  config_lib.run_main(main, None)
