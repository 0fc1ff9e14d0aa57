"""Bad input, as a new user would give it: every public entry point answers
with one `LoraError` that lists every problem and names the path (or file),
what it found and the fix; never an internal exception, never a silent no-op.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax
import pytest

import jlora

KEY = jax.random.key(0)


def base():
  return {"params": {"query": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)},
                     "value": {"kernel": jnp.ones((8, 8))}}}


def lorified():
  return jlora.lorify(base(), 2, key=KEY)


def error(fn, *args, problems: int | None = None, **kwargs) -> str:
  """The message of the one `LoraError` that ``fn`` raises (exactly that type:
  no internal exception gets through), with ``problems`` lines if given."""
  with pytest.raises(Exception) as e:
    fn(*args, **kwargs)
  assert type(e.value) is jlora.LoraError, repr(e.value)
  if problems is not None:
    assert len(e.value.problems) == problems, str(e.value)
    assert (f"({problems} problem" in str(e.value)) or problems == 1 or not e.value.args
  return str(e.value)


def loss2(p, b):
  return jlora.lora(lambda p, x: (x @ p["params"]["query"]["kernel"]).sum())(p, b)


# -- lorify: options and trees -------------------------------------------------------

@pytest.mark.parametrize("kwargs, expected", [
    (dict(rank=None), "rank must be a positive int (or {regex: rank}), got None"),
    (dict(rank={"(": 2}), "rank['(']: not a valid regex"),
    (dict(alpha={"[": 2}), "alpha['[']: not a valid regex"),
    (dict(rank={3: 2}), "rank[3]: a pattern must be a str regex"),
    (dict(targets=5), "targets: got 5, expected None"),
    (dict(targets=[5]), "targets: got [5], expected None"),
    (dict(targets=()), "targets: got an empty tuple, which selects no weight"),
    (dict(targets=[]), "targets: got an empty list"),
    (dict(trainable=()), "trainable: got ()"),
    (dict(dtype="floatx"), "dtype: got 'floatx', expected None (each weight's dtype) or "
                           "a floating dtype"),
    (dict(dtype=jnp.int32), "dtype: got"),
    (dict(rslora="yes"), "rslora must be True or False, got 'yes'"),
    (dict(rank="4"), "rank must be an int, got '4'"),
    (dict(targets=lambda p, l: 1 / 0), "params/query/bias: the targets predicate raised "
                                       "ZeroDivisionError"),
])
def test_lorify_bad_options(kwargs, expected):
  kwargs = dict(dict(rank=2, key=KEY), **kwargs)
  rank = kwargs.pop("rank")
  assert expected in error(jlora.lorify, base(), rank, problems=1, **kwargs)


def test_lorify_collects_every_problem_in_one_error():
  msg = error(jlora.lorify, base(), {"(": 2}, key=None, alpha={"[": 2}, dtype="floatx",
              rslora="yes", targets=(), problems=6)
  for part in ("rank['(']", "alpha['[']", "key must be a PRNG key", "dtype: got 'floatx'",
               "rslora must be True or False", "targets: got an empty tuple"):
    assert part in msg
  msg = error(jlora.lorify, base(), 0, key=None, targets=("qeury",), problems=3)
  assert "['qeury']" in msg and "got 0" in msg and "PRNG key" in msg


def test_axes_refuse_bad_values():
  for bad in (1.5, 0, True):
    msg = error(jlora.Axes, inputs=bad)
    assert "inputs must be None (infer)" in msg and repr(bad) in msg


def test_lorify_bad_trees_name_the_path():
  msg = error(jlora.lorify, jnp.ones((4, 4)), 2, key=KEY, problems=1)
  assert "params: got one array of shape (4, 4), expected a tree" in msg
  assert "params: got None" in error(jlora.lorify, None, 2, key=KEY)
  ints = {"d": {"kernel": jnp.ones((4, 4), jnp.int32)}}
  msg = error(jlora.lorify, ints, 2, key=KEY, problems=1)
  assert "d/kernel (dtype int32)" in msg and "floating" in msg
  msg = error(jlora.lorify, ints, 2, key=KEY, targets=("d",))
  assert "d/kernel (dtype int32)" in msg
  make = jlora.LoRA  # not a function of (path, weight) that returns a Method
  assert "make: got 5" in error(jlora.add_adapters, base(), 5, key=KEY)
  assert "make returned int" in error(jlora.add_adapters, base(), lambda p, w: 3, key=KEY)
  del make


# -- reserved keys ---------------------------------------------------------------------

@pytest.mark.parametrize("key, kwargs", [
    ("lora", {}), ("lora_a", {}), ("lora_b", {}),
    ("trainable", dict(targets=("query",), trainable=("head",))),
])
def test_reserved_keys_are_refused_with_the_path(key, kwargs):
  params = {"params": {"query": {"kernel": jnp.ones((4, 4))},
                       "head": {"kernel": jnp.ones((4, 2))}}}
  where = "head" if key == "trainable" else "query"
  params["params"][where][key] = jnp.ones(3)
  msg = error(jlora.lorify, params, 2, key=KEY, problems=1, **kwargs)
  assert f"params/{where}" in msg and f"'{key}'" in msg and "rename" in msg
  assert params["params"][where][key].shape == (3,)  # the input is untouched


def test_reserved_keys_of_other_methods_and_names():
  params = {"d": {"kernel": jnp.ones((4, 4)), "dora_m": jnp.ones(4)}}
  assert "'dora_m'" in error(jlora.dora, params, 2, key=KEY)
  params = {"d": {"kernel": jnp.ones((4, 4)), "lora@task": jnp.ones(4)}}
  assert "'lora@task'" in error(jlora.lorify, params, 2, key=KEY, name="task")


# -- damaged adapter records -----------------------------------------------------------

@pytest.mark.parametrize("entry", ["merge", "lora", "save_adapters", "trainable_mask",
                                   "summary", "partition"])
def test_a_record_replaced_by_a_string(entry, tmp_path):
  bad = lorified()
  bad["params"]["query"]["lora"] = "LoRA(rank=2)"
  calls = {
      "merge": lambda: jlora.merge(bad),
      "lora": lambda: jlora.lora(lambda p, x: x @ p["params"]["query"]["kernel"])(
          bad, jnp.ones(8)),
      "save_adapters": lambda: jlora.save_adapters(bad, tmp_path / "a"),
      "trainable_mask": lambda: jlora.trainable_mask(bad),
      "summary": lambda: jlora.summary(bad),
      "partition": lambda: jlora.partition(bad),
  }
  msg = error(calls[entry], problems=1)
  assert "params/query/lora: the LoRA record of the adapter array 'lora_a' is a str" in msg
  assert not (tmp_path / "a").exists()


# -- optimizers and partitions -----------------------------------------------------

def test_optimizers_and_partitions_of_nothing():
  assert "optax GradientTransformation" in error(jlora.freeze, "adam", lorified())
  assert "update nothing" in error(jlora.adapters_only, optax.adam(1e-3), base())
  assert "update nothing" in error(jlora.partition, base())
  assert "fn must be callable" in error(jlora.lora, 5)


# -- train steps -----------------------------------------------------------------------

def test_train_step_flags():
  msg = error(jlora.train_step, loss2, optax.sgd(0.1), lorified(), has_aux="yes",
              pmap="no", donate=1, fsdp="no", accumulate=0, problems=5)
  for flag in ("has_aux: got 'yes'", "pmap: got 'no'", "donate: got 1", "fsdp: got 'no'",
               "accumulate must be a positive integer"):
    assert flag in msg
  assert "no adapters" in error(jlora.train_step, loss2, optax.sgd(0.1), base())


def test_train_step_bad_calls():
  params = lorified()
  trainer = jlora.train_step(loss2, optax.sgd(0.1), params)
  state, frozen = trainer.init(params)
  msg = error(trainer.step, frozen, state, jnp.ones((2, 8)), problems=1)
  assert "state and frozen are swapped" in msg
  assert "key: given, but loss_fn takes (params, batch)" in error(trainer.init, params,
                                                                   key=KEY)
  msg = error(trainer.init, params, key=5, problems=2)
  assert "key: got 5" in msg
  three = jlora.train_step(lambda p, b, k: loss2(p, b), optax.sgd(0.1), params)
  assert "key: missing" in error(three.init, params)
  assert "not the tree train_step was built for" in error(trainer.init, base())
  aux = jlora.train_step(loss2, optax.sgd(0.1), params, has_aux=True)
  msg = error(aux.step, *aux.init(params), jnp.ones((2, 8)))
  assert "must return (loss, aux)" in msg and "an array of shape ()" in msg
  acc = jlora.train_step(loss2, optax.sgd(0.1), params, accumulate=2)
  msg = error(acc.step, *acc.init(params), jnp.ones((3, 8)))
  assert "accumulate=2" in msg and "(3, 8) has 3 rows" in msg


# -- files -------------------------------------------------------------------------

def test_file_functions(tmp_path):
  msg = error(jlora.save_adapters, None, None, force="y", problems=3)
  assert "path: got None" in msg and "force: got 'y'" in msg and "params: got None" in msg
  msg = error(jlora.load_adapters, None, None, problems=2)
  assert "base_params: got None" in msg and "path: got None" in msg
  assert "no such directory" in error(jlora.load_adapters, base(), tmp_path / "missing")


def test_checkpoints(tmp_path):
  params = lorified()
  trainer = jlora.train_step(loss2, optax.sgd(0.1), params)
  state, frozen = trainer.init(params)
  assert "directory: got None" in error(jlora.Checkpoints, None)
  assert "async_save: got 'x'" in error(jlora.Checkpoints, tmp_path, async_save="x")
  with jlora.Checkpoints(tmp_path / "c") as ckpts:
    msg = error(ckpts.save, {"a": jnp.ones(2)}, data=object(), force="yes", problems=3)
    assert "state: got dict, expected a jlora.TrainState" in msg
    assert "force: got 'yes'" in msg and "data:" in msg
    assert "state: got dict" in error(ckpts.save, frozen)
    ckpts.save(state, force=True)
    ckpts.wait()
    msg = error(ckpts.restore, frozen, step="0", problems=2)
    assert "like: got dict" in msg and "step: got '0'" in msg
    assert re.search(r"step 7 .*pick one of all_steps", error(ckpts.restore, state, step=7),
                     re.S) or "all_steps" in error(ckpts.restore, state, step=7)


# -- named adapters and merge ------------------------------------------------------------

def test_named_adapters_and_merge():
  params = jlora.lorify(base(), 2, key=KEY, name="t1")
  params = jlora.lorify(params, 2, key=KEY, name="t2")
  for bad in (5, (), [3]):
    assert "names: got" in error(jlora.select, params, bad, problems=1)
  assert "['nope'] match no adapter" in error(jlora.select, params, ("t1", "nope"))
  msg = error(jlora.weighted_adapter, params, {"t1": "x", "t2": float("nan")}, name="m",
              density="half", problems=3)
  assert "weights['t1']: got 'x'" in msg and "weights['t2']: got nan" in msg
  assert "density must be in (0, 1]" in msg
  assert "weights: got" in error(jlora.weighted_adapter, params, ["t1"], name="m")
  assert "dtype: got 'foo'" in error(jlora.merge, params, dtype="foo")


def test_a_damaged_record_is_not_blamed_on_another_model():
  import dataclasses
  bad = lorified()
  record = bad["params"]["query"]["lora"]
  bad["params"]["query"]["lora"] = dataclasses.replace(record, rank="2")
  msg = error(jlora.merge, bad, problems=1)
  assert "params/query/lora: the LoRA record is damaged" in msg
  assert "another model" not in msg
  bad["params"]["query"]["lora"] = dataclasses.replace(record, alpha="x")
  assert "the LoRA record is damaged" in error(jlora.summary, bad)


def test_a_models_own_lora_named_leaves_are_not_mistaken_for_jlora_adapters():
  own = {"layer": {"kernel": jnp.ones((4, 4)), "lora_a": jnp.ones((4, 1)),
                   "lora_b": jnp.ones((1, 4))}}
  merged = jlora.merge(own)  # no jlora record: nothing to read, nothing refused
  assert jax.tree.structure(merged) == jax.tree.structure(own)
  y = jlora.lora(lambda p, x: x @ p["layer"]["kernel"] + x @ p["layer"]["lora_a"] @
                 p["layer"]["lora_b"])(own, jnp.ones(4))
  assert y.shape == (4,)


def test_merge_of_a_tree_without_arrays_is_an_error():
  for params in (None, {}, {"a": "text"}):
    with pytest.raises(jlora.LoraError, match="nothing to merge"):
      jlora.merge(params)
