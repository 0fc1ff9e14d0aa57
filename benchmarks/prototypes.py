"""python -m benchmarks.prototypes [--rounds N] [--profile]

Prototypes of faster LoRA train steps, built *outside* the library: each one
swaps ``jlora.LoRA.dot`` (the factored ``x·W + s·(x·A)·B``) for a variant while
its step is traced, for the common case of a 2-D kernel used as ``x·W`` on
x's last axis (every other use goes to the library's own rule). Compared,
interleaved, against full fine-tuning and the library's jlora step:

* ``flat``:   x reshaped to 2-D ``[T, d]`` before ``x·A`` and ``(x·A)·B``;
* ``vjp``:    ``flat`` plus a ``custom_vjp`` that states the backward:
  ``gt = s·g·Bᵀ``, ``dB = (s·t)ᵀ·g``, ``dA = xᵀ·gt``, ``dx = gt·Aᵀ``, with the
  token-contracting dots (``dA``, ``dB``) written as ``gᵀ``-free
  ``dot_general``\\ s contracting axis 0 of both operands;
* ``concat``: ``x·[W|A]`` as one matmul (forward) and ``[g|gt]·[W|A]ᵀ`` as one
  matmul (dx), under a ``custom_vjp`` (W gets no gradient).

Prints FLOPs, dot count, median step time and ratio to full, and with
``--profile`` the per-class profile of each (see benchmarks/profile_step.py).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics

import jax
import jax.numpy as jnp
import optax
from jax import lax

import jlora
from benchmarks import reference as R
from benchmarks.model import Config

_ORIG = jlora.LoRA.dot


def _simple(use, arrays, labels):
  """(a, b, out label) when this is x[..., in]·W[in, out]; else None."""
  (a, al), (b, bl) = zip(arrays, labels)
  if a.ndim != 2 or b.ndim != 2 or use.x_labels[-1] != al[0]:
    return None
  if tuple(use.out_labels) != tuple(use.x_labels[:-1]) + (bl[1],):
    return None
  return a, b


def _contract0(p, q):
  """pᵀ·q for p [T, m], q [T, n] as one dot_general over axis 0."""
  return lax.dot_general(p, q, (((0,), (0,)), ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _delta(x2, a, b, s):
  return ((x2 @ a) * s) @ b


def _delta_fwd(x2, a, b, s):
  t = (x2 @ a) * s
  return t @ b, (x2, a, b, t)


def _delta_bwd(s, res, g):
  x2, a, b, t = res
  gt = (g @ b.T) * s
  return gt @ a.T, _contract0(x2, gt), _contract0(t, g)


_delta.defvjp(_delta_fwd, _delta_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _concat(x2, w, a, b, s):
  out = w.shape[1]
  y = x2 @ jnp.concatenate([w, a], 1)
  return y[:, :out] + (y[:, out:] * s) @ b


def _concat_fwd(x2, w, a, b, s):
  out = w.shape[1]
  wa = jnp.concatenate([w, a], 1)
  y = x2 @ wa
  t = y[:, out:] * s
  return y[:, :out] + t @ b, (x2, wa, b, t)


def _concat_bwd(s, res, g):
  x2, wa, b, t = res
  out = b.shape[1]
  gt = (g @ b.T) * s
  dx = jnp.concatenate([g, gt], 1) @ wa.T
  return dx, jnp.zeros_like(wa[:, :out]), _contract0(x2, gt), _contract0(t, g)


_concat.defvjp(_concat_fwd, _concat_bwd)


def _dot_flat(self, use, arrays, labels, inner):
  ab = _simple(use, arrays, labels)
  if ab is None:
    return _ORIG(self, use, arrays, labels, inner)
  a, b = ab
  x = use.x
  x2 = x.reshape(-1, x.shape[-1])
  base = inner(x)
  return base + (((x2 @ a) * self.scale) @ b).reshape(base.shape)


def _dot_vjp(self, use, arrays, labels, inner):
  ab = _simple(use, arrays, labels)
  if ab is None:
    return _ORIG(self, use, arrays, labels, inner)
  x = use.x
  base = inner(x)
  return base + _delta(x.reshape(-1, x.shape[-1]), *ab, self.scale).reshape(base.shape)


_W = {}


def _dot_concat(self, use, arrays, labels, inner):
  ab = _simple(use, arrays, labels)
  w = _W.get("w")
  if ab is None or w is None:
    return _ORIG(self, use, arrays, labels, inner)
  x = use.x
  x2 = x.reshape(-1, x.shape[-1])
  y = _concat(x2, w, *ab, self.scale)
  return y.reshape(x.shape[:-1] + (y.shape[-1],))


VARIANTS = {"flat": _dot_flat, "vjp": _dot_vjp, "concat": _dot_concat}


@contextlib.contextmanager
def patched(dot):
  jlora.LoRA.dot = dot
  try:
    yield
  finally:
    jlora.LoRA.dot = _ORIG


def concat_step(s: R.Setup, tx):
  """The jlora step, with the base weight visible to the concat rule.

  ``LoRA.dot`` gets ``inner`` (a closure binding the original dot_general with
  the in-flight weight), not W itself; the prototype recovers W by wrapping
  ``jlora._runtime._rule_dot_general``.
  """
  from jlora import _runtime
  orig_rule = _runtime._rule_dot_general

  def rule(eqn, invals):
    lhs, rhs = invals
    if isinstance(rhs, _runtime.Adapted) and not isinstance(lhs, _runtime.Adapted):
      _W["w"] = rhs.w
      try:
        return orig_rule(eqn, invals)
      finally:
        _W.pop("w", None)
    return orig_rule(eqn, invals)

  return rule, orig_rule


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--rounds", type=int, default=8)
  p.add_argument("--profile", action="store_true")
  p.add_argument("--variants", default="flat,vjp,concat")
  args = p.parse_args(argv)
  from jlora import _runtime
  from benchmarks import profile_step as P

  s = R.build(Config(), R.TARGETS["all"])
  tx = optax.adam(1e-3)
  steps = R.train_steps(s, tx)
  compiled = {}
  for name in ("full", "jlora"):
    fn, a = steps[name]
    compiled[name] = (jax.jit(fn).lower(*a).compile(), a)
  fn, a = steps["jlora"]
  for v in args.variants.split(","):
    rule, orig_rule = concat_step(s, tx)
    _runtime._RULES["dot_general"] = rule
    try:
      with patched(VARIANTS[v]):
        # A fresh function object: jit caches traces by function identity.
        compiled[v] = (jax.jit(lambda *x: fn(*x)).lower(*a).compile(), a)
    finally:
      _runtime._RULES["dot_general"] = orig_rule
  # Same numbers as the library's step (B is non-zero in the setup).
  ref = compiled["jlora"][0](*a)
  for v in args.variants.split(","):
    out = compiled[v][0](*a)
    err = max(float(jnp.max(jnp.abs(x - y))) for x, y in
              zip(jax.tree.leaves(out[0]), jax.tree.leaves(ref[0])))
    print(f"# {v}: max |updated adapters - jlora's| = {err:.2e}, loss {float(out[2]):.6f} "
          f"vs {float(ref[2]):.6f}")

  times = R.interleaved({n: R.jax_call(c, a) for n, (c, a) in compiled.items()}, args.rounds)
  print(f"\n# load {os.getloadavg()[0]:.2f}, {args.rounds} interleaved rounds\n")
  print("| step | GFLOP | dots | fusions | ms (median) | x full | x jlora |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  med = {n: statistics.median(t) for n, t in times.items()}
  for n, (c, _) in compiled.items():
    cost = c.cost_analysis()
    ops = R.op_counts(c.as_text())
    print(f"| {n} | {cost['flops'] / 1e9:.2f} | {ops['dot']} | {ops['fusion']} | "
          f"{med[n] * 1e3:.0f} | {med[n] / med['full']:.3f} | {med[n] / med['jlora']:.3f} |")
  if args.profile:
    for n, (c, a) in compiled.items():
      if n != "full":
        P.report(n, c, a, 2)


if __name__ == "__main__":
  main()
