"""KV-cached generation for the LLaMA port, with adapters merged, unmerged or banked.

``python -m pytest tests/test_decode.py`` checks it; ``python -m
benchmarks.decode`` measures it.

One compiled loop: a prefill of the (right-padded) prompts writes every
layer's keys and values into a fixed-size cache, then ``n - 1`` one-token
decode steps (``lax.scan``) each write one position per sequence and attend
to the cache. Sequences may have prompts of different lengths: each decodes
at its own positions. Tokens are greedy (argmax) or sampled
(``categorical(fold_in(key_b, t), logits / temperature)`` for sequence ``b``'s
``t``-th new token), so a sequence's tokens do not depend on its batch.

The same loop serves three ways of running adapters (``mode=``):

* ``"merged"``: `jlora.merge` once, then the plain model: the base's cost
  (a tree without adapters runs as it is).
* ``"unmerged"``: one lorified tree under `jlora.lora`: ``x·W + s·(x·A)·B``.
* ``"bank"``: a tree of ``K`` adapters from `jlora.stack_adapters` and an
  ``index`` (batch,): sequence ``b`` decodes with adapter ``index[b]``, all in
  the same compiled step (`jlora.route` inside ``jit``; the index is traced),
  routed by the path `jlora.methods.bank.routing` has in force (default
  ``"auto"``). `generate` knows the index before compiling, so it passes
  `jlora.route` the busiest adapter's count (rounded up to a power of two:
  few compilations) as its ``capacity``; decode then groups with no run-time
  choice of slots.

>>> import jax.numpy as jnp
>>> config = llama.LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
...     num_attention_heads=2, num_key_value_heads=1, head_dim=8, intermediate_size=32)
>>> params = llama.LlamaForCausalLM(config).init(
...     jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
>>> out = generate(params, config, [[1, 2, 3], [4, 5]], 4)
>>> out.shape
(2, 4)
>>> [int(t) for t in out[0]] == llama.generate_ids(params, config, [1, 2, 3], 4)
True
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from jlora._errors import Problems
from jlora.methods import bank as bank_lib
from jlora.methods.bank import Bank
from experiments.models import llama

MODES = ("merged", "unmerged", "bank")


def init_cache(config: llama.LlamaConfig, batch: int, length: int, *, dtype=jnp.float32):
  """An empty KV cache: one ``(k, v)`` per layer, each (batch, length, kv_heads, head_dim)."""
  shape = (batch, length, config.num_key_value_heads, config.head_dim)
  return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
               for _ in range(config.num_hidden_layers))


def _bank_sizes(params: Any) -> list[int]:
  """``K`` of every bank in the tree (empty: no bank)."""
  sizes = []

  def walk(tree):
    if isinstance(tree, Bank):
      sizes.append(len(tree.ranks))
    elif isinstance(tree, Mapping):
      for v in tree.values():
        walk(v)

  walk(params)
  return sizes


def _step_fn(config: llama.LlamaConfig, mode: str, dtype, routing: str,
             capacity: int | None = None):
  model = llama.LlamaForCausalLM(config, dtype=dtype)

  def plain(params, ids, positions, cache):
    return model.apply({"params": params}, ids, positions, cache, method="decode")

  factored = jlora.lora(plain)
  if mode == "merged":
    return lambda p, ids, pos, cache, index: plain(p, ids, pos, cache)  # noqa: E731
  if mode == "unmerged":
    return lambda p, ids, pos, cache, index: factored(p, ids, pos, cache)  # noqa: E731

  def banked(p, ids, pos, cache, index):
    with bank_lib.routing(routing):  # traced under the routing it was built for
      return factored(jlora.route(p, index, capacity=capacity), ids, pos, cache)

  return banked


@functools.lru_cache(maxsize=16)
def decoder(config: llama.LlamaConfig, *, mode: str = "merged", dtype=jnp.float32,
            routing: str = "auto", capacity: int | None = None):
  """The compiled decode step of one mode: ``step(params, ids, positions, cache, index)``.

  ``ids`` and ``positions`` are (batch, seq) (seq 1 for a decode step, the
  prompt for a prefill); it returns ``(logits (batch, seq, vocab), cache)``.
  ``index`` is the bank routing (batch,) in ``"bank"`` mode and ignored
  otherwise; ``routing`` is the bank's path (`jlora.methods.bank.routing`),
  ``capacity`` `jlora.route`'s (at most that many sequences on one adapter).
  ``"merged"`` expects a tree merged already (`generate` merges). The cache
  is donated: it is updated in place.
  """
  return jax.jit(_step_fn(config, mode, dtype, routing, capacity), donate_argnums=(3,))


def _pick(logits, t, keys, temperature):
  """Greedy (``keys is None``) or sampled next tokens (batch,) from logits (batch, vocab)."""
  if keys is None:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / temperature
  return jax.vmap(lambda k, l: jax.random.categorical(jax.random.fold_in(k, t), l))(
      keys, scaled).astype(jnp.int32)


@functools.lru_cache(maxsize=16)
def _loop(config: llama.LlamaConfig, n: int, mode: str, dtype, sampled: bool, routing: str,
          capacity: int | None):
  step = _step_fn(config, mode, dtype, routing, capacity)

  @jax.jit
  def run(params, ids, lengths, cache, index, keys, temperature):
    b, p = ids.shape
    keys = keys if sampled else None
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    logits, cache = step(params, ids, positions, cache, index)
    first = _pick(logits[jnp.arange(b), lengths - 1], 0, keys, temperature)

    def body(carry, t):
      tok, pos, cache = carry
      logits, cache = step(params, tok[:, None], pos[:, None], cache, index)
      nxt = _pick(logits[:, 0], t, keys, temperature)
      return (nxt, pos + 1, cache), nxt

    _, rest = jax.lax.scan(body, (first, lengths, cache), jnp.arange(1, n, dtype=jnp.int32))
    return jnp.concatenate([first[:, None], rest.T], axis=1)

  return run


def pad_prompts(prompts: Sequence[Sequence[int]], *, multiple: int = 8
                ) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token lists into ``(ids (batch, width), lengths (batch,))``.

  ``width`` is the longest prompt rounded up to ``multiple`` (fewer shapes,
  fewer compilations; the padding is never attended to).
  """
  lengths = np.array([len(p) for p in prompts], np.int32)
  width = -(-int(lengths.max(initial=1)) // multiple) * multiple
  ids = np.zeros((len(prompts), width), np.int32)
  for row, p in zip(ids, prompts):
    row[:len(p)] = p
  return ids, lengths


def generate(params: Any, config: llama.LlamaConfig, prompts: Sequence[Sequence[int]],
             n: int, *, mode: str = "merged", index: Any = None, key: Any = None,
             temperature: float = 1.0, cache_len: int | None = None, bucket: int = 32,
             dtype=jnp.float32) -> np.ndarray:
  """Generates ``n`` tokens for each prompt with a KV cache, in one compiled loop.

  Args:
    params: the model's params: a base tree, a lorified tree (``"merged"`` or
      ``"unmerged"``) or a bank tree from `jlora.stack_adapters` (``"bank"``).
    config: the model config.
    prompts: one non-empty list of token ids per sequence (lengths may differ).
    n: new tokens per sequence (EOS is not trimmed).
    mode: ``"merged"``, ``"unmerged"`` or ``"bank"`` (see the module docstring).
    index: ``"bank"`` only: int (batch,), the adapter of each sequence, in ``[0, K)``.
    key: ``None`` for greedy decoding; a PRNG key to sample (the same key for
      every sequence), or a key array (batch,), one per sequence.
    temperature: sampling temperature (> 0).
    cache_len: the cache's length; at least the longest prompt + ``n``.
      Default: that, rounded up to a multiple of ``bucket``.
    bucket: rounding of the default cache length (fewer recompilations).
    dtype: compute dtype (the cache's too).

  Returns:
    int32 array (batch, n) of new tokens.

  Raises:
    LoraError: an unknown mode, empty prompts, ``n < 1``, a cache too short,
      an index missing, of the wrong shape or dtype, or outside the bank's ``K``.
  """
  problems = Problems("decode.generate: cannot generate")
  if mode not in MODES:
    problems.add(f"mode={mode!r}; pass one of {MODES}")
  if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
    problems.add(f"n={n!r}; pass a positive int, the number of new tokens")
    n = 1
  if not prompts or any(len(p) == 0 for p in prompts):
    problems.add("prompts: empty, or an empty prompt; pass one non-empty list of ids "
                 "per sequence")
    problems.raise_if_any()
  ids, lengths = pad_prompts(prompts)
  # The prefill writes the padded width; decoding writes up to longest + n.
  batch, need = ids.shape[0], max(ids.shape[1], int(lengths.max()) + int(n))
  if cache_len is None:
    cache_len = -(-need // bucket) * bucket
  elif cache_len < need:
    problems.add(f"cache_len={cache_len}: too short for the longest prompt "
                 f"({int(lengths.max())}, padded to {ids.shape[1]}) + n ({n}); pass "
                 f"cache_len >= {need} or leave it None")
  sizes = _bank_sizes(params) if mode in MODES else []
  if mode == "bank":
    if not sizes:
      problems.add("params: mode='bank' but the tree holds no bank; build one with "
                   "jlora.stack_adapters")
    if index is None:
      problems.add(f"index: missing; mode='bank' needs an int array ({batch},), the "
                   "adapter of each sequence")
    else:
      idx = np.asarray(index)
      if idx.shape != (batch,) or not np.issubdtype(idx.dtype, np.integer):
        problems.add(f"index: shape {idx.shape} dtype {idx.dtype}; pass an int array "
                     f"({batch},), one adapter per prompt")
      elif sizes and (idx.min() < 0 or idx.max() >= min(sizes)):
        problems.add(f"index: values in [{idx.min()}, {idx.max()}] but the bank holds "
                     f"K={min(sizes)} adapters; use indices in [0, {min(sizes)})")
  else:
    if index is not None:
      problems.add(f"index: given with mode={mode!r}; routing needs mode='bank' and a "
                   "bank tree")
    if sizes:
      problems.add(f"params: holds a bank (K={sizes[0]}) but mode={mode!r}; pass "
                   "mode='bank' and an index, or jlora.route(params, k) and merge it")
  if key is not None:
    if not temperature > 0:
      problems.add(f"temperature={temperature!r}; pass a positive float")
    if not (jnp.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key)
            and jnp.shape(key) in ((), (batch,))):
      problems.add(f"key: {getattr(key, 'dtype', type(key).__name__)} of shape "
                   f"{jnp.shape(key)}; pass jax.random.key(seed), or one per prompt "
                   f"({batch},) from jax.random.split")
  problems.raise_if_any()

  if mode == "merged":
    params = jax.jit(jlora.merge)(params)
  keys = jnp.zeros((batch,), jnp.uint32)  # unused when greedy
  if key is not None:
    keys = key if jnp.ndim(key) else jnp.stack([key] * batch)
  cache = init_cache(config, batch, cache_len, dtype=dtype)
  route = jnp.asarray(index if index is not None else np.zeros(batch), jnp.int32)
  capacity = None
  if mode == "bank":  # the busiest adapter's sequences, rounded up to a power of two
    capacity = 1 << (int(np.bincount(np.asarray(index)).max()) - 1).bit_length()
  run = _loop(config, int(n), mode, dtype, key is not None, bank_lib.current_routing(),
              capacity)
  out = run(params, jnp.asarray(ids), jnp.asarray(lengths), cache, route, keys,
            jnp.float32(temperature))
  return np.asarray(out)


@functools.lru_cache(maxsize=8)
def _uncached_fn(config: llama.LlamaConfig, n: int, dtype, sampled: bool):
  model = llama.LlamaForCausalLM(config, dtype=dtype)

  @jax.jit
  def run(params, buf, start, key, temperature):
    keys = key[None] if sampled else None

    def step(i, buf):
      out = model.apply({"params": params}, buf)
      pos = start + i
      nxt = _pick(out[:, pos - 1], i, keys, temperature).astype(buf.dtype)
      return jax.lax.dynamic_update_slice(buf, nxt[None], (0, pos))

    return jax.lax.fori_loop(0, n, step, buf)

  return run


def generate_uncached(params: Any, config: llama.LlamaConfig, prompt: Sequence[int], n: int,
                      *, key: Any = None, temperature: float = 1.0, bucket: int = 32,
                      dtype=jnp.float32) -> list[int]:
  """The reference: one sequence, the whole prefix recomputed at every step.

  `llama.generate_ids` with the sampling rule of `generate`; greedy
  (``key=None``) it is `llama.generate_ids` itself.
  """
  if key is None:
    return llama.generate_ids(params, config, prompt, n, dtype=dtype, bucket=bucket)
  p = len(prompt)
  length = -(-(p + n) // bucket) * bucket
  buf = np.zeros((1, length), np.int32)
  buf[0, :p] = prompt
  out = _uncached_fn(config, n, dtype, True)(params, jnp.asarray(buf), jnp.int32(p), key,
                                             jnp.float32(temperature))
  return [int(i) for i in np.asarray(out)[0, p:p + n]]
