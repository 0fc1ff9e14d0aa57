"""`Axes` by axis index: any kernel layout gets standard LoRA (hypothesis).

Each example stores a weight with random stacked/input/output axes in a
random axis order, names the roles by index, and checks that the adapters
are the standard ones (A: stack + inputs + rank, B: stack + rank + outputs,
``r·(in + out)`` parameters per layer), that the factored run equals the
dense reference, gradients included, and that merging gives the same weight
as the same adapters on the weight stored in role order.
"""

import dataclasses
import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import jlora
from helpers import assert_grads_match_merged, randomize_adapters

dims = st.integers(1, 4)


@st.composite
def permuted(draw):
  s = tuple(draw(st.lists(st.integers(2, 3), min_size=0, max_size=1)))
  i = tuple(draw(st.lists(dims, min_size=1, max_size=2)))
  o = tuple(draw(st.lists(dims, min_size=1, max_size=2)))
  n = len(s) + len(i) + len(o)
  perm = tuple(draw(st.permutations(range(n))))  # kernel axis k holds role perm[k]
  rank = draw(st.integers(1, min(math.prod(i), math.prod(o))))
  method = draw(st.sampled_from(["lora", "dora", "ia3"]))
  return dict(s=s, i=i, o=o, perm=perm, rank=rank, method=method)


def build(case, seed):
  s, i, o, perm = case["s"], case["i"], case["o"], case["perm"]
  roles = s + i + o
  letters = "abcdefg"[:len(roles)]
  sl, il, ol = letters[:len(s)], letters[len(s):len(s) + len(i)], letters[len(s) + len(i):]
  kernel_spec = "".join(letters[r] for r in perm)
  shape = tuple(roles[r] for r in perm)
  kw, kx = jax.random.split(jax.random.key(seed))
  w = jax.random.normal(kw, shape)
  x = jax.random.normal(kx, s + (3,) + i)

  def fn(p, x):
    return jnp.einsum(f"{sl}z{il},{kernel_spec}->{sl}z{ol}", x, p["layer"]["kernel"])

  where = {r: k for k, r in enumerate(perm)}  # role -> kernel axis
  n_s, n_i = len(s), len(i)
  axes = jlora.Axes(stack=tuple(where[r] for r in range(n_s)),
                    inputs=tuple(where[r] for r in range(n_s, n_s + n_i)),
                    outputs=tuple(where[r] for r in range(n_s + n_i, len(roles))))
  return {"layer": {"kernel": w}}, fn, x, axes


def add(method, params, rank, axes, seed):
  key = jax.random.key(seed)
  if method == "lora":
    return jlora.lorify(params, rank, key=key, axes=axes, alpha=2.0)
  if method == "dora":
    return jlora.dora(params, rank, key=key, axes=axes, alpha=2.0)
  return jlora.ia3(params, targets=("layer",), axes=axes)


@given(permuted(), st.integers(0, 2**16))
def test_standard_adapters_in_any_layout(case, seed):
  params, fn, x, axes = build(case, seed)
  s, i, o, r = case["s"], case["i"], case["o"], case["rank"]
  p = add(case["method"], params, r, axes, seed)
  layer = p["layer"]
  if case["method"] == "ia3":
    assert layer["ia3_l"].shape == s + o
  else:
    prefix = case["method"]
    assert layer[f"{prefix}_a"].shape == s + i + (r,)
    assert layer[f"{prefix}_b"].shape == s + (r,) + o
    assert layer[f"{prefix}_a"].size + layer[f"{prefix}_b"].size == (
        math.prod(s) * r * (math.prod(i) + math.prod(o)))
  # Identity at init, then factored == merged with random adapters.
  np.testing.assert_allclose(jax.jit(jlora.lora(fn))(p, x), fn(params, x), rtol=1e-5,
                             atol=1e-5)
  p = randomize_adapters(p, jax.random.key(seed + 1))
  want = fn(jlora.merge(p), x)
  scale = float(jnp.max(jnp.abs(want)))
  np.testing.assert_allclose(jax.jit(jlora.lora(fn))(p, x), want, rtol=1e-5,
                             atol=1e-5 * scale)


@given(permuted(), st.integers(0, 2**16))
def test_gradients_equal_merged_reference_in_any_layout(case, seed):
  params, fn, x, axes = build(case, seed)
  p = randomize_adapters(add(case["method"], params, case["rank"], axes, seed),
                         jax.random.key(seed + 1))
  assert_grads_match_merged(fn, p, x, jax.random.key(seed + 2))


@given(permuted(), st.integers(0, 2**16))
def test_merge_is_the_role_order_merge_permuted(case, seed):
  """The same adapters on the weight stored in role order merge to the same
  weight, up to the storage permutation."""
  params, fn, x, axes = build(case, seed)
  perm = case["perm"]
  p = randomize_adapters(add(case["method"], params, case["rank"], axes, seed),
                         jax.random.key(seed + 1))
  inverse = np.argsort(perm)   # kernel -> role order is transpose(inverse)
  role = {"layer": dict(p["layer"])}
  role["layer"]["kernel"] = jnp.transpose(p["layer"]["kernel"], inverse)
  key, spec = next((k, v) for k, v in role["layer"].items() if isinstance(v, jlora.Method))
  role["layer"][key] = dataclasses.replace(spec, layout=())
  merged_role = jlora.merge(role)["layer"]["kernel"]
  merged = jlora.merge(p)["layer"]["kernel"]
  np.testing.assert_allclose(jnp.transpose(merged, inverse), merged_role, rtol=1e-5,
                             atol=1e-5 * float(jnp.max(jnp.abs(merged_role))))


def test_equinox_style_out_in_weight():
  """``x @ W.T`` with W ``(out, in)``: A on ``in`` with Kaiming fan-in = in."""
  w = jax.random.normal(jax.random.key(0), (6, 10))  # (out, in)
  params = {"linear": {"weight": w}}
  fn = lambda p, x: x @ p["linear"]["weight"].T  # noqa: E731
  p = jlora.lorify(params, 2, key=jax.random.key(1), targets=lambda path, leaf: True,
                   axes=jlora.Axes(inputs=(1,), outputs=(0,)))
  a, b = p["linear"]["weight_lora_a"], p["linear"]["weight_lora_b"]
  assert a.shape == (10, 2) and b.shape == (2, 6)
  assert float(jnp.max(jnp.abs(a))) <= 1 / math.sqrt(10)
  p = randomize_adapters(p, jax.random.key(2))
  a, b = p["linear"]["weight_lora_a"], p["linear"]["weight_lora_b"]
  x = jnp.ones((3, 10))
  np.testing.assert_allclose(jlora.lora(fn)(p, x), fn(jlora.merge(p), x), rtol=1e-5)
  delta = jlora.merge(p)["linear"]["weight"] - w
  np.testing.assert_allclose(delta, (a @ b).T * p["linear"]["weight_lora"].scale, rtol=1e-5,
                             atol=1e-6)


def test_pissa_in_index_layout_keeps_the_model():
  w = jax.random.normal(jax.random.key(0), (6, 10))
  params = {"linear": {"weight": w}}
  fn = lambda p, x: x @ p["linear"]["weight"].T  # noqa: E731
  p = jlora.lorify(params, 3, key=jax.random.key(1), targets=lambda path, leaf: True,
                   axes=jlora.Axes(inputs=(1,), outputs=(0,)), init="pissa")
  x = jax.random.normal(jax.random.key(2), (3, 10))
  np.testing.assert_allclose(jlora.lora(fn)(p, x), fn(params, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("axes, why", [
    (dict(inputs=(0,), outputs=(0,)), "twice"),
    (dict(inputs=(3,)), "outside"),
    (dict(inputs=(0, 1, 2)), "no output axis"),
    (dict(inputs=(0,), outputs=(1,)), "without a role"),
])
def test_bad_index_layouts_name_the_path(axes, why):
  params = {"m": {"kernel": jnp.ones((2, 3, 4))}}
  with pytest.raises(jlora.LoraError, match=f"m/kernel.*{why}"):
    jlora.lorify(params, 1, key=jax.random.key(0), axes=jlora.Axes(**axes))


def test_axes_validates_itself():
  with pytest.raises(jlora.LoraError, match="outputs= needs inputs="):
    jlora.Axes(outputs=(0,))
  with pytest.raises(jlora.LoraError, match="inputs must be"):
    jlora.Axes(inputs=())
  with pytest.raises(jlora.LoraError, match="stack as indices"):
    jlora.Axes(stack=1, inputs=(1,))
