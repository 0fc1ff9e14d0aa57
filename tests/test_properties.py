"""Property tests over shapes, ranks and axis layouts (hypothesis).

Each example builds a weight with random stacked/input/output axes, stores it
in a random axis order or uses it through a transpose, and checks the
invariants against the dense reference ``fn(merge(params))``.
"""

import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given

import jlora
from helpers import assert_grads_match_merged, assert_trees_close, randomize_adapters

dims = st.integers(1, 5)


@st.composite
def layouts(draw):
  stack = draw(st.integers(0, 1))
  s = tuple(draw(st.lists(st.integers(2, 3), min_size=stack, max_size=stack)))
  i = tuple(draw(st.lists(dims, min_size=1, max_size=2)))
  o = tuple(draw(st.lists(dims, min_size=1, max_size=2)))
  rank = draw(st.integers(1, min(math.prod(i), math.prod(o))))
  batch = tuple(draw(st.lists(dims, min_size=1, max_size=2)))
  transposed = draw(st.booleans())   # use the weight through W.T-style einsum
  jit = draw(st.booleans())
  dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
  return dict(s=s, i=i, o=o, rank=rank, batch=batch, transposed=transposed,
              jit=jit, dtype=dtype)


def build(layout, seed):
  s, i, o = layout["s"], layout["i"], layout["o"]
  key = jax.random.key(seed)
  kw, kx = jax.random.split(key)
  w = jax.random.normal(kw, s + i + o, jnp.float32)
  x = jax.random.normal(kx, s + layout["batch"] + i, jnp.float32)
  letters = "abcdefgh"
  sl, il, ol = letters[:len(s)], letters[2:2 + len(i)], letters[4:4 + len(o)]
  bl = "xy"[:len(layout["batch"])]
  x_spec, out_spec = sl + bl + il, sl + bl + ol
  w_spec = sl + il + ol
  dtype = layout["dtype"]

  if layout["transposed"]:
    # Store-order use: transpose the weight to (stack, out, in) first.
    def fn(p, x):
      k = p["layer"]["kernel"]
      k = jnp.transpose(k, tuple(range(len(s))) + tuple(
          range(len(s) + len(i), k.ndim)) + tuple(range(len(s), len(s) + len(i))))
      return jnp.einsum(f"{x_spec},{sl + ol + il}->{out_spec}", x.astype(dtype), k.astype(dtype))
  else:
    def fn(p, x):
      k = p["layer"]["kernel"]
      return jnp.einsum(f"{x_spec},{w_spec}->{out_spec}", x.astype(dtype), k.astype(dtype))

  params = {"layer": {"kernel": w, "bias": jnp.zeros(o)}}
  lorified = jlora.lorify(params, layout["rank"], key=jax.random.key(seed + 1),
                          axes=jlora.Axes(stack=len(s), inputs=len(i)), alpha=2.0)
  return params, lorified, fn, x


def tolerance(layout):
  return 2e-2 if layout["dtype"] == jnp.bfloat16 else 1e-5


@given(layouts(), st.integers(0, 2**16))
def test_shapes_and_identity_at_init(layout, seed):
  params, lorified, fn, x = build(layout, seed)
  s, i, o, r = layout["s"], layout["i"], layout["o"], layout["rank"]
  assert lorified["layer"]["lora_a"].shape == s + i + (r,)
  assert lorified["layer"]["lora_b"].shape == s + (r,) + o
  assert not jnp.any(lorified["layer"]["lora_b"])
  f = jlora.lora(fn)
  f = jax.jit(f) if layout["jit"] else f
  got, want = f(lorified, x), fn(params, x)
  assert_trees_close(got, want, rtol=1e-6, atol=1e-6 * float(jnp.max(jnp.abs(want.astype(jnp.float32)))))


@given(layouts(), st.integers(0, 2**16))
def test_factored_equals_merged(layout, seed):
  _, lorified, fn, x = build(layout, seed)
  lorified = randomize_adapters(lorified, jax.random.key(seed + 2))
  f = jlora.lora(fn)
  f = jax.jit(f) if layout["jit"] else f
  got, want = f(lorified, x), fn(jlora.merge(lorified), x)
  tol = tolerance(layout)
  scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
  assert_trees_close(got, want, rtol=tol, atol=tol * scale)


@given(layouts(), st.integers(0, 2**16))
def test_gradients_equal_merged_reference(layout, seed):
  layout = dict(layout, dtype=jnp.float32)  # the rtol-1e-5 claim is for f32
  _, lorified, fn, x = build(layout, seed)
  lorified = randomize_adapters(lorified, jax.random.key(seed + 2))
  assert_grads_match_merged(fn, lorified, x, jax.random.key(seed + 3))


@given(layouts(), st.integers(0, 2**16),
       st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]))
def test_merge_round_trips_structure_and_dtypes(layout, seed, dtype):
  params, lorified, _, _ = build(layout, seed)
  params = jax.tree.map(lambda p: p.astype(dtype), params)
  lorified = jlora.lorify(params, layout["rank"], key=jax.random.key(seed),
                          axes=jlora.Axes(stack=len(layout["s"]), inputs=len(layout["i"])))
  merged = jlora.merge(randomize_adapters(lorified, jax.random.key(seed)))
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
    assert a.shape == b.shape and a.dtype == b.dtype
  # B = 0 merges back to the base weights exactly.
  assert_trees_close(jlora.merge(lorified), params, rtol=0, atol=0)


@given(st.integers(2, 30), st.integers(1, 8), st.integers(1, 4), st.integers(0, 2**16),
       st.booleans())
def test_embedding_lookup_and_attend(vocab, d, rank, seed, jit):
  """Embed lookups (gather) and tied ``attend`` (x·Wᵀ) stay exact."""
  rank = min(rank, vocab, d)
  key = jax.random.key(seed)
  table = jax.random.normal(key, (vocab, d))
  params = {"embed": {"embedding": table}}
  lorified = randomize_adapters(jlora.lorify(params, rank, key=key), jax.random.key(seed + 1))
  tokens = jax.random.randint(key, (3, 4), 0, vocab)

  def fn(p, tokens):
    e = p["embed"]["embedding"]
    h = jnp.take(e, tokens, axis=0)
    return jnp.tanh(h) @ e.T

  f = jax.jit(jlora.lora(fn)) if jit else jlora.lora(fn)
  got, want = f(lorified, tokens), fn(jlora.merge(lorified), tokens)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))
