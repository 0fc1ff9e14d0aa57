"""python -m benchmarks.qlora [--quick] [--rounds N] [--json PATH]

QLoRA benchmark (issue 10): SmolLM2-135M-Instruct (experiments/models/llama.py,
30 layers, d 576, vocab 49152, tied head), LoRA r 8 alpha 16 on every linear
layer (q, k, v, o, gate, up, down), experiment 6's batch (4 rows) and
sequence length (128 tokens, 129 with the shifted target), f32, Adam on the
adapters; one ``jax.jit``-compiled train step per base:

* ``f32``:  the base as the port loads it (the GGUF file dequantized to f32);
* ``nf4``:  ``jlora.quantize(f32 base, "nf4")``: every kernel and the
  embedding in NF4, blocks of 64, f32 scales;
* ``nf4_dq``: the same with double quantization (8-bit scales, blocks of 256);
* ``q4_1``: the wheel's own GGUF blocks, read with ``jlora.quant.from_gguf``
  (Q4_1 layers, a Q8_0 embedding), never dequantized in full.

The frozen half is a jit argument (never a constant). For each: frozen base
bytes, XLA FLOPs (``cost_analysis``), ``memory_analysis()`` (arguments,
outputs, aliased, temporaries; peak = arguments + outputs − aliased +
temporaries) and wall time, interleaved round-robin (the order rotates every
round), medians, with the load average (``os.getloadavg``) before and after.
Run from the repository root. ``--quick`` keeps 2 layers (seconds; its
numbers mean nothing).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from benchmarks.reference import analyse, fmt_bytes, interleaved, table

RANK, ALPHA = 8, 16.0
BATCH, SEQ = 4, 128
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GOALS = {"base_bytes": 0.16, "wall": 1.3}


def nbytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree, is_leaf=jlora.quant.is_quantized))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="2 layers: a smoke run")
  p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
  p.add_argument("--json", default=None, help="also write the numbers to this file")
  args = p.parse_args(argv)

  import dataclasses
  import gguf
  from experiments.models import llama

  load = {"before": os.getloadavg()}
  reader = gguf.GGUFReader(llama.gguf_path())
  config = llama.config_from_gguf(reader)
  if args.quick:
    config = dataclasses.replace(config, num_hidden_layers=2)
  f32 = jax.tree.map(jnp.asarray, llama.convert_gguf(reader, config))
  bases = {
      "f32": f32,
      "nf4": jlora.quantize(f32, "nf4"),
      "nf4_dq": jlora.quantize(f32, "nf4", double_quant=True),
      "q4_1": llama.convert_gguf(reader, config, blocks=True),
  }
  # The GGUF blocks dequantize to exactly the port's f32 weights.
  k = bases["q4_1"]["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert np.array_equal(np.asarray(k.dequantize()),
                        np.asarray(f32["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]))

  model = llama.LlamaForCausalLM(config)
  tokens = jax.random.randint(jax.random.key(0), (BATCH, SEQ + 1), 0, config.vocab_size)
  tx = optax.adam(1e-3)

  def loss_fn(adapters, frozen, tokens):
    params = jlora.combine(adapters, frozen)
    logits = jlora.lora(model.apply)({"params": params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  def step(adapters, opt_state, frozen, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(adapters, frozen, tokens)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss

  stats, calls, trees = {}, {}, {}
  for name, base in bases.items():
    lorified = jlora.lorify(base, RANK, key=jax.random.key(1), alpha=ALPHA, targets=TARGETS)
    adapters, frozen = jlora.partition(lorified)
    opt_state = tx.init(adapters)
    a = (adapters, opt_state, frozen, tokens)
    t0 = time.perf_counter()
    st = analyse(step, a)
    st["compile_s"] = time.perf_counter() - t0
    compiled = st.pop("compiled")
    mem = compiled.memory_analysis()
    st["alias"] = mem.alias_size_in_bytes
    st["peak"] = st["argument"] + st["output"] - st["alias"] + st["temp"]
    st["base_bytes"] = nbytes(base)
    st["adapter_bytes"] = nbytes(adapters)
    stats[name] = st
    trees[name] = a
    calls[name] = (lambda c=compiled, a=a: jax.block_until_ready(c(*a)))
    # Same loss as the f32 step on the dequantized tree (sanity of the run).
    st["loss0"] = float(compiled(*a)[2])
    print(f"{name}: compiled in {st['compile_s']:.1f} s, loss {st['loss0']:.4f}", flush=True)

  times = interleaved(calls, args.rounds, warmup=1)
  load["after"] = os.getloadavg()
  med = {n: statistics.median(t) for n, t in times.items()}

  largest = sorted((int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(f32)), reverse=True)
  two_largest = largest[0] + largest[1]
  rows = []
  for n, st in stats.items():
    rows.append([n, fmt_bytes(st["base_bytes"]), f"{st['base_bytes'] / stats['f32']['base_bytes']:.4f}",
                 f"{st['flops'] / 1e9:.2f}", fmt_bytes(st["temp"]), fmt_bytes(st["peak"]),
                 f"{med[n] * 1e3:.0f}", f"{med[n] / med['f32']:.3f}"])
  print(f"\nload average before {load['before']}, after {load['after']}; {args.rounds} rounds\n")
  print(table(rows, ["base", "frozen base", "x f32", "GFLOP", "temp", "peak", "ms (med)", "x f32"]))
  lines = []
  for n in ("nf4", "nf4_dq", "q4_1"):
    ratio = stats[n]["base_bytes"] / stats["f32"]["base_bytes"]
    extra = stats[n]["temp"] - stats["f32"]["temp"]
    wall = med[n] / med["f32"]
    lines.append(f"{n}: base bytes {ratio:.4f}x ({'met' if ratio <= GOALS['base_bytes'] else 'NOT met'}"
                 f" <= {GOALS['base_bytes']}); temp - f32 temp {fmt_bytes(extra)} vs two largest "
                 f"dequantized weights {fmt_bytes(two_largest)} "
                 f"({'met' if extra <= two_largest else 'NOT met'}); peak {stats[n]['peak'] / stats['f32']['peak']:.3f}x; "
                 f"wall {wall:.3f}x ({'met' if wall <= GOALS['wall'] else 'NOT met'} <= {GOALS['wall']})")
  print("\n" + "\n".join(lines))
  if args.quick:
    print("\n(--quick: 2 layers; the numbers mean nothing)")
  if args.json:
    import flax
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "load": load, "quick": args.quick, "rounds": args.rounds, "layers": config.num_hidden_layers,
           "batch": BATCH, "seq": SEQ, "rank": RANK, "alpha": ALPHA, "targets": TARGETS,
           "versions": {"jax": jax.__version__, "flax": flax.__version__,
                        "python": platform.python_version(), "machine": platform.machine(),
                        "cpus": os.cpu_count()},
           "stats": stats, "times": times, "median": med, "two_largest_weights": two_largest,
           "summary": lines}
    from experiments.utils import write_json

    write_json(args.json, out)


if __name__ == "__main__":
  sys.exit(main())
