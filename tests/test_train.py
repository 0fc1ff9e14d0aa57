"""The single-device train step: what it trains, donates, accumulates, casts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import train_case as tc


@pytest.fixture(scope="module")
def params():
  return tc.lorified()


@pytest.fixture(scope="module")
def reference(params):
  """Three plain f32 steps on full batches: (adapters on the host, losses)."""
  state, _, losses = _steps(jlora.train_step(tc.loss_fn, tc.optimizer(), params),
                            params, 3)
  return jax.tree.map(np.asarray, state.adapters), losses


def _steps(trainer, params, n, *, key=None, rows=16):
  state, frozen = trainer.init(params, key=key)
  losses = []
  for i in range(n):
    state, metrics = trainer.step(state, frozen, tc.batch(i, rows))
    losses.append(float(metrics["loss"]))
  return state, frozen, losses


def test_trains_adapters_only_and_keeps_callers_arrays(params):
  trainer = jlora.train_step(tc.loss_fn, tc.optimizer(), params)
  state, frozen, losses = _steps(trainer, params, 8)
  assert losses[-1] < losses[0]
  assert int(state.step) == 8
  _, frozen0 = jlora.partition(params)
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen0)):
    np.testing.assert_array_equal(a, b)
  # The step donates the state it is given, never the caller's tree.
  assert not any(x.is_deleted() for x in jax.tree.leaves(params))
  trained = trainer.params(state, frozen)
  assert jax.tree.structure(trained) == jax.tree.structure(params)
  b = trained["params"]["up"]["lora_b"]
  assert float(jnp.abs(b).max()) > 0


def test_state_is_donated(params):
  trainer = jlora.train_step(tc.loss_fn, tc.optimizer(), params)
  state, frozen = trainer.init(params)
  new, _ = trainer.step(state, frozen, tc.batch(0))
  assert all(x.is_deleted() for x in jax.tree.leaves(state.adapters))
  assert all(x.is_deleted() for x in jax.tree.leaves(state.opt_state))
  assert not any(x.is_deleted() for x in jax.tree.leaves(frozen))
  kept = jlora.train_step(tc.loss_fn, tc.optimizer(), params, donate=False)
  state, frozen = kept.init(params)
  kept.step(state, frozen, tc.batch(0))
  assert not any(x.is_deleted() for x in jax.tree.leaves(state))


def _consts(closed) -> list:
  out = list(closed.consts)
  for eqn in closed.jaxpr.eqns:
    for p in eqn.params.values():
      if isinstance(p, jax.extend.core.ClosedJaxpr):
        out += _consts(p)
  return out


def test_frozen_weights_are_arguments_not_constants(params):
  trainer = jlora.train_step(tc.loss_fn, tc.optimizer(), params, accumulate=2)
  state, frozen = trainer.init(params)
  closed = jax.make_jaxpr(trainer.step)(state, frozen, tc.batch(0))
  sizes = [np.size(c) for c in _consts(closed)]
  smallest_frozen = min(x.size for x in jax.tree.leaves(frozen) if x.ndim == 2)
  assert all(s < smallest_frozen for s in sizes), sizes
  lowered = trainer.step.lower(state, frozen, tc.batch(0))
  n_args = len(jax.tree.leaves(lowered.args_info))
  assert n_args == len(jax.tree.leaves((state, frozen, tc.batch(0))))


def test_accumulation_matches_one_big_batch(params, reference):
  state, _, losses = _steps(jlora.train_step(tc.loss_fn, tc.optimizer(), params,
                                             accumulate=4), params, 3)
  np.testing.assert_allclose(losses, reference[1], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state.adapters), jax.tree.leaves(reference[0])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_compute_keeps_f32_master_adapters(params, reference):
  seen = []

  def loss_fn(p, batch):
    seen.append({jnp.dtype(x.dtype).name for x in jax.tree.leaves(p)})
    return tc.loss_fn(p, batch)

  trainer = jlora.train_step(loss_fn, tc.optimizer(), params, compute_dtype=jnp.bfloat16)
  state, _, losses = _steps(trainer, params, 3)
  assert seen and all(s == {"bfloat16"} for s in seen)
  assert {x.dtype for x in jax.tree.leaves((state.adapters, state.opt_state))
          if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
  np.testing.assert_allclose(losses, reference[1], rtol=2e-2)
  for a, b in zip(jax.tree.leaves(state.adapters), jax.tree.leaves(reference[0])):
    np.testing.assert_allclose(a, b, atol=5e-3)


def test_key_is_folded_per_step_and_micro_batch(params):
  keys = []

  def loss_fn(p, batch, key):
    keys.append(key)
    return tc.loss_fn(p, batch, key), jax.random.key_data(key)

  trainer = jlora.train_step(loss_fn, tc.optimizer(), params, has_aux=True, accumulate=2)
  state, frozen = trainer.init(params, key=jax.random.key(3))
  state, m1 = trainer.step(state, frozen, tc.batch(0))
  state, m2 = trainer.step(state, frozen, tc.batch(1))
  k1, k2 = np.asarray(m1["aux"]), np.asarray(m2["aux"])
  assert k1.shape == (2, 2)  # one key per micro-batch
  assert len({tuple(k) for k in np.concatenate([k1, k2])}) == 4
  base = jax.random.fold_in(jax.random.key(3), 0)
  np.testing.assert_array_equal(k1[1], jax.random.key_data(jax.random.fold_in(base, 1)))


def test_option_problems_are_reported_together(params):
  with pytest.raises(jlora.LoraError) as e:
    jlora.train_step("nope", object(), params, accumulate=0, compute_dtype=jnp.int32,
                     fsdp=True)
  text = str(e.value)
  assert "5 problems" in text
  for part in ("loss_fn", "optax", "accumulate", "compute_dtype", "fsdp=True"):
    assert part in text


def test_nothing_to_train_is_an_error():
  with pytest.raises(jlora.LoraError, match="lorify"):
    jlora.train_step(tc.loss_fn, tc.optimizer(), tc.base_params())


def test_uneven_accumulation_names_the_fix(params):
  trainer = jlora.train_step(tc.loss_fn, tc.optimizer(), params, accumulate=3)
  state, frozen = trainer.init(params)
  with pytest.raises(jlora.LoraError, match="accumulate=3"):
    trainer.step(state, frozen, tc.batch(0, rows=16))


def test_non_scalar_loss_is_an_error(params):
  trainer = jlora.train_step(lambda p, b: jnp.ones(3), tc.optimizer(), params)
  state, frozen = trainer.init(params)
  with pytest.raises(jlora.LoraError, match="scalar"):
    trainer.step(state, frozen, tc.batch(0))


def test_init_with_another_tree_is_an_error(params):
  trainer = jlora.train_step(tc.loss_fn, tc.optimizer(), params)
  with pytest.raises(jlora.LoraError, match="not the tree"):
    trainer.init({"params": {"dense": {"kernel": jnp.ones((2, 2))}}})
