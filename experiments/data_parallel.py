"""python -m experiments.data_parallel [--quick] [--steps=150] [--batch=32] [--seq=64] [--rank=8]

Trains LoRA adapters on a small byte-level transformer, data-parallel across 8
simulated CPU devices (``--xla_force_host_platform_device_count=8``, set by
this script before JAX starts), and reports per-device memory.

Four runs from the same start, on the same batches (Moby Dick bytes if
``make data`` fetched them, else a synthetic stream):

* ``jit``: one device, the reference.
* ``mesh``: `jlora.train_step` over a ``("data",)`` mesh of 8 devices: the
  batch split 8 ways, adapters and frozen weights replicated.
* ``fsdp``: the same, with every frozen weight split 8 ways along its largest
  divisible axis (``fsdp=True``).
* ``fsdp+bf16+acc2``: FSDP with bf16 compute (f32 master adapters) and 2
  accumulated micro-batches per step.

Per run it prints the final loss, its largest difference from ``jit`` over all
steps, the step time, and XLA's memory analysis of the compiled step per
device (arguments, of which frozen weights, and temporaries), plus the frozen
bytes each device actually holds. Results go to
``runs/data_parallel[_quick]/results.json``.

On one CPU the 8 "devices" share the same cores, so the step times show the
overhead of the collectives, not a speed-up; the memory columns are what
carries over to real accelerators.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jlora  # noqa: E402
from experiments import config as config_lib  # noqa: E402
from experiments.config import REPO_ROOT  # noqa: E402
from experiments.utils import SMOKE_TEST  # noqa: E402

VOCAB = 256
OWN = {
    "steps": (150, "training steps of each run"),
    "batch": (32, "rows per step (split over the devices)"),
    "seq": (64, "bytes per row"),
    "rank": (8, "LoRA rank (alpha = 2 x rank)"),
}
QUICK = dict(steps=10)  # a smoke test


class ByteLM(nn.Module):
  """A pre-LN decoder over bytes with a tied output projection."""

  d: int = 128
  heads: int = 4
  layers: int = 2

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(VOCAB, self.d, name="embed")
    h = embed(tokens)
    mask = nn.make_causal_mask(tokens)
    for i in range(self.layers):
      y = nn.MultiHeadDotProductAttention(self.heads, name=f"attn_{i}")(
          nn.LayerNorm(name=f"ln_a{i}")(h), mask=mask)
      h = h + y
      y = nn.Dense(4 * self.d, name=f"up_{i}")(nn.LayerNorm(name=f"ln_m{i}")(h))
      h = h + nn.Dense(self.d, name=f"down_{i}")(nn.gelu(y))
    return embed.attend(nn.LayerNorm(name="ln_f")(h))


def corpus() -> tuple[np.ndarray, str]:
  """Bytes of Moby Dick if fetched, else a synthetic stream."""
  try:
    from experiments import data
    text = "\n\n".join(data.moby_dick_chapters())
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32), "Moby Dick bytes"
  except (FileNotFoundError, ValueError, ImportError):
    rng = np.random.default_rng(0)
    words = [bytes(rng.integers(97, 123, rng.integers(2, 8))) for _ in range(200)]
    text = b" ".join(words[i] for i in rng.integers(0, 200, 50_000))
    return np.frombuffer(text, np.uint8).astype(np.int32), "synthetic words"


def batch_at(stream: np.ndarray, step: int, rows: int, seq: int) -> dict:
  """Batch ``step``: random windows, a function of the step alone."""
  starts = np.random.default_rng([0, step]).integers(0, len(stream) - seq - 1, rows)
  return {"tokens": np.stack([stream[s:s + seq + 1] for s in starts])}


def main(argv=None) -> dict:
  cfg = config_lib.resolve(OWN, argv or [], QUICK, usage=__doc__)
  for key in OWN:
    if cfg[key] < 1:
      raise config_lib.ConfigError(f"--{key}: must be >= 1, got {cfg[key]}")
  steps = cfg["steps"]
  n = jax.device_count()
  stream, source = corpus()
  model = ByteLM()
  base = model.init(jax.random.key(0), jnp.zeros((1, cfg["seq"]), jnp.int32))
  params = jlora.lorify(base, cfg["rank"], key=jax.random.key(1), alpha=2 * cfg["rank"],
                        targets=re.compile(r"(attn_\d+/(query|value)|up_\d+|down_\d+)/kernel$"))
  apply = jlora.lora(model.apply)

  def loss_fn(p, batch):
    logits = apply(p, batch["tokens"][:, :-1]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["tokens"][:, 1:]).mean()

  mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  runs = {"jit": {}, "mesh": dict(mesh=mesh), "fsdp": dict(mesh=mesh, fsdp=True),
          "fsdp+bf16+acc2": dict(mesh=mesh, fsdp=True, compute_dtype=jnp.bfloat16,
                                 accumulate=2)}
  batches = [batch_at(stream, i, cfg["batch"], cfg["seq"]) for i in range(steps)]
  frozen_total = sum(x.nbytes for x in jax.tree.leaves(jlora.partition(params)[1]))
  adapter_total = sum(x.nbytes for x in jax.tree.leaves(jlora.partition(params)[0]))
  if cfg["quick"]:
    print(SMOKE_TEST)
  print(f"{n} devices; {source}; {steps} steps x {cfg['batch']} rows x {cfg['seq']} bytes; "
        f"frozen weights {frozen_total / 2**20:.2f} MiB, adapters "
        f"{adapter_total / 2**10:.1f} KiB (rank {cfg['rank']})")
  results = {"smoke_test": SMOKE_TEST if cfg["quick"] else False, "devices": n,
             "source": source, "steps": steps, "batch": cfg["batch"],
             "seq": cfg["seq"], "rank": cfg["rank"], "frozen_bytes": frozen_total,
             "adapter_bytes": adapter_total, "runs": {}}
  reference = None
  for name, kw in runs.items():
    trainer = jlora.train_step(loss_fn, optax.adamw(3e-3), params, **kw)
    state, frozen = trainer.init(params)
    first = trainer.shard_batch(batches[0])
    t0 = time.perf_counter()
    compiled = trainer.step.lower(state, frozen, first).compile()
    compile_s = time.perf_counter() - t0
    stats = compiled.memory_analysis()
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    batch_bytes = sum(x.nbytes for x in jax.tree.leaves(first)) // (1 if name == "jit" else n)
    held = max(sum(s.data.nbytes for x in jax.tree.leaves(frozen)
                   for s in x.addressable_shards if s.device == d)
               for d in {s.device for x in jax.tree.leaves(frozen) for s in x.addressable_shards})
    losses, times = [], []
    for i in range(steps):
      b = first if i == 0 else trainer.shard_batch(batches[i])
      t = time.perf_counter()
      state, metrics = compiled(state, frozen, b)
      losses.append(float(metrics["loss"]))
      times.append(time.perf_counter() - t)
    reference = reference or losses
    run = {
        "final_loss": losses[-1], "first_loss": losses[0],
        "max_loss_diff_vs_jit": float(np.max(np.abs(np.subtract(losses, reference)))),
        "step_ms": 1000 * float(np.median(times)), "compile_s": compile_s,
        "argument_bytes": int(stats.argument_size_in_bytes),
        "frozen_argument_bytes": int(stats.argument_size_in_bytes - state_bytes - batch_bytes),
        "temp_bytes": int(stats.temp_size_in_bytes), "frozen_held_bytes": int(held),
        "losses": losses,
    }
    results["runs"][name] = run
    print(f"{name:>15}: loss {run['first_loss']:.3f} -> {run['final_loss']:.3f} "
          f"(max |diff| vs jit {run['max_loss_diff_vs_jit']:.1e}), step "
          f"{run['step_ms']:.0f} ms, per device: arguments {run['argument_bytes'] / 2**10:.0f} "
          f"KiB (frozen {run['frozen_argument_bytes'] / 2**10:.0f} KiB, held "
          f"{run['frozen_held_bytes'] / 2**10:.0f} KiB), temporaries "
          f"{run['temp_bytes'] / 2**10:.0f} KiB", flush=True)
  ratio = (results["runs"]["fsdp"]["frozen_argument_bytes"]
           / results["runs"]["mesh"]["frozen_argument_bytes"])
  results["fsdp_frozen_ratio"] = ratio
  print(f"FSDP: frozen weights per device = {ratio:.3f} of replicated (1/{n} = {1 / n:.3f})")
  out = os.path.join(REPO_ROOT, "runs", "data_parallel" + ("_quick" if cfg["quick"] else ""))
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  print(f"wrote {os.path.join(out, 'results.json')}")
  return results


if __name__ == "__main__":
  config_lib.run_main(main, None)
