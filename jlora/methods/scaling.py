"""Scaling a weight by a vector over some of its axes, in factored form.

``W' = c ⊙ W_inner`` (``W_inner``: the weight after the methods below). In a
``dot_general`` that is a scaling of the output when ``c``'s axes survive in
the result, or of ``x`` when they are contracted (a weight used through its
transpose, e.g. a tied embedding), so no dense weight is formed at run time.
Used by `IA3` (``c = l``) and `DoRA` (``c = m / ‖W + s·A·B‖``).
"""

from __future__ import annotations

from jlora import _labels
from jlora.methods.base import ConvUse, DotUse, GatherUse


def scaled_dot(use: DotUse, c, c_labels, compute):
  """``x·(c ⊙ W)`` given ``compute(x) = x·W``; None if ``c`` straddles both sides."""
  if all(l in use.out_labels for l in c_labels):
    y = compute(use.x)
    return y * _labels.broadcast_to(c, c_labels, use.out_labels).astype(y.dtype)
  if all(l in use.x_labels for l in c_labels):
    x = use.x * _labels.broadcast_to(c, c_labels, use.x_labels).astype(use.x.dtype)
    return compute(x)
  return None


def scaled_conv(use: ConvUse, c, c_labels, compute):
  """``conv(x, c ⊙ K)`` for ``c`` over the output features only."""
  if tuple(c_labels) != (use.out_feature,):
    return None
  y = compute(use.x)
  shape = [1] * y.ndim
  shape[use.out_feature_axis] = c.shape[0]
  return y * c.reshape(shape).astype(y.dtype)


def scaled_gather(use: GatherUse, c, c_labels, compute):
  """``gather(c ⊙ W, indices)`` for ``c`` over axes that are sliced whole
  (an embedding's features); None otherwise."""
  dn, wl = use.dimension_numbers, use.weight_labels
  if dn.operand_batching_dims:
    return None
  kept = [l for d, l in enumerate(wl) if d not in dn.collapsed_slice_dims]
  n_batch = use.indices.ndim - 1
  if tuple(dn.offset_dims) != tuple(range(n_batch, n_batch + len(kept))):
    return None
  for d, l in enumerate(wl):
    if l in c_labels and (d in dn.start_index_map or d in dn.collapsed_slice_dims
                          or use.slice_sizes[d] != c.shape[c_labels.index(l)]):
      return None
  y = compute()
  out = [_labels.fresh() for _ in range(n_batch)] + kept
  return y * _labels.broadcast_to(c, c_labels, out).astype(y.dtype)


def scale_weight(w, w_labels, c, c_labels):
  return (w * _labels.broadcast_to(c, c_labels, w_labels).astype(w.dtype)).astype(w.dtype)
