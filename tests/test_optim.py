"""Freezing: frozen leaves stay bit-identical and hold no optimizer state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from helpers import assert_trees_close
import zoo

pytestmark = pytest.mark.standard_promotion


def setup():
  case = zoo.case("transformer")
  params = jlora.lorify(case.params, 2, key=jax.random.key(0), trainable=("LayerNorm_0",))
  tokens = case.inputs[0]

  def loss(p):
    logits = jlora.lora(case.fn)(p, tokens)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens))

  return params, loss


@pytest.mark.parametrize("opt", [optax.adam(1e-2), optax.sgd(1e-2, momentum=0.9),
                                 optax.adamw(1e-2, weight_decay=0.1)],
                         ids=["adam", "sgd-momentum", "adamw"])
def test_freeze_keeps_base_bit_identical_and_holds_no_state(opt):
  params, loss = setup()
  tx = jlora.freeze(opt, params)
  state = tx.init(params)
  mask = jlora.trainable_mask(params)
  n_trainable = sum(x.size for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m)
  state_floats = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
  # Adam keeps 2 moments, sgd-momentum 1, for trainable leaves only.
  per_leaf = 1 if "sgd" in str(opt) else 2
  assert state_floats <= per_leaf * n_trainable

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  new = params
  for _ in range(3):
    new, state = step(new, state)
  for (path, before), after, m in zip(jax.tree_util.tree_leaves_with_path(params),
                                      jax.tree.leaves(new), jax.tree.leaves(mask)):
    if m:
      continue
    np.testing.assert_array_equal(after, before, err_msg=jax.tree_util.keystr(path))
  changed = [jax.tree_util.keystr(p) for (p, b), a, m in zip(
      jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(new), jax.tree.leaves(mask))
      if m and not np.array_equal(a, b)]
  assert any("lora_b" in c for c in changed) and any("LayerNorm_0" in c for c in changed)


def test_plain_optax_masked_does_not_freeze():
  """Why `freeze` exists: optax.masked passes raw gradients through."""
  params = {"w": jnp.ones(3), "frozen": jnp.ones(3)}
  tx = optax.masked(optax.sgd(0.1), {"w": True, "frozen": False})
  grads = {"w": jnp.ones(3), "frozen": jnp.ones(3)}
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(updates["frozen"][0]) == 1.0  # the raw gradient, not zero


def test_partition_recipe_differentiates_only_adapters():
  params, loss = setup()
  adapters, frozen = jlora.partition(params)
  tx = optax.adam(1e-2)
  state = tx.init(adapters)

  @jax.jit
  def step(adapters, frozen, state):
    grads = jax.grad(lambda a: loss(jlora.combine(a, frozen)))(adapters)
    updates, state = tx.update(grads, state, adapters)
    return optax.apply_updates(adapters, updates), state

  new_adapters, _ = step(adapters, frozen, state)
  assert jax.tree.structure(new_adapters) == jax.tree.structure(adapters)
  combined = jlora.combine(new_adapters, frozen)
  assert jax.tree.structure(combined) == jax.tree.structure(params)
  assert float(loss(combined)) < float(loss(params))


def test_combine_rejects_mismatched_halves():
  params, _ = setup()
  adapters, frozen = jlora.partition(params)
  with pytest.raises(jlora.LoraError, match="one jlora.partition call"):
    jlora.combine(adapters, {"params": {}})


def test_mask_is_an_optax_ready_prefix_tree():
  params, _ = setup()
  mask = jlora.trainable_mask(params)
  assert jax.tree.structure(mask) == jax.tree.structure(params)
  tx = optax.masked(optax.set_to_zero(), jax.tree.map(lambda m: not m, mask))
  tx.init(params)  # optax accepts it as-is
  assert_trees_close(jlora.combine(*jlora.partition(params)), params, rtol=0)
