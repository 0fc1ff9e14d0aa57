"""equinox models: weights held by Modules (not mappings) are adapted, run
factored through `jlora.lora`, merged, trained and saved like any other."""

from __future__ import annotations

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora

KEY = jax.random.key(0)
WEIGHTS = re.compile(r"weight$")
# equinox's Linear.weight is (out, in): A on the input axis, B on the output.
AXES = jlora.Axes(inputs=(1,), outputs=(0,))


def _mlp():
  model = eqx.nn.MLP(6, 3, 8, 2, key=KEY)

  def apply(m, x):
    return jax.vmap(m)(x)
  return model, apply, (jax.random.normal(jax.random.key(1), (5, 6)),)


def _mha():
  model = eqx.nn.MultiheadAttention(num_heads=2, query_size=8, key=KEY)

  def apply(m, q, kv):
    return m(q, kv, kv)
  return model, apply, (jax.random.normal(jax.random.key(1), (4, 8)),
                        jax.random.normal(jax.random.key(2), (3, 8)))


MODELS = {"mlp": _mlp, "mha": _mha}


def _lorified(model):
  """Adapters on every ``weight``, with B moved off zero so that they act."""
  params = jlora.lorify(model, 2, key=jax.random.key(3), targets=WEIGHTS, alpha=4,
                        axes=AXES)
  adapters, frozen = jlora.partition(params)
  adapters = jax.tree.map(
      lambda x: x + 0.1 * jax.random.normal(jax.random.key(x.size), x.shape, x.dtype),
      adapters)
  return jlora.combine(adapters, frozen)


def _close(a, b, tol=1e-5):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def _arrays(tree):
  return eqx.filter(tree, eqx.is_array)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_adapted_by_path_and_merged_back(name):
  model, apply, inputs = MODELS[name]()
  params = _lorified(model)
  adapted = sorted(jlora._tree.path_str(p) for p in jlora._structure.read(params)[1])
  expected = {"mlp": ["layers/0/weight", "layers/1/weight", "layers/2/weight"],
              "mha": [f"{k}_proj/weight" for k in ("key", "output", "query", "value")]}
  assert adapted == expected[name]
  for path, entry in jlora._structure.read(params)[1].items():
    (a, b), (n_out, n_in) = entry.adapters[0].arrays, entry.weight.shape
    assert (a.shape, b.shape) == ((n_in, 2), (2, n_out)), path  # A on `in`
  merged = jlora.merge(params)
  assert jax.tree.structure(merged) == jax.tree.structure(model)  # a plain Module
  assert type(merged) is type(model)
  for w, m in zip(jax.tree.leaves(_arrays(model)), jax.tree.leaves(_arrays(merged))):
    assert w.shape == m.shape and w.dtype == m.dtype
  # factored == merged, and the merged Module runs as equinox code
  _close(jlora.lora(apply)(params, *inputs), apply(merged, *inputs))
  assert not np.allclose(apply(merged, *inputs), apply(model, *inputs))
  # at init (B = 0) the model is unchanged
  fresh = jlora.lorify(model, 2, key=jax.random.key(3), targets=WEIGHTS, axes=AXES)
  _close(jlora.lora(apply)(fresh, *inputs), apply(model, *inputs))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gradients_equal_the_merged_reference(name):
  model, apply, inputs = MODELS[name]()
  params = _lorified(model)
  adapters, frozen = jlora.partition(params)

  def factored(adapters):
    return jnp.sum(jlora.lora(apply)(jlora.combine(adapters, frozen), *inputs) ** 2)

  def reference(adapters):
    return jnp.sum(apply(jlora.merge(jlora.combine(adapters, frozen)), *inputs) ** 2)

  _close(jax.grad(factored)(adapters), jax.grad(reference)(adapters), tol=1e-4)
  assert any(float(jnp.abs(g).max()) > 0
             for g in jax.tree.leaves(jax.grad(factored)(adapters)))


@pytest.mark.standard_promotion  # optax's Adam bias correction
@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_train_step_trains_the_adapters_only(name):
  model, apply, inputs = MODELS[name]()
  params = _lorified(model)

  def loss_fn(p, batch):
    return jnp.mean(jlora.lora(apply)(p, *batch) ** 2)

  trainer = jlora.train_step(loss_fn, optax.adam(1e-2), params)
  state, frozen = trainer.init(params)
  losses = []
  for _ in range(3):
    state, metrics = trainer.step(state, frozen, inputs)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0]
  trained = trainer.params(state, frozen)
  before, after = jlora.partition(params)[1], jlora.partition(trained)[1]
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    if eqx.is_array(a):
      assert np.asarray(a).tobytes() == np.asarray(b).tobytes()  # frozen: bit-identical


@pytest.mark.parametrize("name", sorted(MODELS))
def test_save_and_load_round_trip(name, tmp_path):
  model, apply, inputs = MODELS[name]()
  params = _lorified(model)
  jlora.save_adapters(params, tmp_path / "a")
  loaded = jlora.load_adapters(model, tmp_path / "a")
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(_arrays(loaded)), jax.tree.leaves(_arrays(params))):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  _close(jlora.lora(apply)(loaded, *inputs), jlora.lora(apply)(params, *inputs))


def test_namedtuples_and_dataclasses_are_adapted():
  import dataclasses
  from typing import NamedTuple

  class Layer(NamedTuple):
    kernel: jax.Array
    bias: jax.Array

  @jax.tree_util.register_dataclass
  @dataclasses.dataclass
  class Net:
    first: Layer
    second: jax.Array

  net = Net(Layer(jnp.ones((4, 3)), jnp.zeros(3)), jnp.ones((3, 2)))
  params = jlora.lorify(net, 1, key=KEY, targets=re.compile("kernel|second"))
  assert sorted(jlora._tree.path_str(p) for p in jlora._structure.read(params)[1]) == [
      "first/kernel", "second"]
  merged = jlora.merge(params)
  assert jax.tree.structure(merged) == jax.tree.structure(net)

  def apply(n, x):
    return (x @ n.first.kernel + n.first.bias) @ n.second

  x = jnp.ones((2, 4))
  _close(jlora.lora(apply)(params, x), apply(merged, x))
  # twice: the second method goes into the same holder
  again = jlora.dora(params, 1, key=KEY, targets=re.compile("second"))
  assert len(jlora._structure.read(again)[1][("second",)].adapters) == 2
  _close(jlora.lora(apply)(again, x), apply(jlora.merge(again), x))


def test_trainable_in_a_module_is_refused_with_the_path():
  model, _, _ = _mlp()
  with pytest.raises(jlora.LoraError, match=r"layers/2: leaves to train in full must sit "
                     r"in a mapping") as e:
    jlora.lorify(model, 2, key=KEY, targets=WEIGHTS,
                 trainable=lambda path, leaf: path == "layers/2/bias")
  assert "Linear" in str(e.value)


def test_summary_names_and_optimizers_on_a_module():
  model, apply, inputs = _mlp()
  params = jlora.lorify(model, 2, key=KEY, targets=WEIGHTS, name="t1", axes=AXES)
  s = jlora.summary(params)
  assert [r.path for r in s.rows] == ["layers/0/weight", "layers/1/weight",
                                      "layers/2/weight"]
  assert s.total_params == sum(x.size for x in jax.tree.leaves(_arrays(params)))
  assert jlora.adapter_names(params) == ["t1"]
  disabled = jlora.disable(params)
  assert jax.tree.structure(disabled) == jax.tree.structure(model)
  _close(apply(disabled, *inputs), apply(model, *inputs))
  tx = jlora.adapters_only(optax.adam(1e-3), params)
  state = tx.init(params)  # moments for the adapters only
  adapters = sum(x.size for x in jax.tree.leaves(jlora.partition(params)[0]))
  assert sum(x.size for x in jax.tree.leaves(state)) == 2 * adapters + 1


def test_default_targets_point_equinox_users_at_weight():
  model, _, _ = _mlp()
  with pytest.raises(jlora.LoraError, match=r"re.compile\(r'weight\$'\)"):
    jlora.lorify(model, 2, key=KEY)
