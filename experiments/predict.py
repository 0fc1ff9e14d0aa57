"""python -m experiments.predict --run=runs/minilm_fortunes-lora "some text" ["more text" ...]

Uses the adapters of a finished main-job run (``make run`` or
``python -m experiments.finetune``). For a fortunes run it prints, per text,
the predicted label and its probability (``--top=3``: the three most likely);
for a Moby Dick run (``--config=smollm2_mobydick``) it prints each text's
greedy continuation (``--tokens`` of them).

Everything comes from the run folder: ``config.json`` (the settings),
``labels.json`` (the label names, in the head's order), ``base.json`` (which
pretrained base) and ``adapters/`` (`jlora.save_adapters`). The base is
loaded, the adapters with `jlora.load_adapters` (which checks that they were
trained on this base), and `jlora.merge` folds them in: the model then runs
at the base model's cost.
"""

from __future__ import annotations

import json
import os
from typing import Any

from experiments import config as config_lib
from experiments.config import REPO_ROOT

OWN = {
    "run": ("", "the run folder, e.g. runs/minilm_fortunes-lora (relative: to the repository "
                "or the current folder)"),
    "top": (1, "labels shown per text, most likely first (fortunes runs)"),
    "tokens": (24, "greedy tokens generated per text (Moby Dick runs)"),
}


def _folder(run: str) -> str:
  for path in (run, os.path.join(REPO_ROOT, run)):
    if os.path.isfile(os.path.join(path, "config.json")):
      return os.path.abspath(path)
  raise config_lib.ConfigError(f"--run: {run!r} is not a run folder (no config.json there or "
                               f"under {REPO_ROOT}); run `make run` first")


def _read(folder: str, name: str) -> Any:
  with open(os.path.join(folder, name)) as f:
    return json.load(f)


def load_run(run: str) -> tuple[dict[str, Any], Any, Any]:
  """``(config, merged params, extra)`` of a run folder; extra is the label names or the corpus.

  Raises:
    config_lib.ConfigError: Not a run folder, or one without adapters.
  """
  import jlora

  folder = _folder(run)
  cfg = _read(folder, "config.json")
  adapters = os.path.join(folder, "adapters")
  if not os.path.isdir(adapters):
    raise config_lib.ConfigError(
        f"--run: {folder} has no adapters/ (method {cfg['method']!r}, or the run is not finished); "
        "predict needs a finished LoRA run: python -m experiments.finetune")
  from experiments import training

  if cfg["task"] == "fortunes":
    from experiments.models import bert

    labels = _read(folder, "labels.json")
    config, encoder, _ = bert.load_minilm()
    base = bert.init_classifier_params(config, encoder, len(labels))  # head: replaced below
    base = training.quantize_base(base, cfg)  # the base it was trained on (QLoRA runs)
    return cfg, jlora.merge(jlora.load_adapters(base_params=base, path=adapters)), labels
  from experiments import lm
  from experiments.models import llama

  config, params, tok = llama.load_smollm2(blocks=cfg.get("quantize") == "gguf")
  config, params = lm.truncate(config, params, cfg.get("layers", 0))
  params = training.quantize_base(params, cfg)
  return cfg, jlora.merge(jlora.load_adapters(base_params=params, path=adapters)), (config, tok)


def classify(cfg: dict[str, Any], params: Any, labels: list[str],
             texts: list[str]) -> list[list[tuple[str, float]]]:
  """Per text, ``(label, probability)`` pairs, most likely first."""
  import jax
  import numpy as np

  from experiments.models import bert

  config, _, _ = bert.load_minilm()
  tok = bert.load_tokenizer(max_length=cfg["max_len"], pad_to_multiple_of=None)
  batch = bert.tokenize(tok, texts)
  model = bert.BertClassifier(config, len(labels), pooling="mean")
  logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
  probs = np.asarray(jax.nn.softmax(logits, -1))
  return [[(labels[i], float(p[i])) for i in np.argsort(-p)] for p in probs]


def main(argv: list[str] | None = None) -> list:
  argv = list(argv or [])
  texts = [a for a in argv if not a.startswith("-")]
  cfg = config_lib.resolve(OWN, [a for a in argv if a.startswith("-")], usage=__doc__)
  if not cfg["run"]:
    raise config_lib.ConfigError("--run=FOLDER is needed, e.g. --run=runs/minilm_fortunes-lora")
  if not texts:
    raise config_lib.ConfigError('give the texts after the settings: --run=FOLDER "some text"')
  run_cfg, params, extra = load_run(cfg["run"])
  if run_cfg["task"] == "fortunes":
    out = classify(run_cfg, params, extra, texts)
    for text, ranked in zip(texts, out):
      best = ", ".join(f"{label} ({p:.3f})" for label, p in ranked[: max(cfg["top"], 1)])
      print(f"{best}\t{text}")
    return out
  from experiments.models import llama

  config, tok = extra
  out = [llama.decode(tok, llama.generate_ids(params, config, llama.encode(tok, t), cfg["tokens"]))
         for t in texts]
  for text, continuation in zip(texts, out):
    print(f"{text!r} -> {continuation!r}")
  return out


if __name__ == "__main__":
  config_lib.run_main(main, None)
