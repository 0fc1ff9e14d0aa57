"""QLoRA: `lora(fn)` on quantized weights, and the rest of jlora on quantized trees.

The reference is always ``fn`` on the dequantized tree (merged when it has
adapters): quantized weights must behave exactly like the float arrays they
stand for, and only be dequantized at their point of use.
"""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from helpers import assert_trees_close, randomize_adapters


class MLP(nn.Module):
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(128, dtype=self.dtype, name="up")(x))
    return nn.Dense(64, dtype=self.dtype, name="down")(x)


class Block(nn.Module):
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, _):
    h = nn.Dense(64, dtype=self.dtype, name="proj")(x)
    return x + jnp.tanh(h), None


class Stack(nn.Module):
  """``nn.scan`` over 3 layers: kernels stacked (3, 64, 64)."""
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    layers = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=3)(dtype=self.dtype, name="layers")
    x, _ = layers(x, None)
    return x


class TiedLM(nn.Module):
  """An ``Embed`` lookup and a tied ``attend`` head."""

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(96, 64, name="embed")
    h = nn.Dense(64, name="mix")(embed(ids))
    return embed.attend(h)


X = jax.random.normal(jax.random.key(0), (4, 64))
IDS = jnp.array([[1, 5, 95, 0], [7, 7, 3, 64]])


def _tree(model, x, fmt, *, lorify=True, axes=None, **quant):
  params = model.init(jax.random.key(1), x)
  q = jlora.quantize(params, fmt, **quant)
  if not lorify:
    return q
  lq = jlora.lorify(q, 4, key=jax.random.key(2), axes=axes)
  return randomize_adapters(lq, jax.random.key(3), scale=0.1)


def _grads(apply, tree, *args):
  adapters, frozen = jlora.partition(tree)
  def loss(a):
    return jnp.sum(jnp.square(apply(jlora.combine(a, frozen), *args).astype(jnp.float32)))
  g = jax.grad(loss)(adapters)
  return jax.tree.map(lambda x: x, g, is_leaf=lambda x: x is None)


def _adapter_arrays(tree):
  """The ``lora_a`` / ``lora_b`` arrays of a tree (or of its gradient), by path."""
  return [x for kp, x in jax.tree_util.tree_leaves_with_path(tree)
          if re.search(r"lora_[ab]'\]$", jax.tree_util.keystr(kp))]


def _check(model, tree, args, *, jit, rtol, atol):
  fn = jlora.lora(model.apply)
  run = jax.jit(fn) if jit else fn
  reference = jlora.merge(tree)          # plain float tree: dequantized, folded
  want = model.apply(reference, *args)
  got = run(tree, *args)
  assert got.dtype == want.dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=rtol, atol=atol)
  # Adapter gradients against lora(fn) on the dequantized tree (same adapters).
  g = _adapter_arrays(_grads(run, tree, *args))
  g_ref = _adapter_arrays(_grads(jlora.lora(model.apply), jlora.dequantize(tree), *args))
  assert len(g) == len(g_ref) > 0
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=rtol, atol=atol * float(jnp.abs(b).max()))


@pytest.mark.parametrize("fmt", ["nf4", "int8", "int4", "q4_1", "q8_0"])
@pytest.mark.parametrize("jit", [False, True])
def test_dense_equals_dequantized_merged(fmt, jit):
  tree = _tree(MLP(), X, fmt)
  _check(MLP(), tree, (X,), jit=jit, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_bf16_compute_on_quantized_weights(jit):
  tree = _tree(MLP(jnp.bfloat16), X, "nf4", double_quant=True)
  _check(MLP(jnp.bfloat16), tree, (X,), jit=jit, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("jit", [False, True])
def test_nn_scan_stack_dequantizes_per_layer(jit):
  tree = _tree(Stack(), X, "nf4", axes=jlora.Axes(stack=1), double_quant=True, stack=1)
  kernel = tree["params"]["layers"]["proj"]["kernel"]
  assert kernel.shape == (3, 64, 64) and kernel.arrays["scale_mean"].shape == (3,)
  _check(Stack(), tree, (X,), jit=jit, rtol=2e-5, atol=2e-5)
  # No (3, 64, 64) float array outside the scan: each layer is dequantized in its body.
  jaxpr = jax.make_jaxpr(jlora.lora(Stack().apply))(tree, X).jaxpr
  outer = [v.aval for e in jaxpr.eqns for v in e.outvars]
  assert not any(a.shape == (3, 64, 64) and jnp.issubdtype(a.dtype, jnp.floating)
                 for a in outer)
  assert any(e.primitive.name == "scan" for e in jaxpr.eqns)


def test_embedding_lookup_and_tied_attend():
  tree = _tree(TiedLM(), IDS, "nf4")
  assert tree["params"]["embed"]["embedding"].axis == -1
  _check(TiedLM(), tree, (IDS,), jit=True, rtol=2e-5, atol=2e-5)


def test_lookup_dequantizes_only_the_rows():
  params = jlora.quantize(nn.Embed(96, 64).init(jax.random.key(0), IDS), "nf4")
  fn = jlora.lora(nn.Embed(96, 64).apply)
  np.testing.assert_array_equal(np.asarray(fn(params, IDS)),
                                np.asarray(nn.Embed(96, 64).apply(jlora.dequantize(params), IDS)))
  avals = [v.aval for e in _all_eqns(jax.make_jaxpr(fn)(params, IDS).jaxpr) for v in e.outvars]
  assert not any(a.shape == (96, 64) for a in avals)   # never the whole table


def _all_eqns(jaxpr):
  for e in jaxpr.eqns:
    yield e
    for p in e.params.values():
      inner = getattr(p, "jaxpr", p)
      if hasattr(inner, "eqns"):
        yield from _all_eqns(inner)


def test_quantized_weights_without_adapters():
  tree = _tree(MLP(), X, "int4", lorify=False)
  got = jlora.lora(MLP().apply)(tree, X)
  np.testing.assert_allclose(got, MLP().apply(jlora.dequantize(tree), X), rtol=1e-6, atol=1e-6)
  # Some weights quantized and adapted, others adapted only.
  params = MLP().init(jax.random.key(1), X)
  mixed = jlora.quantize(jlora.lorify(params, 2, key=jax.random.key(2)), "nf4",
                         targets=("up",))
  mixed = randomize_adapters(mixed, jax.random.key(4), scale=0.1)
  _check(MLP(), mixed, (X,), jit=True, rtol=2e-5, atol=2e-5)


def test_backward_recomputes_the_dequantization():
  """The dequantize + use runs under checkpoint: no float weight is a residual."""
  tree = _tree(MLP(), X, "nf4")
  adapters, frozen = jlora.partition(tree)
  fn = jlora.lora(MLP().apply)
  _, vjp = jax.vjp(lambda a: fn(jlora.combine(a, frozen), X), adapters)
  residuals = [x for x in jax.tree.leaves(vjp) if hasattr(x, "shape")]
  weights = {(64, 128), (128, 64)}
  assert not any(tuple(r.shape) in weights and r.dtype == jnp.float32 for r in residuals)


# ----------------------------------------------------------------- merge


def test_merge_gives_a_float_tree_in_a_chosen_dtype():
  tree = _tree(MLP(), X, "nf4")
  merged = jlora.merge(tree)
  plain = MLP().init(jax.random.key(1), X)
  assert jax.tree.structure(merged) == jax.tree.structure(plain)
  assert_trees_close(merged, jlora.merge(jlora.dequantize(tree)), rtol=0, atol=0)
  half = jlora.merge(tree, dtype=jnp.bfloat16)
  assert half["params"]["up"]["kernel"].dtype == jnp.bfloat16
  assert half["params"]["up"]["bias"].dtype == jnp.float32        # untouched
  # A quantized tree without adapters merges to its dequantized floats.
  q = _tree(MLP(), X, "nf4", lorify=False)
  assert_trees_close(jlora.merge(q), jlora.dequantize(q), rtol=0, atol=0)


def test_merge_requantize():
  tree = _tree(MLP(), X, "nf4", double_quant=True)
  again = jlora.merge(tree, requantize=True)
  k = again["params"]["up"]["kernel"]
  assert isinstance(k, jlora.Quantized) and k.format == "nf4" and "scale_mean" in k.arrays
  assert jax.tree.structure(again) == jax.tree.structure(jlora.quantize(
      MLP().init(jax.random.key(1), X), "nf4", double_quant=True))
  np.testing.assert_array_equal(
      np.asarray(k.dequantize()),
      np.asarray(jlora.quantize(jlora.merge(tree), "nf4", double_quant=True)
                 ["params"]["up"]["kernel"].dequantize()))
  as_int8 = jlora.merge(tree, requantize="int8")
  assert as_int8["params"]["down"]["kernel"].format == "int8"
  with pytest.raises(jlora.LoraError, match="requantize= needs quantized weights"):
    jlora.merge(jlora.merge(tree), requantize=True)


# ----------------------------------------------------------------- training and files


def _loss(params, batch):
  out = jlora.lora(MLP().apply)(params, batch["x"])
  return jnp.mean(jnp.square(out - batch["y"]))


def _batch(i):
  rng = np.random.default_rng(i)
  return {"x": rng.normal(size=(8, 64)).astype(np.float32),
          "y": rng.normal(size=(8, 64)).astype(np.float32)}


@pytest.mark.standard_promotion
@pytest.mark.parametrize("compute_dtype", [None, jnp.bfloat16])
def test_train_step_leaves_quantized_leaves_bit_identical(compute_dtype):
  tree = jlora.lorify(jlora.quantize(MLP().init(jax.random.key(1), X), "nf4"), 4,
                      key=jax.random.key(2))
  before = jax.tree.map(np.asarray, jlora.partition(tree)[1])
  trainer = jlora.train_step(_loss, optax.adam(1e-2), tree, compute_dtype=compute_dtype)
  state, frozen = trainer.init(tree)
  losses = []
  for _ in range(4):  # one batch, fitted: the loss must fall
    state, metrics = trainer.step(state, frozen, _batch(0))
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0]
  after = trainer.params(state, frozen)
  q = after["params"]["up"]["kernel"]
  assert isinstance(q, jlora.Quantized) and q.dtype == jnp.float32
  for a, b in zip(jax.tree.leaves(jlora.partition(after)[1]), jax.tree.leaves(before)):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), b)
  # The optimizer holds state for the adapters only, none for packed codes.
  tx = jlora.adapters_only(optax.adam(1e-2), tree)
  opt = tx.init(tree)
  assert all(jnp.issubdtype(x.dtype, jnp.floating) or x.ndim == 0
             for x in jax.tree.leaves(opt))
  assert sum(x.size for x in jax.tree.leaves(opt)) == 2 * sum(
      x.size for x in _adapter_arrays(tree)) + 1


@pytest.mark.standard_promotion
def test_train_step_on_a_mesh_with_fsdp():
  tree = jlora.lorify(jlora.quantize(MLP().init(jax.random.key(1), X), "nf4"), 4,
                      key=jax.random.key(2))
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  trainer = jlora.train_step(_loss, optax.adam(1e-2), tree, mesh=mesh, fsdp=True)
  state, frozen = trainer.init(tree)
  state, _ = trainer.step(state, frozen, trainer.shard_batch(_batch(0)))
  q = trainer.params(state, frozen)["params"]["up"]["kernel"]
  assert isinstance(q, jlora.Quantized)
  np.testing.assert_array_equal(np.asarray(q.arrays["codes"]),
                                np.asarray(tree["params"]["up"]["kernel"].arrays["codes"]))


def test_save_and_load_adapters_on_a_quantized_base(tmp_path):
  base = jlora.quantize(MLP().init(jax.random.key(1), X), "nf4")
  tree = randomize_adapters(jlora.lorify(base, 4, key=jax.random.key(2)), jax.random.key(3))
  jlora.save_adapters(tree, tmp_path / "adapters")
  loaded = jlora.load_adapters(base, tmp_path / "adapters")
  assert jax.tree.structure(loaded) == jax.tree.structure(tree)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(tree)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  # The fingerprint covers the quantized base: another format is another base.
  with pytest.raises(jlora.LoraError, match=r"kernel.*nf4/64/-2"):
    jlora.load_adapters(jlora.quantize(MLP().init(jax.random.key(1), X), "int4"),
                        tmp_path / "adapters")


@pytest.mark.standard_promotion
def test_checkpoint_round_trip_is_exact(tmp_path):
  tree = jlora.lorify(jlora.quantize(MLP().init(jax.random.key(1), X), "nf4",
                                     double_quant=True), 4, key=jax.random.key(2))
  trainer = jlora.train_step(_loss, optax.adam(1e-2), tree)
  state, frozen = trainer.init(tree)
  state, _ = trainer.step(state, frozen, _batch(0))
  with jlora.Checkpoints(tmp_path / "run", every=1) as ckpts:
    ckpts.save(state)
  fresh, _ = trainer.init(tree)
  with jlora.Checkpoints(tmp_path / "run") as ckpts:
    restored, _ = ckpts.restore(fresh)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  # The whole tree, quantized base included, through orbax as plain leaves.
  import orbax.checkpoint as ocp
  whole = trainer.params(state, frozen)
  with ocp.StandardCheckpointer() as c:
    c.save(tmp_path / "whole", whole)
  with ocp.StandardCheckpointer() as c:
    back = c.restore(tmp_path / "whole", jax.tree.map(np.asarray, whole))
  assert jax.tree.structure(back) == jax.tree.structure(whole)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(whole)):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


def test_lorify_adapters_in_a_chosen_dtype():
  q = jlora.quantize(MLP().init(jax.random.key(1), X), "nf4")
  lq = jlora.lorify(q, 4, key=jax.random.key(2), dtype=jnp.bfloat16)
  assert lq["params"]["up"]["lora_a"].dtype == jnp.bfloat16
  assert lq["params"]["up"]["kernel"] is q["params"]["up"]["kernel"]
  assert jlora.summary(lq) is not None


def test_export_peft_writes_the_same_adapters(tmp_path):
  """The adapters of a quantized tree export exactly as on its float base."""
  tree = _tree(MLP(), X, "nf4")
  names = {"params/up": "model.up", "params/down": "model.down"}
  jlora.export_peft(tree, tmp_path / "q", module_path=names)
  jlora.export_peft(jlora.dequantize(tree), tmp_path / "f", module_path=names)
  for f in ("adapter_config.json", "adapter_model.safetensors"):
    assert (tmp_path / "q" / f).read_bytes() == (tmp_path / "f" / f).read_bytes()


class Deep(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(6):
      x = x + jnp.tanh(nn.Dense(1024, use_bias=False, name=f"l{i}")(x))
    return x


@pytest.mark.parametrize("fmt", ["nf4", "q4_1"])
def test_compiled_step_never_holds_every_dequantized_weight(fmt):
  """Six 4 MiB layers: the gradient's temporaries grow by about one
  dequantized weight, not six (XLA would otherwise dequantize them all
  up front, in the forward and again in the backward pass)."""
  x = jnp.ones((64, 1024))
  base = Deep().init(jax.random.key(0), x)
  weight = 1024 * 1024 * 4
  temps = {}
  for name, tree in (("f32", base), ("q", jlora.quantize(base, fmt))):
    adapters, frozen = jlora.partition(jlora.lorify(tree, 8, key=jax.random.key(1)))
    def loss(a, f):
      return jnp.sum(jnp.square(jlora.lora(Deep().apply)(jlora.combine(a, f), x)))
    compiled = jax.jit(jax.grad(loss)).lower(adapters, frozen).compile()
    temps[name] = compiled.memory_analysis().temp_size_in_bytes
  assert temps["q"] - temps["f32"] <= 2 * weight, temps
