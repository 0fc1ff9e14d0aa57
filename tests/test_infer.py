"""`infer_axes` / `lorify(like=...)`: layouts read from use, layout by layout.

For each model the inferred axes equal the truth, the adapters are the
standard ones (``r·(in + out)`` parameters per weight and layer), the
factored run equals the merged reference with gradients, and no use falls
back to the dense weight (the suite turns warnings into errors).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from helpers import assert_trees_close, randomize_adapters

A = jlora.Axes
KEY = jax.random.key(0)


class ScanMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    layer = nn.scan(lambda m, c, _: (nn.tanh(nn.Dense(8)(c)), None),
                    variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return layer(self, x, None)[0]


class EmbedAttend(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(11, 6)
    return embed.attend(jnp.tanh(embed(tokens)))


def flax_case(module, x):
  params = module.init(KEY, x)
  return params, module.apply, x


def gemma_q(p, x):  # gemma's q_einsum: (N, D, H), the input D in the middle
  return jnp.einsum("btd,ndh->btnh", x, p["attn"]["q_einsum"]["w"])


def gemma_kv(p, x):  # kv_einsum: (C, K, D, H)
  return jnp.einsum("btd,ckdh->cbtkh", x, p["attn"]["kv_einsum"]["w"])


def eqx_linear(p, x):  # equinox: weight (out, in), y = W·x
  return jax.vmap(lambda v: p["linear"]["weight"] @ v)(x)


def conv(p, x):
  return jax.lax.conv_general_dilated(x, p["conv"]["kernel"], (1,) * (x.ndim - 2), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC")
                                      if x.ndim == 4 else ("NWC", "WIO", "NWC"))


def cases():
  r = jax.random.normal
  yield "dense", *flax_case(nn.Dense(5), jnp.ones((2, 4))), {
      "params/kernel": A(stack=(), inputs=(0,), outputs=(1,))}
  yield "dense_general", *flax_case(nn.DenseGeneral((3, 4), axis=(-2, -1)),
                                    jnp.ones((2, 5, 2))), {
      "params/kernel": A(stack=(), inputs=(0, 1), outputs=(2, 3))}
  yield "einsum", *flax_case(nn.Einsum((4, 3, 5), "btd,dnh->btnh"), jnp.ones((2, 3, 4))), {
      "params/kernel": A(stack=(), inputs=(0,), outputs=(1, 2))}
  yield "conv", *flax_case(nn.Conv(6, (3, 3)), jnp.ones((1, 5, 5, 2))), {
      "params/kernel": A(stack=(), inputs=(0, 1, 2), outputs=(3,))}
  yield "conv_transpose", *flax_case(nn.ConvTranspose(4, (3,)), jnp.ones((1, 5, 2))), {
      "params/kernel": A(stack=(), inputs=(0, 1), outputs=(2,))}
  yield "embed_attend", *flax_case(EmbedAttend(), jnp.array([[1, 2, 3]])), {
      "params/Embed_0/embedding": A(stack=(), inputs=(0,), outputs=(1,))}
  yield "scan", *flax_case(ScanMLP(), jnp.ones((2, 8))), {
      "params/Dense_0/kernel": A(stack=(0,), inputs=(1,), outputs=(2,))}
  yield "gemma_q", {"attn": {"q_einsum": {"w": r(KEY, (2, 6, 3))}}}, gemma_q, \
      jnp.ones((2, 4, 6)), {"attn/q_einsum/w": A(stack=(), inputs=(1,), outputs=(0, 2))}
  yield "gemma_kv", {"attn": {"kv_einsum": {"w": r(KEY, (2, 3, 6, 4))}}}, gemma_kv, \
      jnp.ones((2, 4, 6)), {"attn/kv_einsum/w": A(stack=(), inputs=(2,), outputs=(0, 1, 3))}
  yield "equinox_linear", {"linear": {"weight": r(KEY, (6, 10))}}, eqx_linear, \
      jnp.ones((3, 10)), {"linear/weight": A(stack=(), inputs=(1,), outputs=(0,))}
  # Square kernels, whose shape alone cannot tell the window from in x out.
  yield "conv_3x3_rgb", {"conv": {"kernel": r(KEY, (3, 3, 3, 3))}}, conv, \
      jnp.ones((1, 6, 6, 3)), {"conv/kernel": A(stack=(), inputs=(0, 1, 2), outputs=(3,))}
  yield "conv1d_8_2_4", {"conv": {"kernel": r(KEY, (8, 2, 4))}}, conv, \
      jnp.ones((1, 9, 2)), {"conv/kernel": A(stack=(), inputs=(0, 1), outputs=(2,))}


CASES = {name: rest for name, *rest in cases()}


@pytest.mark.parametrize("name", CASES)
def test_inferred_axes_equal_the_truth(name):
  params, fn, x, truth = CASES[name]
  assert jlora.infer_axes(fn, params, x) == truth


@pytest.mark.parametrize("name", CASES)
def test_like_gives_standard_lora_that_runs_factored(name):
  params, fn, x, truth = CASES[name]
  rank = 2
  p = jlora.lorify(params, rank, key=jax.random.key(1), like=(fn, x))
  (path, axes), = truth.items()
  holder = p
  for k in path.split("/")[:-1]:
    holder = holder[k]
  weight = path.split("/")[-1]
  a_key = "lora_a" if weight in ("kernel", "embedding") else f"{weight}_lora_a"
  shape = holder[weight].shape
  n_stack = math.prod(shape[k] for k in axes.stack)
  n_in, n_out = (math.prod(shape[k] for k in axes.inputs),
                 math.prod(shape[k] for k in axes.outputs))
  adapter = holder[a_key].size + holder[a_key.replace("_a", "_b")].size
  assert adapter == n_stack * rank * (n_in + n_out)
  p = randomize_adapters(p, jax.random.key(2))
  want = fn(jlora.merge(p), x)
  scale = float(jnp.max(jnp.abs(want)))
  np.testing.assert_allclose(jax.jit(jlora.lora(fn))(p, x), want, rtol=1e-5,
                             atol=1e-5 * scale)

  adapters, frozen = jlora.partition(p)
  cot = jax.random.normal(jax.random.key(3), want.shape)
  got = jax.jit(jax.grad(lambda a: jnp.sum(jlora.lora(fn)(jlora.combine(a, frozen), x) * cot)))(adapters)
  ref = jax.jit(jax.grad(lambda a: jnp.sum(fn(jlora.merge(jlora.combine(a, frozen)), x) * cot)))(adapters)
  g_scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref))
  assert_trees_close(got, ref, rtol=1e-5, atol=1e-5 * g_scale)


def test_vmap_of_index_embedding_lookup_stays_factored():
  """``jax.vmap(lambda t: W[t])(ids)`` (how ``eqx.nn.Embedding`` is used) is
  a gather over both axes with a full slice of the features: factored like
  ``Embed``, no dense update (a fallback would warn, and warnings are errors)."""
  params = {"embedding": {"weight": jax.random.normal(KEY, (12, 5))}}

  def fn(p, ids):
    return jax.vmap(lambda t: p["embedding"]["weight"][t])(ids)

  ids = jnp.array([0, 3, 11, 3])
  p = jlora.lorify(params, 2, key=jax.random.key(1), like=(fn, ids))
  assert p["embedding"]["weight_lora_a"].shape == (12, 2)
  p = randomize_adapters(p, jax.random.key(2))
  np.testing.assert_allclose(jax.jit(jlora.lora(fn))(p, ids), fn(jlora.merge(p), ids),
                             rtol=1e-5, atol=1e-6)


def test_two_incompatible_uses_name_both():
  params = {"m": {"w": jnp.ones((4, 4, 3))}}

  def fn(p, x):  # axis 1 is contracted once and kept once
    w = p["m"]["w"]
    return jnp.einsum("bi,ijo->bjo", x, w).sum() + jnp.einsum("bj,ijo->bio", x, w).sum()

  with pytest.raises(jlora.LoraError, match=r"m/w: axis \d is .* in `.*dot_general.*` but"):
    jlora.infer_axes(fn, params, jnp.ones((2, 4)))


def test_a_targeted_weight_that_fn_never_contracts_is_an_error():
  params = {"a": {"kernel": jnp.ones((4, 4))}, "b": {"kernel": jnp.ones((4, 4))}}
  fn = lambda p, x: x @ p["a"]["kernel"]  # noqa: E731
  with pytest.raises(jlora.LoraError, match="b/kernel: the function in `like` never "
                                            "contracts this weight"):
    jlora.lorify(params, 2, key=KEY, targets=("a", "b"), like=(fn, jnp.ones((1, 4))))
  with pytest.raises(jlora.LoraError, match="axes= or like=, not both"):
    jlora.lorify(params, 2, key=KEY, axes=A(), like=(fn, jnp.ones((1, 4))))
  # targets=None adapts exactly what fn contracts.
  p = jlora.lorify(params, 2, key=KEY, like=(fn, jnp.ones((1, 4))))
  assert "lora" in p["a"] and "lora" not in p["b"]


@pytest.mark.standard_promotion  # optax's Adam under strict promotion
def test_equinox_models_train_with_inferred_axes():
  """``eqx.nn.MLP`` and ``eqx.nn.MultiheadAttention`` with no axes stated and
  no transposes: like= puts A on ``Linear.weight``'s input axis, and a train
  step moves the loss."""
  import equinox as eqx
  import optax

  mlp = eqx.nn.MLP(6, 3, 8, 2, key=KEY)
  mha = eqx.nn.MultiheadAttention(num_heads=2, query_size=8, key=KEY)
  x = jax.random.normal(jax.random.key(1), (5, 6))
  q = jax.random.normal(jax.random.key(2), (4, 8))
  models = [(mlp, lambda m, x: jax.vmap(m)(x), (x,)),
            (mha, lambda m, q: m(q, q, q), (q,))]
  for model, fn, args in models:
    found = jlora.infer_axes(fn, model, *args)
    assert found and all(a == A(stack=(), inputs=(1,), outputs=(0,))
                         for a in found.values()), found
    p = jlora.lorify(model, 2, key=jax.random.key(3), like=(fn, *args))
    p = randomize_adapters(p, jax.random.key(4), scale=0.1)
    want = fn(jlora.merge(p), *args)
    np.testing.assert_allclose(eqx.filter_jit(jlora.lora(fn))(p, *args), want, rtol=1e-5,
                               atol=1e-5 * float(jnp.max(jnp.abs(want))))

    def loss_fn(params, batch):
      return jnp.mean(jlora.lora(fn)(params, *batch) ** 2)

    trainer = jlora.train_step(loss_fn, optax.adam(1e-2), p)
    state, frozen = trainer.init(p)
    losses = []
    for _ in range(3):
      state, metrics = trainer.step(state, frozen, args)
      losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0], losses
