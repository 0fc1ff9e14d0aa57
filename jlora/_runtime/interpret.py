"""The interpreter: evaluates a jaxpr in which some values are adapted weights.

Equations whose inputs hold no adapted weight are bound as they are; the
others go to the rule registered for their primitive (`registry.RULES`), or
run on the dense merged weight when there is none. With fusion on, groups
of dots that share their input (`fusion.plan`) are evaluated together when
the first of them comes up.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jax.extend import core as jcore

from jlora._adapted import Adapted
from jlora._runtime import fusion
from jlora._runtime.context import Context
from jlora._runtime.registry import RULES, bind, fallback
from jlora.quant import _lazy


def evaluate(ctx: Context, jaxpr: jcore.Jaxpr, consts: Sequence[Any],
             args: Sequence[Any]) -> list[Any]:
  """The outputs of ``jaxpr`` on ``consts`` and ``args`` (some `Adapted`)."""
  env: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  def run(eqn):
    invals = [read(v) for v in eqn.invars]
    if any(isinstance(v, Adapted) for v in invals) or _lazy.wants_rule(eqn, invals):
      outs = RULES.get(eqn.primitive.name, fallback)(ctx, eqn, invals)
    else:
      outs = bind(eqn, invals)
    if not eqn.primitive.multiple_results:
      outs = [outs]
    for v, val in zip(eqn.outvars, outs):
      if not isinstance(v, jcore.DropVar):
        env[v] = val

  for v, val in zip(jaxpr.constvars, consts):
    env[v] = val
  for v, val in zip(jaxpr.invars, args):
    env[v] = val
  plan = None
  if ctx.fuse:
    plan = fusion.plan(jaxpr, [v for v, val in env.items() if isinstance(val, Adapted)])
  done: set[int] = set()

  def produce(var):  # evaluates, ahead of its turn, the shape ops that make a weight
    if isinstance(var, jcore.Literal) or var in env:
      return
    k = plan.producer[var]
    produce(jaxpr.eqns[k].invars[0])
    run(jaxpr.eqns[k])
    done.add(k)

  for i, eqn in enumerate(jaxpr.eqns):
    if i in done:
      continue
    if plan is not None and i in plan.groups:
      members = [(jaxpr.eqns[j], j, rhs) for j, rhs in plan.groups[i]]
      done.update(fusion.run_fused(ctx, members, read, produce, env))
      if i in done:
        continue
    run(eqn)
  return [read(v) for v in jaxpr.outvars]
