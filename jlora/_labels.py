"""Named-axis arithmetic used by the runtime and by every method.

In flight, an adapted weight and each of its adapter arrays carry one *label*
per axis. Two arrays share a label exactly when they share that axis: LoRA's
``A`` carries the weight's input labels plus a rank label, ``B`` the rank
label plus the weight's output labels. Every contraction is then an einsum
over labels, which keeps the rules independent of axis order and layout.
"""

from __future__ import annotations

import functools
import itertools
import math
import string
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

Labels = tuple[str, ...]
_LETTERS = string.ascii_letters
_counter = itertools.count()


def fresh(prefix: str = "t") -> str:
  """A label not used anywhere else."""
  return f"{prefix}{next(_counter)}"


def sizes_of(*operands: tuple[jnp.ndarray, Sequence[str]]) -> dict[str, int]:
  sizes: dict[str, int] = {}
  for array, labels in operands:
    for label, size in zip(labels, array.shape):
      sizes[label] = size
  return sizes


def einsum(out: Sequence[str], *operands: tuple[jnp.ndarray, Sequence[str]],
           precision=None, preferred_element_type=None) -> jnp.ndarray:
  """``jnp.einsum`` with labels instead of letters."""
  letters: dict[str, str] = {}

  def sub(labels: Sequence[str]) -> str:
    return "".join(letters.setdefault(l, _LETTERS[len(letters)]) for l in labels)

  spec = ",".join(sub(l) for _, l in operands) + "->" + sub(out)
  return jnp.einsum(spec, *(a for a, _ in operands), precision=precision,
                    preferred_element_type=preferred_element_type)


def _kept(first: Sequence[str], second: Sequence[str], later: Sequence[str],
          out: Sequence[str]) -> Labels:
  need = set(later) | set(out)
  return tuple(dict.fromkeys(l for l in (*first, *second) if l in need))


def chain(x: jnp.ndarray, x_labels: Sequence[str],
          factors: Sequence[tuple[jnp.ndarray, Sequence[str]]],
          out: Sequence[str], *, scale: float = 1.0, precision=None,
          preferred_element_type=None) -> jnp.ndarray:
  """Contracts ``x`` with two factors one at a time, never forming their product.

  The order (``x·F1`` first or ``x·F2`` first) is chosen to minimise FLOPs,
  so ``x·A·B`` for a Dense layer and ``x·Bᵀ·Aᵀ`` for a tied-embedding
  ``attend`` both stay rank-``r`` skinny. ``scale`` multiplies the rank-sized
  intermediate, the cheapest place for it.
  """
  x, x_labels, out, unflatten = _collapse_free(x, x_labels, factors, out)
  (f1, l1), (f2, l2) = factors
  sizes = sizes_of((x, x_labels), (f1, l1), (f2, l2))

  def cost(first_labels, later_labels):
    mid = _kept(x_labels, first_labels, later_labels, out)
    first = math.prod(sizes[l] for l in set(x_labels) | set(first_labels))
    second = math.prod(sizes[l] for l in set(mid) | set(later_labels))
    return first + second, mid

  c12, mid12 = cost(l1, l2)
  c21, mid21 = cost(l2, l1)
  if c21 < c12:
    (f1, l1), (f2, l2), mid = (f2, l2), (f1, l1), mid21
  else:
    mid = mid12
  kw = dict(precision=precision, preferred_element_type=preferred_element_type)
  f1 = f1.astype(x.dtype) if f1.dtype != x.dtype else f1
  f2 = f2.astype(x.dtype) if f2.dtype != x.dtype else f2
  t = einsum(mid, (x, x_labels), (f1, l1), **kw)
  if scale != 1.0:
    t = t * jnp.asarray(scale, t.dtype)
  if t.dtype != f2.dtype:
    f2 = f2.astype(t.dtype)
  return unflatten(einsum(out, (t, mid), (f2, l2), **kw))


def contract(out: Sequence[str], t: tuple[jnp.ndarray, Sequence[str]],
             factor: tuple[jnp.ndarray, Sequence[str]], *, precision=None,
             preferred_element_type=None) -> jnp.ndarray:
  """``t·factor`` in ``out`` layout, with ``t``'s free axes merged as in `chain`."""
  (t, t_labels), (f, f_labels) = t, factor
  t, t_labels, out, unflatten = _collapse_free(t, t_labels, [factor], out)
  f = f.astype(t.dtype) if f.dtype != t.dtype else f
  return unflatten(einsum(out, (t, t_labels), (f, f_labels), precision=precision,
                          preferred_element_type=preferred_element_type))


def _collapse_free(x, x_labels, factors, out):
  """Merges x's run of axes that no factor has (batch, tokens) into one.

  With one free axis, every skinny matmul and each of its transposes under
  ``grad`` (``dA = xᵀ·g``, ``dB = tᵀ·g``) contracts a single axis; with two
  (``[batch, seq, d]``) the gradient dots contract two, which XLA:CPU lowers
  with a transposed copy of the activation or cotangent (measured: 29% of the
  reference LoRA step, see BENCHMARKS.md).
  """
  carried = {l for _, labels in factors for l in labels}
  free = tuple(l for l in x_labels if l not in carried)
  x_labels, out = tuple(x_labels), tuple(out)
  identity = (x, x_labels, out, lambda y: y)
  if len(free) < 2 or free[0] not in out:
    return identity
  k, j, n = x_labels.index(free[0]), out.index(free[0]), len(free)
  if x_labels[k:k + n] != free or out[j:j + n] != free:
    return identity
  merged = fresh("m")
  free_shape = x.shape[k:k + n]
  x = x.reshape(x.shape[:k] + (-1,) + x.shape[k + n:])
  return (x, x_labels[:k] + (merged,) + x_labels[k + n:],
          out[:j] + (merged,) + out[j + n:],
          lambda y: y.reshape(y.shape[:j] + free_shape + y.shape[j + 1:]))


def fold_into_matmul(x: jnp.ndarray, x_labels: Sequence[str],
                     w: jnp.ndarray, w_labels: Sequence[str],
                     b: jnp.ndarray, b_labels: Sequence[str], out: Sequence[str], *,
                     t: tuple[jnp.ndarray, Sequence[str]] | None = None,
                     a: tuple[jnp.ndarray, Sequence[str]] | None = None,
                     x_for_a: jnp.ndarray | None = None, scale: float = 1.0,
                     precision=None, preferred_element_type=None) -> jnp.ndarray | None:
  """``x·W + t·B`` in ``out`` layout, computed as one matmul ``[x | t]·[W ; B]``.

  ``t`` is given (labels: x's free ones, then the rank), or is
  ``scale·x_for_a·A`` (``x_for_a`` defaults to ``x``; A has x's contracted
  labels plus the rank). The sum is then the output of a dot, like the plain
  ``x·W``: XLA cannot re-add it inside each consumer (as it does with
  ``x·W + t·B`` written as an ``add``), so under ``grad`` only the sum is kept
  for the backward, not both halves. Differentiation goes through a
  ``custom_jvp`` whose tangent is ``dx·W + x·dW + dt·B + t·dB``: the
  concatenated operands are never saved, and a frozen ``W`` gets no dense
  gradient. Without differentiation, the primal is the two dots and an add.

  Returns None where the layout does not fit: W with batch axes, or A's
  input axes not the ones x contracts (a tied embedding's ``attend``).
  """
  x_labels, w_labels, b_labels, out = (tuple(x_labels), tuple(w_labels),
                                       tuple(b_labels), tuple(out))
  contracted = tuple(l for l in x_labels if l in w_labels)
  free = tuple(l for l in x_labels if l not in w_labels)
  outputs = tuple(l for l in w_labels if l not in x_labels)
  rank = tuple(l for l in b_labels if l not in outputs)
  if (not contracted or not rank or len(contracted) + len(outputs) != len(w_labels)
      or set(out) != set(free) | set(outputs) or len(out) != len(free) + len(outputs)
      or set(b_labels) != set(rank) | set(outputs) or x.dtype != w.dtype):
    return None
  if t is None:
    if a is None:
      return None
    a_arr, a_labels = a
    if set(a_labels) != set(contracted) | set(rank) or len(a_labels) != len(contracted) + len(rank):
      return None
  else:
    t_arr, t_labels = t
    if tuple(sorted(t_labels)) != tuple(sorted(free + rank)):
      return None
  sizes = sizes_of((x, x_labels), (w, w_labels), (b, b_labels))
  m = math.prod(sizes[l] for l in free)
  k = math.prod(sizes[l] for l in contracted)
  r = math.prod(sizes[l] for l in rank)
  n = math.prod(sizes[l] for l in outputs)

  def flat(array, labels, order, shape):
    perm = [tuple(labels).index(l) for l in order]
    if perm != list(range(len(perm))):
      array = jnp.transpose(array, perm)
    return array.reshape(shape)

  x2 = flat(x, x_labels, free + contracted, (m, k))
  if t is None:
    xa = x2 if x_for_a is None else flat(x_for_a, x_labels, free + contracted, (m, k))
    a2 = flat(a_arr.astype(x.dtype), a_labels, contracted + rank, (k, r))
    t2 = lax.dot_general(xa, a2, (((1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=preferred_element_type)
    if scale != 1.0:
      t2 = t2 * jnp.asarray(scale, t2.dtype)
  else:
    t2 = flat(t_arr, t_labels, free + rank, (m, r))
  w2 = flat(w, w_labels, contracted + outputs, (k, n))
  b2 = flat(b.astype(w.dtype), b_labels, rank + outputs, (r, n))
  # The weight's axes first when out starts with them (W as the dot's lhs).
  weight_first = out[0] in outputs
  y = _stacked_matmul(x2, t2.astype(x.dtype), w2, b2, weight_first, precision,
                      preferred_element_type)
  order = outputs + free if weight_first else free + outputs
  y = y.reshape(tuple(sizes[l] for l in order))
  perm = [order.index(l) for l in out]
  return y if perm == list(range(len(perm))) else jnp.transpose(y, perm)


def _matmul(p, q, weight_first, precision, preferred):
  """``p·q`` for ``p`` [m, k], ``q`` [k, n]: [m, n], or [n, m] if weight_first."""
  if weight_first:
    return lax.dot_general(q, p, (((0,), (1,)), ((), ())), precision=precision,
                           preferred_element_type=preferred)
  return lax.dot_general(p, q, (((1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=preferred)


def _one_matmul(x, t, w, b, weight_first, precision, preferred):
  return _matmul(jnp.concatenate([x, t], axis=1), jnp.concatenate([w, b], axis=0),
                 weight_first, precision, preferred)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6))
def _stacked_matmul(x, t, w, b, weight_first, precision, preferred):
  """``x·w + t·b``; under differentiation as one matmul ``[x | t]·[w ; b]``."""
  return (_matmul(x, w, weight_first, precision, preferred)
          + _matmul(t, b, weight_first, precision, preferred))


@functools.partial(_stacked_matmul.defjvp, symbolic_zeros=True)
def _stacked_matmul_jvp(weight_first, precision, preferred, primals, tangents):
  x, t, w, b = primals
  y = _one_matmul(x, t, w, b, weight_first, precision, preferred)
  terms = [_matmul(p, q, weight_first, precision, preferred)
           for p, q in ((tangents[0], w), (x, tangents[2]), (tangents[1], b),
                        (t, tangents[3]))
           if not (isinstance(p, SymbolicZero) or isinstance(q, SymbolicZero))]
  tangent = functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(y)
  return y, tangent


def broadcast_to(array: jnp.ndarray, labels: Sequence[str],
                 target: Sequence[str]) -> jnp.ndarray:
  """Transposes and expands ``array`` so it broadcasts against ``target``."""
  present = [l for l in target if l in labels]
  array = jnp.transpose(array, [list(labels).index(l) for l in present])
  shape = [array.shape[present.index(l)] if l in present else 1 for l in target]
  return array.reshape(shape)
