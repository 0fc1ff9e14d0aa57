"""A quantized weight in flight in `jlora.lora`'s interpreter.

`Lazy` is a `Quantized` leaf plus the shape-only operations the traced code
applied to the weight since it entered (casts, transposes, reshapes, slices),
still to be applied to the dequantized values. It is dequantized only at a
point of use, any other primitive that reads it (``dot_general``,
``conv_general_dilated``, ``gather``, ...), and that use runs under
``jax.checkpoint`` together with the dequantization, so that a backward pass
dequantizes again instead of keeping a full-precision copy as a residual.

A ``gather`` of whole rows from a weight whose blocks run along the rows
(an ``Embed`` lookup) gathers the quantized rows first and dequantizes only
those.

Control flow re-enters with the `Lazy` as it is: ``lax.scan`` slices its
children along the leading axis like any pytree (see `jlora.quant.Quantized`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora.quant._array import Quantized
from jlora.quant._formats import scales

# Single-operand primitives that only move values of the weight around: they
# are recorded, and applied after dequantization at the point of use.
SHAPE_OPS = frozenset({"convert_element_type", "transpose", "reshape", "squeeze",
                       "broadcast_in_dim", "slice", "copy", "copy_p",
                       "reduce_precision", "sharding_constraint"})
# Primitives whose rule re-enters the interpreter with the Lazy value as it is.
CONTROL = frozenset({"jit", "pjit", "closed_call", "core_call", "remat2", "checkpoint",
                     "cond", "scan", "while"})


class _Op:
  """One recorded operation: ``fn``, the shape and dtype it produces, its kind."""

  __slots__ = ("fn", "shape", "dtype", "kind")

  def __init__(self, fn: Callable[[jax.Array], jax.Array], shape, dtype, kind: str):
    self.fn, self.shape, self.dtype, self.kind = fn, tuple(shape), jnp.dtype(dtype), kind


@jax.tree_util.register_pytree_node_class
class Lazy:
  """A `Quantized` weight and the operations applied to it, not yet dequantized."""

  __slots__ = ("q", "ops")

  def __init__(self, q: Quantized, ops: Sequence[_Op] = ()):
    self.q = q
    self.ops = tuple(ops)

  def tree_flatten(self):
    return (self.q,), self.ops

  @classmethod
  def tree_unflatten(cls, ops, children):
    return cls(children[0], ops)

  @property
  def shape(self) -> tuple[int, ...]:
    return self.ops[-1].shape if self.ops else self.q.shape

  @property
  def dtype(self):
    return self.ops[-1].dtype if self.ops else self.q.dtype

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def then(self, fn, shape, dtype, kind) -> Lazy:
    return Lazy(self.q, self.ops + (_Op(fn, shape, dtype, kind),))

  def reshape(self, shape) -> Lazy:
    shape = tuple(shape)
    return self.then(lambda w: w.reshape(shape), shape, self.dtype, "reshape")

  def materialize(self) -> jax.Array:
    """The dequantized weight with every recorded operation applied."""
    return apply_ops(self.q, self.ops)

  def __repr__(self):
    return f"Lazy({self.q!r}, ops={len(self.ops)})"


CASTS = frozenset({"convert_element_type", "copy", "copy_p"})


def apply_ops(q: Quantized, ops: Sequence[_Op]) -> jax.Array:
  """Dequantizes (straight to the compute dtype when the first op is a cast,
  as in a bf16 model's ``promote_dtype``), then applies the rest."""
  ops = list(ops)
  if ops and ops[0].kind == "convert_element_type" and jnp.issubdtype(ops[0].dtype, jnp.floating):
    w = q.dequantize(ops.pop(0).dtype)
  else:
    w = q.dequantize()
  for op in ops:
    w = op.fn(w)
  return w


def stop_gradient(v: Any) -> Any:
  return jax.tree.map(lax.stop_gradient, v) if isinstance(v, Lazy) else lax.stop_gradient(v)


def materialize(v: Any) -> Any:
  """``v`` itself, or the dequantized weight when it is a `Lazy`."""
  return v.materialize() if isinstance(v, Lazy) else v


def wants_rule(eqn, invals: Sequence[Any]) -> bool:
  """Whether a control-flow rule should see the `Lazy` values of ``invals``."""
  return eqn.primitive.name in CONTROL and any(isinstance(v, Lazy) for v in invals)


class _Bound:
  """A primitive with its parameters, standing in for a jaxpr equation."""

  def __init__(self, primitive, params):
    self.primitive, self.params = primitive, params


def bind_params(primitive, params: dict, invals: Sequence[Any]) -> Any:
  """``primitive.bind(*invals, **params)`` where some of ``invals`` are `Lazy`
  (for rules that rebind a primitive with changed parameters)."""
  if not any(isinstance(v, Lazy) for v in invals):
    return primitive.bind(*invals, **params)
  return bind(_Bound(primitive, params), invals,
              lambda e, vals: primitive.bind(*vals, **e.params))


def bind(eqn, invals: Sequence[Any], plain_bind: Callable) -> Any:
  """``eqn`` on values of which some are `Lazy`.

  A shape-only operation on the weight is recorded; anything else is a use,
  run with the dequantization under ``jax.checkpoint``.
  """
  name = eqn.primitive.name
  if (name in SHAPE_OPS and len(invals) == 1 and not eqn.primitive.multiple_results
      and hasattr(eqn, "outvars")):
    aval = eqn.outvars[0].aval
    return invals[0].then(lambda w: plain_bind(eqn, [w]), aval.shape, aval.dtype, name)
  if name == "gather" and isinstance(invals[0], Lazy) and not isinstance(invals[1], Lazy):
    rows = _gather_rows(eqn, invals[0], invals[1])
    if rows is not None:
      return rows
  lazy_at = [i for i, v in enumerate(invals) if isinstance(v, Lazy)]
  array_at = [i for i, v in enumerate(invals)
              if not isinstance(v, Lazy) and isinstance(v, (jax.Array, np.ndarray))]

  def use(arrays, lazies):
    vals = list(invals)
    for i, v in zip(array_at, arrays):
      vals[i] = v
    for i, v in zip(lazy_at, lazies):
      vals[i] = v.materialize()
    return plain_bind(eqn, vals)

  return recomputed(use, [invals[i] for i in array_at], [invals[i] for i in lazy_at])


def _zero_cotangent(x):
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, jax.dtypes.float0)


def _dependency(values) -> Any:
  """The first non-empty plain numeric array among ``values``, or None."""
  for v in jax.tree.leaves(values):
    if (isinstance(v, (jax.Array, np.ndarray)) and v.size
        and jnp.dtype(v.dtype).kind in "biuf" and jnp.dtype(v.dtype).itemsize in (1, 2, 4, 8)):
      return v
  return None


def after(dep: Any, lazies: Any) -> Any:
  """``lazies``, available only once ``dep`` is: their stored arrays go
  through a ``lax.cond`` on a predicate of ``dep`` that is always true
  (``bits | 1 != 0``) but that XLA cannot evaluate early, so no part of the
  dequantization that reads them can be scheduled before ``dep`` exists.
  (It copies the packed arrays, a seventh of the float weight for NF4.)"""
  leaves, treedef = jax.tree.flatten(lazies)
  if dep is None or not leaves:
    return lazies
  first = jnp.ravel(dep)[0]
  width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[jnp.dtype(first.dtype).itemsize]
  bits = first.astype(jnp.uint8) if first.dtype == jnp.bool_ else \
      lax.bitcast_convert_type(first, width)
  pred = (bits | 1) != 0
  leaves = lax.cond(pred, lambda a: a, lambda a: [jnp.zeros_like(x) for x in a], leaves)
  return jax.tree.unflatten(treedef, leaves)


def recomputed(use: Callable, arrays: list, lazies: list):
  """``use(arrays, lazies)``, dequantizing in the forward and again in the
  backward pass, never keeping the dequantized weight in between.

  ``jax.checkpoint`` alone is not enough: a dequantization depends only on
  the weight's stored arrays, so XLA (on CPU, which drops optimization
  barriers before scheduling) may run every layer's at the start of the step
  and hold them all. Here each one waits (`after`) for the value that
  arrives just before its use: the activations in the forward pass, the
  incoming cotangent in the backward pass. The quantized weights get zero
  cotangents (they are frozen).
  """
  @jax.custom_vjp
  def run(arrays, lazies):
    return use(arrays, after(_dependency(arrays), lazies))

  def fwd(arrays, lazies):
    return run(arrays, lazies), (arrays, lazies)

  def bwd(res, g):
    arrays, lazies = res
    lazies = after(_dependency(g), lazies)
    _, vjp = jax.vjp(lambda a: use(a, lazies), arrays)
    (d_arrays,) = vjp(g)
    return d_arrays, jax.tree.map(_zero_cotangent, lazies)

  run.defvjp(fwd, bwd)
  return run(arrays, lazies)


def _gather_rows(eqn, v: Lazy, indices) -> jax.Array | None:
  """An ``Embed`` lookup (whole rows of a 2-D table) from the quantized rows.

  Only when the blocks run along the rows (``axis=-1``) and the recorded
  operations are casts: each child is gathered with the same indices, and
  only the gathered rows are dequantized.
  """
  q = v.q
  dn = eqn.params["dimension_numbers"]
  if (q.ndim != 2 or q.axis != -1 or any(op.kind not in CASTS for op in v.ops)
      or tuple(eqn.params["slice_sizes"]) != (1, q.shape[1])
      or tuple(dn.collapsed_slice_dims) != (0,) or tuple(dn.start_index_map) != (0,)
      or getattr(dn, "operand_batching_dims", ()) or indices.shape[-1:] != (1,)):
    return None
  batch = indices.ndim - 1
  if tuple(dn.offset_dims) != (batch,):
    return None

  def take(child):
    tail = child.shape[1:]
    child_dn = lax.GatherDimensionNumbers(
        offset_dims=tuple(range(batch, batch + len(tail))), collapsed_slice_dims=(0,),
        start_index_map=(0,))
    return lax.gather(child, indices, child_dn, (1, *tail),
                      mode=eqn.params["mode"], indices_are_sorted=eqn.params["indices_are_sorted"],
                      unique_indices=eqn.params["unique_indices"])

  def rows(q):
    arrays = dict(q.arrays)
    if "scale_mean" in arrays:  # double quant: the (small) scales first, then rows
      arrays = {"codes": arrays["codes"], "scale": scales(arrays, q.spec.main)}
    picked = Quantized({k: take(a) for k, a in arrays.items()}, q.format,
                       q.logical_dtype, q.block_size, q.axis)
    w = picked.dequantize()
    for op in v.ops:  # casts only (checked above): elementwise, any shape
      w = op.fn(w) if op.kind != "convert_element_type" else w.astype(op.dtype)
    return w

  return recomputed(lambda _, lazies: rows(lazies[0]), [indices], [q])


def enter(v: Any) -> Any:
  """The interpreter's value for a tree leaf: a `Lazy` for a `Quantized` one."""
  return Lazy(v) if isinstance(v, Quantized) else v


def scannable(v: Any) -> Any:
  """``v`` ready to be ``lax.scan``'s ``xs``: a `Lazy` with no pending
  operations slices per layer as it is; one with operations (recorded on the
  whole stack) is dequantized first."""
  if isinstance(v, Lazy) and v.ops:
    return v.materialize()
  return v
