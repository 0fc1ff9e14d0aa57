"""Named adapters: several on one base, select/disable, weighted combinations."""

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from helpers import assert_trees_close, randomize_adapters
import zoo


def named(case):
  p = case.params
  for k, (name, r) in enumerate((("t1", 2), ("t2", 3), ("t3", 2))):
    p = jlora.lorify(p, r, key=jax.random.key(k), alpha=2.0 * r + k, name=name)
  return randomize_adapters(p, jax.random.key(9))


def delta(p, name):
  q = jlora.merge(jlora.select(p, name))
  return jax.tree.map(lambda a, b: a - b, q, jlora.disable(p))


def test_select_and_disable():
  case = zoo.case("plain")
  p = named(case)
  assert jlora.adapter_names(p) == ["t1", "t2", "t3"]
  assert sorted(k for k in p["w1"] if k.startswith("lora@t2")) == [
      "lora@t2", "lora@t2_a", "lora@t2_b"]
  x = case.inputs[0]
  one = jlora.select(p, "t2")
  assert jlora.adapter_names(one) == ["t2"]
  assert_trees_close(jax.jit(jlora.lora(case.fn))(one, x), case.fn(jlora.merge(one), x),
                     rtol=1e-5, atol=1e-5)
  assert_trees_close(jlora.disable(p), case.params, rtol=0, atol=0)
  # All active together: the updates add up.
  total = jax.tree.map(lambda *d: sum(d), *(delta(p, n) for n in ("t1", "t2", "t3")))
  assert_trees_close(jlora.merge(p), jax.tree.map(jnp.add, case.params, total), rtol=1e-5,
                     atol=1e-5)
  with pytest.raises(jlora.LoraError, match=r"names \['t9'\] match no adapter"):
    jlora.select(p, "t9")
  with pytest.raises(jlora.LoraError, match="already has"):
    jlora.lorify(p, 2, key=jax.random.key(0), name="t1")
  path = os.path.join(tempfile.mkdtemp(), "named")
  jlora.save_adapters(p, path)
  assert_trees_close(jlora.load_adapters(case.params, path), p, rtol=0, atol=0)


def combined(p, how, **kw):
  q = jlora.weighted_adapter(p, {"t1": 0.7, "t2": -1.3, "t3": 0.5}, name="mix",
                             combination=how, **kw)
  return delta(q, "mix")


def test_cat_and_full_rank_svd_are_exact_weighted_sums():
  p = named(zoo.case("plain"))
  want = jax.tree.map(lambda a, b, c: 0.7 * a - 1.3 * b + 0.5 * c,
                      delta(p, "t1"), delta(p, "t2"), delta(p, "t3"))
  assert_trees_close(combined(p, "cat"), want, rtol=1e-4, atol=1e-5)
  assert_trees_close(combined(p, "svd", rank=8), want, rtol=1e-3, atol=1e-4)  # ≥ min(in, out)
  q = jlora.weighted_adapter(p, {"t1": 1.0, "t2": 1.0}, name="c", combination="cat")
  assert q["w1"]["lora@c"].rank == 5 and q["w1"]["lora@c"].scale == 1.0


def test_linear_follows_peft_factor_mixing():
  p = named(zoo.case("plain"))
  q = jlora.weighted_adapter(p, {"t1": 0.7, "t3": -0.5}, name="lin", combination="linear")
  w1 = p["w1"]
  s1, s3 = w1["lora@t1"].scale, w1["lora@t3"].scale
  a = np.sqrt(0.7 * s1) * w1["lora@t1_a"] - np.sqrt(0.5 * s3) * w1["lora@t3_a"]
  b = np.sqrt(0.7 * s1) * w1["lora@t1_b"] + np.sqrt(0.5 * s3) * w1["lora@t3_b"]
  np.testing.assert_allclose(q["w1"]["lora@lin_a"], a, rtol=1e-5)
  np.testing.assert_allclose(q["w1"]["lora@lin_b"], b, rtol=1e-5)
  with pytest.raises(jlora.LoraError, match="'linear' needs equal ranks"):
    jlora.weighted_adapter(p, {"t1": 1.0, "t2": 1.0}, name="x", combination="linear")


def numpy_ties(deltas, weights, density):
  """TIES by the paper, on one matrix per task, in numpy."""
  trimmed = []
  for d in deltas:
    flat = np.abs(d).ravel()
    k = int(density * flat.size)
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat, kind="stable")[:k]] = True
    trimmed.append(np.where(keep.reshape(d.shape), d, 0.0))
  t = np.stack(trimmed)
  sign = np.where(t.sum(0) >= 0, 1.0, -1.0)
  agree = np.sign(t) == sign
  w = np.asarray(weights)[:, None, None]
  return (np.where(agree, t * w, 0).sum(0)) / np.maximum(agree.sum(0), 1)


def test_ties_matches_a_numpy_reference_then_svd():
  p = named(zoo.case("plain"))
  ds = [np.asarray(delta(p, n)["w1"]["kernel"], np.float64) for n in ("t1", "t2", "t3")]
  want = numpy_ties(ds, [0.7, -1.3, 0.5], density=0.5)
  got = jlora.ties([jnp.asarray(d, jnp.float32)[None] for d in ds], [0.7, -1.3, 0.5],
                   density=0.5)[0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Then SVD to a rank that holds it exactly (min(6, 8) = 6).
  full = combined(p, "ties", density=0.5, rank=6)["w1"]["kernel"]
  np.testing.assert_allclose(full, want, rtol=1e-3, atol=1e-4)
  low = combined(p, "ties", density=0.5, rank=2)["w1"]["kernel"]
  u, s, vt = np.linalg.svd(want)
  np.testing.assert_allclose(low, (u[:, :2] * s[:2]) @ vt[:2], rtol=1e-3, atol=1e-4)
