"""IA3, DoRA, PiSSA, adapter dropout, and several methods on one weight."""

import os
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from helpers import assert_trees_close, randomize_adapters
import zoo

FEEDFORWARD = re.compile(r"down|w2")


def add(method, case, key=1):
  """The case's tree with ``method`` (or a mix of methods) added."""
  p, axes = case.params, case.lorify.get("axes")
  k = jax.random.key(key)
  if method == "ia3":
    return jlora.ia3(p, targets=None, feedforward=FEEDFORWARD, axes=axes)
  if method == "dora":
    return jlora.dora(p, 2, key=k, alpha=3.0, axes=axes)
  if method == "pissa":
    return jlora.lorify(p, 2, key=k, alpha=4.0, axes=axes, init="pissa")
  if method == "combo":  # LoRA, then IA3, then DoRA, all on the same weights
    p = jlora.lorify(p, 2, key=k, axes=axes)
    p = jlora.ia3(p, targets=None, feedforward=FEEDFORWARD, axes=axes)
    return jlora.dora(p, 1, key=jax.random.key(key + 7), axes=axes)
  raise ValueError(method)


def perturb(params, key=3):
  mask = jlora.trainable_mask(params)
  noise = randomize_adapters(params, jax.random.key(key), scale=0.3)
  return jax.tree.map(lambda m, p, n: p + n if m else p, mask, params, noise)


def max_abs(tree):
  return max(float(jnp.max(jnp.abs(x.astype(jnp.float32)))) for x in jax.tree.leaves(tree))


METHODS = ("ia3", "dora", "pissa", "combo")
# Every method on a plain MLP and a scanned stack; all three at once on the
# transformer (attention kernels, embedding lookups, tied-embedding attend).
PAIRS = [(m, c) for m in METHODS for c in ("plain", "scan")] + [("combo", "transformer")]


@pytest.mark.parametrize("method, case_name", PAIRS)
def test_identity_at_init_and_factored_equals_merged(method, case_name):
  case = zoo.case(case_name)
  params = add(method, case)
  fn = jax.jit(jlora.lora(case.fn))
  want0 = jax.jit(case.fn)(case.params, *case.inputs)
  tol = 1e-4 if method == "pissa" else 1e-5  # PiSSA's residual is rounded
  assert_trees_close(fn(params, *case.inputs), want0, rtol=tol, atol=tol * max_abs(want0))
  params = perturb(params)
  got = fn(params, *case.inputs)
  want = jax.jit(lambda p, *a: case.fn(jlora.merge(p), *a))(params, *case.inputs)
  assert max_abs(jax.tree.map(lambda a, b: a - b, want, want0)) > 1e-2
  assert_trees_close(got, want, rtol=1e-4, atol=1e-4 * max_abs(want))


@pytest.mark.parametrize("case_name", ("plain", "scan"))
@pytest.mark.parametrize("method", METHODS)
def test_gradients_match_merged_reference(method, case_name):
  case = zoo.case(case_name)
  adapters, frozen = jlora.partition(perturb(add(method, case)))

  def loss(run):
    def f(a):
      p = jlora.combine(a, frozen)
      out = run(p)
      return jnp.sum(jnp.sin(out))
    return f

  got = jax.jit(jax.grad(loss(lambda p: jlora.lora(case.fn)(p, *case.inputs))))(adapters)
  want = jax.jit(jax.grad(loss(lambda p: case.fn(jlora.merge(p), *case.inputs))))(adapters)
  assert max_abs(want) > 0
  assert_trees_close(got, want, rtol=1e-4, atol=1e-4 * max_abs(want))


def test_bf16_multi_axis_kernels_with_all_methods():
  case = zoo.case("bf16_general")
  params = perturb(add("combo", case))
  got = jax.jit(jlora.lora(case.fn))(params, *case.inputs)
  want = jax.jit(lambda p, *a: case.fn(jlora.merge(p), *a))(params, *case.inputs)
  assert_trees_close(got, want, rtol=3e-2, atol=3e-2 * max_abs(want))


def test_ia3_sides_follow_peft():
  w = jax.random.normal(jax.random.key(0), (4, 6))
  params = {"k": {"kernel": w}, "ff": {"kernel": w.T}}
  p = jlora.ia3(params, targets=("k", "ff"), feedforward=("ff",))
  assert p["k"]["ia3"].feedforward is False and p["ff"]["ia3"].feedforward is True
  l_k, l_ff = jnp.arange(1.0, 7.0), jnp.arange(2.0, 8.0)
  p["k"]["ia3_l"], p["ff"]["ia3_l"] = l_k, l_ff
  x = jnp.ones((2, 4))
  f = lambda p, x: (x @ p["k"]["kernel"]) @ p["ff"]["kernel"]  # noqa: E731
  want = (((x @ w) * l_k) * l_ff) @ w.T  # output side on k, input side on ff
  np.testing.assert_allclose(jlora.lora(f)(p, x), want, rtol=1e-5)
  merged = jlora.merge(p)
  np.testing.assert_allclose(merged["k"]["kernel"], w * l_k[None, :], rtol=1e-6)
  np.testing.assert_allclose(merged["ff"]["kernel"], w.T * l_ff[:, None], rtol=1e-6)
  with pytest.raises(jlora.LoraError, match=r"feedforward modules \['v'\] are not in targets"):
    jlora.ia3(params, targets=("k",), feedforward=("v",))


def test_dora_norm_is_constant_for_gradients_and_factored_norm_is_exact():
  w = jax.random.normal(jax.random.key(0), (5, 3))
  p = perturb(jlora.dora({"d": {"kernel": w}}, 2, key=jax.random.key(1), alpha=4.0))
  a, b, m = (p["d"][k] for k in ("dora_a", "dora_b", "dora_m"))
  x = jax.random.normal(jax.random.key(2), (4, 5))

  def reference(a, b, m):  # DoRA by its definition, on the dense weight
    v = w + 2.0 * a @ b
    return x @ (m * v / jax.lax.stop_gradient(jnp.linalg.norm(v, axis=0)))

  def factored(a, b, m):
    q = dict(p["d"], dora_a=a, dora_b=b, dora_m=m)
    return jlora.lora(lambda p, x: x @ p["d"]["kernel"])({"d": q}, x)

  np.testing.assert_allclose(jax.jit(factored)(a, b, m), reference(a, b, m), rtol=1e-5,
                             atol=1e-5)
  grad = lambda f: jax.jit(jax.grad(lambda *t: jnp.sum(jnp.cos(f(*t))), argnums=(0, 1, 2)))  # noqa: E731
  g1, g2 = grad(factored)(a, b, m), grad(reference)(a, b, m)
  assert_trees_close(g1, g2, rtol=1e-4, atol=1e-5)
  init = jlora.dora({"d": {"kernel": w}}, 2, key=jax.random.key(1))
  np.testing.assert_allclose(init["d"]["dora_m"], jnp.linalg.norm(w, axis=0), rtol=1e-6)


def test_dora_does_not_form_a_dense_update():
  params = randomize_adapters(jlora.dora({"d": {"kernel": jnp.ones((64, 96))}}, 4,
                                         key=jax.random.key(0)), jax.random.key(1))
  adapters, frozen = jlora.partition(params)

  def loss(a):
    p = jlora.combine(a, frozen)
    return jnp.sum(jlora.lora(lambda p, x: x @ p["d"]["kernel"])(p, jnp.ones((8, 64))) ** 2)

  jaxpr = jax.make_jaxpr(jax.grad(loss))(adapters)
  # W·W (for ‖W‖²) is the only weight-sized array: no A·B, no dense gradient.
  formed = [str(e.primitive) for e in jaxpr.eqns for v in e.outvars
            if tuple(v.aval.shape) == (64, 96)
            and str(e.primitive) not in ("stop_gradient", "mul", "convert_element_type")]
  assert not formed, formed


def test_pissa_splits_the_weight_into_residual_and_principal_part():
  w = jax.random.normal(jax.random.key(0), (2, 7, 5))
  p = jlora.lorify({"l": {"kernel": w}}, 3, key=jax.random.key(1), alpha=6.0,
                   init="pissa", axes=jlora.Axes(stack=1))["l"]
  a, b, res = p["lora_a"], p["lora_b"], p["kernel"]
  principal = 2.0 * jnp.einsum("sir,sro->sio", a, b)
  np.testing.assert_allclose(res + principal, w, rtol=1e-5, atol=1e-5)
  for s in range(2):  # the principal part is the best rank-3 approximation
    u, sv, vt = np.linalg.svd(np.asarray(w[s]))
    np.testing.assert_allclose(principal[s], (u[:, :3] * sv[:3]) @ vt[:3], atol=1e-4)


def test_dropout_only_with_a_key_and_per_use_masks():
  case = zoo.case("scan")
  p = perturb(jlora.lorify(case.params, 2, key=jax.random.key(1), dropout=0.5,
                           axes=jlora.Axes(stack=1)))
  x = case.inputs[0]
  plain = jax.jit(jlora.lora(case.fn))(p, x)
  assert_trees_close(plain, jax.jit(case.fn)(jlora.merge(p), x), rtol=1e-5, atol=1e-5)
  run = jax.jit(lambda p, x, k: jlora.lora(case.fn, rng=k)(p, x))
  y1, y2 = run(p, x, jax.random.key(5)), run(p, x, jax.random.key(5))
  y3 = run(p, x, jax.random.key(6))
  np.testing.assert_array_equal(y1, y2)
  assert float(jnp.max(jnp.abs(y1 - plain))) > 1e-3
  assert float(jnp.max(jnp.abs(y1 - y3))) > 1e-3
  # Dropout acts on the adapter path only: with B = 0 it changes nothing.
  p0 = jlora.lorify(case.params, 2, key=jax.random.key(1), dropout=0.5,
                    axes=jlora.Axes(stack=1))
  assert_trees_close(run(p0, x, jax.random.key(5)), jax.jit(case.fn)(case.params, x), rtol=1e-6,
                     atol=1e-6)


def test_dropout_is_inverted_dropout_of_x_before_a():
  w = jnp.zeros((200, 1))
  p = jlora.lorify({"d": {"kernel": w}}, 1, key=jax.random.key(0), dropout=0.25)
  p["d"]["lora_a"] = jnp.ones((200, 1))
  p["d"]["lora_b"] = jnp.ones((1, 1))
  f = jlora.lora(lambda p, x: x @ p["d"]["kernel"], rng=jax.random.key(3))
  y = f(p, jnp.eye(200))[:, 0]   # each row: one input's dropped value
  kept = np.asarray(y) != 0
  np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75, rtol=1e-6)
  assert 0.6 < kept.mean() < 0.9


@pytest.mark.standard_promotion
def test_methods_train_together_and_merge_into_one_plain_tree():
  case = zoo.case("plain")
  params = add("combo", case)
  x = case.inputs[0]
  target = jnp.ones((x.shape[0], 3))
  tx = jlora.freeze(optax.adam(3e-2), params)
  state = tx.init(params)

  def loss(p):
    return jnp.mean((jlora.lora(case.fn)(p, x) - target) ** 2)

  @jax.jit
  def step(p, s):
    l, g = jax.value_and_grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, l

  first = None
  for _ in range(15):
    params, state, l = step(params, state)
    first = first if first is not None else float(l)
  assert float(l) < 0.5 * first
  for leaf in ("lora_b", "ia3_l", "dora_m", "dora_b"):  # every method trained
    assert not np.allclose(params["w2"][leaf], add("combo", case)["w2"][leaf])
  merged = jlora.merge(params)
  assert jax.tree.structure(merged) == jax.tree.structure(case.params)
  np.testing.assert_allclose(case.fn(merged, x), jlora.lora(case.fn)(params, x), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("method", ("ia3", "dora", "combo"))
def test_checkpoint_round_trip_is_exact(method):
  case = zoo.case("scan")
  params = perturb(add(method, case))
  path = os.path.join(tempfile.mkdtemp(), "ckpt")
  jlora.save_adapters(params, path)
  loaded = jlora.load_adapters(case.params, path)
  assert_trees_close(loaded, params, rtol=0, atol=0)


def test_pissa_checkpoint_round_trip_onto_the_residual_base():
  case = zoo.case("plain")
  params = perturb(add("pissa", case))
  path = os.path.join(tempfile.mkdtemp(), "ckpt")
  jlora.save_adapters(params, path)
  loaded = jlora.load_adapters(jlora.disable(params), path)
  assert_trees_close(loaded, params, rtol=0, atol=0)
