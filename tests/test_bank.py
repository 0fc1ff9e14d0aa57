"""Mixed-task batches: a bank of K adapters, one adapter per example."""

import os
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from helpers import assert_trees_close, randomize_adapters
import zoo

# Ranks and alphas differ per adapter: the bank zero-pads and keeps scales.
SPECS = [(1, 2.0), (3, 3.0), (2, 1.0)]
TARGETS = re.compile(r"(attn|up|down|w1|w2).*kernel")  # not the embedding lookup


def trees(case):
  axes = case.lorify.get("axes")
  return [randomize_adapters(jlora.lorify(case.params, r, key=jax.random.key(k), alpha=a,
                                          axes=axes, targets=TARGETS), jax.random.key(10 + k))
          for k, (r, a) in enumerate(SPECS)]


def per_example(case, ts, index, x):
  """Each example run alone with its own adapter, merged (the reference)."""
  run = jax.jit(lambda p, x: case.fn(jlora.merge(p), x))
  outs = [run(ts[int(k)], x[n:n + 1]) for n, k in enumerate(index)]
  return jnp.concatenate(outs)


@pytest.mark.parametrize("name", ("scan", "transformer"))
def test_mixed_batch_equals_each_example_with_its_own_adapter(name):
  case = zoo.case(name)
  ts = trees(case)
  bank = jlora.stack_adapters(ts)
  x = case.inputs[0]
  index = jnp.arange(x.shape[0]) % len(SPECS)
  run = jax.jit(lambda b, i, x: jlora.lora(case.fn)(jlora.route(b, i), x))
  got = run(bank, index, x)
  want = per_example(case, ts, index, x)
  assert_trees_close(got, want, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want))))
  # Another routing reuses the compiled function (the index is traced).
  run(bank, index[::-1], x)
  assert run._cache_size() == 1
  # One adapter for the whole batch, and merging a routed bank.
  one = jax.jit(jlora.lora(case.fn))(jlora.route(bank, 1), x)
  assert_trees_close(one, jax.jit(lambda p, x: case.fn(jlora.merge(p), x))(ts[1], x), rtol=1e-4,
                     atol=1e-4 * float(jnp.max(jnp.abs(one))))
  merge = jax.jit(jlora.merge)
  assert_trees_close(merge(jlora.route(bank, 2)), merge(ts[2]), rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_used_member_and_match_the_reference():
  case = zoo.case("scan")
  bank = jlora.stack_adapters(trees(case))
  adapters, frozen = jlora.partition(bank)
  x = case.inputs[0]
  index = jnp.array([2, 0, 2, 0])  # adapter 1 unused

  def mixed(a):
    return jnp.sum(jnp.sin(jlora.lora(case.fn)(jlora.route(jlora.combine(a, frozen), index), x)))

  def reference(a):
    p = jlora.combine(a, frozen)
    return sum(jnp.sum(jnp.sin(case.fn(jlora.merge(jlora.route(p, k)), x[n:n + 1])))
               for n, k in enumerate(index.tolist()))

  got = jax.jit(jax.grad(mixed))(adapters)
  want = jax.jit(jax.grad(reference))(adapters)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want))
  assert_trees_close(got, want, rtol=1e-4, atol=1e-5 * scale)
  for leaf in ("bank_a", "bank_b"):
    g = got["params"]["layers"]["up"][leaf]
    assert float(jnp.max(jnp.abs(g[1]))) == 0.0
    assert float(jnp.max(jnp.abs(g[0]))) > 0 and float(jnp.max(jnp.abs(g[2]))) > 0


def test_padding_stays_zero_and_checkpoint_round_trip():
  case = zoo.case("plain")
  bank = jlora.stack_adapters(trees(case))
  a = bank["w1"]["bank_a"]
  assert a.shape == (3, 6, 3) and not jnp.any(a[0, :, 1:]) and not jnp.any(a[2, :, 2:])
  assert bank["w1"]["bank"].scales == (2.0, 1.0, 0.5)
  path = os.path.join(tempfile.mkdtemp(), "bank")
  routed = jlora.route(bank, jnp.array([0, 1, 2, 1]))
  jlora.save_adapters(routed, path)
  assert_trees_close(jlora.load_adapters(case.params, path), routed, rtol=0, atol=0)


def test_errors_name_the_fix():
  case = zoo.case("plain")
  with pytest.raises(jlora.LoraError, match="holds no bank"):
    jlora.route(case.params, 0)
  ts = trees(case)
  with pytest.raises(jlora.LoraError, match="adapts different weights"):
    jlora.stack_adapters([ts[0], jlora.lorify(case.params, 1, key=jax.random.key(0),
                                              targets=("w1",))])
  bank = jlora.route(jlora.stack_adapters(ts), jnp.array([0, 1, 2, 1]))
  with pytest.raises(jlora.LoraError, match="route it to one adapter"):
    jlora.merge(bank)


def test_dropout_at_each_adapters_rate_in_training_only():
  base = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (6, 5))}}
  rates = (0.0, 0.5, 0.0)
  ts = [randomize_adapters(jlora.lorify(base, 2, key=jax.random.key(k), dropout=p),
                           jax.random.key(10 + k)) for k, p in enumerate(rates)]
  bank = jlora.stack_adapters(ts)
  assert bank["dense"]["bank"].dropouts == rates
  fn = lambda p, x: x @ p["dense"]["kernel"]
  x = jax.random.normal(jax.random.key(1), (4, 6))
  index = jnp.array([0, 1, 2, 1])
  routed = jlora.route(bank, index)
  evaluate = jlora.lora(fn)(routed, x)  # no rng: no dropout
  want = jnp.concatenate([fn(jlora.merge(ts[int(k)]), x[n:n + 1]) for n, k in enumerate(index)])
  assert_trees_close(evaluate, want, rtol=1e-5, atol=1e-5)

  train = jax.jit(jax.vmap(lambda key: jlora.lora(fn, rng=key)(routed, x)))
  outs = train(jax.random.split(jax.random.key(2), 4000))
  # Rate 0: exact. Rate 0.5: each draw differs, the mean is the undropped output
  # (inverted dropout keeps the expectation; without the 1/(1-p) it would be half).
  rate0 = np.asarray(index) != 1
  np.testing.assert_allclose(outs[:, rate0], np.broadcast_to(evaluate[rate0], outs[:, rate0].shape),
                             rtol=1e-5, atol=1e-5)
  assert float(jnp.min(jnp.std(outs[:, ~rate0], axis=0))) > 0.1
  err = jnp.abs(jnp.mean(outs, axis=0) - evaluate)[~rate0]
  sem = (jnp.std(outs, axis=0) / np.sqrt(outs.shape[0]))[~rate0]
  assert bool(jnp.all(err < 5 * sem + 1e-5)), (err, sem)

  # Gradients: adapter 0's examples are never dropped, so its gradient is the
  # evaluation gradient; adapter 1's is not.
  adapters, frozen = jlora.partition(routed)
  loss = lambda a, key: jnp.sum(jnp.sin(jlora.lora(fn, rng=key)(jlora.combine(a, frozen), x)))
  g_train = jax.grad(loss)(adapters, jax.random.key(3))
  g_eval = jax.grad(loss)(adapters, None)
  for leaf in ("bank_a", "bank_b"):
    assert_trees_close(g_train["dense"][leaf][0], g_eval["dense"][leaf][0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(g_train["dense"][leaf][1], g_eval["dense"][leaf][1])

  path = os.path.join(tempfile.mkdtemp(), "bank")
  jlora.save_adapters(routed, path)
  assert jlora.load_adapters(base, path)["dense"]["bank"].dropouts == rates
