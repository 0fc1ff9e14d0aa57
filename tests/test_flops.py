"""What XLA says the factored runtime costs, in FLOPs.

Cost is read from the compiled program (``compiled.cost_analysis()['flops']``),
so these tests check what actually runs, not what the code intends: a dense
``xᵀ·dy`` for a frozen weight, or an ``A·B`` formed in the forward, shows up
as millions of extra FLOPs.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jlora

N, D, R = 64, 1024, 8  # batch, width of the square layer, rank


def _flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"])


def _wide_layer():
  model = nn.Dense(D)
  x = jax.random.normal(jax.random.key(0), (N, D))
  params = model.init(jax.random.key(1), x)
  lorified = jlora.lorify(params, R, key=jax.random.key(2), alpha=2 * R)
  adapters, frozen = jlora.partition(lorified)
  return model, x, adapters, frozen


def test_lora_gradient_forms_no_dense_weight_gradient():
  model, x, adapters, frozen = _wide_layer()

  def loss(y):
    return jnp.mean(y ** 2)

  def lora_grad(adapters, frozen, x):
    return jax.grad(lambda a: loss(jlora.lora(model.apply)(jlora.combine(a, frozen), x)))(adapters)

  def merge_grad(adapters, frozen, x):
    return jax.grad(lambda a: loss(model.apply(jlora.merge(jlora.combine(a, frozen)), x)))(adapters)

  lora = _flops(lora_grad, adapters, frozen, x)
  merged = _flops(merge_grad, adapters, frozen, x)

  # One dense N×D×D matmul: 2·64·1024·1024 = 134,217,728 FLOPs.
  dense = 2 * N * D * D
  # One skinny N×D×R matmul: 2·64·1024·8 = 1,048,576 FLOPs.
  skinny = 2 * N * D * R
  # x is an input, so no dx is needed. The factored gradient is the forward
  # x·W (one dense) plus five skinny matmuls: x·A, (x·A)·B, dB = (x·A)ᵀ·g,
  # g·Bᵀ and dA = xᵀ·(g·Bᵀ), about 134.2M + 5.2M = 139.5M, and elementwise
  # work of order N·D = 65,536 per op. A dense dW = xᵀ·dy would add a second
  # 134M on top, so the bound below leaves half a dense matmul of slack and
  # still cannot hold if one is formed.
  assert lora < dense + 0.5 * dense, (lora, dense)
  assert lora > dense + 5 * skinny  # the forward and the adapter matmuls are all there
  # Merging inside the loss forms W + s·A·B (2·D·R·D = 16.8M), runs the
  # forward (134M) and then needs the dense gradient of the merged weight,
  # xᵀ·dy (134M), before projecting it onto A and B (2 × 16.8M): ≈ 319M.
  assert merged > 2 * dense, (merged, dense)
  assert lora < 0.5 * merged, (lora, merged)


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(256, name="fc1")(x))
    return nn.Dense(64, name="fc2")(x)


def test_merged_forward_costs_exactly_the_base_forward():
  model = _MLP()
  x = jax.random.normal(jax.random.key(0), (32, 128))
  params = model.init(jax.random.key(1), x)
  lorified = jlora.lorify(params, 4, key=jax.random.key(2), alpha=8)
  # A non-zero B, so merging changes the weights.
  lorified = jax.tree_util.tree_map_with_path(
      lambda kp, v: jnp.full_like(v, 0.05) if "lora_b" in jax.tree_util.keystr(kp) else v,
      lorified)
  merged = jlora.merge(lorified)

  # The merged tree is the base tree again: same structure, shapes, dtypes.
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), merged) == jax.tree.map(
      lambda a: (a.shape, a.dtype), params)
  # ... and it computes the adapted function, not the base one.
  adapted = jlora.lora(model.apply)(lorified, x)
  np.testing.assert_allclose(model.apply(merged, x), adapted, rtol=1e-5, atol=1e-5)
  assert not np.allclose(model.apply(params, x), adapted, atol=1e-3)

  base = _flops(model.apply, params, x)
  assert _flops(model.apply, merged, x) == base
  # The unmerged forward pays for the adapters: per layer x·A and (x·A)·B,
  # 2·32·4·(128 + 256) + 2·32·4·(256 + 64) = 98,304 + 81,920 matmul FLOPs
  # (plus the scale and the add, 32·(256 + 64) each), i.e. strictly more.
  unmerged = _flops(jlora.lora(model.apply), lorified, x)
  adapter = 2 * 32 * 4 * (128 + 256) + 2 * 32 * 4 * (256 + 64)
  assert base + adapter <= unmerged <= base + 2 * adapter, (base, unmerged, adapter)
