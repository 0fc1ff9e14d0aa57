"""How a `Bank` routes each example to its adapter: the gather, one-hot,
grouped and sorted-segment paths for ``x·A[index]·B[index]``, the ``auto``
rule, and `routing` to force a path while tracing."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools

import jax
import jax.numpy as jnp

from jlora._errors import LoraError

#
# Four ways to run ``x·A[index]·B[index]`` for a batch routed per example:
#
# * ``gather``: gathers ``A[index]``, ``B[index]`` (one copy per example) and
#   runs one batched ``x·A·B``. Reads ``batch × r × (in + out)`` adapter
#   values; FLOPs those of one adapter. Works for every layout (stacks too).
# * ``onehot``: ``t = x·A_k`` against all ``K`` adapters at once (a matmul
#   batched over ``k``, so the bank's ``(K, in, r)`` is read in place), ``t``
#   masked by ``onehot(index)·scale``, then one matmul with all of ``B``
#   flattened to ``(K·r, out)``. Dense matmuls, no gather, but ``K``× the
#   adapter FLOPs: good while ``K·r`` is small. With ``FUSE_ONEHOT`` it joins
#   the runtime's shared-input fusion instead (q, k, v: one ``x·A`` matmul),
#   which needs each ``A`` transposed to ``(in, K·r)``: a copy of the bank
#   every call, measured slower (0.47× vs 0.68× merged at K 16), so off.
# * ``grouped``: each example's rows scattered into one of ``capacity`` slots
#   of its adapter, ``(K, capacity·rows, in)``, then two matmuls batched over
#   ``k`` against the bank in place, and the results gathered back. Reads the
#   bank once and copies ``x`` once; FLOPs ``capacity·K / batch``× those of
#   one adapter. ``capacity`` is the smallest of ``GROUPED_CAPACITIES``
#   (multiples of the batch's even share ``ceil(batch / K)``) that holds the
#   busiest adapter's examples; a batch busier than the largest takes the
#   gather (``lax.cond``: one compiled function serves every routing). The
#   even share first: on CPU one slot per adapter runs as matrix-vector
#   products, twice as fast per byte of the bank as two slots. A capacity
#   known when tracing (`route`'s ``capacity``) fixes the slots instead, with
#   no ``lax.cond``: on CPU ops inside a branch run slower, and decode at
#   K 16 / 64 gained ≈ 3 % on balanced batches and 1–5 % on random ones
#   (BENCHMARKS.md "Serving", sixth follow-up). Running the even share outside
#   the branch without it gained as much on balanced batches but lost 2–7 %
#   on random ones (one more pass over the bank), so the ladder stays whole.
# * ``segment``: rows sorted by adapter, ``jax.lax.ragged_dot`` against the
#   ``(K, in, r)`` and ``(K, r, out)`` stacks with the group sizes, unsorted.
#   A grouped matmul where one exists (GPU/TPU kernels); XLA:CPU lowers
#   ``ragged_dot`` as ``K`` masked dense dots (its FLOP count is ``K``×).
#
# ``auto`` (the default) picks by device and size; measured on CPU in
# BENCHMARKS.md (decode over a bank, K = 1…256). ``routing(path)`` forces one
# while a function is traced (jit caches what it traced: force the path
# before the first call of a jitted function).

ROUTINGS = ("auto", "gather", "onehot", "grouped", "segment")
_ROUTING = contextvars.ContextVar("jlora_bank_routing", default="auto")
# The ``auto`` rule. First the grouped path, while the rows it copies stay
# few: it copies ``x`` (``rows`` values per example and input) where the
# gather copies the adapters (``r`` per example and input), so grouped while
# ``GROUPED_ROWS_PER_RANK · rows <= r``. Decode (1 row an example) groups: on
# CPU it was the fastest path at K = 16, 64, 256 and tied at K 1
# (BENCHMARKS.md "Serving": 0.83–0.87×, 0.76–0.80×, 0.76–0.77× merged's
# tokens/s over two runs).
GROUPED_ROWS_PER_RANK = 2
# Slots per adapter the grouped path tries, as multiples of the batch's even
# share ``ceil(batch / K)`` (the smallest that holds the busiest adapter).
GROUPED_CAPACITIES = (1, 4)
# Then one-hot, while the bank's width ``K·r`` stays within this many columns
# (measured, BENCHMARKS.md "Serving") ...
ONEHOT_MAX_WIDTH = 128
# ... and while one-hot's extra work stays below the gather's copies. Per
# example and adapter value, one-hot does ``2·(K − 1)·rows`` more FLOPs than
# the gather (``rows``: the example's tokens), which instead copies that value
# once; on CPU a copied value costs about this many FLOPs. So a full-sequence
# forward (128 rows an example) gathers at K 16 (BENCHMARKS.md "Mixed-task
# batches": one-hot there was 2.1× a single adapter). Else the gather.
ONEHOT_FLOPS_PER_COPY = 64


@contextlib.contextmanager
def routing(path: str):
  """Forces how banks route per-example batches while a function is traced.

  Args:
    path: ``"auto"`` (the default rule), ``"gather"``, ``"onehot"``,
      ``"grouped"`` or ``"segment"`` (see the notes above `ROUTINGS` in this module). The
      result is the same up to float rounding; the cost differs.

  Raises:
    LoraError: an unknown path.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> from jlora.methods import bank as bank_lib
    >>> base = {"dense": {"kernel": jnp.eye(3)}}
    >>> trees = [jlora.lorify(base, 1, key=jax.random.key(k)) for k in range(2)]
    >>> trees = [jax.tree.map(lambda x: x + k if x.shape == (1, 3) else x, t)
    ...          for k, t in enumerate(trees)]
    >>> fn = jlora.lora(lambda p, x: x @ p["dense"]["kernel"])
    >>> routed = jlora.route(jlora.stack_adapters(trees), jnp.array([1, 0]))
    >>> outs = []
    >>> for path in ("gather", "onehot", "grouped", "segment"):
    ...   with bank_lib.routing(path):
    ...     outs.append(fn(routed, jnp.ones((2, 3))))
    >>> all(bool(jnp.allclose(outs[0], out)) for out in outs[1:])
    True
  """
  if path not in ROUTINGS:
    raise LoraError([f"path={path!r}; pass one of {ROUTINGS}"],
                    header="jlora: unknown bank routing")
  token = _ROUTING.set(path)
  try:
    yield
  finally:
    _ROUTING.reset(token)


def current_routing() -> str:
  """The routing in force (``"auto"`` unless inside `routing`)."""
  return _ROUTING.get()


@dataclasses.dataclass(frozen=True)
class _Plan:
  """One use of a bank in the layout the onehot and segment paths need."""

  first: tuple[jax.Array, tuple[str, ...]]   # the factor x contracts with, (k, *c, r)
  second: tuple[jax.Array, tuple[str, ...]]  # the other, (k, r, *o)
  x_order: tuple[str, ...]                   # (e, *rest, *c): x's labels, transposed
  rest: tuple[str, ...]                      # x's free labels after e
  outs: tuple[str, ...]                      # the second factor's kept labels o
  out_labels: tuple[str, ...]
  rows_per_example: int
  x_labels: tuple[str, ...]


def plan_of(x, x_labels, fa, fb, out_labels, e) -> _Plan | None:
  """How x meets the bank's two factors, or None (stacks, odd uses: gather)."""
  (a, al), (b, bl) = fa, fb
  k, r = al[0], al[-1]
  if set(al[1:-1]) & set(bl):  # stacked layers (nn.scan): gather handles them
    return None
  if set(al[1:-1]) <= set(x_labels) and not set(bl[2:]) & set(x_labels):
    first, second = (a, al), (b, bl)           # x·A·B (Dense)
  elif set(bl[2:]) <= set(x_labels) and not set(al[1:-1]) & set(x_labels):
    first, second = (b, bl), (a, al)           # x·Bᵀ·Aᵀ (a tied head's attend)
  else:
    return None
  (f1, l1), (f2, l2) = first, second
  c = tuple(l for l in l1 if l not in (k, r))
  o = tuple(l for l in l2 if l not in (k, r))
  rest = tuple(l for l in x_labels if l not in c and l != e)
  if set(out_labels) != {e, *rest, *o} or len(out_labels) != 1 + len(rest) + len(o):
    return None
  f1 = jnp.transpose(f1, [l1.index(l) for l in (k, *c, r)])
  f2 = jnp.transpose(f2, [l2.index(l) for l in (k, r, *o)])
  sizes = dict(zip(x_labels, x.shape))
  rows = 1
  for l in rest:
    rows *= sizes[l]
  return _Plan((f1, (k, *c, r)), (f2, (k, r, *o)), (e, *rest, *c), rest, o,
               tuple(out_labels), rows, tuple(x_labels))


def choose_path(plan: _Plan | None, k: int, r: int) -> str:
  """The path in force: forced by `routing`, else the ``auto`` rule.

  ``plan`` gives the rows per example (``None``: one row, as in decode).
  """
  path = _ROUTING.get()
  if path != "auto":
    return path
  rows = 1 if plan is None else plan.rows_per_example
  if GROUPED_ROWS_PER_RANK * rows <= r:
    return "grouped"
  if k * r <= ONEHOT_MAX_WIDTH and 2 * (k - 1) * rows <= ONEHOT_FLOPS_PER_COPY:
    return "onehot"
  return "gather"


def _rows(plan: _Plan, x):
  """x as (examples, rows per example, contracted)."""
  xt = jnp.transpose(x, [plan.x_labels.index(l) for l in plan.x_order])
  e = xt.shape[0]
  return xt.reshape(e, plan.rows_per_example, -1), xt.shape


def _finish(plan: _Plan, y, xt_shape):
  """(examples, rows, o...) back to the use's output layout."""
  n_rest = len(plan.rest)
  y = y.reshape(xt_shape[:1 + n_rest] + plan.second[0].shape[2:])
  order = (plan.x_order[0], *plan.rest, *plan.outs)
  return jnp.transpose(y, [order.index(l) for l in plan.out_labels])


def onehot_path(plan: _Plan, x, index, scale, k, *, precision, preferred_element_type):
  (f1, _), (f2, _) = plan.first, plan.second
  rows, shape = _rows(plan, x)
  kw = dict(precision=precision, preferred_element_type=preferred_element_type)
  f1 = f1.reshape(k, -1, f1.shape[-1]).astype(rows.dtype)
  e, f, c = rows.shape
  # Batched over k (x broadcast, A read in place: no transposed copy of the bank).
  xk = jnp.broadcast_to(rows.reshape(1, e * f, c), (k, e * f, c))
  t = jnp.einsum("kmc,kcr->kmr", xk, f1, **kw).reshape(k, e, f, -1)
  weight = jax.nn.one_hot(index, k, dtype=jnp.float32) * scale[:, None]
  t = t * weight.T[:, :, None, None].astype(t.dtype)
  f2 = f2.reshape(k, f2.shape[1], -1).astype(t.dtype)
  y = jnp.einsum("kefr,kro->efo", t, f2, **kw)
  return _finish(plan, y, shape)


def grouped_path(plan: _Plan, x, index, scale, k, *, precision, preferred_element_type,
                 capacity: int | None = None):
  """The grouped path; ``capacity``: the slots per adapter, fixed when tracing (`route`'s
  promise: no run-time choice). An example beyond its adapter's slots gets NaNs."""
  (f1, _), (f2, _) = plan.first, plan.second
  rows, shape = _rows(plan, x)
  e, f, c = rows.shape
  f1 = f1.reshape(k, c, f1.shape[-1]).astype(rows.dtype)
  f2 = f2.reshape(k, f2.shape[1], -1).astype(rows.dtype)
  kw = dict(precision=precision, preferred_element_type=preferred_element_type)
  counts = jnp.bincount(index, length=k)
  order = jnp.argsort(index, stable=True)
  rank = jnp.zeros_like(index).at[order].set(  # the example's place among its adapter's
      jnp.arange(e, dtype=index.dtype) - (jnp.cumsum(counts) - counts)[index[order]])

  def grouped(cap):
    def at(rows):
      # the example's slot among its adapter's; beyond them, a distinct slot out of range
      slot = jnp.where(rank < cap, index * cap + rank, k * cap + jnp.arange(e))
      xs = jnp.zeros((k * cap, f, c), rows.dtype).at[slot].set(
          rows, mode="drop", unique_indices=True)
      t = jnp.einsum("kmc,kcr->kmr", xs.reshape(k, cap * f, c), f1, **kw)
      y = jnp.einsum("kmr,kro->kmo", t.astype(f2.dtype), f2, **kw)
      return y.reshape(k * cap, f, -1).at[slot].get(mode="fill", fill_value=jnp.nan)
    return at

  def gathered(rows):  # an adapter has more examples than the largest capacity
    t = jnp.einsum("efc,ecr->efr", rows, f1[index], **kw)
    return jnp.einsum("efr,ero->efo", t.astype(f2.dtype), f2[index], **kw)

  if capacity is not None:
    run = grouped(min(e, capacity))
  else:
    caps = sorted({min(e, m * -(-e // k)) for m in GROUPED_CAPACITIES})
    busiest = jnp.max(counts)
    run = grouped(caps.pop()) if caps[-1] == e else gathered  # e slots hold any batch
    for cap in reversed(caps):  # the smallest capacity that holds the busiest adapter
      run = functools.partial(jax.lax.cond, busiest <= cap, grouped(cap), run)
  y = run(rows)
  y = y * scale[:, None, None].astype(y.dtype)
  return _finish(plan, y, shape)


def segment_path(plan: _Plan, x, index, scale, k, *, precision, preferred_element_type):
  (f1, _), (f2, _) = plan.first, plan.second
  rows, shape = _rows(plan, x)
  e, f, c = rows.shape
  order = jnp.argsort(index, stable=True)
  groups = (jnp.bincount(index, length=k) * f).astype(jnp.int32)
  sorted_rows = rows[order].reshape(e * f, c)
  f1 = f1.reshape(k, c, f1.shape[-1]).astype(rows.dtype)
  kw = dict(precision=precision, preferred_element_type=preferred_element_type)
  t = jax.lax.ragged_dot(sorted_rows, f1, groups, **kw)
  t = t * jnp.repeat(scale[order], f)[:, None].astype(t.dtype)
  f2 = f2.reshape(k, f2.shape[1], -1).astype(t.dtype)
  y = jax.lax.ragged_dot(t, f2, groups, **kw).reshape(e, f, -1)
  y = jnp.zeros_like(y).at[order].set(y)  # unsort
  return _finish(plan, y, shape)


# -----------------------------------------------------------------------------
