"""Scratch: what the grouped path's lax.cond costs at K16 (balanced): stock vs cap-1 without cond."""
import os, sys, time, statistics, functools
import jax, jax.numpy as jnp, numpy as np
import jlora
from jlora.methods import bank as bank_lib, routing as R
from benchmarks import decode as D
from experiments.models import decode, llama
config, params, _ = llama.load_smollm2()
K, batch, cache_len = 16, 16, 64
trees = D.adapters(params, K, 8)
bank = jlora.stack_adapters(trees)
merged = jax.jit(jlora.merge)(trees[0]); del trees
index = jnp.asarray(np.arange(batch) % K, jnp.int32)
ids = jnp.ones((batch, 1), jnp.int32); pos = jnp.full((batch, 1), cache_len - 1, jnp.int32)

def nocond(plan, x, index, scale, k, *, precision, preferred_element_type):
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
  cap = 1
  slot = index * cap + rank
  xs = jnp.zeros((k * cap, f, c), rows.dtype).at[slot].set(rows, unique_indices=True)
  t = jnp.einsum("kmc,kcr->kmr", xs.reshape(k, cap * f, c), f1, **kw)
  y = jnp.einsum("kmr,kro->kmo", t.astype(f2.dtype), f2, **kw)
  y = y.reshape(k * cap, f, -1)[slot]
  y = y * scale[:, None, None].astype(y.dtype)
  return R._finish(plan, y, shape)

fns = {"merged": (decode._step_fn(config, "merged", jnp.float32, "auto"), merged),
       "grouped": (decode._step_fn(config, "bank", jnp.float32, "grouped"), bank)}
compiled, caches = {}, {}
for name, (fn, p) in fns.items():
  caches[name] = decode.init_cache(config, batch, cache_len)
  compiled[name] = (jax.jit(fn, donate_argnums=(3,)).lower(p, ids, pos, caches[name], index).compile(), p)
stock = R.grouped_path
FLAG = ["stock"]
bank_lib.grouped_path = lambda *a, **k: (nocond if FLAG[0] == "cap1" else stock)(*a, **k)
fn = decode._step_fn(config, "bank", jnp.float32, "grouped")
FLAG[0] = "cap1"
caches["nocond"] = decode.init_cache(config, batch, cache_len)
compiled["nocond"] = (jax.jit(fn, donate_argnums=(3,)).lower(bank, ids, pos, caches["nocond"], index).compile(), bank)
def top(p, ids, pos, cache, index):
  busiest = jnp.max(jnp.bincount(index, length=K))
  def br(flag):
    def run(p, ids, pos, cache, index):
      FLAG[0] = flag
      return fn(p, ids, pos, cache, index)
    return run
  return jax.lax.cond(busiest <= 1, br("cap1"), br("stock"), p, ids, pos, cache, index)
caches["topcond"] = decode.init_cache(config, batch, cache_len)
compiled["topcond"] = (jax.jit(top, donate_argnums=(3,)).lower(bank, ids, pos, caches["topcond"], index).compile(), bank)
out = {}
for name, (c, p) in compiled.items():
  out[name], caches[name] = c(p, ids, pos, caches[name], index)
print("max diff nocond-grouped", float(jnp.max(jnp.abs(out["nocond"] - out["grouped"]))), "topcond", float(jnp.max(jnp.abs(out["topcond"] - out["grouped"]))))
times = {n: [] for n in compiled}
names = list(compiled)
print("load", os.getloadavg())
for r in range(int(sys.argv[1])):
  for name in names[r % len(names):] + names[:r % len(names)]:
    c, p = compiled[name]
    t0 = time.perf_counter()
    lg, caches[name] = c(p, ids, pos, caches[name], index); lg.block_until_ready()
    times[name].append(time.perf_counter() - t0)
med = {n: statistics.median(v) for n, v in times.items()}
print("load", os.getloadavg())
for n in names:
  print(f"{n:8s} {1e3*med[n]:7.2f} ms  tokens/s over merged {med['merged']/med[n]:.3f}")
