"""Rules that re-enter control flow with the same interpreter: ``jit``,
``remat``, ``cond``, ``scan`` and ``while``.

Adapted weights flow into the bodies as they are, so scan-stacked and
rematerialised layers stay factored. Values that leave a loop or a branch
(carries, outputs) are dense.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore
from jax.sharding import Sharding

from jlora._adapted import Adapted, Term
from jlora._runtime.interpret import evaluate
from jlora._runtime.registry import dense, fallback, rule
from jlora.quant import _lazy


def _closed(jaxpr):
  if isinstance(jaxpr, jcore.ClosedJaxpr):
    return jaxpr.jaxpr, jaxpr.consts
  return jaxpr, ()


@rule("jit", "pjit", "closed_call", "core_call")
def call(ctx, eqn, invals):
  """An inner ``jax.jit`` keeps its output shardings and its donation.

  Without either, the inner function is evaluated inline (XLA inlines it
  anyway). With them, it is re-entered as a ``jax.jit`` of the interpreted
  body: non-adapted inputs and plain outputs are constrained to the inner
  jit's shardings, and its donated non-adapted inputs stay donated.
  """
  jaxpr, consts = _closed(eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr"))
  p = eqn.params
  outs_sh = [s if isinstance(s, Sharding) else None for s in p.get("out_shardings", ())]
  ins_sh = [s if isinstance(s, Sharding) else None for s in p.get("in_shardings", ())]
  donated = [bool(d) and not isinstance(v, Adapted)
             for d, v in zip(p.get("donated_invars", ()), invals)]
  if not any(outs_sh) and not any(ins_sh) and not any(donated):
    return evaluate(ctx, jaxpr, consts, invals)

  def constrain(vals, shardings):
    return [v if s is None or isinstance(v, Adapted) else lax.with_sharding_constraint(v, s)
            for v, s in zip(vals, list(shardings) + [None] * (len(vals) - len(shardings)))]

  def body(*args):
    return constrain(evaluate(ctx, jaxpr, consts, constrain(list(args), ins_sh)), outs_sh)

  donate = tuple(i for i, d in enumerate(donated) if d)
  return jax.jit(body, donate_argnums=donate)(*invals)


@rule("remat2", "checkpoint")
def remat(ctx, eqn, invals):
  jaxpr, consts = _closed(eqn.params["jaxpr"])

  def body(*args):
    return dense(ctx, evaluate(ctx, jaxpr, consts, args), eqn.primitive.name)

  return jax.checkpoint(body, prevent_cse=eqn.params.get("prevent_cse", True),
                        policy=eqn.params.get("policy"))(*invals)


@rule("cond")
def cond(ctx, eqn, invals):
  index, *ops = invals
  if isinstance(index, Adapted):
    return fallback(ctx, eqn, invals)
  branches = [
      (lambda *a, _b=b: dense(ctx, evaluate(ctx, _b.jaxpr, _b.consts, a), "cond"))
      for b in eqn.params["branches"]
  ]
  return lax.switch(index, branches, *ops)


def _pack(v: Adapted):
  """An adapted ``xs`` of a scan: the arrays with its leading axis, moved first."""
  lead = v.labels[0]
  sliced, fixed = [_lazy.scannable(v.w)], []
  for t in v.terms:
    for a, l in zip(t.arrays, t.labels):
      if lead in l:
        sliced.append(jnp.moveaxis(a, l.index(lead), 0))
      else:
        fixed.append(a)
  return tuple(sliced), (v, fixed)


def _unpack(x, info) -> Adapted:
  """One iteration's slice of a packed adapted ``xs``."""
  v, fixed = info
  sliced = iter(x[1:])
  fixed = iter(fixed)
  lead = v.labels[0]
  terms = []
  for t in v.terms:
    arrays, labels = [], []
    for l in t.labels:
      if lead in l:  # moveaxis put `lead` first; the rest keep their order
        arrays.append(next(sliced))
        labels.append(tuple(q for q in l if q != lead))
      else:
        arrays.append(next(fixed))
        labels.append(l)
    terms.append(Term(t.method, arrays, labels))
  return Adapted(x[0], v.labels[1:], terms, v.path)


@rule("scan")
def scan(ctx, eqn, invals):
  p = eqn.params
  n_consts, n_carry = p["num_consts"], p["num_carry"]
  consts = invals[:n_consts]
  carry = dense(ctx, invals[n_consts:n_consts + n_carry], "scan carry")
  body_jaxpr: jcore.ClosedJaxpr = p["jaxpr"]
  # An adapted xs is scanned over its leading axis: slice W and every array
  # that has that axis; arrays without it are closed over, whole.
  packed, rebuild = [], []
  for v in invals[n_consts + n_carry:]:
    if isinstance(v, Adapted):
      x, info = _pack(v)
    else:
      x, info = _lazy.scannable(v), None
    packed.append(x)
    rebuild.append(info)
  if ctx.rng is not None:  # each iteration (layer) draws its own dropout masks
    packed.append(jax.random.split(ctx.rng, p["length"]))

  def body(c, x):
    x = list(x)
    inner = ctx.with_rng(x.pop()) if ctx.rng is not None else ctx
    x = [xi if info is None else _unpack(xi, info) for xi, info in zip(x, rebuild)]
    outs = dense(inner, evaluate(inner, body_jaxpr.jaxpr, body_jaxpr.consts,
                                 [*consts, *c, *x]), "scan")
    return outs[:n_carry], outs[n_carry:]

  carry_out, ys = lax.scan(body, carry, packed, length=p["length"],
                           reverse=p["reverse"], unroll=p["unroll"])
  return [*carry_out, *ys]


@rule("while")
def while_(ctx, eqn, invals):
  p = eqn.params
  nc, nb = p["cond_nconsts"], p["body_nconsts"]
  cconsts, bconsts = invals[:nc], invals[nc:nc + nb]
  init = dense(ctx, invals[nc + nb:], "while carry")
  cj, bj = p["cond_jaxpr"], p["body_jaxpr"]
  # With a dropout key, an iteration counter rides in the carry: iteration i
  # draws its masks from fold_in(key, i), as each scan iteration does.
  counted = ctx.rng is not None

  def cond_fn(c):
    c = c[1:] if counted else c
    return evaluate(ctx, cj.jaxpr, cj.consts, [*cconsts, *c])[0]

  def body_fn(c):
    inner = ctx
    if counted:
      i, c = c[0], c[1:]
      inner = ctx.with_rng(jax.random.fold_in(ctx.rng, i))
    outs = dense(inner, evaluate(inner, bj.jaxpr, bj.consts, [*bconsts, *c]), "while")
    return [i + 1, *outs] if counted else outs

  if not counted:
    return lax.while_loop(cond_fn, body_fn, init)
  return lax.while_loop(cond_fn, body_fn, [jnp.zeros((), jnp.int32), *init])[1:]
