"""Subprocess entry points for the training tests.

Device counts, ``jax.distributed`` and SIGKILL need a process of their own;
the tests in ``test_train_scale.py`` and ``test_checkpoint.py`` run this file
as ``python tests/train_child.py MODE --out DIR ...`` with ``XLA_FLAGS`` (and
``PYTHONPATH``) set. Each mode writes its results under ``--out``. Importing
this module does nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys


def _mesh(n: int | None = None):
  import jax
  devices = jax.devices()[:n] if n else jax.devices()
  return jax.make_mesh((len(devices),), ("data",), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def _run(trainer, params, steps: int, *, key=None, rows: int = 16, start_state=None):
  import numpy as np

  import train_case as tc
  state, frozen = trainer.init(params, key=key)
  if start_state is not None:
    state = start_state
  losses = []
  for i in range(steps):
    state, metrics = trainer.step(state, frozen, trainer.shard_batch(tc.batch(i, rows)))
    losses.append(float(np.asarray(metrics["loss"]).reshape(-1)[0]))
  return state, frozen, losses


def equivalence(out: str) -> None:
  """The jit, pmap, mesh (DP) and mesh FSDP forms, the last with gradient
  accumulation too, from the same start; and XLA's memory analysis of the
  replicated and FSDP steps."""
  import jax
  import numpy as np

  import jlora
  import train_case as tc
  params = tc.lorified()
  mesh = _mesh()
  forms = {"jit": {}, "pmap": dict(pmap=True), "mesh": dict(mesh=mesh),
           "fsdp": dict(mesh=mesh, fsdp=True),
           "fsdp_acc2": dict(mesh=mesh, fsdp=True, accumulate=2)}
  results = {"memory": {}}
  for name, kw in forms.items():
    trainer = jlora.train_step(tc.loss_fn, tc.optimizer(), params, **kw)
    state, frozen = trainer.init(params)
    batches = [trainer.shard_batch(tc.batch(i)) for i in range(3)]
    step = trainer.step
    if name in ("mesh", "fsdp"):  # compile once, analyse, and run that program
      step = trainer.step.lower(state, frozen, batches[0]).compile()
      stats = step.memory_analysis()
      state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
      batch_bytes = sum(x.nbytes for x in jax.tree.leaves(batches[0])) // mesh.size
      held = max(sum(s.data.nbytes for x in jax.tree.leaves(frozen)
                     for s in x.addressable_shards if s.device == d)
                 for d in mesh.devices.flat)
      results["memory"]["replicated" if name == "mesh" else name] = {
          "argument_bytes": stats.argument_size_in_bytes,
          "temp_bytes": stats.temp_size_in_bytes,
          "frozen_argument_bytes": stats.argument_size_in_bytes - state_bytes - batch_bytes,
          "frozen_held_bytes": held,
          "frozen_total_bytes": sum(x.nbytes for x in jax.tree.leaves(frozen))}
    losses = []
    for b in batches:
      state, metrics = step(state, frozen, b)
      losses.append(float(np.asarray(metrics["loss"]).reshape(-1)[0]))
    adapters = tc.flat(state.adapters)
    if name == "pmap":
      adapters = {k: v[0] for k, v in adapters.items()}
    np.savez(os.path.join(out, f"{name}.npz"), **adapters)
    results[name] = {"losses": losses,
                     "dtypes": sorted({str(v.dtype) for v in adapters.values()})}
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=1)


def quantized(out: str) -> None:
  """QLoRA on an 8-device FSDP mesh against one device: an NF4 base (double
  quantization) whose packed codes and scales shard like any other frozen
  leaf; the losses, the adapters and the untouched codes."""
  import jax
  import numpy as np

  import jlora
  import train_case as tc
  base = jlora.quantize(tc.base_params(), "nf4", block_size=32, double_quant=True, stack=0)
  params = jlora.lorify(base, 4, key=jax.random.key(1), alpha=8)
  codes = {k: v for k, v in tc.flat(jlora.partition(params)[1]).items()}
  results = {}
  for name, kw in (("jit", {}), ("fsdp", dict(mesh=_mesh(), fsdp=True))):
    trainer = jlora.train_step(tc.loss_fn, tc.optimizer(), params, **kw)
    state, frozen, losses = _run(trainer, params, 3)
    leaves = jax.tree.leaves(frozen)
    held = max(sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == d)
               for d in jax.devices())
    after = tc.flat(jlora.partition(trainer.params(state, frozen))[1])
    results[name] = {
        "losses": losses, "frozen_total_bytes": sum(x.nbytes for x in leaves),
        "frozen_held_bytes": held,
        "sharded_leaves": sum(len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated
                              for x in leaves),
        "leaves": len(leaves),
        "codes_unchanged": sorted(after) == sorted(codes) and all(
            np.array_equal(after[k], codes[k]) for k in codes),
        "quantized": sum(map(jlora.quant.is_quantized, jax.tree.leaves(
            trainer.params(state, frozen), is_leaf=jlora.quant.is_quantized)))}
    np.savez(os.path.join(out, f"{name}.npz"), **tc.flat(state.adapters))
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=1)


def reshard(out: str) -> None:
  """Save on an 8-device FSDP mesh; restore on 4 devices and on 1."""
  import jax
  import numpy as np

  import jlora
  import train_case as tc
  params = tc.lorified()
  key = jax.random.key(7)
  trainer8 = jlora.train_step(tc.loss_fn, tc.optimizer(), params, mesh=_mesh(),
                              fsdp=True, accumulate=2)
  state, frozen, _ = _run(trainer8, params, 2, key=key)
  saved = tc.flat(state)
  ckdir = os.path.join(out, "ckpt")
  with jlora.Checkpoints(ckdir, every=1) as ckpts:
    ckpts.save(state, data={"next": 2})
  state8, m8 = trainer8.step(state, frozen, trainer8.shard_batch(tc.batch(2)))
  report = {"loss8": float(m8["loss"])}
  for name, kw in (("mesh4", dict(mesh=_mesh(4))), ("jit1", {})):
    trainer = jlora.train_step(tc.loss_fn, tc.optimizer(), params, accumulate=2, **kw)
    like, frozen_n = trainer.init(params, key=jax.random.key(0))
    with jlora.Checkpoints(ckdir) as ckpts:
      restored, data = ckpts.restore(like)
    got = tc.flat(restored)
    report[name] = {
        "data": data,
        "equal": sorted(k for k in saved if np.array_equal(saved[k], got[k])),
        "devices": len(jax.tree.leaves(restored.adapters)[0].sharding.device_set),
    }
    state_n, m = trainer.step(restored, frozen_n, trainer.shard_batch(tc.batch(2)))
    report[name]["loss"] = float(m["loss"])
    diff = max(float(np.max(np.abs(a - b))) for a, b in
               zip(jax.tree.leaves(tc.flat(state_n.adapters)),
                   jax.tree.leaves(tc.flat(state8.adapters))))
    report[name]["max_adapter_diff"] = diff
  report["keys"] = sorted(saved)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(report, f, indent=1)


def multiprocess(out: str, pid: int, port: int, nproc: int) -> None:
  """One of ``nproc`` processes: data-parallel FSDP over all their devices,
  each process loading only its rows of every batch."""
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
  import numpy as np

  import jlora
  import train_case as tc
  params = tc.lorified()
  trainer = jlora.train_step(tc.loss_fn, tc.optimizer(), params, mesh=_mesh(), fsdp=True)
  state, frozen = trainer.init(params)
  rows = 16 // nproc
  losses = []
  for i in range(3):
    local = {k: v[pid * rows:(pid + 1) * rows] for k, v in tc.batch(i).items()}
    state, metrics = trainer.step(state, frozen, trainer.shard_batch(local))
    losses.append(float(np.asarray(metrics["loss"].addressable_data(0))))
  adapters = {k: np.asarray(x.addressable_data(0)) for k, x in
              zip(tc.flat(state.adapters), jax.tree.leaves(state.adapters))}
  np.savez(os.path.join(out, f"process{pid}.npz"), **adapters)
  with open(os.path.join(out, f"process{pid}.json"), "w") as f:
    json.dump({"losses": losses, "devices": jax.device_count(),
               "local_devices": jax.local_device_count()}, f)
  jax.distributed.shutdown()


def train(out: str, steps: int, every: int, crash_at: int | None = None) -> None:
  """Trains ``steps`` steps, resuming from ``out/ckpt`` if it holds a
  checkpoint; prints ``step N`` after each step. Batches are a function of the
  step alone, so a resumed run sees the same data as an uninterrupted one.

  With ``crash_at``, the process SIGKILLs itself while orbax finalises the
  save of that step (after its files are written, before the rename that
  commits it).
  """
  import jax
  import numpy as np

  import jlora
  import train_case as tc
  if crash_at is not None:
    from orbax.checkpoint._src.path import atomicity
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def crash(self, *a, **k):
      if os.path.basename(str(self.get_final())) == str(crash_at):
        print(f"crashing in save {crash_at}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
      return await finalize(self, *a, **k)

    atomicity.AtomicRenameTemporaryPath.finalize = crash
  params = tc.lorified()
  trainer = jlora.train_step(tc.loss_fn, tc.optimizer(), params, accumulate=2)
  state, frozen = trainer.init(params, key=jax.random.key(42))
  with jlora.Checkpoints(os.path.join(out, "ckpt"), every=every, keep=2) as ckpts:
    position = 0
    if ckpts.latest_step() is not None:
      state, data = ckpts.restore(state)
      position = data["next_batch"]
      print(f"resumed {int(state.step)}", flush=True)
    while position < steps:
      state, _ = trainer.step(state, frozen, tc.batch(position))
      position += 1
      ckpts.save(state, data={"next_batch": position})
      print(f"step {position}", flush=True)
  np.savez(os.path.join(out, "final.npz"), **tc.flat(state.adapters))


def save(out: str, hang: str | None) -> None:
  """Saves adapters ``v0`` to ``out/adapters``, prints ``saved 0``, then
  replaces them with ``force=True`` by ``v1``, ``v2``, ... for ever, printing
  ``saved N`` after each. With ``hang``, the second save blocks at that point
  (``write``: its files half written; ``swap``: the new directory complete,
  the old one renamed aside) and prints ``hanging``, for the parent to
  SIGKILL."""
  import time

  import jax
  import jax.numpy as jnp
  import numpy as np

  import jlora
  from jlora._checkpoint import adapters, atomic
  base = {"params": {"dense": {"kernel": jnp.ones((64, 64)), "bias": jnp.zeros(64)}}}
  params = jlora.lorify(base, 4, key=jax.random.key(0))
  path = os.path.join(out, "adapters")

  def version(i):
    p = dict(params["params"]["dense"])
    p["lora_b"] = jnp.full((4, 64), float(i + 1))
    return {"params": {"dense": p}}

  def hang_now():
    print("hanging", flush=True)
    time.sleep(600)

  jlora.save_adapters(version(0), path)
  np.save(os.path.join(out, "v0.npy"), np.asarray(version(0)["params"]["dense"]["lora_b"]))
  print("saved 0", flush=True)
  if hang == "write":
    real = adapters.write

    def write(directory, items, record):
      real(directory, items, record)
      os.remove(os.path.join(directory, "jlora", "metadata"))  # half written
      hang_now()
    adapters.write = write
  if hang == "swap":
    atomic._exchange = lambda a, b: False  # the fallback: two renames
    real_rename = os.rename

    def rename(src, dst):
      real_rename(src, dst)
      if dst.endswith(os.sep + "old"):
        hang_now()
    atomic.os.rename = rename
  i = 1
  while True:
    jlora.save_adapters(version(i), path, force=True)
    print(f"saved {i}", flush=True)
    i += 1


def errors(out: str) -> None:
  """Bad calls of the mesh and pmap forms on 2 devices; writes, per case, the
  exception type and message (``errors.json``)."""
  import jax
  import jax.numpy as jnp

  import jlora
  import train_case as tc
  params = tc.lorified()
  mesh2, mesh1 = _mesh(2), _mesh(1)
  fsdp2 = jlora.train_step(tc.loss_fn, tc.optimizer(), params, mesh=mesh2, fsdp=True)
  fsdp1 = jlora.train_step(tc.loss_fn, tc.optimizer(), params, mesh=mesh1, fsdp=True)
  pmap = jlora.train_step(tc.loss_fn, tc.optimizer(), params, pmap=True)
  odd = jax.tree.map(lambda x: x[:3], tc.batch(0))
  cases = {
      "mesh_shard_odd": lambda: fsdp2.shard_batch(odd),
      "mesh_step_odd": lambda: fsdp2.step(*fsdp2.init(params), odd),
      "fsdp_other_mesh": lambda: fsdp2.step(fsdp2.init(params)[0], fsdp1.init(params)[1],
                                            fsdp2.shard_batch(tc.batch(0))),
      "pmap_shard_odd": lambda: pmap.shard_batch(odd),
      "pmap_step_unsharded": lambda: pmap.step(*pmap.init(params), tc.batch(0)),
  }
  results = {}
  for name, call in cases.items():
    try:
      call()
      results[name] = {"type": None, "message": ""}
    except Exception as e:  # the test asserts the type
      results[name] = {"type": type(e).__name__, "message": str(e)}
  with open(os.path.join(out, "errors.json"), "w") as f:
    json.dump(results, f, indent=1)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=["equivalence", "reshard", "multiprocess", "train",
                                           "save", "errors", "quantized"])
  parser.add_argument("--out", required=True)
  parser.add_argument("--pid", type=int, default=0)
  parser.add_argument("--nproc", type=int, default=2)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--every", type=int, default=2)
  parser.add_argument("--crash-at", type=int, default=None)
  parser.add_argument("--hang", choices=["write", "swap"], default=None)
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  if args.mode == "equivalence":
    equivalence(args.out)
  elif args.mode == "reshard":
    reshard(args.out)
  elif args.mode == "multiprocess":
    multiprocess(args.out, args.pid, args.port, args.nproc)
  elif args.mode == "save":
    save(args.out, args.hang)
  elif args.mode == "errors":
    errors(args.out)
  elif args.mode == "quantized":
    quantized(args.out)
  else:
    train(args.out, args.steps, args.every, args.crash_at)


if __name__ == "__main__":
  sys.path[:0] = [os.path.dirname(os.path.abspath(__file__))]
  main()
