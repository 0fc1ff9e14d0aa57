"""LoRA: ``W + s·A·B`` with ``s = alpha / rank`` (Hu et al., 2021)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from jlora import _labels
from jlora._method import ConvUse, DotUse, GatherUse, Method, WeightLabels


@dataclasses.dataclass(frozen=True, repr=False)
class LoRA(Method):
  """Low-rank adaptation of one weight: ``W + (alpha / rank) · A·B``.

  ``A`` has the weight's (stacked and) input axes plus ``rank``; ``B`` has
  ``rank`` plus the output axes. ``B`` starts at zero, so the adapted model
  starts out equal to the base model.

  Attributes:
    rank: the rank ``r`` of the update.
    alpha: the scaling numerator; the update is scaled by ``alpha / rank``
      (or ``alpha / sqrt(rank)`` with ``rslora=True``).
    weight: key of the adapted weight in its mapping.
    stack: leading stacked axes (``nn.scan`` layers), kept in front of A and B.
    inputs: number of input axes of the weight after the stacked ones.
    order: position among the methods on the same weight.
    rslora: use rank-stabilised scaling ``alpha / sqrt(rank)``.
    init: ``"kaiming"`` (PEFT's default: A ~ U(±1/sqrt(fan_in))),
      ``"gaussian"`` (A ~ N(0, 1/rank²)), or ``"pissa"`` (PiSSA, Meng et al.
      2024: ``A = U_r·sqrt(S_r)``, ``B = sqrt(S_r)·V_rᵀ`` from the top-``r``
      SVD ``W = U·S·Vᵀ``, divided by ``sqrt(scale)`` so that ``s·A·B`` is the
      principal part; the weight becomes the residual ``W − s·A·B``, so the
      model is unchanged at init. Save that residual base with the adapters:
      `load_adapters` onto the original base would count the principal part
      twice).
    dropout: PEFT's ``lora_dropout``: inverted dropout on ``x`` before ``A``,
      active only when `lora` gets an ``rng`` (training).
    name: the adapter's name; ``"default"`` keeps the plain ``lora`` keys,
      any other name gives ``lora@name`` keys (several adapters on one weight).
  """

  rank: int
  alpha: float
  weight: str = "kernel"
  stack: int = 0
  inputs: int = 1
  order: int = 0
  rslora: bool = False
  init: str = "kaiming"
  dropout: float = 0.0
  name: str = "default"

  prefix = "lora"
  leaves = ("a", "b")

  @property
  def scale(self) -> float:
    denom = math.sqrt(self.rank) if self.rslora else self.rank
    return float(self.alpha) / denom

  def describe(self) -> str:
    extra = ", rslora" if self.rslora else ""
    return f"LoRA(rank={self.rank}, alpha={self.alpha:g}{extra})"

  def __repr__(self) -> str:
    fields = [f"rank={self.rank}", f"alpha={self.alpha:g}"]
    for f in dataclasses.fields(self)[2:]:
      value = getattr(self, f.name)
      if value != f.default:
        fields.append(f"{f.name}={value!r}")
    return f"LoRA({', '.join(fields)})"

  def shapes(self, weight_shape):
    s, i, o = self.split_shape(weight_shape)
    return (s + i + (self.rank,), s + (self.rank,) + o)

  def create(self, key, weight, *, dtype):
    a_shape, b_shape = self.shapes(weight.shape)
    fan_in = math.prod(self.split_shape(weight.shape)[1])
    if self.init == "kaiming":
      bound = 1.0 / math.sqrt(fan_in)
      a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
    elif self.init == "gaussian":
      a = jax.random.normal(key, a_shape, dtype) / self.rank
    elif self.init == "pissa":
      return self._pissa(weight, dtype)
    else:  # validated by lorify
      raise ValueError(f"unknown init {self.init!r}")
    return (a, jnp.zeros(b_shape, dtype)), weight

  def _pissa(self, weight, dtype):
    s, i, o = self.split_shape(weight.shape)
    n_in, n_out = math.prod(i), math.prod(o)
    w = weight.astype(jnp.float32).reshape((-1, n_in, n_out))
    u, sv, vt = jnp.linalg.svd(w, full_matrices=False)
    root = jnp.sqrt(sv[:, :self.rank] / self.scale)
    a = u[:, :, :self.rank] * root[:, None, :]
    b = root[:, :, None] * vt[:, :self.rank, :]
    residual = w - self.scale * jnp.einsum("sir,sro->sio", a, b)
    a_shape, b_shape = self.shapes(weight.shape)
    return ((a.reshape(a_shape).astype(dtype), b.reshape(b_shape).astype(dtype)),
            residual.reshape(weight.shape).astype(weight.dtype))

  def labels(self, weight: WeightLabels, tag: str):
    r = f"r{tag}"
    return (weight.stack + weight.inputs + (r,), weight.stack + (r,) + weight.outputs)

  def fold(self, w, w_labels, arrays, labels):
    a, b = arrays
    dtype = jnp.promote_types(w.dtype, a.dtype)
    delta = _labels.einsum(w_labels, (a.astype(dtype), labels[0]),
                           (b.astype(dtype), labels[1]))
    return (w.astype(dtype) + delta * jnp.asarray(self.scale, dtype)).astype(w.dtype)

  def down(self, arrays, labels, *, training):
    if self.dropout and training:
      return None  # each use draws its own dropout mask of x
    return arrays[0], labels[0], self.scale

  def dot(self, use: DotUse, arrays, labels, inner):
    if use.down is not None:  # s·x·A was computed with other weights' A (fusion)
      base = inner(use.x)
      delta = _labels.contract(use.out_labels, use.down, (arrays[1], labels[1]),
                               precision=use.precision,
                               preferred_element_type=use.preferred_element_type)
      return base + delta.astype(base.dtype)
    delta = _labels.chain(dropout(use.x, self.dropout, use.rng), use.x_labels, list(zip(arrays, labels)),
                          use.out_labels, scale=self.scale,
                          precision=use.precision,
                          preferred_element_type=use.preferred_element_type)
    base = inner(use.x)
    return base + delta.astype(base.dtype)

  def conv(self, use: ConvUse, arrays, labels, inner):
    (a, al), (b, bl) = zip(arrays, labels)
    o = use.out_feature
    r = next(l for l in bl if l in al)
    if tuple(sorted(bl)) != tuple(sorted((r, o))) or o in al:
      return None
    kernel_labels = tuple(r if l == o else l for l in use.kernel_labels)
    if sorted(kernel_labels) != sorted(al):
      return None
    kernel = jnp.transpose(a, [al.index(l) for l in kernel_labels]).astype(use.x.dtype)
    t = use.bind(dropout(use.x, self.dropout, getattr(use, "rng", None)), kernel)  # the same conv, with rank-many output features
    t = t * jnp.asarray(self.scale, t.dtype)
    t_labels = [_labels.fresh() for _ in range(t.ndim)]
    t_labels[use.out_feature_axis] = r
    out_labels = list(t_labels)
    out_labels[use.out_feature_axis] = o
    delta = _labels.einsum(out_labels, (t, t_labels), (b.astype(t.dtype), bl))
    base = inner(use.x)
    return base + delta.astype(base.dtype)

  def gather(self, use: GatherUse, arrays, labels, inner):
    (a, al), (b, bl) = zip(arrays, labels)
    dn, wl = use.dimension_numbers, use.weight_labels
    if dn.operand_batching_dims:
      return None
    r = next(l for l in bl if l in al)
    b_only = [l for l in bl if l not in al]
    indexed = set(dn.start_index_map) | set(dn.collapsed_slice_dims)
    w_sizes = _labels.sizes_of((b, bl), (a, al))
    for d, l in enumerate(wl):
      if l in b_only and (d in indexed or use.slice_sizes[d] != w_sizes[l]):
        return None
    a_axes = [l for l in wl if l not in b_only] + [r]
    if sorted(a_axes) != sorted(al):
      return None
    n_batch = use.indices.ndim - 1
    n_offset = len(wl) - len(dn.collapsed_slice_dims)
    if tuple(dn.offset_dims) != tuple(range(n_batch, n_batch + n_offset)):
      return None
    pos = {l: k for k, l in enumerate(a_axes)}
    collapsed = tuple(sorted(pos[wl[d]] for d in dn.collapsed_slice_dims))
    new_dn = lax.GatherDimensionNumbers(
        offset_dims=tuple(range(n_batch, n_batch + len(a_axes) - len(collapsed))),
        collapsed_slice_dims=collapsed,
        start_index_map=tuple(pos[wl[d]] for d in dn.start_index_map),
        operand_batching_dims=(), start_indices_batching_dims=())
    slice_sizes = tuple(use.slice_sizes[wl.index(l)] if l != r else w_sizes[r]
                        for l in a_axes)
    operand = jnp.transpose(a, [al.index(l) for l in a_axes])
    t = use.bind(operand, use.indices, dimension_numbers=new_dn, slice_sizes=slice_sizes)
    t = t * jnp.asarray(self.scale, t.dtype)
    batch = [_labels.fresh() for _ in range(n_batch)]
    kept_w = [l for d, l in enumerate(wl) if d not in dn.collapsed_slice_dims]
    t_labels = batch + [l for k, l in enumerate(a_axes) if k not in collapsed]
    delta = _labels.einsum(batch + kept_w, (t, t_labels), (b.astype(t.dtype), bl))
    base = inner()
    return base + delta.astype(base.dtype)


def dropout(x: jax.Array, rate: float, rng) -> jax.Array:
  """Inverted dropout of ``x`` (PEFT's ``lora_dropout``); identity without a key."""
  if not rate or rng is None:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))
