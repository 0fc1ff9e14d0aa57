"""`lora(fn)` against the dense reference `fn(merge(params))`, model by model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from helpers import assert_trees_close, randomize_adapters
import zoo

CASES = zoo.NAMES


def lorified(case, key=1, randomize=True):
  params = jlora.lorify(case.params, 2, key=jax.random.key(key), **case.lorify)
  return randomize_adapters(params, jax.random.key(key + 1)) if randomize else params


def max_abs(tree):
  return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(tree))


# Eager runs are slow for the larger models (op-by-op dispatch), so only the
# small ones also run eagerly.
MODES = [pytest.param(name, jit, id=f"{'jit' if jit else 'eager'}-{name}")
         for name in CASES for jit in (True, False)
         if jit or name in ("plain", "nnx", "scan")]


@pytest.mark.parametrize("name, jit", MODES)
def test_identity_at_init(name, jit):
  case = zoo.case(name)
  fn = jlora.lora(case.fn)
  fn = jax.jit(fn) if jit else fn
  out = fn(lorified(case, randomize=False), *case.inputs)
  want = (jax.jit(case.fn) if jit else case.fn)(case.params, *case.inputs)
  assert_trees_close(out, want, rtol=1e-6, atol=1e-6 * max_abs(want))


@pytest.mark.parametrize("name, jit", MODES)
def test_factored_equals_merged(name, jit):
  case = zoo.case(name)
  params = lorified(case)
  fn = jlora.lora(case.fn)
  fn = jax.jit(fn) if jit else fn
  got = fn(params, *case.inputs)
  want = case.fn(jlora.merge(params), *case.inputs)
  base = case.fn(case.params, *case.inputs)
  # The adapters must actually change the output, or this test proves nothing.
  assert max_abs(jax.tree.map(lambda a, b: (a - b).astype(jnp.float32), want, base)) > 1e-2
  assert_trees_close(got, want, rtol=case.tol, atol=case.tol * max_abs(want))


@pytest.mark.parametrize("name", CASES)
def test_gradients_match_merged_reference(name):
  case = zoo.case(name)
  params = lorified(case)
  adapters, frozen = jlora.partition(params)
  out_shape = jax.eval_shape(case.fn, case.params, *case.inputs)
  cot = jax.tree.map(lambda s: jax.random.normal(jax.random.key(7), s.shape, s.dtype), out_shape)

  def dot(out):
    return sum(jnp.sum(o.astype(jnp.float32) * c.astype(jnp.float32))
               for o, c in zip(jax.tree.leaves(out), jax.tree.leaves(cot)))

  def factored(a):
    return dot(jlora.lora(case.fn)(jlora.combine(a, frozen), *case.inputs))

  def reference(a):
    return dot(case.fn(jlora.merge(jlora.combine(a, frozen)), *case.inputs))

  got = jax.jit(jax.grad(factored))(adapters)
  want = jax.jit(jax.grad(reference))(adapters)
  assert max_abs(want) > 0
  assert_trees_close(got, want, rtol=case.tol * 10, atol=case.tol * max_abs(want))


def test_grad_of_whole_tree_gives_zero_for_frozen_base():
  case = zoo.case("plain")
  params = lorified(case)
  g = jax.grad(lambda p: jnp.sum(jlora.lora(case.fn)(p, *case.inputs)))(params)
  assert float(jnp.max(jnp.abs(g["w1"]["kernel"]))) == 0.0
  assert float(jnp.max(jnp.abs(g["w1"]["lora_b"]))) > 0.0


def test_vmap_over_inputs_and_over_adapters():
  case = zoo.case("plain")
  params = lorified(case)
  fn = jlora.lora(case.fn)
  x = jnp.stack([case.inputs[0], 2 * case.inputs[0]])
  got = jax.vmap(lambda xi: fn(params, xi))(x)
  want = jax.vmap(lambda xi: case.fn(jlora.merge(params), xi))(x)
  assert_trees_close(got, want, rtol=1e-5, atol=1e-5)
  # A batch of adapters (e.g. an ensemble) over one base.
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), params, randomize_adapters(params, jax.random.key(9)))
  got = jax.vmap(lambda p: fn(p, case.inputs[0]))(stacked)
  want = jax.vmap(lambda p: case.fn(jlora.merge(p), case.inputs[0]))(stacked)
  assert_trees_close(got, want, rtol=1e-5, atol=1e-5)


def test_batch_stats_are_left_untouched():
  case = zoo.case("cnn_batchnorm")
  params = lorified(case)
  x = case.inputs[0]
  y, updates = jlora.lora(case.fn)(params, x, train=True, mutable=["batch_stats"])
  y_ref, updates_ref = case.fn(jlora.merge(params), x, train=True, mutable=["batch_stats"])
  assert_trees_close(updates, updates_ref, rtol=1e-5, atol=1e-6)
  assert "lora_a" not in str(jax.tree.map(jnp.shape, updates))
  assert_trees_close(y, y_ref, rtol=1e-4, atol=1e-5)


def test_stays_factored_no_dense_update_in_the_jaxpr():
  """The traced step never holds an array of the weight's shape besides W."""
  params = {"dense": {"kernel": jnp.zeros((64, 96))}}
  params = randomize_adapters(jlora.lorify(params, 4, key=jax.random.key(0)), jax.random.key(1))
  adapters, frozen = jlora.partition(params)
  x = jnp.ones((8, 64))

  def loss(a):
    p = jlora.combine(a, frozen)
    return jnp.sum(jlora.lora(lambda p, x: x @ p["dense"]["kernel"])(p, x) ** 2)

  jaxpr = jax.make_jaxpr(jax.grad(loss))(adapters)
  formed = [str(e.primitive) for e in jaxpr.eqns for v in e.outvars
            if tuple(v.aval.shape) == (64, 96) and str(e.primitive) != "stop_gradient"]
  assert not formed, f"a dense 64x96 update or gradient was formed by {formed}"


def test_fallback_is_correct_and_warns_once():
  """A use with no factored form (here a weight-decay term) runs merged."""
  params = {"dense": {"kernel": jnp.ones((6, 5))}}
  params = randomize_adapters(jlora.lorify(params, 2, key=jax.random.key(0)), jax.random.key(1))

  def fn(p, x):
    k = p["dense"]["kernel"]
    return x @ k + jnp.sum(k * k)

  x = jnp.ones((3, 6))
  with pytest.warns(jlora.FactoredFallbackWarning, match="dense/kernel.*mul"):
    got = jlora.lora(fn)(params, x)
  np.testing.assert_allclose(got, fn(jlora.merge(params), x), rtol=1e-5)


def test_control_flow_cond_and_while():
  params = {"d": {"kernel": jax.random.normal(jax.random.key(0), (4, 4))}}
  params = randomize_adapters(jlora.lorify(params, 2, key=jax.random.key(1)), jax.random.key(2))

  def fn(p, x):
    k = p["d"]["kernel"]
    x = jax.lax.cond(x.sum() > 0, lambda x: x @ k, lambda x: -(x @ k), x)
    return jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ k), x)

  x = jnp.arange(8.0).reshape(2, 4) / 8
  assert_trees_close(jax.jit(jlora.lora(fn))(params, x), fn(jlora.merge(params), x),
                     rtol=1e-5, atol=1e-6)


def test_python_loop_over_stacked_kernel_slices():
  """Indexing a stacked kernel layer by layer slices A and B the same way."""
  k = jax.random.normal(jax.random.key(0), (3, 5, 5))
  params = {"stack": {"kernel": k}}
  params = jlora.lorify(params, 2, key=jax.random.key(1), axes=jlora.Axes(stack=1))
  params = randomize_adapters(params, jax.random.key(2))

  def fn(p, x):
    for i in range(3):
      x = jnp.tanh(x @ p["stack"]["kernel"][i])
    return x

  x = jnp.ones((2, 5))
  assert_trees_close(jlora.lora(fn)(params, x), fn(jlora.merge(params), x), rtol=1e-5, atol=1e-6)


def test_conv_transpose_and_grouped_conv_fall_back_correctly():
  class Grouped(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(4, (3,), feature_group_count=2, name="g")(x)

  m = Grouped()
  x = jnp.ones((1, 7, 4))
  params = randomize_adapters(jlora.lorify(m.init(jax.random.key(0), x), 1, key=jax.random.key(1)),
                              jax.random.key(2))
  with pytest.warns(jlora.FactoredFallbackWarning):
    got = jlora.lora(m.apply)(params, x)
  assert_trees_close(got, m.apply(jlora.merge(params), x), rtol=1e-5, atol=1e-6)
