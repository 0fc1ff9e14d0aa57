"""Comparison helpers for trees: structure first, then values; gradients against merged."""

from __future__ import annotations

import jax
import numpy as np


def assert_trees_close(actual, expected, *, rtol=1e-5, atol=0.0, what="tree"):
  """Asserts equal structure, shapes and dtypes, then close values."""
  sa, se = jax.tree.structure(actual), jax.tree.structure(expected)
  assert sa == se, f"{what}: structures differ\n  actual:   {sa}\n  expected: {se}"
  for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
    name = f"{what}{jax.tree_util.keystr(path)}"
    assert np.shape(a) == np.shape(e), f"{name}: shape {np.shape(a)} != {np.shape(e)}"
    assert a.dtype == e.dtype, f"{name}: dtype {a.dtype} != {e.dtype}"
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(e, np.float64),
                               rtol=rtol, atol=atol, err_msg=name)


def randomize_adapters(params, key, scale=0.5):
  """Replaces every adapter array by random values (B is zero at init)."""
  import jlora
  mask = jlora.trainable_mask(params)
  leaves, treedef = jax.tree.flatten(params)
  masks = jax.tree.leaves(mask)
  keys = jax.random.split(key, len(leaves))
  out = [scale * jax.random.normal(k, l.shape, l.dtype) if m else l
         for l, m, k in zip(leaves, masks, keys)]
  return jax.tree.unflatten(treedef, out)


def assert_grads_match_merged(fn, lorified, x, key):
  """The adapters' gradients through ``jlora.lora(fn)`` equal those through
  ``fn`` on the merged tree, for a random cotangent drawn from ``key``."""
  import jax.numpy as jnp

  import jlora
  adapters, frozen = jlora.partition(lorified)
  cot = jax.random.normal(key, jax.eval_shape(fn, jlora.merge(lorified), x).shape)

  def factored(a):
    return jnp.sum(jlora.lora(fn)(jlora.combine(a, frozen), x) * cot)

  def reference(a):
    return jnp.sum(fn(jlora.merge(jlora.combine(a, frozen)), x) * cot)

  got, want = jax.jit(jax.grad(factored))(adapters), jax.jit(jax.grad(reference))(adapters)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want))
  assert_trees_close(got, want, rtol=1e-5, atol=1e-5 * scale)
