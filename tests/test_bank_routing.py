"""A bank's routing paths (gather, onehot, grouped, segment, auto) against per-example references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from helpers import assert_trees_close, randomize_adapters
from jlora.methods import bank as bank_lib
from jlora.methods import routing as routing_lib

PATHS = ("gather", "onehot", "grouped", "segment")  # "auto" is one of them: test_auto_rule


def model_fn(p, x):
  """Dense layers on (batch, seq, d), a multi-axis (heads) kernel and a tied head.

  Covers x·A·B with several free axes, two weights on one x (shared-input
  fusion), kernels with two output and two input axes, and an embedding's
  ``attend`` (x·Bᵀ·Aᵀ).
  """
  # w1 and gate share x: the one-hot path fuses their down-projections.
  h = jnp.tanh(x @ p["w1"]["kernel"]) * jax.nn.sigmoid(x @ p["gate"]["kernel"])  # (b, t, 8)
  q = jnp.einsum("btd,dhk->bthk", h, p["heads"]["kernel"])           # (b, t, 2, 3)
  h = h + jnp.einsum("bthk,hkd->btd", jnp.sin(q), p["merge"]["kernel"])
  return h @ p["embed"]["embedding"].T                                # (b, t, 11)


def base():
  ks = jax.random.split(jax.random.key(0), 5)
  return {"w1": {"kernel": jax.random.normal(ks[0], (6, 8))},
          "gate": {"kernel": jax.random.normal(ks[4], (6, 8))},
          "heads": {"kernel": 0.5 * jax.random.normal(ks[1], (8, 2, 3))},
          "merge": {"kernel": 0.5 * jax.random.normal(ks[2], (2, 3, 8))},
          "embed": {"embedding": jax.random.normal(ks[3], (11, 8))}}


def trees(k_adapters):
  ranks = [1 + (k % 3) for k in range(k_adapters)]  # ranks differ: zero-padded
  return [randomize_adapters(
      jlora.lorify(base(), r, key=jax.random.key(k), alpha=float(k + 1),
                   axes={"merge": jlora.Axes(inputs=2), "w1|gate|heads|embed": jlora.Axes(inputs=1)}), jax.random.key(50 + k))
          for k, r in enumerate(ranks)]


def run(path, fn, *args):
  with bank_lib.routing(path):
    return jax.jit(fn)(*args)  # a fresh jit: traced under this path


# The grouped path's branches: with 4 examples over 4 adapters its capacities are
# 1 and 2 slots an adapter here; [3, 0, 2, 1] fits 1, [3, 0, 3, 1] needs 2, and
# [3, 3, 3, 1] overflows both and takes the gather; the same with one row an example
# (decode).
@pytest.mark.parametrize("k_adapters,fuse,index,rows", (
    (1, False, [0, 0, 0, 0], 3), (4, False, [3, 0, 3, 1], 3), (4, True, [3, 0, 3, 1], 3),
    (4, False, [3, 0, 2, 1], 3), (4, False, [3, 3, 3, 1], 3), (4, False, [3, 0, 2, 1], 1),
    (4, False, [3, 0, 3, 1], 1)))
def test_paths_agree_with_each_example_merged_values_and_gradients(k_adapters, fuse, index,
                                                                   rows, monkeypatch):
  monkeypatch.setattr(bank_lib, "FUSE_ONEHOT", fuse)  # one-hot in the shared-input fusion
  monkeypatch.setattr(routing_lib, "GROUPED_CAPACITIES", (1, 2))
  ts = trees(k_adapters)
  bank = jlora.stack_adapters(ts)
  x = jax.random.normal(jax.random.key(1), (4, rows, 6))
  index = jnp.asarray(index, jnp.int32)
  fn = jlora.lora(model_fn)
  merged = [jax.jit(jlora.merge)(t) for t in ts]
  want = jnp.concatenate([model_fn(merged[int(k)], x[n:n + 1]) for n, k in enumerate(index)])
  adapters, frozen = jlora.partition(bank)

  def loss(a):
    return jnp.sum(jnp.sin(fn(jlora.route(jlora.combine(a, frozen), index), x)))

  def reference(a):  # each example alone, its adapter merged (gradient reference)
    p = jlora.combine(a, frozen)
    return sum(jnp.sum(jnp.sin(model_fn(jlora.merge(jlora.route(p, int(k))), x[n:n + 1])))
               for n, k in enumerate(index.tolist()))

  want_grad = jax.jit(jax.grad(reference))(adapters)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want_grad))
  for path in PATHS:
    got = run(path, lambda b, i, x: fn(jlora.route(b, i), x), bank, index, x)
    assert_trees_close(got, want, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want))),
                       what=path)
    grad = run(path, jax.grad(loss), adapters)
    assert_trees_close(grad, want_grad, rtol=1e-4, atol=1e-5 * scale, what=f"{path} grad")
  # Padded rank columns get zero gradients on every path: they stay zero.
  if k_adapters > 1:
    g = run("onehot", jax.grad(loss), adapters)["w1"]["bank_a"]
    assert not jnp.any(g[0, :, 1:])


def test_paths_really_differ_in_the_compiled_program(monkeypatch):
  monkeypatch.setattr(bank_lib, "FUSE_ONEHOT", True)
  bank = jlora.stack_adapters(trees(4))
  x = jnp.ones((4, 2, 6))
  index = jnp.arange(4, dtype=jnp.int32)
  texts = {}
  for path in PATHS:
    fn = lambda b, i, x: jlora.lora(model_fn)(jlora.route(b, i), x)  # noqa: E731
    with bank_lib.routing(path):  # a new function: traced anew (jit caches per function)
      texts[path] = str(jax.make_jaxpr(fn)(bank, index, x))
  assert "ragged_dot" in texts["segment"] and "ragged_dot" not in texts["gather"]
  assert texts["onehot"].count("gather") < texts["gather"].count("gather")
  assert "scatter" in texts["grouped"] and "cond" in texts["grouped"]
  assert "scatter" not in texts["gather"] and "cond" not in texts["gather"]
  # Fused one-hot: w1's and gate's x·A of all K adapters in one matmul.
  assert texts["onehot"].count("dot_general") < texts["gather"].count("dot_general")


def test_auto_rule_and_bad_path():
  import types
  assert routing_lib.current_routing() == "auto"

  def path(rows, k, r=8):
    return routing_lib.choose_path(types.SimpleNamespace(rows_per_example=rows), k, r)

  # Decode (1 row an example) groups at every K, and so do a few rows ...
  most = 8 // routing_lib.GROUPED_ROWS_PER_RANK  # rows an example at rank 8
  assert [path(1, k) for k in (1, 16, 256)] == ["grouped"] * 3
  assert routing_lib.choose_path(None, 16, 8) == "grouped"  # None: one row
  assert path(most, 256) == "grouped" and path(most, 256, r=4) == "gather"
  # ... beyond: one-hot while K·r and its extra FLOPs stay small, else the gather.
  w = routing_lib.ONEHOT_MAX_WIDTH
  assert path(most + 1, 2) == "onehot" and path(most + 1, w // 8 + 1) == "gather"
  assert path(128, 16) == "gather" and path(128, 1) == "onehot"  # one adapter: no extra
  with bank_lib.routing("segment"):
    assert routing_lib.choose_path(None, 256, 8) == "segment"
  with pytest.raises(jlora.LoraError, match="pass one of"):
    with bank_lib.routing("ragged"):
      pass


def test_a_capacity_known_when_tracing_groups_with_no_run_time_choice():
  ts = trees(4)
  bank = jlora.stack_adapters(ts)
  x = jax.random.normal(jax.random.key(1), (4, 1, 6))  # decode: one row an example
  fn = jlora.lora(model_fn)
  merged = [jax.jit(jlora.merge)(t) for t in ts]
  routed = lambda capacity: lambda b, i, x: fn(jlora.route(b, i, capacity=capacity), x)  # noqa: E731
  adapters, frozen = jlora.partition(bank)
  for index, capacity in (([3, 0, 2, 1], 1), ([3, 0, 3, 1], 2), ([3, 3, 3, 1], 4)):
    index = jnp.asarray(index, jnp.int32)
    want = jnp.concatenate([model_fn(merged[int(k)], x[n:n + 1]) for n, k in enumerate(index)])
    got = run("grouped", routed(capacity), bank, index, x)
    assert_trees_close(got, want, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want))),
                       what=f"capacity {capacity}")
    loss = lambda a, capacity: jnp.sum(jnp.sin(routed(capacity)(  # noqa: E731
        jlora.combine(a, frozen), index, x)))
    assert_trees_close(run("grouped", jax.grad(lambda a: loss(a, capacity)), adapters),
                       run("grouped", jax.grad(lambda a: loss(a, None)), adapters),
                       rtol=1e-5, atol=1e-6, what=f"capacity {capacity} grad")
    with bank_lib.routing("grouped"):
      text = str(jax.make_jaxpr(routed(capacity))(bank, index, x))
    assert "scatter" in text and "cond" not in text  # the slots fixed when tracing
  # A traced index that breaks the promise: NaNs for the example beyond its adapter's
  # capacity (the second on adapter 3), never another adapter's values.
  got = run("grouped", routed(1), bank, jnp.asarray([3, 0, 3, 1], jnp.int32), x)
  assert [bool(jnp.isnan(g).all()) for g in got] == [False, False, True, False]
  assert not jnp.isnan(got[jnp.asarray([0, 1, 3])]).any()


def test_route_checks_a_capacity_against_a_concrete_index():
  bank = jlora.stack_adapters(trees(4))
  with pytest.raises(jlora.LoraError, match=r"capacity=1, but the index routes 3 examples to "
                     r"adapter 3 \(1 adapter\(s\) over capacity: \[3\]\); pass capacity=3"):
    jlora.route(bank, jnp.asarray([3, 3, 3, 1]), capacity=1)
  for capacity in (0, True, 1.5, "2"):
    with pytest.raises(jlora.LoraError, match=f"capacity={capacity!r}; pass a positive int"):
      jlora.route(bank, jnp.arange(4), capacity=capacity)
  with pytest.raises(jlora.LoraError, match="capacity=2 with a single adapter"):
    jlora.route(bank, 1, capacity=2)
  with pytest.raises(jlora.LoraError) as info:  # every problem at once
    jlora.route(bank, jnp.zeros((2, 2), jnp.int32), capacity=0)
  assert len(info.value.problems) == 2
  routed = jlora.route(bank, jnp.asarray([3, 3, 3, 1]), capacity=np.int64(3))["w1"]["bank"]
  assert routed.capacity == 3 and type(routed.capacity) is int  # static, JSON-safe
