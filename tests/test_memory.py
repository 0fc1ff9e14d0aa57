"""The LoRA train step keeps no more activation memory per layer than full
fine-tuning (issue 14): XLA's ``memory_analysis`` of compiled gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import jlora
from helpers import assert_trees_close, randomize_adapters

TOKENS, D, HIDDEN, RANK = 512, 64, 256, 4


class MLP(nn.Module):
  layers: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.layers):
      h = nn.gelu(nn.Dense(HIDDEN, name=f"up{i}")(x))
      x = x + nn.Dense(D, name=f"down{i}")(h)
    return x


def temps(layers: int) -> tuple[int, int]:
  """Temporary bytes of the full and of the LoRA gradient."""
  model = MLP(layers)
  x = jax.random.normal(jax.random.key(0), (8, TOKENS // 8, D))
  params = model.init(jax.random.key(1), x)
  lorified = jlora.lorify(params, RANK, key=jax.random.key(2))
  adapters, frozen = jlora.partition(lorified)

  def full(p, x):
    return jnp.mean(model.apply(p, x) ** 2)

  def lora(a, f, x):
    return jnp.mean(jlora.lora(model.apply)(jlora.combine(a, f), x) ** 2)

  def temp(fn, *args):
    return jax.jit(jax.grad(fn)).lower(*args).compile().memory_analysis().temp_size_in_bytes

  return temp(full, params, x), temp(lora, adapters, frozen, x)


def test_lora_saves_no_more_per_layer_than_full():
  # Each extra layer adds what its backward needs: the up-projection's output
  # (for GELU's backward), GELU's tanh and output. LoRA must add the same,
  # plus its two rank-r intermediates t = s·x·A, and not keep x·W and t·B
  # apart (the sum re-added in each consumer: one [T, HIDDEN] more per layer).
  (full_4, lora_4), (full_8, lora_8) = temps(4), temps(8)
  full_layer, lora_layer = (full_8 - full_4) / 4, (lora_8 - lora_4) / 4
  rank_intermediates = 2 * TOKENS * RANK * 4
  assert full_layer > 0
  assert lora_layer <= full_layer + rank_intermediates, (lora_layer, full_layer)


@pytest.mark.parametrize("jit", [False, True])
def test_one_matmul_form_matches_merged(jit):
  # The train-time form [x | t]·[W ; B] (custom_jvp) against the merged
  # weight: value, gradients w.r.t. A and B, and a forward-mode derivative.
  model = MLP(2)
  x = jax.random.normal(jax.random.key(0), (4, 16, D))
  lorified = jlora.lorify(model.init(jax.random.key(1), x), RANK, key=jax.random.key(2))
  lorified = randomize_adapters(lorified, jax.random.key(3), scale=0.1)
  adapters, frozen = jlora.partition(lorified)

  def factored(a, x):
    return jnp.sum(jnp.sin(jlora.lora(model.apply)(jlora.combine(a, frozen), x)))

  def merged(a, x):
    return jnp.sum(jnp.sin(model.apply(jlora.merge(jlora.combine(a, frozen)), x)))

  wrap = jax.jit if jit else (lambda f: f)
  got = wrap(jax.value_and_grad(factored, argnums=(0, 1)))(adapters, x)
  want = jax.value_and_grad(merged, argnums=(0, 1))(adapters, x)
  assert_trees_close(got, want, rtol=2e-5, atol=2e-5, what="value_and_grad")
  dx = jnp.ones_like(x)
  got_t = wrap(lambda x: jax.jvp(lambda x: factored(adapters, x), (x,), (dx,)))(x)
  want_t = jax.jvp(lambda x: merged(adapters, x), (x,), (dx,))
  assert_trees_close(got_t, want_t, rtol=2e-5, atol=2e-4, what="jvp")
