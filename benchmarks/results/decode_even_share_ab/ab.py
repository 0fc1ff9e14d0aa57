"""Scratch: the grouped path's common case outside the cond (a trivial branch when every
example fits its slot) vs stock (dots inside the cond) vs capacity given (no cond)."""
import os, sys, time, statistics, functools
import jax, jax.numpy as jnp, numpy as np
import jlora
from jlora.methods import bank as bank_lib, routing as R
from benchmarks import decode as D
from experiments.models import decode, llama
config, params, _ = llama.load_smollm2()
K = int(sys.argv[2]); batch, cache_len = max(K, 16), 64
trees = D.adapters(params, K, 8)
bank = jlora.stack_adapters(trees)
merged = jax.jit(jlora.merge)(trees[0]); del trees
index = jnp.asarray(np.arange(batch) % K, jnp.int32)
ids = jnp.ones((batch, 1), jnp.int32); pos = jnp.full((batch, 1), cache_len - 1, jnp.int32)
stock = R.grouped_path

def overflow(plan, x, index, scale, k, *, precision, preferred_element_type, capacity=None):
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
  cap = -(-e // k)
  slot = jnp.where(rank < cap, index * cap + rank, k * cap + jnp.arange(e))
  xs = jnp.zeros((k * cap, f, c), rows.dtype).at[slot].set(rows, mode="drop", unique_indices=True)
  t = jnp.einsum("kmc,kcr->kmr", xs.reshape(k, cap * f, c), f1, **kw)
  y = jnp.einsum("kmr,kro->kmo", t.astype(f2.dtype), f2, **kw)
  y = y.reshape(k * cap, f, -1).at[slot].get(mode="fill", fill_value=0)
  def rest(y):
    t = jnp.einsum("efc,ecr->efr", rows, f1[index], **kw)
    g = jnp.einsum("efr,ero->efo", t.astype(f2.dtype), f2[index], **kw)
    return jnp.where((rank < cap)[:, None, None], y, g)
  y = jax.lax.cond(jnp.max(counts) <= cap, lambda y: y, rest, y)
  y = y * scale[:, None, None].astype(y.dtype)
  return R._finish(plan, y, shape)

FLAG = ["stock"]
bank_lib.grouped_path = lambda *a, **k: (overflow if FLAG[0] == "overflow" else stock)(*a, **k)
setups = {"merged": ("merged", merged, None, "stock"), "grouped": ("bank", bank, None, "stock"),
          "capacity": ("bank", bank, -(-batch // K), "stock"), "overflow": ("bank", bank, None, "overflow")}
compiled, caches = {}, {}
for name, (mode, p, cap, flag) in setups.items():
  FLAG[0] = flag
  fn = decode._step_fn(config, mode, jnp.float32, "grouped", cap)
  caches[name] = decode.init_cache(config, batch, cache_len)
  compiled[name] = (jax.jit(fn, donate_argnums=(3,)).lower(p, ids, pos, caches[name], index).compile(), p)
out = {}
for name, (c, p) in compiled.items():
  out[name], caches[name] = c(p, ids, pos, caches[name], index)
print("max diff vs grouped", {n: float(jnp.max(jnp.abs(out[n] - out["grouped"]))) for n in out})
# an unbalanced index too: overflow's other branch
idx2 = index.at[1].set(0)
for n in ("grouped", "overflow"):
  c, p = compiled[n]
  out[n + "2"], caches[n] = c(p, ids, pos, caches[n], idx2)
print("unbalanced diff", float(jnp.max(jnp.abs(out["overflow2"] - out["grouped2"]))))
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
  paired = statistics.median([m / x for m, x in zip(times["merged"], times[n])])
  print(f"K{K} {n:9s} {1e3*med[n]:7.2f} ms  over merged {med['merged']/med[n]:.3f}  paired {paired:.3f}")
