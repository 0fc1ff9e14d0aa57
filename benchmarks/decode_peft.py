"""/work/peftvenv/bin/python benchmarks/decode_peft.py DIR  (run by ``python -m benchmarks.decode --peft``)

PyTorch + PEFT worker for the mixed-adapter generation comparison. ``DIR``
holds what `benchmarks.decode` wrote: ``config.json`` (the Hugging Face
``LlamaConfig`` of the SmolLM2 port), ``base.npz`` (its weights, HF names,
torch layout), ``adapter_{k}/`` (each adapter, `jlora.export_peft`) and
``job.json`` (prompt ids, adapter per sequence, new tokens, rounds). It
builds ``LlamaForCausalLM``, loads every adapter into one ``PeftModel`` and
times ``generate(..., adapter_names=..., do_sample=False)`` (PEFT's
mixed-batch path: a loop over the adapters present in each LoRA layer),
eager, f32, on the CPU threads torch is given. Writes ``peft.json``: the
tokens and the wall time of each round.
"""

import json
import os
import sys
import time

import numpy as np
import torch
import transformers
from peft import PeftModel


def main(directory):
  job = json.load(open(os.path.join(directory, "job.json")))
  torch.set_num_threads(job.get("threads", os.cpu_count()))
  config = transformers.LlamaConfig(**json.load(open(os.path.join(directory, "config.json"))))
  model = transformers.LlamaForCausalLM(config)
  state = {k: torch.from_numpy(v) for k, v in np.load(os.path.join(directory, "base.npz")).items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  missing = [m for m in missing if m != "lm_head.weight"]  # tied to embed_tokens
  if missing or unexpected:
    raise SystemExit(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
  model.tie_weights()
  model.eval()
  names = [f"adapter_{k}" for k in range(job["adapters"])]
  peft_model = PeftModel.from_pretrained(model, os.path.join(directory, names[0]),
                                         adapter_name=names[0])
  for name in names[1:]:
    peft_model.load_adapter(os.path.join(directory, name), adapter_name=name)
  peft_model.eval()
  ids = torch.tensor(job["prompts"], dtype=torch.long)
  routing = [names[k] for k in job["index"]]
  kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=job["n"],
                min_new_tokens=job["n"], do_sample=False, adapter_names=routing,
                pad_token_id=config.eos_token_id)
  times, out = [], None
  with torch.no_grad():
    warmup = 1 if job.get("warmup", True) else 0  # eager torch: nothing to compile
    for _ in range(job["rounds"] + warmup):
      t0 = time.perf_counter()
      out = peft_model.generate(**kwargs)
      times.append(time.perf_counter() - t0)
  tokens = out[:, ids.shape[1]:].tolist()
  result = {"tokens": tokens, "seconds": times[warmup:], "warmup_seconds": times[:warmup],
            "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": __import__("peft").__version__, "threads": torch.get_num_threads()}
  json.dump(result, open(os.path.join(directory, "peft.json"), "w"))


if __name__ == "__main__":
  main(sys.argv[1])
