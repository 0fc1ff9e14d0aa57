"""Where the arrays of the mesh form live: FSDP specs, and placing host
values onto global shardings."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P


def fsdp_spec(shape: tuple[int, ...], n: int, names: tuple[str, ...]) -> P:
  """Shards the largest axis that ``n`` divides (earliest on ties)."""
  best = None
  for axis, size in enumerate(shape):
    if size % n == 0 and size >= n and (best is None or size > shape[best]):
      best = axis
  if best is None:
    return P()
  spec = [None] * len(shape)
  spec[best] = names
  return P(*spec)


def place(tree: Any, sharding: Any) -> Any:
  """Puts arrays that every process holds in full onto global shardings.

  ``sharding`` is one sharding or a tree of them matching ``tree``. Goes
  through host memory: each device receives its slice, no program is
  compiled, and no result shares a buffer with ``tree`` (the step donates
  the state, and the caller's arrays must stay valid).
  """
  def one(x, sharding):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = one(jax.random.key_data(x), sharding)
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

  if isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(lambda x: one(x, sharding), tree)
  return jax.tree.map(one, tree, sharding)
