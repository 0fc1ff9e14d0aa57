"""python -m benchmarks.decode [--quick] [--ks 1,16,64,256] [--paths gather,onehot,grouped,segment] [--rounds N] [--layers L] [--json PATH] [--peft PYTHON]

Serving many adapters at once (issue 14): KV-cached decode steps of
SmolLM2-135M-Instruct (experiments/models/decode.py, 30 layers, d 576, vocab
49152, f32), LoRA r 8 alpha 16 on q, k, v, o, gate, up, down (random ``A``
and ``B``: trained-looking adapters), one token per sequence per step against
a cache of ``--cache`` positions.

For each ``K`` in ``--ks`` the batch is ``max(K, 16)`` sequences, sequence
``b`` routed to adapter ``b mod K``, and these decode steps are compiled and
timed, interleaved round-robin (the order rotates every round), medians:

* ``merged``: the batch with one merged adapter (`jlora.merge`): the base's cost;
* ``unmerged``: one adapter under `jlora.lora`;
* ``gather``, ``onehot``, ``grouped``, ``segment`` (``--paths``): a bank of
  ``K`` adapters (`jlora.stack_adapters` + `jlora.route`, the index traced),
  each routing path of `jlora.methods.routing` forced; ``auto`` is the one
  the runtime picks (its ratio is reported when that path was timed);
* ``grouped_capacity`` (with ``grouped``): the grouped path given
  `jlora.route`'s ``capacity`` (the busiest adapter's sequences, known
  before compiling, as `decode.generate` passes it): no run-time choice.

Each step's XLA FLOPs (``cost_analysis``) and temporaries
(``memory_analysis``) are recorded too. Decode tokens/s = batch / median
step time. The load average (``os.getloadavg``) is recorded before and after
each ``K`` next to its timings, with the date, the CPU and the versions
(`experiments.utils.provenance`). Run from the repository root; ``--quick``
keeps 2 layers, K = 1, 16 and 2 rounds (its numbers mean nothing).

``--peft /work/peftvenv/bin/python``: generation of ``--new-tokens`` tokens
for 16 sequences over 16 adapters (equal-length prompts, greedy), jlora's
bank (`decode.generate`, ``mode="bank"``, prefill included) against PEFT's
``generate(..., adapter_names=...)`` on the same weights (`hf_export`) and
the same adapters (`jlora.export_peft`), run by `benchmarks/decode_peft.py`
in that Python; jlora's rounds before and after PEFT's, medians; the tokens
of every sequence compared.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from experiments import lm, utils
from experiments.models import decode, llama
from jlora.methods import routing as routing_lib

TARGETS = re.compile(r"(q|k|v|o|gate|up|down)_proj/kernel")
PATHS = ("gather", "onehot", "grouped", "segment")


def adapters(params, k_adapters: int, rank: int):
  """``K`` lorified trees with random adapters (shared base arrays)."""
  out = []
  for k in range(k_adapters):
    tree = jlora.lorify(params, rank, key=jax.random.key(k), alpha=2 * rank, targets=TARGETS)
    mask = jlora.trainable_mask(tree)
    keys = iter(jax.random.split(jax.random.key(1000 + k), len(jax.tree.leaves(tree))))
    out.append(jax.tree.map(
        lambda x, m: 0.02 * jax.random.normal(next(keys), x.shape, x.dtype) if m else x,
        tree, mask))
  return out


def interleaved(calls: dict, rounds: int) -> dict[str, list[float]]:
  times: dict[str, list[float]] = {k: [] for k in calls}
  names = list(calls)
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      t0 = time.perf_counter()
      calls[name]()
      times[name].append(time.perf_counter() - t0)
  return times


def measure_k(config, params, k_adapters: int, *, rank: int, cache_len: int,
              rounds: int, paths=PATHS) -> dict:
  batch = max(k_adapters, 16)
  trees = adapters(params, k_adapters, rank)
  bank = jlora.stack_adapters(trees)
  del trees[1:]  # K copies of the adapters: keep only the bank (and trees[0])
  index = jnp.asarray(np.arange(batch) % k_adapters, jnp.int32)
  merged = jax.jit(jlora.merge)(trees[0])
  ids = jnp.ones((batch, 1), jnp.int32)
  pos = jnp.full((batch, 1), cache_len - 1, jnp.int32)
  setups = {"merged": (decoder("merged"), merged),
            "unmerged": (decoder("unmerged"), trees[0])}
  for path in paths:
    setups[path] = (decoder("bank", routing=path), bank)
  capacity = -(-batch // k_adapters)  # sequence b on adapter b mod K
  if "grouped" in paths:
    setups["grouped_capacity"] = (decoder("bank", routing="grouped", capacity=capacity), bank)
  auto = routing_lib.choose_path(None, k_adapters, rank)  # what "auto" routes decode with
  caches, compiled, record = {}, {}, {}
  for name, (fn, p) in setups.items():
    cache = decode.init_cache(config, batch, cache_len)
    c = fn.lower(p, ids, pos, cache, index).compile()
    cost = c.cost_analysis()
    mem = c.memory_analysis()
    record[name] = {"flops": float(cost.get("flops", 0.0)),
                    "temp_bytes": int(mem.temp_size_in_bytes)}
    caches[name] = cache
    compiled[name] = (c, p)
  # The bank's logits equal each sequence's own merged adapter's (one step).
  check = {}
  for name in [n for n in setups if n not in ("merged", "unmerged")]:
    c, p = compiled[name]
    logits, caches[name] = c(p, ids, pos, caches[name], index)
    check[name] = logits

  def call(name):
    def run():
      c, p = compiled[name]
      logits, caches[name] = c(p, ids, pos, caches[name], index)
      logits.block_until_ready()
    return run

  calls = {name: call(name) for name in setups}
  for fn in calls.values():  # warm-up
    fn()
  load_before = os.getloadavg()
  times = interleaved(calls, rounds)
  load_after = os.getloadavg()
  med = {k: statistics.median(v) for k, v in times.items()}
  first = next(iter(check), None)
  spread = max((float(jnp.max(jnp.abs(check[a] - check[first]))) for a in check), default=0.0)
  out = {"K": k_adapters, "batch": batch, "auto": auto, "capacity": capacity,
         "load_before": list(load_before), "load_after": list(load_after),
         "median_ms": {k: round(1e3 * v, 2) for k, v in med.items()},
         "all_ms": {k: [round(1e3 * t, 2) for t in v] for k, v in times.items()},
         "tokens_per_s": {k: round(batch / v, 1) for k, v in med.items()},
         "over_merged_tokens_per_s": {k: round(med["merged"] / v, 3) for k, v in med.items()},
         "compiled": record, "max_abs_logit_between_paths": spread}
  if auto in med:
    out["over_merged_tokens_per_s"]["auto"] = out["over_merged_tokens_per_s"][auto]
  print(json.dumps({k: out[k] for k in ("K", "batch", "auto", "load_before", "median_ms",
                                         "over_merged_tokens_per_s")}), flush=True)
  return out


def hf_export(config, params, directory: str) -> None:
  """The port's base as a Hugging Face ``LlamaForCausalLM`` (config.json, base.npz)."""
  hf = {"vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads, "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": True, "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id, "torch_dtype": "float32"}
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf, f)
  m = params["model"]
  state = {"model.embed_tokens.weight": m["embed_tokens"]["embedding"],
           "model.norm.weight": m["norm"]["scale"]}
  for i in range(config.num_hidden_layers):
    layer, pre = m[f"layers_{i}"], f"model.layers.{i}."
    state[pre + "input_layernorm.weight"] = layer["input_layernorm"]["scale"]
    state[pre + "post_attention_layernorm.weight"] = layer["post_attention_layernorm"]["scale"]
    for group in ("self_attn", "mlp"):
      for name, sub in layer[group].items():
        state[f"{pre}{group}.{name}.weight"] = np.asarray(sub["kernel"]).T
  np.savez(os.path.join(directory, "base.npz"),
           **{k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in state.items()})


def peft_compare(config, params, *, python: str, k_adapters: int, rank: int, n: int,
                 rounds: int, peft_rounds: int) -> dict:
  """jlora's bank generation vs PEFT ``generate(adapter_names=)``: same weights, batch, adapters."""
  import subprocess
  import tempfile

  from jlora.peft import maps
  batch, prompt_len = max(k_adapters, 16), 8
  trees = adapters(params, k_adapters, rank)
  directory = tempfile.mkdtemp(prefix="jlora-decode-peft-")
  hf_export(config, params, directory)
  for k, tree in enumerate(trees):
    jlora.export_peft(tree, os.path.join(directory, f"adapter_{k}"), module_path=maps.LLAMA)
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, config.vocab_size, (batch, prompt_len)).tolist()
  index = (np.arange(batch) % k_adapters).astype(np.int32)
  with open(os.path.join(directory, "job.json"), "w") as f:
    json.dump({"prompts": prompts, "index": index.tolist(), "n": n, "rounds": peft_rounds,
               "warmup": False, "adapters": k_adapters, "threads": os.cpu_count()}, f)
  bank = jlora.stack_adapters(trees)

  def ours():
    t0 = time.perf_counter()
    out = decode.generate(bank, config, prompts, n, mode="bank", index=index)
    return out, time.perf_counter() - t0

  tokens, _ = ours()  # compile
  load = {"before": os.getloadavg()}
  jl = [ours()[1] for _ in range(rounds)]
  load["peft_start"] = os.getloadavg()
  worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "decode_peft.py")
  subprocess.run([python, worker, directory], check=True)
  load["peft_end"] = os.getloadavg()
  jl += [ours()[1] for _ in range(rounds)]
  load["after"] = os.getloadavg()
  theirs = json.load(open(os.path.join(directory, "peft.json")))
  same = [a == b for a, b in zip(tokens.tolist(), theirs["tokens"])]
  med_j, med_p = statistics.median(jl), statistics.median(theirs["seconds"])
  out = {"K": k_adapters, "batch": batch, "prompt_len": prompt_len, "new_tokens": n,
         "load": load, "jlora_seconds": jl, "peft_seconds": theirs["seconds"],
         "jlora_tokens_per_s": round(batch * n / med_j, 1),
         "peft_tokens_per_s": round(batch * n / med_p, 1),
         "jlora_over_peft_tokens_per_s": round(med_p / med_j, 2),
         "sequences_identical": int(sum(same)), "sequences": len(same),
         "tokens_identical": int(sum(x == y for a, b in zip(tokens.tolist(), theirs["tokens"])
                                     for x, y in zip(a, b))),
         "versions": {k: theirs[k] for k in ("torch", "transformers", "peft", "threads")}}
  print(json.dumps({k: v for k, v in out.items() if "seconds" not in k}), flush=True)
  return out


_CONFIG = {}


def decoder(mode, routing="auto", capacity=None):
  return decode.decoder(_CONFIG["config"], mode=mode, routing=routing, capacity=capacity)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--ks", default=None, help="adapter counts K (default 1,16,64,256; "
                  "1,16 with --quick)")
  ap.add_argument("--paths", default=",".join(PATHS), help="bank routing paths timed")
  ap.add_argument("--rounds", type=int, default=None, help="timing rounds (default 5; "
                  "2 with --quick)")
  ap.add_argument("--layers", type=int, default=0, help="0: all 30")
  ap.add_argument("--rank", type=int, default=8)
  ap.add_argument("--cache", type=int, default=64, help="cache length (positions)")
  ap.add_argument("--json", default="benchmarks/results/decode.json")
  ap.add_argument("--peft", default=None, metavar="PYTHON",
                  help="a Python with torch + peft: also compare with PEFT generate "
                  "(adapter_names=) at K 16, and skip the K table unless --ks is given")
  ap.add_argument("--new-tokens", type=int, default=16, help="--peft: tokens generated")
  ap.add_argument("--peft-rounds", type=int, default=1,
                  help="--peft: PEFT's timed generate calls (eager: no warm-up call)")
  argv = sys.argv[1:] if argv is None else list(argv)
  args = ap.parse_args(argv)
  paths = tuple(args.paths.split(",")) if args.paths else ()
  unknown = [p for p in paths if p not in PATHS]
  if unknown:
    ap.error(f"--paths: unknown {unknown}; choose from {list(PATHS)}")
  rounds = args.rounds or (2 if args.quick else 5)
  ks = [int(k) for k in (args.ks or ("1,16" if args.quick else "1,16,64,256")).split(",")]
  config, params, _ = llama.load_smollm2()
  config, params = lm.truncate(config, params, 2 if args.quick else args.layers)
  _CONFIG["config"] = config
  print(f"# decode, jax {jax.__version__} {jax.devices()[0].platform}, "
        f"{config.num_hidden_layers} layers, load {os.getloadavg()}", flush=True)
  results, peft = [], None
  if args.peft:
    peft = peft_compare(config, params, python=args.peft, k_adapters=16, rank=args.rank,
                        n=args.new_tokens, rounds=rounds, peft_rounds=args.peft_rounds)
    if args.ks is None:
      ks = []
  for k in ks:
    results.append(measure_k(config, params, k, rank=args.rank, cache_len=args.cache,
                             rounds=rounds, paths=paths))
  prov = utils.provenance()
  prov["command"] = shlex.join(["python", "-m", "benchmarks.decode", *argv])
  out = {**prov, "quick": args.quick, "device": str(jax.devices()[0]),
         "config": {"layers": config.num_hidden_layers, "rank": args.rank, "alpha": 2 * args.rank,
                    "targets": TARGETS.pattern, "cache_len": args.cache,
                    "rounds": rounds, "dtype": "float32", "paths": list(paths),
                    "onehot_max_width": routing_lib.ONEHOT_MAX_WIDTH,
                    "grouped_capacities": list(routing_lib.GROUPED_CAPACITIES)},
         "results": results, "peft": peft}
  utils.write_json(args.json, out)
  print("wrote", args.json)
  return out


if __name__ == "__main__":
  main()
