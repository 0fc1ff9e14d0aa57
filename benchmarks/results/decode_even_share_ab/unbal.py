"""Scratch A/B at HEAD: grouped decode with a random (unbalanced) routing: the old ladder
(all inside the cond, 92a6b8e), the current one (even share outside), and slots fixed at
the busiest count with no cond (what a capacity given before tracing would run)."""
import os, sys, time, statistics, importlib.util
import jax, jax.numpy as jnp, numpy as np
import jlora
from jlora.methods import bank as bank_lib, routing as R
from benchmarks import decode as D
from experiments.models import decode, llama
spec = importlib.util.spec_from_file_location("routing_old", "/tmp/scratch/old/routing_old.py")
old = importlib.util.module_from_spec(spec); sys.modules["routing_old"] = old; spec.loader.exec_module(old)
rounds, K, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
config, params, _ = llama.load_smollm2()
batch, cache_len = max(K, 16), 64
trees = D.adapters(params, K, 8)
bank = jlora.stack_adapters(trees)
merged = jax.jit(jlora.merge)(trees[0]); del trees
if mode == "random":
  index = jnp.asarray(np.random.default_rng(0).integers(0, K, batch), jnp.int32)
else:
  index = jnp.asarray(np.arange(batch) % K, jnp.int32)
busiest = int(np.bincount(np.asarray(index)).max())
print("index", np.asarray(index).tolist(), "busiest", busiest, "share", -(-batch // K))
ids = jnp.ones((batch, 1), jnp.int32); pos = jnp.full((batch, 1), cache_len - 1, jnp.int32)
new = R.grouped_path

def fixed(plan, x, index, scale, k, *, precision, preferred_element_type):
  (f1, _), (f2, _) = plan.first, plan.second
  rows, shape = R._rows(plan, x)
  e, f, c = rows.shape
  f1 = f1.reshape(k, c, f1.shape[-1]).astype(rows.dtype)
  f2 = f2.reshape(k, f2.shape[1], -1).astype(rows.dtype)
  kw = dict(precision=precision, preferred_element_type=preferred_element_type)
  counts = jnp.bincount(index, length=k)
  order = jnp.argsort(index, stable=True)
  rank = jnp.zeros_like(index).at[order].set(
      jnp.arange(e, dtype=index.dtype) - (jnp.cumsum(counts) - counts)[index[order]])
  cap = busiest
  slot = index * cap + rank
  xs = jnp.zeros((k * cap, f, c), rows.dtype).at[slot].set(rows, unique_indices=True)
  t = jnp.einsum("kmc,kcr->kmr", xs.reshape(k, cap * f, c), f1, **kw)
  y = jnp.einsum("kmr,kro->kmo", t.astype(f2.dtype), f2, **kw)
  y = y.reshape(k * cap, f, -1)[slot] * scale[:, None, None].astype(y.dtype)
  return R._finish(plan, y, shape)

FLAG = ["new"]
impl = {"new": new, "old": old.grouped_path, "fixed": fixed}
bank_lib.grouped_path = lambda *a, **k: impl[FLAG[0]](*a, **k)
setups = {"merged": ("merged", merged, "new"), "old": ("bank", bank, "old"),
          "new": ("bank", bank, "new"), "fixed": ("bank", bank, "fixed")}
compiled, caches = {}, {}
for name, (m, p, flag) in setups.items():
  FLAG[0] = flag
  fn = decode._step_fn(config, m, jnp.float32, "grouped")
  caches[name] = decode.init_cache(config, batch, cache_len)
  compiled[name] = (jax.jit(fn, donate_argnums=(3,)).lower(p, ids, pos, caches[name], index).compile(), p)
out = {}
for name, (c, p) in compiled.items():
  out[name], caches[name] = c(p, ids, pos, caches[name], index)
print("max diff vs old", {n: float(jnp.max(jnp.abs(out[n] - out["old"]))) for n in out if n != "merged"})
times = {n: [] for n in compiled}
names = list(compiled)
print("load", os.getloadavg())
for r in range(rounds):
  for name in names[r % len(names):] + names[:r % len(names)]:
    c, p = compiled[name]
    t0 = time.perf_counter()
    lg, caches[name] = c(p, ids, pos, caches[name], index); lg.block_until_ready()
    times[name].append(time.perf_counter() - t0)
med = {n: statistics.median(v) for n, v in times.items()}
print("load", os.getloadavg())
for n in names:
  paired = statistics.median([m / x for m, x in zip(times["merged"], times[n])])
  print(f"K{K} {mode} {n:7s} {1e3*med[n]:7.2f} ms  over merged {med['merged']/med[n]:.3f}  paired {paired:.3f}")
