"""Running unmodified model code with adapters in factored form.

`lora(fn)` traces ``fn`` on the *base* tree to a jaxpr and evaluates that
jaxpr with a small interpreter. Each adapted weight enters the interpreter as
an `Adapted` value: the frozen weight plus its adapter arrays, every axis
labelled. Shape-only operations on the weight (casts, transposes, reshapes,
slices of stacked layers) are applied to the labels and, where needed, to the
adapter arrays. Uses of the weight (``dot_general``, ``conv_general_dilated``,
``gather``) are handed to each method, which computes its factored form
(``x·W + s·(x·A)·B`` for LoRA) without forming ``A·B``. Control flow
(``jit``, ``scan``, ``cond``, ``while``, ``remat``) is re-entered with the same
interpreter, so scan-stacked and rematerialised layers stay factored.

Anything else that touches an adapted weight gets the dense effective weight
(the method's ``fold``) instead: always correct, never silent — the first
such use per weight and primitive emits a `FactoredFallbackWarning`.

The interpreter only runs while JAX traces; under ``jit`` it costs nothing per
step. It relies on public APIs only: ``jax.make_jaxpr``,
``jax.extend.core`` and ``Primitive.bind``.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import math
import warnings
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from jlora import _labels, _structure
from jlora._labels import Labels
from jlora._method import ConvUse, DotUse, GatherUse, Method
from jlora._tree import Path, keypath_to_path, path_str


class FactoredFallbackWarning(UserWarning):
  """A use of an adapted weight ran on the dense merged weight instead."""


_warned: set[tuple[str, str]] = set()


def _warn_fallback(primitive: str, path: Path) -> None:
  key = (primitive, path_str(path))
  if key in _warned:
    return
  _warned.add(key)
  warnings.warn(
      f"jlora: {path_str(path)} is used by `{primitive}`, which has no factored "
      "form; this use runs on the merged weight W + ΔW (correct, but it forms "
      "the dense update). This warning is shown once per weight and primitive.",
      FactoredFallbackWarning, stacklevel=4)


# The PRNG key of the current `lora(fn, rng=key)` call (None: no dropout),
# and how often each weight has been used in this trace, so that every use
# of every weight draws its own dropout mask.
_RNG: contextvars.ContextVar = contextvars.ContextVar("jlora_rng", default=None)
_USES: contextvars.ContextVar = contextvars.ContextVar("jlora_uses", default=None)


def _site_rng(path: Path):
  """A key for one use of the weight at ``path``, or None without a key."""
  rng = _RNG.get()
  if rng is None:
    return None
  uses = _USES.get()
  name = path_str(path)
  n = uses.get(name, 0)
  uses[name] = n + 1
  return jax.random.fold_in(jax.random.fold_in(rng, zlib.crc32(name.encode())), n)


class Term:
  """One method's arrays on a weight in flight, each axis labelled."""

  __slots__ = ("method", "arrays", "labels")

  def __init__(self, method: Method, arrays: Sequence[jax.Array],
               labels: Sequence[Labels]):
    self.method = method
    self.arrays = tuple(arrays)
    self.labels = tuple(tuple(l) for l in labels)


@jax.tree_util.register_pytree_node_class
class Adapted:
  """A frozen weight (possibly reshaped, cast, sliced) plus its adapters."""

  __slots__ = ("w", "labels", "terms", "path")

  def __init__(self, w, labels: Sequence[str], terms: Sequence[Term], path: Path):
    self.w = w
    self.labels = tuple(labels)
    self.terms = tuple(terms)
    self.path = path

  def tree_flatten(self):
    children = (self.w,) + tuple(a for t in self.terms for a in t.arrays)
    aux = (self.labels, tuple((t.method, t.labels) for t in self.terms), self.path)
    return children, aux

  @classmethod
  def tree_unflatten(cls, aux, children):
    labels, metas, path = aux
    w, rest = children[0], list(children[1:])
    terms = []
    for method, arr_labels in metas:
      n = len(arr_labels)
      terms.append(Term(method, rest[:n], arr_labels))
      rest = rest[n:]
    return cls(w, labels, terms, path)

  def with_arrays(self, fn: Callable[[jax.Array, Labels], tuple[jax.Array, Labels]]):
    terms = []
    for t in self.terms:
      pairs = [fn(a, l) for a, l in zip(t.arrays, t.labels)]
      terms.append(Term(t.method, [p[0] for p in pairs], [p[1] for p in pairs]))
    return terms

  def materialize(self) -> jax.Array:
    w = self.w
    for t in self.terms:
      w = t.method.fold(w, self.labels, t.arrays, t.labels)
    return w


def _enter(weight: jax.Array, entry: _structure.Entry) -> Adapted:
  """The in-flight value of one adapted weight, with fresh labels."""
  first = entry.adapters[0].method
  s, i = first.stack, first.inputs
  tag = _labels.fresh("")
  labels = tuple(f"s{k}_{tag}" for k in range(s)) + tuple(
      f"i{k}_{tag}" for k in range(i)) + tuple(
          f"o{k}_{tag}" for k in range(weight.ndim - s - i))
  # The base weight is frozen by definition: no dense gradient is ever formed.
  weight = lax.stop_gradient(weight)
  terms: list[Term] = []
  for n, adapter in enumerate(entry.adapters):
    method = adapter.method
    wl = method.weight_labels(labels)

    def inner_weight(_below=tuple(terms)):
      w = weight
      for t in _below:
        w = t.method.fold(w, labels, t.arrays, t.labels)
      return w

    arrays, arr_labels = method.prepare(labels, adapter.arrays,
                                        method.labels(wl, f"{tag}_{n}"), inner_weight)
    terms.append(Term(method, arrays, arr_labels))
  return Adapted(weight, labels, terms, entry.path)


# ----------------------------------------------------------------------------
# Shape-only operations on an adapted weight.


def _drop_label(array, labels: Labels, label: str):
  if label not in labels:
    return array, labels
  k = labels.index(label)
  return lax.index_in_dim(array, 0, k, keepdims=False), labels[:k] + labels[k + 1:]


def _reshape(ad: Adapted, new_shape: Sequence[int]) -> Adapted | None:
  """Reshape an adapted weight by regrouping labels, or None if impossible."""
  old_shape = ad.w.shape
  # 1. Squeeze size-1 axes away.
  terms = ad.terms
  labels = ad.labels
  ones = [l for l, n in zip(labels, old_shape) if n == 1]
  for one in ones:
    terms = [Term(t.method, *zip(*(_drop_label(a, l, one) for a, l in zip(t.arrays, t.labels))))
             for t in terms]
  old = [(l, n) for l, n in zip(labels, old_shape) if n != 1]
  new = [n for n in new_shape if n != 1]
  # 2. Group the remaining axes by matching cumulative products.
  groups: list[tuple[list[str], list[int]]] = []
  i = j = 0
  while i < len(old) or j < len(new):
    g_old, g_new = [old[i]], [new[j]]
    i, j = i + 1, j + 1
    po, pn = g_old[0][1], g_new[0]
    while po != pn:
      if po < pn:
        g_old.append(old[i]); po *= old[i][1]; i += 1
      else:
        g_new.append(new[j]); pn *= new[j]; j += 1
    groups.append(([l for l, _ in g_old], g_new))
  new_labels: list[str] = []
  for g_labels, g_sizes in groups:
    if len(g_labels) == 1 and len(g_sizes) == 1:
      new_labels.append(g_labels[0])
      continue
    fresh = [_labels.fresh() for _ in g_sizes]
    new_terms = []
    for t in terms:
      arrays, arr_labels = [], []
      for a, l in zip(t.arrays, t.labels):
        present = [x for x in l if x in g_labels]
        if not present:
          arrays.append(a); arr_labels.append(l)
          continue
        if present != g_labels:
          return None  # the group is split across arrays or reordered
        k = l.index(g_labels[0])
        if tuple(l[k:k + len(g_labels)]) != tuple(g_labels):
          return None
        arrays.append(a.reshape(a.shape[:k] + tuple(g_sizes) + a.shape[k + len(g_labels):]))
        arr_labels.append(l[:k] + tuple(fresh) + l[k + len(g_labels):])
      new_terms.append(Term(t.method, arrays, arr_labels))
    terms = new_terms
    new_labels.extend(fresh)
  # 3. Insert the new size-1 axes; each term's first array carries them.
  it = iter(new_labels)
  final_labels = []
  for n in new_shape:
    if n == 1:
      one = _labels.fresh()
      final_labels.append(one)
      terms = [Term(t.method, (t.arrays[0][..., None],) + t.arrays[1:],
                    ((*t.labels[0], one),) + t.labels[1:]) for t in terms]
    else:
      final_labels.append(next(it))
  return Adapted(ad.w.reshape(tuple(new_shape)), final_labels, terms, ad.path)


def _slice(ad: Adapted, w_new, starts: Sequence[Any], sizes: Sequence[int]) -> Adapted:
  """Slice every array along the labels that the weight was sliced on."""
  def one(a, l):
    for label, start, size, full in zip(ad.labels, starts, sizes, ad.w.shape):
      if label in l and size != full:
        a = lax.dynamic_slice_in_dim(a, start, size, l.index(label))
    return a, l
  return Adapted(w_new, ad.labels, ad.with_arrays(one), ad.path)


def _cast(ad: Adapted, w_new, dtype) -> Adapted:
  def one(a, l):
    return (lax.convert_element_type(a, dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a), l
  return Adapted(w_new, ad.labels, ad.with_arrays(one), ad.path)


# ----------------------------------------------------------------------------
# The interpreter.


def _bind(eqn, invals):
  params = eqn.primitive.get_bind_params(eqn.params)
  subfuns = ()
  if isinstance(params, tuple):  # older JAX: (subfuns, params)
    subfuns, params = params
  with eqn.ctx.manager:
    return eqn.primitive.bind(*subfuns, *invals, **params)


def _dense(vals, eqn_name: str):
  out = []
  for v in vals:
    if isinstance(v, Adapted):
      _warn_fallback(eqn_name, v.path)
      v = v.materialize()
    out.append(v)
  return out


def _fallback(eqn, invals):
  return _bind(eqn, _dense(invals, eqn.primitive.name))


def _apply_terms(ad: Adapted, hook: str, use, base: Callable):
  """Composes the methods on ``ad`` around ``base``, innermost first.

  Each method's hook gets ``inner``, the computation of the methods below
  it; the ``x`` a method passes to ``inner`` is the ``use.x`` the next one
  sees (IA3 on the input side scales ``x`` before the inner methods).
  """
  fn = base
  for t in ad.terms:
    def fn(*args, _t=t, _inner=fn):
      use_ = dataclasses.replace(use, x=args[0]) if args else use
      out = getattr(_t.method, hook)(use_, _t.arrays, _t.labels, _inner)
      if out is None:
        raise _Unsupported
      return out
  return fn


class _Unsupported(Exception):
  pass


def _dot_use(eqn, ad: Adapted, x, w_is_rhs: bool):
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
  use = DotUse(x, tuple(x_labels), out_labels, eqn.params.get("precision"),
               eqn.params.get("preferred_element_type"), _site_rng(ad.path))

  def base(x_):
    return _bind(eqn, [x_, ad.w] if w_is_rhs else [ad.w, x_])

  return use, base


def _rule_dot_general(eqn, invals):
  lhs, rhs = invals
  if isinstance(lhs, Adapted) and isinstance(rhs, Adapted):
    return _fallback(eqn, invals)
  w_is_rhs = isinstance(rhs, Adapted)
  ad, x = (rhs, lhs) if w_is_rhs else (lhs, rhs)
  use, base = _dot_use(eqn, ad, x, w_is_rhs)
  try:
    return _apply_terms(ad, "dot", use, base)(x)
  except _Unsupported:
    return _fallback(eqn, invals)


def _rule_conv(eqn, invals):
  x, ad = invals
  if isinstance(x, Adapted) or not isinstance(ad, Adapted):
    return _fallback(eqn, invals)
  params = eqn.params
  if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
    return _fallback(eqn, invals)
  dn = params["dimension_numbers"]
  use = ConvUse(x, lambda x_, k_: _bind(eqn, [x_, k_]), ad.labels,
                ad.labels[dn.rhs_spec[0]], dn.out_spec[1], _site_rng(ad.path))
  try:
    return _apply_terms(ad, "conv", use, lambda x_: _bind(eqn, [x_, ad.w]))(x)
  except _Unsupported:
    return _fallback(eqn, invals)


def _rule_gather(eqn, invals):
  ad, indices = invals
  if not isinstance(ad, Adapted) or isinstance(indices, Adapted):
    return _fallback(eqn, invals)

  def bind(operand, idx, **overrides):
    params = dict(eqn.params, **overrides)
    return eqn.primitive.bind(operand, idx, **params)

  use = GatherUse(indices, ad.labels, eqn.params["dimension_numbers"],
                  tuple(eqn.params["slice_sizes"]), bind)
  try:
    return _apply_terms(ad, "gather", use, lambda: _bind(eqn, [ad.w, indices]))()
  except _Unsupported:
    return _fallback(eqn, invals)


def _rule_convert(eqn, invals):
  (ad,) = invals
  dtype = eqn.params["new_dtype"]
  if not jnp.issubdtype(dtype, jnp.floating):
    return _fallback(eqn, invals)
  return _cast(ad, _bind(eqn, [ad.w]), dtype)


def _rule_transpose(eqn, invals):
  (ad,) = invals
  perm = eqn.params["permutation"]
  return Adapted(_bind(eqn, [ad.w]), [ad.labels[p] for p in perm], ad.terms, ad.path)


def _rule_reshape(eqn, invals):
  ad = invals[0]
  if len(invals) != 1 or eqn.params.get("dimensions") is not None:
    return _fallback(eqn, invals)
  out = _reshape(ad, eqn.params["new_sizes"])
  return _fallback(eqn, invals) if out is None else out


def _rule_squeeze(eqn, invals):
  (ad,) = invals
  dims = set(d % ad.w.ndim for d in eqn.params["dimensions"])
  new_shape = [n for d, n in enumerate(ad.w.shape) if d not in dims]
  out = _reshape(ad, new_shape)
  return _fallback(eqn, invals) if out is None else out


def _rule_broadcast_in_dim(eqn, invals):
  ad = invals[0]
  shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
  pure_expand = (len(invals) == 1 and list(dims) == sorted(dims)
                 and all(shape[d] == n for d, n in zip(dims, ad.w.shape))
                 and all(n == 1 for d, n in enumerate(shape) if d not in dims))
  out = _reshape(ad, shape) if pure_expand else None
  return _fallback(eqn, invals) if out is None else out


def _rule_slice(eqn, invals):
  (ad,) = invals
  if eqn.params.get("strides") and any(s != 1 for s in eqn.params["strides"]):
    return _fallback(eqn, invals)
  starts = eqn.params["start_indices"]
  sizes = [e - s for s, e in zip(starts, eqn.params["limit_indices"])]
  return _slice(ad, _bind(eqn, [ad.w]), starts, sizes)


def _rule_dynamic_slice(eqn, invals):
  ad, *starts = invals
  if not isinstance(ad, Adapted) or any(isinstance(s, Adapted) for s in starts):
    return _fallback(eqn, invals)
  sizes = eqn.params["slice_sizes"]
  # Clamp like XLA does, so the adapters are sliced at the same place as W.
  starts = [jnp.clip(s, 0, full - size) for s, size, full in zip(starts, sizes, ad.w.shape)]
  return _slice(ad, _bind(eqn, [ad.w, *starts]), starts, sizes)


def _rule_passthrough(eqn, invals):
  if len(invals) != 1:
    return _fallback(eqn, invals)
  (ad,) = invals
  return Adapted(_bind(eqn, [ad.w]), ad.labels, ad.terms, ad.path)


def _rule_call(eqn, invals):
  closed = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
  if isinstance(closed, jcore.ClosedJaxpr):
    return _eval(closed.jaxpr, closed.consts, invals)
  return _eval(closed, (), invals)


def _rule_remat(eqn, invals):
  jaxpr = eqn.params["jaxpr"]
  consts = jaxpr.consts if isinstance(jaxpr, jcore.ClosedJaxpr) else ()
  jaxpr = jaxpr.jaxpr if isinstance(jaxpr, jcore.ClosedJaxpr) else jaxpr

  def body(*args):
    return _dense(_eval(jaxpr, consts, args), eqn.primitive.name)

  return jax.checkpoint(body, prevent_cse=eqn.params.get("prevent_cse", True),
                        policy=eqn.params.get("policy"))(*invals)


def _rule_cond(eqn, invals):
  index, *ops = invals
  if isinstance(index, Adapted):
    return _fallback(eqn, invals)
  branches = [
      (lambda *a, _b=b: _dense(_eval(_b.jaxpr, _b.consts, a), "cond"))
      for b in eqn.params["branches"]
  ]
  return lax.switch(index, branches, *ops)


def _rule_scan(eqn, invals):
  p = eqn.params
  n_consts, n_carry = p["num_consts"], p["num_carry"]
  consts = invals[:n_consts]
  carry = _dense(invals[n_consts:n_consts + n_carry], "scan carry")
  xs = list(invals[n_consts + n_carry:])
  body_jaxpr: jcore.ClosedJaxpr = p["jaxpr"]
  # An adapted xs is scanned over its leading axis: slice W and every array
  # that has that axis; arrays without it are closed over, whole.
  packed, rebuild = [], []
  for v in xs:
    if not isinstance(v, Adapted):
      packed.append(v)
      rebuild.append(None)
      continue
    lead = v.labels[0]
    sliced, fixed = [v.w], []
    for t in v.terms:
      for a, l in zip(t.arrays, t.labels):
        if lead in l:
          sliced.append(jnp.moveaxis(a, l.index(lead), 0))
        else:
          fixed.append(a)
    packed.append(tuple(sliced))
    rebuild.append((v, fixed))

  def unpack(x, info):
    v, fixed = info
    sliced = iter(x[1:])
    fixed = iter(fixed)
    lead = v.labels[0]
    terms = []
    for t in v.terms:
      arrays, labels = [], []
      for l in t.labels:
        if lead in l:
          arrays.append(next(sliced))
          labels.append(tuple(q for q in l if q != lead))
          # moveaxis put `lead` first; the rest keep their order
        else:
          arrays.append(next(fixed))
          labels.append(l)
      terms.append(Term(t.method, arrays, labels))
    return Adapted(x[0], v.labels[1:], terms, v.path)

  rng = _RNG.get()
  if rng is not None:  # each iteration (layer) draws its own dropout masks
    packed.append(jax.random.split(rng, p["length"]))

  def body(c, x):
    x = list(x)
    token = _RNG.set(x.pop()) if rng is not None else None
    try:
      x = [xi if info is None else unpack(xi, info) for xi, info in zip(x, rebuild)]
      outs = _dense(_eval(body_jaxpr.jaxpr, body_jaxpr.consts, [*consts, *c, *x]), "scan")
    finally:
      if token is not None:
        _RNG.reset(token)
    return outs[:n_carry], outs[n_carry:]

  carry_out, ys = lax.scan(body, carry, packed, length=p["length"],
                           reverse=p["reverse"], unroll=p["unroll"])
  return [*carry_out, *ys]


def _rule_while(eqn, invals):
  p = eqn.params
  nc, nb = p["cond_nconsts"], p["body_nconsts"]
  cconsts, bconsts = invals[:nc], invals[nc:nc + nb]
  init = _dense(invals[nc + nb:], "while carry")
  cj, bj = p["cond_jaxpr"], p["body_jaxpr"]

  def cond(c):
    return _eval(cj.jaxpr, cj.consts, [*cconsts, *c])[0]

  def body(c):
    return _dense(_eval(bj.jaxpr, bj.consts, [*bconsts, *c]), "while")

  return lax.while_loop(cond, body, init)


_RULES: dict[str, Callable] = {
    "dot_general": _rule_dot_general,
    "conv_general_dilated": _rule_conv,
    "gather": _rule_gather,
    "convert_element_type": _rule_convert,
    "transpose": _rule_transpose,
    "reshape": _rule_reshape,
    "squeeze": _rule_squeeze,
    "broadcast_in_dim": _rule_broadcast_in_dim,
    "slice": _rule_slice,
    "dynamic_slice": _rule_dynamic_slice,
    "copy": _rule_passthrough,
    "copy_p": _rule_passthrough,
    "sharding_constraint": _rule_passthrough,
    "reduce_precision": _rule_passthrough,
    "jit": _rule_call,
    "pjit": _rule_call,
    "closed_call": _rule_call,
    "core_call": _rule_call,
    "remat2": _rule_remat,
    "checkpoint": _rule_remat,
    "cond": _rule_cond,
    "scan": _rule_scan,
    "while": _rule_while,
}


def _eval(jaxpr: jcore.Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
  env: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  def run(eqn):
    invals = [read(v) for v in eqn.invars]
    if any(isinstance(v, Adapted) for v in invals):
      rule = _RULES.get(eqn.primitive.name, _fallback)
      outs = rule(eqn, invals)
    else:
      outs = _bind(eqn, invals)
    if not eqn.primitive.multiple_results:
      outs = [outs]
    for v, val in zip(eqn.outvars, outs):
      if not isinstance(v, jcore.DropVar):
        env[v] = val

  for v, val in zip(jaxpr.constvars, consts):
    env[v] = val
  for v, val in zip(jaxpr.invars, args):
    env[v] = val
  plan = _plan(jaxpr, [v for v, val in env.items() if isinstance(val, Adapted)])
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
      done.update(_run_fused([(jaxpr.eqns[j], j, rhs) for j, rhs in plan.groups[i]],
                             read, produce, env))
      if i in done:
        continue
    run(eqn)
  return [read(v) for v in jaxpr.outvars]


# ----------------------------------------------------------------------------
# Shared-input fusion.
#
# q, k and v of an attention layer (gate and up of a gated MLP) multiply the
# same x. Their rank-r down-projections x·A are skinny matmuls that XLA:CPU
# runs far below peak, three times forward and six times backward (dA = xᵀ·g,
# dx += g·Aᵀ). Fusion concatenates the down-projection factors of such a
# group and does each of those as one wider matmul (BENCHMARKS.md). The
# group is found on the jaxpr: dot_generals whose non-weight operand is the
# same variable, contracted on the same axes; the shape ops that make their
# weights (casts, reshapes) are evaluated early, which is safe because they
# depend on the weight alone.

_FUSE: contextvars.ContextVar = contextvars.ContextVar("jlora_fuse", default=True)
_WEIGHT_OPS = frozenset({"convert_element_type", "transpose", "reshape", "squeeze",
                         "broadcast_in_dim", "slice", "copy", "copy_p"})


@dataclasses.dataclass(frozen=True)
class _Plan:
  groups: dict[int, list[tuple[int, bool]]]  # leader -> [(eqn index, weight is rhs)]
  producer: dict[Any, int]                   # weight-derived var -> its eqn index


def _plan(jaxpr: jcore.Jaxpr, adapted: Sequence[Any]) -> _Plan | None:
  if not adapted or not _FUSE.get():
    return None
  weights, producer, groups = set(adapted), {}, {}

  def is_weight(v):
    return isinstance(v, jcore.Var) and v in weights

  for i, eqn in enumerate(jaxpr.eqns):
    name = eqn.primitive.name
    if name in _WEIGHT_OPS and len(eqn.invars) == 1 and is_weight(eqn.invars[0]):
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
  return _Plan(groups, producer) if groups else None


def _run_fused(members, read, produce, env) -> set[int]:
  """Evaluates a group's fusable dots together; returns their eqn indices.

  A dot is fusable when its weight carries one method whose `Method.down`
  gives a factor (LoRA without active dropout). Fewer than two: nothing.
  """
  training = _RNG.get() is not None
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
    use, base = _dot_use(eqn, ad, x, rhs)
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
    try:
      out = _apply_terms(ad, "dot", use, base)(x)
    except _Unsupported:
      out = _fallback(eqn, [x, ad] if rhs else [ad, x])
    if not isinstance(eqn.outvars[0], jcore.DropVar):
      env[eqn.outvars[0]] = out
  return {index for _, index, *_ in fused}


def _is_dynamic(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def lora(fn: Callable, *, rng: jax.Array | None = None, fuse: bool = True) -> Callable:
  """Makes ``fn`` run with the adapters in a jlora tree, in factored form.

  ``fn``'s first argument is a parameter tree (anything `lorify` accepts:
  Linen variables, a pure-dict NNX state, a dict of arrays). The returned
  function takes the same arguments, except that the tree may hold adapters;
  it computes what ``fn`` would compute on `merge`\\ (tree), but as
  ``x·W + s·(x·A)·B``: it never forms ``A·B`` and never a gradient for the
  frozen ``W`` (the base weights of adapted leaves are held under
  ``stop_gradient``).

  Works under ``jit``, ``grad`` and ``vmap``, through ``nn.scan``, ``nn.remat``,
  ``lax.cond``/``while_loop``, bf16 casts, multi-axis kernels, ``Conv``,
  ``Embed`` lookups and tied-embedding ``attend``. Uses with no factored form
  run on the merged weight and warn once (`FactoredFallbackWarning`).

  Array arguments (``jax.Array``/``numpy``) are traced; every other argument
  (flags, strings, ``rngs`` dicts of keys are arrays) is passed through as a
  static Python value.

  Adapter dropout (``LoRA(dropout=p)``, PEFT's ``lora_dropout``) is active
  only when ``rng`` is given: build the wrapper inside the training step with
  that step's key, ``jlora.lora(apply, rng=step_key)(params, x)``. Each use of
  each weight (and each layer of a scanned stack) draws its own mask from
  ``rng``; without ``rng`` (evaluation) the adapter path is deterministic.

  Args:
    fn: a function whose first positional argument is the parameter tree.
    rng: a PRNG key for adapter dropout, or None for none.
    fuse: compute the down-projections ``x·A`` of weights that share their
      input (q, k, v; gate, up) as one matmul. The result is the same up to
      float rounding; ``False`` gives one skinny matmul per weight.

  Returns:
    A function with ``fn``'s signature that accepts a jlora tree.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora
    >>> model = nn.Dense(3)
    >>> x = jnp.ones((2, 4))
    >>> params = model.init(jax.random.key(0), x)
    >>> lorified = jlora.lorify(params, 2, key=jax.random.key(1))
    >>> y = jlora.lora(model.apply)(lorified, x)
    >>> bool(jnp.allclose(y, model.apply(params, x)))  # B = 0 at init
    True
  """

  @functools.wraps(fn)
  def wrapped(params, *args, **kwargs):
    base, entries, _ = _structure.read(params, what="the tree passed to lora(fn)")
    base_leaves_kp, base_def = jax.tree_util.tree_flatten_with_path(base)
    base_leaves = [v for _, v in base_leaves_kp]
    paths = [keypath_to_path(kp) for kp, _ in base_leaves_kp]
    arg_leaves, arg_def = jax.tree_util.tree_flatten((args, kwargs))
    dynamic = [_is_dynamic(a) for a in arg_leaves]
    dyn_vals = [a for a, d in zip(arg_leaves, dynamic) if d]

    def flat_fn(base_leaves, dyn_vals):
      it = iter(dyn_vals)
      leaves = [next(it) if d else a for a, d in zip(arg_leaves, dynamic)]
      a, kw = jax.tree_util.tree_unflatten(arg_def, leaves)
      return fn(jax.tree_util.tree_unflatten(base_def, base_leaves), *a, **kw)

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(base_leaves, dyn_vals)
    invals = [_enter(v, entries[p]) if p in entries else v
              for p, v in zip(paths, base_leaves)]
    tokens = _RNG.set(rng), _USES.set({}), _FUSE.set(fuse)
    try:
      outs = _eval(closed.jaxpr, closed.consts, [*invals, *dyn_vals])
      outs = _dense(outs, "output")
    finally:
      _RNG.reset(tokens[0])
      _USES.reset(tokens[1])
      _FUSE.reset(tokens[2])
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

  return wrapped
