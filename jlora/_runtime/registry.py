"""The rule registry, and what every rule shares: binding and falling back.

A rule handles one primitive applied to at least one adapted weight::

  @rule("transpose")
  def transpose(ctx, eqn, invals): ...

It returns the outputs (one value, or a list for a primitive with multiple
results); a primitive with no rule runs on the dense merged weight
(`fallback`), correctly, with a `FactoredFallbackWarning`. Adding a
primitive means one decorated function in the module of its kind
(`shapes`, `uses`, `control`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from jlora._adapted import Adapted
from jlora._runtime.context import Context
from jlora.quant import _lazy

Rule = Callable[[Context, Any, list], Any]
RULES: dict[str, Rule] = {}


def rule(*names: str) -> Callable[[Rule], Rule]:
  """Registers the decorated function as the rule of the named primitives."""
  def register(fn: Rule) -> Rule:
    for name in names:
      if name in RULES:
        raise RuntimeError(f"jlora: two rules for primitive {name!r}")
      RULES[name] = fn
    return fn
  return register


def bind(eqn, invals: Sequence[Any]):
  """Runs ``eqn``'s primitive on plain values, as the jaxpr would.

  Quantized weights (`jlora.quant._lazy.Lazy`) are dequantized here, at
  their point of use, or the shape-only operation on them is recorded.
  """
  if any(isinstance(v, _lazy.Lazy) for v in invals):
    return _lazy.bind(eqn, invals, bind)
  params = eqn.primitive.get_bind_params(eqn.params)
  subfuns = ()
  if isinstance(params, tuple):  # older JAX: (subfuns, params)
    subfuns, params = params
  with eqn.ctx.manager:
    return eqn.primitive.bind(*subfuns, *invals, **params)


def dense(ctx: Context, vals: Sequence[Any], what: str) -> list[Any]:
  """``vals`` with every adapted weight folded into a dense one (warns)."""
  out = []
  for v in vals:
    if isinstance(v, Adapted):
      ctx.warn_fallback(what, v.path)
      v = v.materialize()
    out.append(_lazy.materialize(v))
  return out


def fallback(ctx: Context, eqn, invals):
  """``eqn`` on the dense merged weights: correct for any primitive."""
  return bind(eqn, dense(ctx, invals, eqn.primitive.name))
