"""python -m experiments.mobydick_lm [--quick] [--key=value ...]

Experiment 6: SmolLM2-135M on Moby Dick chapters.

* Held-out perplexity of the base model and of LoRA (``configs/smollm2_mobydick.py``:
  r=8 on Wq, Wv), with greedy samples before and after: this is the main
  job's ``--config=smollm2_mobydick`` run (`finetune.run_mobydick`), whose
  checkpoints land in ``runs/mobydick_lm``.
* Step time and memory of LoRA vs full fine-tuning on the same batches:
  ``full_steps`` steps of full fine-tuning (Adam on all 134.5M parameters)
  suffice for timing; LoRA's numbers come from its training run.

Any setting of the config can be overridden (``--steps=20``), plus
``--full_steps``. Writes ``experiments/results/mobydick_lm.{md,json}``
(``--quick``: under ``runs/quick``).
"""

from __future__ import annotations

import time
from typing import Any

from experiments import config as config_lib
from experiments import finetune, lm, utils

OWN = {"full_steps": (4, "steps of full fine-tuning, for timing only")}
QUICK_OWN = {"full_steps": 2}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  cfg = config_lib.load(["--run_name=mobydick_lm", *(argv or [])], default="smollm2_mobydick",
                        own=OWN, own_quick=QUICK_OWN, fixed=True, usage=__doc__)
  if cfg["quick"] and cfg["run_name"] == "mobydick_lm":
    cfg["run_name"] = "quick-mobydick_lm"
  t0 = time.perf_counter()
  lora_res = finetune.run(cfg)  # trains, resumes or reports the LoRA run
  print(f"\nfull fine-tuning: {cfg['full_steps']} steps for timing ...", flush=True)
  corpus = lm.corpus_from(cfg)
  full = lm.train(corpus, dict(cfg, method="full"), steps=cfg["full_steps"], evaluate=False,
                  progress=cfg["progress"])
  rows = []
  for name, r in (("LoRA r=%d on %s" % (cfg["rank"], "+".join(cfg["targets"])), lora_res),
                  ("full fine-tuning", full)):
    m = r["memory"]
    rows.append([name, f"{r['trainable_params']:,}", f"{1000 * r['step_time_s']:.0f} ms",
                 utils.mib(r["opt_state_bytes"]), utils.mib(m.get("peak", 0)),
                 utils.mib(m.get("temporaries", 0))])
  res = {"settings": cfg, "smoke_test": utils.SMOKE_TEST if cfg["quick"] else False,
         "provenance": utils.provenance(), "base_ppl": lora_res["base_ppl"],
         "lora_ppl": lora_res["heldout_ppl"], "merge_check": lora_res.get("merge_check"),
         "samples": lora_res["samples"], "evals": lora_res["evals"],
         "lora": {k: lora_res[k] for k in ("trainable_params", "total_params", "step_time_s",
                                           "first_step_s", "memory", "opt_state_bytes")},
         "full": {k: full[k] for k in ("trainable_params", "total_params", "step_time_s",
                                      "first_step_s", "memory", "opt_state_bytes")}}
  timing_note = (f"step time = median over steps 2..{cfg['steps']} (LoRA) and "
                 f"2..{cfg['full_steps']} (full), batch {cfg['batch_size']} x {cfg['seq_len']} "
                 "tokens, f32 on CPU")
  md = "\n".join([
      "## 6. SmolLM2-135M on Moby Dick\n",
      *([f"**{utils.SMOKE_TEST}.**\n"] if cfg["quick"] else []),
      f"1 seed. LoRA r={cfg['rank']} (alpha {cfg['alpha']:g}) on {', '.join(cfg['targets'])}, "
      f"{cfg['steps']} steps x batch {cfg['batch_size']} x {cfg['seq_len']} tokens, lr "
      f"{cfg['lr']:g}; held-out = last {cfg['n_heldout']} chapters, first "
      f"{corpus.heldout.size:,} tokens scored in windows of {cfg['seq_len'] + 1}.\n",
      utils.table(["model", "held-out perplexity"],
                  [["base", f"{res['base_ppl']:.2f}"], ["LoRA", f"{res['lora_ppl']:.2f}"]]),
      "",
      utils.table(["method", "trainable params", "step time", "optimizer state",
                   "step peak mem (XLA)", "of which temporaries"], rows),
      f"\n{timing_note}.\n",
      "Greedy samples (before -> after):\n",
      *[f"- `{s['prompt']}` -> before: `{s['before']!r}`; after: `{s['after']!r}`"
        for s in res["samples"]],
      "",
  ])
  res["wall_s"] = time.perf_counter() - t0
  print(md)
  with open(utils.out_path(cfg["quick"], "mobydick_lm.md"), "w") as f:
    f.write(md)
  utils.write_json(utils.out_path(cfg["quick"], "mobydick_lm.json"), res)
  return res


if __name__ == "__main__":
  config_lib.run_main(main, None)
