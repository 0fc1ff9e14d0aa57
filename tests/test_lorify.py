"""`lorify`: shapes, targets, per-path settings, purity, and every error."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import zoo

KEY = jax.random.key(0)


def transformer_params():
  return zoo.case("transformer").params


def mlp():
  return {"params": {
      "query": {"kernel": jnp.ones((8, 16)), "bias": jnp.zeros(16)},
      "value": {"kernel": jnp.ones((8, 16)), "bias": jnp.zeros(16)},
      "head": {"kernel": jnp.ones((16, 3)), "bias": jnp.zeros(3)},
  }}


def adapted_paths(tree):
  from jlora._tree import keypath_to_path
  return sorted("/".join(str(k) for k in keypath_to_path(path)[:-1])
                for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
                if "lora_a" in str(path[-1]))


def test_adds_sibling_leaves_with_paper_shapes_and_zero_b():
  out = jlora.lorify(mlp(), 4, key=KEY, alpha=8, targets=("query", "value"))
  q = out["params"]["query"]
  assert q["lora_a"].shape == (8, 4) and q["lora_b"].shape == (4, 16)
  assert q["lora"] == jlora.LoRA(rank=4, alpha=8.0) and q["lora"].scale == 2.0
  assert not jnp.any(q["lora_b"])
  bound = 1 / np.sqrt(8)   # PEFT's kaiming_uniform(a=sqrt(5)) bound
  assert 0.5 * bound < float(jnp.max(jnp.abs(q["lora_a"]))) <= bound


def test_is_pure_and_deterministic():
  params = mlp()
  before = jax.tree.map(np.asarray, params)
  a = jlora.lorify(params, 2, key=KEY)
  b = jlora.lorify(params, 2, key=KEY)
  assert jax.tree.structure(params) == jax.tree.structure(before)
  jax.tree.map(np.testing.assert_array_equal, params, before)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert "lora" not in params["params"]["query"]


def test_targets_by_name_regex_and_predicate():
  p = mlp()
  assert adapted_paths(jlora.lorify(p, 2, key=KEY, targets=("query", "value"))) == [
      "params/query", "params/value"]
  assert adapted_paths(jlora.lorify(p, 2, key=KEY, targets=re.compile(r"head"))) == ["params/head"]
  assert adapted_paths(jlora.lorify(
      p, 2, key=KEY, targets=lambda path, leaf: path.endswith("value/kernel"))) == ["params/value"]
  assert len(adapted_paths(jlora.lorify(p, 2, key=KEY))) == 3


def test_targets_flax_attention_and_embed():
  out = jlora.lorify(transformer_params(), 2, key=KEY, targets=("query", "value", "embed"))
  attn = out["params"]["attn_0"]
  # DenseGeneral (d, heads, head_dim): one input axis; A (d, r), B (r, heads, head_dim).
  assert attn["query"]["lora_a"].shape == (16, 2)
  assert attn["query"]["lora_b"].shape == (2, 4, 4)
  assert out["params"]["embed"]["lora_a"].shape == (37, 2)
  out = jlora.lorify(transformer_params(), 2, key=KEY, targets=("out",))
  # (heads, head_dim, d): two input axes.
  assert out["params"]["attn_0"]["out"]["lora_a"].shape == (4, 4, 2)
  assert out["params"]["attn_0"]["out"]["lora_b"].shape == (2, 16)


def test_per_path_rank_and_alpha():
  out = jlora.lorify(mlp(), {"query": 4, ".*": 1}, key=KEY, alpha={"value": 3.0, ".*": 1.0})
  p = out["params"]
  assert p["query"]["lora"].rank == 4 and p["value"]["lora"].rank == 1
  assert p["value"]["lora"].alpha == 3.0 and p["head"]["lora"].alpha == 1.0


def test_rslora_and_gaussian_init():
  out = jlora.lorify(mlp(), 4, key=KEY, alpha=8, rslora=True, init="gaussian",
                     targets=("query",))
  assert out["params"]["query"]["lora"].scale == pytest.approx(4.0)


def test_trainable_modules_are_marked_and_trained():
  out = jlora.lorify(mlp(), 2, key=KEY, targets=("query",), trainable=("head",))
  mask = jlora.trainable_mask(out)["params"]
  assert mask["head"]["kernel"] and mask["head"]["bias"]
  assert mask["query"]["lora_a"] and not mask["query"]["kernel"] and not mask["value"]["kernel"]
  merged = jlora.merge(out)
  assert jax.tree.structure(merged) == jax.tree.structure(mlp())


def test_non_standard_weight_names_get_prefixed_siblings():
  params = {"layer": {"w_in": jnp.ones((4, 6)), "w_out": jnp.ones((6, 4))}}
  out = jlora.lorify(params, 2, key=KEY, targets=re.compile("w_"))
  assert sorted(out["layer"]) == ["w_in", "w_in_lora", "w_in_lora_a", "w_in_lora_b",
                                  "w_out", "w_out_lora", "w_out_lora_a", "w_out_lora_b"]
  fn = lambda p, x: x @ p["layer"]["w_in"] @ p["layer"]["w_out"]  # noqa: E731
  x = jnp.ones((2, 4))
  np.testing.assert_allclose(jlora.lora(fn)(out, x), fn(params, x))


def test_scan_stacked_kernel_keeps_layer_axis_in_front():
  case = zoo.case("scan")
  out = jlora.lorify(case.params, 2, key=KEY, axes=jlora.Axes(stack=1))
  up = out["params"]["layers"]["up"]
  assert up["lora_a"].shape == (3, 12, 2) and up["lora_b"].shape == (3, 2, 24)


def test_summary_counts_the_paper_example():
  s = jlora.summary(jlora.lorify({"w": {"kernel": jnp.ones((100, 100))}}, 2, key=KEY))
  assert (s.rows[0].adapter_params, s.rows[0].weight_params) == (400, 10_000)
  assert s.trainable_params == 400 and s.total_params == 10_400
  assert s.trainable_bytes == 1600
  assert "w/kernel" in str(s) and "LoRA(rank=2, alpha=2)" in str(s)


# -- errors -------------------------------------------------------------------

def error_of(fn, *args, **kwargs) -> str:
  with pytest.raises(jlora.LoraError) as info:
    fn(*args, **kwargs)
  return str(info.value)


@pytest.mark.parametrize("rank", [0, -3, 2.5, True])
def test_bad_rank(rank):
  msg = error_of(jlora.lorify, mlp(), rank, key=KEY)
  assert "rank" in msg and "positive" in msg or "int" in msg


def test_rank_larger_than_weight_names_path_and_fix():
  msg = error_of(jlora.lorify, mlp(), 9, key=KEY)
  assert "params/query/kernel: rank 9 > min(in=8, out=16); lower the rank or exclude this path" in msg
  assert "params/head/kernel: rank 9 > min(in=16, out=3)" in msg
  assert "3 problems" in msg  # collected, raised once


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf"), "16"])
def test_bad_alpha(alpha):
  msg = error_of(jlora.lorify, mlp(), 2, key=KEY, alpha=alpha)
  assert "alpha" in msg


def test_targets_matching_nothing_lists_what_is_available():
  msg = error_of(jlora.lorify, mlp(), 2, key=KEY, targets=("qeury", "value"))
  assert "['qeury']" in msg and "available module names: ['head', 'query', 'value']" in msg
  msg = error_of(jlora.lorify, mlp(), 2, key=KEY, targets=re.compile("nothing"))
  assert "params/query/kernel" in msg
  msg = error_of(jlora.lorify, mlp(), 2, key=KEY, targets=lambda p, l: False)
  assert "params/head/bias" in msg


def test_non_array_leaves():
  params = mlp()
  params["params"]["query"]["note"] = "hello"
  params["params"]["value"]["step"] = 3
  msg = error_of(jlora.lorify, params, 2, key=KEY)
  assert "params/query/note: leaf of type str is not an array" in msg
  assert "params/value/step: leaf of type int" in msg


def test_lorify_twice_on_the_same_weight():
  once = jlora.lorify(mlp(), 2, key=KEY, targets=("query",))
  msg = error_of(jlora.lorify, once, 2, key=KEY, targets=("query",))
  assert "params/query/kernel: already has LoRA(rank=2, alpha=2) adapters" in msg
  assert "merge" in msg
  # Other weights can still be adapted, and existing adapters are not re-adapted.
  twice = jlora.lorify(once, 2, key=KEY, targets=("value",))
  assert adapted_paths(twice) == ["params/query", "params/value"]


def test_adapter_shapes_that_do_not_fit_their_kernel():
  bad = jlora.lorify(mlp(), 2, key=KEY, targets=("query", "value"))
  bad["params"]["query"]["lora_a"] = jnp.ones((7, 2))
  del bad["params"]["value"]["lora_b"]
  for fn in (jlora.merge, jlora.summary, jlora.trainable_mask,
             lambda p: jlora.lora(lambda p: p)(p)):
    msg = error_of(fn, bad)
    assert "params/query/lora_a: shape (7, 2) does not fit kernel (8, 16)" in msg
    assert "expected (8, 2)" in msg
    assert "params/value/lora_b: missing adapter array" in msg


def test_other_bad_input():
  assert "PRNG key" in error_of(jlora.lorify, mlp(), 2, key=0)
  assert "init must be one of" in error_of(jlora.lorify, mlp(), 2, key=KEY, init="zeros")
  assert "no pattern in `rank`" in error_of(jlora.lorify, mlp(), {"query": 2}, key=KEY)
  ints = {"t": {"kernel": jnp.ones((4, 4), jnp.int32)}}
  assert "not floating point" in error_of(jlora.lorify, ints, 2, key=KEY,
                                          targets=lambda p, l: True)
  vec = {"t": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}}
  assert "t/bias: shape (4,) has rank 1" in error_of(jlora.lorify, vec, 2, key=KEY,
                                                     targets=lambda p, l: True)
  assert "both for adapters and for full training" in error_of(
      jlora.lorify, mlp(), 2, key=KEY, targets=("head",), trainable=("head",))
  assert "stack" in error_of(jlora.lorify, mlp(), 2, key=KEY, axes=jlora.Axes(stack=1))


def test_linen_model_unchanged_at_init_with_default_targets():
  model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
  x = jnp.ones((2, 5))
  params = model.init(KEY, x)
  out = jlora.lora(model.apply)(jlora.lorify(params, 2, key=KEY), x)
  np.testing.assert_array_equal(out, model.apply(params, x))
