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


# ----------------------------------------------------------------------------
# Shared-input fusion: weights used with the same x get one down-projection.


class _SharedInput(nn.Module):
  """q, k, v on one x (multi-axis kernels), gate/up on another, a tied output."""

  v_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda name, **kw: nn.DenseGeneral((2, 3), name=name, **kw)
    q, k, v = dense("q")(x), dense("k")(x), dense("v", dtype=self.v_dtype)(x)
    h = jnp.einsum("bthd,bshd->bth", q, k)[..., None] * v.astype(jnp.float32)
    h = h.reshape(*h.shape[:2], 6)
    gate, up = nn.Dense(5, name="gate")(h), nn.Dense(5, name="up")(h)
    out = nn.Dense(6, name="down")(jax.nn.silu(gate) * up)
    return nn.Embed(7, 6, name="tied").attend(out)  # out·Eᵀ: contracts B's axis, not fused


def _shared_input_case(v_dtype=jnp.float32):
  model = _SharedInput(v_dtype)
  x = jax.random.normal(jax.random.key(0), (2, 4, 6))
  params = model.init(jax.random.key(1), x)
  return model, x, params


def _count_dots(fn, *args):
  return str(jax.make_jaxpr(fn)(*args)).count("dot_general")


@pytest.mark.parametrize("v_dtype", [jnp.float32, jnp.bfloat16])
def test_fusion_equals_unfused_and_merged_with_gradients(v_dtype):
  model, x, params = _shared_input_case(v_dtype)
  # bf16 v: the merged reference rounds W + s·A·B to bf16, the factored form
  # does not; compare to 3% of the output's range. Fused vs unfused stays tight.
  tol = dict(rtol=1e-4, atol=1e-4) if v_dtype == jnp.float32 else dict(rtol=0, atol=None)
  rank = {"q": 2, "k": 3, "v": 4, "gate": 1, "up": 2, "down": 2, "tied": 2}
  lp = jlora.lorify(params, rank, key=jax.random.key(2),
                    targets=("q", "k", "v", "gate", "up", "down", "tied"))
  lp = randomize_adapters(lp, jax.random.key(3))
  fused, unfused = jlora.lora(model.apply), jlora.lora(model.apply, fuse=False)
  y = jax.jit(fused)(lp, x)
  assert_trees_close(y, jax.jit(unfused)(lp, x), rtol=1e-5, atol=1e-5)
  y_ref = model.apply(jlora.merge(lp), x)
  if tol["atol"] is None:
    tol["atol"] = 0.03 * max_abs(y_ref)
  assert_trees_close(y, y_ref, **tol)

  adapters, frozen = jlora.partition(lp)
  c = jax.random.normal(jax.random.key(4), y.shape)
  loss = lambda f: lambda a: jnp.sum(c * f(jlora.combine(a, frozen), x))
  ref = lambda a: jnp.sum(c * model.apply(jlora.merge(jlora.combine(a, frozen)), x))
  g = jax.jit(jax.grad(loss(fused)))(adapters)
  assert_trees_close(g, jax.jit(jax.grad(loss(unfused)))(adapters), rtol=1e-4, atol=1e-5)
  g_ref = jax.grad(ref)(adapters)
  assert_trees_close(g, g_ref, **(tol | dict(atol=tol["atol"] and 0.03 * max_abs(g_ref))
                                  if v_dtype == jnp.bfloat16 else tol))

  # f32: q, k, v share one down-projection and gate, up another: 3 fewer x·A
  # dots forward; backward 3 fewer dA = xᵀ·g and 1 fewer dx = g·Aᵀ (x, the
  # model input, needs no gradient). bf16: v multiplies a bf16 copy of x, a
  # different input, so only q, k fuse: 2 fewer forward, 5 fewer in all.
  fewer, fewer_grad = (3, 7) if v_dtype == jnp.float32 else (2, 5)
  assert _count_dots(fused, lp, x) == _count_dots(unfused, lp, x) - fewer
  assert (_count_dots(jax.grad(loss(fused)), adapters)
          == _count_dots(jax.grad(loss(unfused)), adapters) - fewer_grad)


def test_fusion_skips_weights_it_cannot_share():
  """DoRA on k, and LoRA with active dropout, keep their own x·A."""
  model, x, params = _shared_input_case()
  lp = jlora.lorify(params, 2, key=jax.random.key(2), targets=("q", "v"))
  lp = jlora.lorify(lp, 2, key=jax.random.key(6), targets=("gate", "up"), dropout=0.5)
  lp = jlora.dora(lp, 2, key=jax.random.key(4), targets=("k",))
  lp = randomize_adapters(lp, jax.random.key(3))
  rng = jax.random.key(5)
  train, train_unfused = jlora.lora(model.apply, rng=rng), jlora.lora(model.apply, rng=rng, fuse=False)
  # Training: gate/up draw their own dropout masks, so only q and v fuse (-1 dot);
  # the same masks are drawn either way.
  assert _count_dots(train, lp, x) == _count_dots(train_unfused, lp, x) - 1
  assert_trees_close(jax.jit(train)(lp, x), jax.jit(train_unfused)(lp, x), rtol=1e-5, atol=1e-5)
  # Evaluation (no rng): dropout is off, so gate and up fuse too.
  evaluate = jlora.lora(model.apply)
  assert _count_dots(evaluate, lp, x) == _count_dots(jlora.lora(model.apply, fuse=False), lp, x) - 2
  assert_trees_close(evaluate(lp, x), model.apply(jlora.merge(lp), x), rtol=1e-4, atol=1e-4)


# -- the three runtime bugs of the architecture review, each with its test ----


def test_fallback_warns_in_every_call_not_once_per_process():
  """The warning state is per call: a second model (or call) with the same
  path warns again, so `pytest.warns` does not depend on test order."""
  def fn(p, x):
    k = p["dense"]["kernel"]
    return x @ k + jnp.sum(k * k)

  for seed in range(2):  # two models, same paths
    params = {"dense": {"kernel": jnp.ones((6, 5)) * (seed + 1)}}
    params = jlora.lorify(params, 2, key=jax.random.key(seed))
    with pytest.warns(jlora.FactoredFallbackWarning, match="dense/kernel.*mul"):
      jlora.lora(fn)(params, jnp.ones((3, 6)))


def test_dropout_draws_a_new_mask_in_every_while_iteration():
  """Like a scan layer, each while iteration draws its own dropout masks."""
  params = {"d": {"kernel": jnp.eye(8)}}
  params = jlora.lorify(params, 4, key=jax.random.key(0), dropout=0.5)
  params = randomize_adapters(params, jax.random.key(1))

  def fn(p, x):
    def body(c):
      i, out = c
      return i + 1, out.at[i].set(x @ p["d"]["kernel"])
    init = (jnp.zeros((), jnp.int32), jnp.zeros((2,) + x.shape))
    return jax.lax.while_loop(lambda c: c[0] < 2, body, init)[1]

  x = jnp.ones((4, 8))
  out = jax.jit(jlora.lora(fn, rng=jax.random.key(2)))(params, x)
  assert not np.allclose(out[0], out[1]), "both iterations used the same dropout mask"
  # Without a key there is no dropout: both iterations equal the merged model.
  plain = jlora.lora(fn)(params, x)
  np.testing.assert_allclose(plain[0], x @ jlora.merge(params)["d"]["kernel"], rtol=1e-5)
  np.testing.assert_allclose(plain[0], plain[1])


INNER_JIT_CHILD = r"""
import jax, jax.numpy as jnp, numpy as np, jlora
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((2,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
rows = NamedSharding(mesh, P("x"))
inner = jax.jit(lambda w, x: x @ w, out_shardings=rows)
params = jlora.lorify({"d": {"kernel": jnp.ones((4, 4))}}, 2, key=jax.random.key(0))
params["d"]["lora_b"] = jnp.ones((2, 4))
fn = lambda p, x: inner(p["d"]["kernel"], x)
x = jnp.arange(32.0).reshape(8, 4)
want = x @ jlora.merge(params)["d"]["kernel"]
for y in (jlora.lora(fn)(params, x), jax.jit(jlora.lora(fn))(params, x)):
  np.testing.assert_allclose(y, want, rtol=1e-6)
  assert len(y.sharding.device_set) == 2, y.sharding
  assert y.sharding.is_equivalent_to(rows, 2), y.sharding
donate = jax.jit(lambda w, x: x @ w + x.sum(), donate_argnums=1)
x2 = jnp.ones((8, 4))
jlora.lora(lambda p, x: donate(p["d"]["kernel"], x))(params, x2)
assert x2.is_deleted(), "the inner jit's donation was dropped"
print("ok")
"""


def test_inner_jit_keeps_its_out_shardings_and_donation():
  """An inner ``jax.jit`` is re-entered as a jit: its ``out_shardings`` and
  donation survive (they were dropped when it was inlined)."""
  import os
  import subprocess
  import sys
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", INNER_JIT_CHILD], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
