"""Shared-input fusion: one down-projection for weights that share ``x``.

q, k and v of an attention layer (gate and up of a gated MLP) multiply the
same x. Their rank-r down-projections x·A are skinny matmuls that XLA:CPU
runs far below peak, three times forward and six times backward (dA = xᵀ·g,
dx += g·Aᵀ). Fusion concatenates the down-projection factors of such a
group and does each of those as one wider matmul (BENCHMARKS.md). The
group is found on the jaxpr (`plan`): dot_generals whose non-weight operand
is the same variable, contracted on the same axes; the shape ops that make
their weights (casts, reshapes) are evaluated early, which is safe because
they depend on the weight alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from jax.extend import core as jcore

from jlora._adapted import Adapted
from jlora._runtime.uses import dot_use, run_dot

WEIGHT_OPS = frozenset({"convert_element_type", "transpose", "reshape", "squeeze",
                        "broadcast_in_dim", "slice", "copy", "copy_p"})


@dataclasses.dataclass(frozen=True)
class Plan:
  groups: dict[int, list[tuple[int, bool]]]  # leader -> [(eqn index, weight is rhs)]
  producer: dict[Any, int]                   # weight-derived var -> its eqn index


def plan(jaxpr: jcore.Jaxpr, adapted: Sequence[Any]) -> Plan | None:
  """The fusable groups of ``jaxpr`` whose weights derive from ``adapted``."""
  if not adapted:
    return None
  weights, producer, groups = set(adapted), {}, {}

  def is_weight(v):
    return isinstance(v, jcore.Var) and v in weights

  for i, eqn in enumerate(jaxpr.eqns):
    name = eqn.primitive.name
    if name in WEIGHT_OPS and len(eqn.invars) == 1 and is_weight(eqn.invars[0]):
      weights.add(eqn.outvars[0])
      producer[eqn.outvars[0]] = i
    elif name == "dot_general" and is_weight(eqn.invars[0]) != is_weight(eqn.invars[1]):
      (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
      rhs = is_weight(eqn.invars[1])
      x = eqn.invars[0] if rhs else eqn.invars[1]
      if lb or not isinstance(x, jcore.Var):
        continue
      key = (x, tuple(lc if rhs else rc), str(eqn.params.get("precision")),
             str(eqn.params.get("preferred_element_type")))
      groups.setdefault(key, []).append((i, rhs))
  groups = {g[0][0]: g for g in groups.values() if len(g) > 1}
  return Plan(groups, producer) if groups else None


def run_fused(ctx, members, read, produce, env) -> set[int]:
  """Evaluates a group's fusable dots together; returns their eqn indices.

  A dot is fusable when its weight carries one method whose `Method.down`
  gives a factor (LoRA without active dropout). Fewer than two: nothing.
  """
  training = ctx.rng is not None
  ready = []
  for eqn, index, rhs in members:
    produce(eqn.invars[1 if rhs else 0])
    ad = read(eqn.invars[1 if rhs else 0])
    if not isinstance(ad, Adapted) or len(ad.terms) != 1:
      continue
    t = ad.terms[0]
    down = t.method.down(t.arrays, t.labels, training=training)
    if down is not None:
      ready.append((eqn, index, rhs, ad, down))
  if len(ready) < 2:
    return set()
  x = read(members[0][0].invars[0 if members[0][2] else 1])
  contracted_dims = sorted(ready[0][0].params["dimension_numbers"][0][0 if ready[0][2] else 1])
  free_dims = [d for d in range(x.ndim) if d not in contracted_dims]
  free_shape = tuple(x.shape[d] for d in free_dims)
  cols, fused = [], []
  for eqn, index, rhs, ad, (factor, f_labels, scale) in ready:
    use, base = dot_use(ctx, eqn, ad, x, rhs)
    contracted = [use.x_labels[d] for d in contracted_dims]
    own = [l for l in f_labels if l not in contracted]
    if (any(l not in f_labels for l in contracted) or
        any(l in use.x_labels or l in use.out_labels for l in own)):
      continue
    perm = [f_labels.index(l) for l in (*contracted, *own)]
    own_shape = tuple(factor.shape[f_labels.index(l)] for l in own)
    cols.append(jnp.transpose(factor, perm).reshape(-1, math.prod(own_shape)).astype(x.dtype))
    fused.append((eqn, index, rhs, ad, use, base, own, own_shape, scale))
  if len(fused) < 2:
    return set()
  p = fused[0][4]
  x2 = jnp.transpose(x, free_dims + contracted_dims).reshape(math.prod(free_shape), -1)
  h = jnp.einsum("mk,kr->mr", x2, jnp.concatenate(cols, axis=1), precision=p.precision,
                 preferred_element_type=p.preferred_element_type)
  start = 0
  for (eqn, index, rhs, ad, use, base, own, own_shape, scale), col in zip(fused, cols):
    t = h[:, start:start + col.shape[1]] * jnp.asarray(scale, h.dtype)
    start += col.shape[1]
    t_labels = tuple(use.x_labels[d] for d in free_dims) + tuple(own)
    use = dataclasses.replace(use, down=(t.reshape(free_shape + own_shape), t_labels))
    out = run_dot(ctx, eqn, ad, x, rhs, use=use, base=base)
    if not isinstance(eqn.outvars[0], jcore.DropVar):
      env[eqn.outvars[0]] = out
  return {index for _, index, *_ in fused}
