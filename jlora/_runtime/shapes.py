"""Rules for shape-only operations on an adapted weight.

Casts, transposes, reshapes, squeezes, expanding broadcasts and slices move
the weight's labels (and, where needed, its adapter arrays) along, so that
the use that follows still sees ``W`` plus its adapters (`jlora._adapted`).
"""

from __future__ import annotations

import jax.numpy as jnp

from jlora import _adapted
from jlora._adapted import Adapted
from jlora._runtime.registry import bind, fallback, rule


@rule("convert_element_type")
def convert(ctx, eqn, invals):
  (ad,) = invals
  dtype = eqn.params["new_dtype"]
  if not jnp.issubdtype(dtype, jnp.floating):
    return fallback(ctx, eqn, invals)
  return _adapted.cast(ad, bind(eqn, [ad.w]), dtype)


@rule("transpose")
def transpose(ctx, eqn, invals):
  (ad,) = invals
  perm = eqn.params["permutation"]
  return Adapted(bind(eqn, [ad.w]), [ad.labels[p] for p in perm], ad.terms, ad.path)


@rule("reshape")
def reshape(ctx, eqn, invals):
  ad = invals[0]
  if len(invals) != 1 or eqn.params.get("dimensions") is not None:
    return fallback(ctx, eqn, invals)
  out = _adapted.reshape(ad, eqn.params["new_sizes"])
  return fallback(ctx, eqn, invals) if out is None else out


@rule("squeeze")
def squeeze(ctx, eqn, invals):
  (ad,) = invals
  dims = set(d % ad.w.ndim for d in eqn.params["dimensions"])
  new_shape = [n for d, n in enumerate(ad.w.shape) if d not in dims]
  out = _adapted.reshape(ad, new_shape)
  return fallback(ctx, eqn, invals) if out is None else out


@rule("broadcast_in_dim")
def broadcast_in_dim(ctx, eqn, invals):
  ad = invals[0]
  shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
  pure_expand = (len(invals) == 1 and list(dims) == sorted(dims)
                 and all(shape[d] == n for d, n in zip(dims, ad.w.shape))
                 and all(n == 1 for d, n in enumerate(shape) if d not in dims))
  out = _adapted.reshape(ad, shape) if pure_expand else None
  return fallback(ctx, eqn, invals) if out is None else out


@rule("slice")
def slice_(ctx, eqn, invals):
  (ad,) = invals
  if eqn.params.get("strides") and any(s != 1 for s in eqn.params["strides"]):
    return fallback(ctx, eqn, invals)
  starts = eqn.params["start_indices"]
  sizes = [e - s for s, e in zip(starts, eqn.params["limit_indices"])]
  return _adapted.slice_(ad, bind(eqn, [ad.w]), starts, sizes)


@rule("dynamic_slice")
def dynamic_slice(ctx, eqn, invals):
  ad, *starts = invals
  if not isinstance(ad, Adapted) or any(isinstance(s, Adapted) for s in starts):
    return fallback(ctx, eqn, invals)
  sizes = eqn.params["slice_sizes"]
  # Clamp like XLA does, so the adapters are sliced at the same place as W.
  starts = [jnp.clip(s, 0, full - size) for s, size, full in zip(starts, sizes, ad.w.shape)]
  return _adapted.slice_(ad, bind(eqn, [ad.w, *starts]), starts, sizes)


@rule("copy", "copy_p", "sharding_constraint", "reduce_precision")
def passthrough(ctx, eqn, invals):
  if len(invals) != 1:
    return fallback(ctx, eqn, invals)
  (ad,) = invals
  return Adapted(bind(eqn, [ad.w]), ad.labels, ad.terms, ad.path)
