"""Rules for the uses of an adapted weight: ``dot_general``, ``conv`` and
``gather``, each handed to the methods on the weight in order.

Each method's hook (`Method.dot`, `Method.conv`, `Method.gather`) gets the
labelled use and ``inner``, the computation of the methods below it; a hook
that returns None has no factored form there, and the use runs on the dense
merged weight instead (`registry.fallback`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
from jax import lax

from jlora import _labels
from jlora._adapted import Adapted
from jlora._runtime.registry import bind, fallback, rule
from jlora.methods.base import ConvUse, DotUse, GatherUse
from jlora.quant import _lazy


class Unsupported(Exception):
  """A method has no factored form for this use."""


def apply_terms(ad: Adapted, hook: str, use, base: Callable):
  """Composes the methods on ``ad`` around ``base``, innermost first.

  Each method's hook gets ``inner``, the computation of the methods below
  it; the ``x`` a method passes to ``inner`` is the ``use.x`` the next one
  sees (IA3 on the input side scales ``x`` before the inner methods).
  """
  fn = base
  for k, t in enumerate(ad.terms):
    def fn(*args, _t=t, _inner=fn, _outer=k > 0):
      use_ = dataclasses.replace(use, x=args[0]) if args else use
      if _outer and getattr(use_, "weight", None) is not None:
        use_ = dataclasses.replace(use_, weight=None)  # its inner is not x·W
      out = getattr(_t.method, hook)(use_, _t.arrays, _t.labels, _inner)
      if out is None:
        raise Unsupported
      return out
  return fn


def dot_use(ctx, eqn, ad: Adapted, x, w_is_rhs: bool):
  """The labelled `DotUse` of ``dot_general(x, W)`` and the plain ``x·W``."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  xc, wc, xb, wb = (lc, rc, lb, rb) if w_is_rhs else (rc, lc, rb, lb)
  x_labels = [_labels.fresh() for _ in range(x.ndim)]
  for xd, wd in zip((*xc, *xb), (*wc, *wb)):
    x_labels[xd] = ad.labels[wd]
  batch = [ad.labels[d] for d in wb]
  x_free = [l for d, l in enumerate(x_labels) if d not in xc and d not in xb]
  w_free = [l for d, l in enumerate(ad.labels) if d not in wc and d not in wb]
  out_labels = tuple(batch + (x_free + w_free if w_is_rhs else w_free + x_free))
  plain = isinstance(ad.w, jax.Array) and not wb  # not quantized, no batch axes
  use = DotUse(x, tuple(x_labels), out_labels, eqn.params.get("precision"),
               eqn.params.get("preferred_element_type"), ctx.site_rng(ad.path),
               weight=(ad.w, ad.labels) if plain else None)

  def base(x_):
    return bind(eqn, [x_, ad.w] if w_is_rhs else [ad.w, x_])

  return use, base


def run_dot(ctx, eqn, ad: Adapted, x, w_is_rhs: bool, use=None, base=None):
  """``dot_general`` of ``x`` and ``ad`` through its methods (or dense)."""
  if use is None:
    use, base = dot_use(ctx, eqn, ad, x, w_is_rhs)
  try:
    return apply_terms(ad, "dot", use, base)(x)
  except Unsupported:
    return fallback(ctx, eqn, [x, ad] if w_is_rhs else [ad, x])


@rule("dot_general")
def dot_general(ctx, eqn, invals):
  lhs, rhs = invals
  if isinstance(lhs, Adapted) and isinstance(rhs, Adapted):
    return fallback(ctx, eqn, invals)
  w_is_rhs = isinstance(rhs, Adapted)
  ad, x = (rhs, lhs) if w_is_rhs else (lhs, rhs)
  return run_dot(ctx, eqn, ad, x, w_is_rhs)


@rule("conv_general_dilated")
def conv(ctx, eqn, invals):
  x, ad = invals
  if isinstance(x, Adapted) or not isinstance(ad, Adapted):
    return fallback(ctx, eqn, invals)
  params = eqn.params
  if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
    return fallback(ctx, eqn, invals)
  dn = params["dimension_numbers"]
  use = ConvUse(x, lambda x_, k_: bind(eqn, [x_, k_]), ad.labels,
                ad.labels[dn.rhs_spec[0]], dn.out_spec[1], ctx.site_rng(ad.path))
  try:
    return apply_terms(ad, "conv", use, lambda x_: bind(eqn, [x_, ad.w]))(x)
  except Unsupported:
    return fallback(ctx, eqn, invals)


def _whole_slices_unindexed(eqn, shape, indices):
  """The gather's params and indices with every axis that is sliced whole
  dropped from ``start_index_map`` (its start can only be 0).

  ``jax.vmap(lambda t: W[t])(ids)`` indexes both axes of ``W``, the feature
  axis with a full-size slice; without it the gather is an ``Embed`` lookup.
  """
  p = eqn.params
  dn, sizes = p["dimension_numbers"], p["slice_sizes"]
  modes = (lax.GatherScatterMode.CLIP, lax.GatherScatterMode.PROMISE_IN_BOUNDS)
  whole = [k for k, d in enumerate(dn.start_index_map)
           if sizes[d] == shape[d] and d not in dn.collapsed_slice_dims]
  keep = [k for k in range(len(dn.start_index_map)) if k not in whole]
  if not whole or not keep or dn.operand_batching_dims or p.get("mode") not in modes:
    return dict(p), indices
  dn = dn._replace(start_index_map=tuple(dn.start_index_map[k] for k in keep))
  return dict(p, dimension_numbers=dn), indices[..., keep]


@rule("gather")
def gather(ctx, eqn, invals):
  ad, indices = invals
  if not isinstance(ad, Adapted) or isinstance(indices, Adapted):
    return fallback(ctx, eqn, invals)
  params, indices = _whole_slices_unindexed(eqn, ad.w.shape, indices)

  def bind_with(operand, idx, **overrides):  # a quantized operand: at its use
    return _lazy.bind_params(eqn.primitive, dict(params, **overrides), [operand, idx])

  use = GatherUse(indices, ad.labels, params["dimension_numbers"],
                  tuple(params["slice_sizes"]), bind_with)
  try:
    return apply_terms(ad, "gather", use, lambda: bind_with(ad.w, indices))()
  except Unsupported:
    return fallback(ctx, eqn, invals)
