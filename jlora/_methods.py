"""More adapter methods: (IA)³ and DoRA, each a `Method` beside the weight.

Both scale the weight by a vector ``c`` over some of its axes,
``W' = c ⊙ W_inner`` (``W_inner``: the weight after the methods below this
one). In a ``dot_general`` that is a scaling of the output when ``c``'s axes
survive in the result, or of ``x`` when they are contracted (a weight used
through its transpose, e.g. a tied embedding), so neither method forms a
dense weight at run time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jlora import _labels, _lorify, _targets
from jlora._errors import Problems
from jlora._lora import LoRA
from jlora._method import DEFAULT_NAME, ConvUse, DotUse, GatherUse, Method, WeightLabels
from jlora._targets import Axes, Targets
from jlora._tree import Path, path_str


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


def _scale_weight(w, w_labels, c, c_labels):
  return (w * _labels.broadcast_to(c, c_labels, w_labels).astype(w.dtype)).astype(w.dtype)


@dataclasses.dataclass(frozen=True)
class IA3(Method):
  """(IA)³ (Liu et al., 2022): a learned vector ``l`` rescaling one weight.

  On the output side (keys, values, attention outputs) ``y = (x·W) ⊙ l``;
  with ``feedforward=True`` on the input side ``y = (x ⊙ l)·W`` (PEFT's
  ``feedforward_modules``). ``l`` starts at one, so the model starts out
  unchanged; merging scales W's output columns (or input rows) by ``l``.

  Unlike PEFT, which rescales the whole layer output including its bias,
  jlora scales ``x·W`` only (the method sees the weight, not the bias); the
  two agree at init and differ by ``(l − 1)·bias`` after training.

  Attributes:
    weight, stack, inputs, order, name: as in `LoRA`.
    feedforward: scale the input axes instead of the output axes.
  """

  weight: str = "kernel"
  stack: int = 0
  inputs: int = 1
  order: int = 0
  feedforward: bool = False
  name: str = DEFAULT_NAME

  prefix = "ia3"
  leaves = ("l",)

  def describe(self) -> str:
    return f"IA3({'input' if self.feedforward else 'output'} side)"

  def shapes(self, weight_shape):
    s, i, o = self.split_shape(weight_shape)
    return (s + (i if self.feedforward else o),)

  def create(self, key, weight, *, dtype):
    return (jnp.ones(self.shapes(weight.shape)[0], dtype),), weight

  def labels(self, weight: WeightLabels, tag: str):
    return (weight.stack + (weight.inputs if self.feedforward else weight.outputs),)

  def fold(self, w, w_labels, arrays, labels):
    return _scale_weight(w, w_labels, arrays[0], labels[0])

  def dot(self, use, arrays, labels, inner):
    return scaled_dot(use, arrays[0], labels[0], inner)

  def conv(self, use, arrays, labels, inner):
    return scaled_conv(use, arrays[0], labels[0], inner)

  def gather(self, use, arrays, labels, inner):
    return scaled_gather(use, arrays[0], labels[0], inner)


@dataclasses.dataclass(frozen=True)
class DoRA(Method):
  """DoRA (Liu et al., 2024): ``W' = m ⊙ (W + s·A·B) / ‖W + s·A·B‖``.

  A LoRA update on the direction plus a learned magnitude ``m`` per output
  (over the stacked and output axes), initialised to ``‖W‖``, the norm over
  the input axes, so the model starts out unchanged. As in the paper and
  PEFT, the norm is a constant for gradients (``stop_gradient``).

  Factored: ``y = (m / ‖·‖) ⊙ (x·W + s·(x·A)·B)``. The norm per output comes
  from ``‖W_o‖² + 2s·(Wᵀ·A)_o·b_o + s²·b_oᵀ·(Aᵀ·A)·b_o``, without a dense
  ``A·B``; it is computed once per call, when the weight enters `lora` (or
  `merge`). Slicing the weight along its *input* axes before using it is not
  supported (the norm runs over the input axes in hand).

  Attributes:
    rank, alpha, rslora, dropout: as in `LoRA` (dropout acts on the LoRA
      path only, as in PEFT).
    weight, stack, inputs, order, name: as in `LoRA`.
  """

  rank: int
  alpha: float
  weight: str = "kernel"
  stack: int = 0
  inputs: int = 1
  order: int = 0
  rslora: bool = False
  dropout: float = 0.0
  name: str = DEFAULT_NAME

  prefix = "dora"
  leaves = ("a", "b", "m")

  @property
  def lora(self) -> LoRA:
    return LoRA(rank=self.rank, alpha=self.alpha, weight=self.weight, stack=self.stack,
                inputs=self.inputs, rslora=self.rslora, dropout=self.dropout)

  @property
  def scale(self) -> float:
    return self.lora.scale

  def describe(self) -> str:
    return f"DoRA(rank={self.rank}, alpha={self.alpha:g})"

  def shapes(self, weight_shape):
    s, _, o = self.split_shape(weight_shape)
    return self.lora.shapes(weight_shape) + (s + o,)

  def create(self, key, weight, *, dtype):
    (a, b), _ = self.lora.create(key, weight, dtype=dtype)
    s, i, _ = self.split_shape(weight.shape)
    axes = tuple(range(len(s), len(s) + len(i)))
    w = weight.astype(jnp.float32)
    m = jnp.sqrt(jnp.sum(w * w, axis=axes))
    return (a, b, m.astype(dtype)), weight

  def labels(self, weight: WeightLabels, tag: str):
    return self.lora.labels(weight, tag) + (weight.stack + weight.outputs,)

  def prepare(self, w_labels, arrays, labels, inner_weight):
    a, b, m = arrays
    al, bl, ml = labels
    w = lax.stop_gradient(inner_weight()).astype(jnp.float32)
    a = lax.stop_gradient(a).astype(jnp.float32)
    b = lax.stop_gradient(b).astype(jnp.float32)
    r = next(l for l in bl if l in al and l not in w_labels)
    r2 = _labels.fresh("r")
    bl2 = tuple(r2 if l == r else l for l in bl)
    rest = tuple(l for l in al if l in ml)  # stacked axes
    s = jnp.float32(self.scale)
    sq = _labels.einsum(ml, (w * w, w_labels))
    wa = _labels.einsum(rest + (r,) + tuple(l for l in ml if l not in rest),
                        (w, w_labels), (a, al))
    cross = _labels.einsum(ml, (wa, rest + (r,) + tuple(l for l in ml if l not in rest)),
                           (b, bl))
    gram = _labels.einsum(rest + (r, r2), (a, al),
                          (a, tuple(r2 if l == r else l for l in al)))
    quad = _labels.einsum(ml, (gram, rest + (r, r2)), (b, bl), (b, bl2))
    norm = jnp.sqrt(jnp.maximum(sq + 2 * s * cross + s * s * quad, 0.0))
    c = m / lax.stop_gradient(norm).astype(m.dtype)
    return (arrays[0], arrays[1], c), labels

  def fold(self, w, w_labels, arrays, labels):
    a, b, c = arrays
    folded = self.lora.fold(w, w_labels, (a, b), labels[:2])
    return _scale_weight(folded, w_labels, c, labels[2])

  def dot(self, use, arrays, labels, inner):
    def compute(x):
      return self.lora.dot(dataclasses.replace(use, x=x), arrays[:2], labels[:2], inner)
    return scaled_dot(use, arrays[2], labels[2], compute)

  def conv(self, use, arrays, labels, inner):
    def compute(x):
      out = self.lora.conv(dataclasses.replace(use, x=x), arrays[:2], labels[:2], inner)
      if out is None:
        raise _NoConv
      return out
    try:
      return scaled_conv(use, arrays[2], labels[2], compute)
    except _NoConv:
      return None


  def gather(self, use, arrays, labels, inner):
    def compute():
      out = self.lora.gather(use, arrays[:2], labels[:2], inner)
      if out is None:
        raise _NoConv
      return out
    try:
      return scaled_gather(use, arrays[2], labels[2], compute)
    except _NoConv:
      return None


class _NoConv(Exception):
  pass


# -----------------------------------------------------------------------------
# Entry points.


def _layout(path: Path, leaf, axes) -> tuple[int, int]:
  where = path_str(path)
  ax = Axes() if axes is None else _targets.per_path(axes, where, name="axes")
  if ax.stack >= leaf.ndim - 1:
    raise ValueError(f"{where}: Axes(stack={ax.stack}) leaves fewer than 2 axes of "
                     f"shape {tuple(leaf.shape)}; lower `stack`")
  inputs = ax.inputs or _targets.infer_inputs(leaf.shape, ax.stack)
  if not 1 <= inputs < leaf.ndim - ax.stack:
    raise ValueError(f"{where}: Axes(inputs={inputs}) does not fit shape "
                     f"{tuple(leaf.shape)} with stack={ax.stack}")
  return ax.stack, inputs


def _matches(feedforward: Targets, path: Path, leaf) -> bool:
  if feedforward is None:
    return False
  if isinstance(feedforward, str):
    feedforward = (feedforward,)
  if hasattr(feedforward, "search"):
    return bool(feedforward.search(path_str(path)))
  if callable(feedforward):
    return bool(feedforward(path_str(path), leaf))
  return len(path) >= 2 and path[-2] in tuple(feedforward)


def ia3(params: Any, *, targets: Targets, feedforward: Targets = (),
        axes: Axes | dict | None = None, trainable: Targets = None,
        name: str = DEFAULT_NAME, dtype=None) -> Any:
  """Adds (IA)³ scaling vectors to the chosen weights (PEFT's ``IA3Config``).

  Every weight that ``targets`` picks gets a vector ``ia3_l`` of ones:
  over its output axes (``y = (x·W) ⊙ l``), or, for the weights that
  ``feedforward`` also picks, over its input axes (``y = (x ⊙ l)·W``). As in
  PEFT, ``feedforward`` must be a subset of ``targets``. PEFT's default for
  BERT is keys, values and the feed-forward down projection, the latter
  scaled on its input.

  Args:
    params: a tree of arrays (may already hold other methods' adapters).
    targets: the weights to adapt, in any form `lorify` accepts.
    feedforward: the targets scaled on the input side: names, a regex or a
      predicate, as ``targets``.
    axes: `Axes` or ``{regex: Axes}`` for stacked or multi-axis weights.
    trainable: leaves to train in full, as in `lorify`.
    name: the adapter's name (``ia3@name`` keys unless ``"default"``).
    dtype: dtype of the vectors (default: the weight's).

  Returns:
    The tree with the vectors added.

  Raises:
    LoraError: listing every problem (targets matching nothing, feedforward
      modules outside targets, a weight that already has (IA)³ vectors).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"k": {"kernel": jnp.ones((4, 6))}, "ff": {"kernel": jnp.ones((6, 4))}}
    >>> p = jlora.ia3(params, targets=("k", "ff"), feedforward=("ff",))
    >>> p["k"]["ia3_l"].shape, p["ff"]["ia3_l"].shape
    ((6,), (6,))
    >>> bool(jnp.all(jlora.merge(p)["k"]["kernel"] == params["k"]["kernel"]))
    True
  """
  pre = Problems("jlora: cannot add IA3 vectors")
  _lorify.check_name(name, pre)
  if isinstance(feedforward, (list, tuple)) and isinstance(targets, (list, tuple)):
    extra = [f for f in feedforward if f not in targets]
    if extra:
      pre.add(f"feedforward modules {extra} are not in targets {list(targets)}; "
              "as in PEFT, feedforward_modules must be a subset of target_modules")
  pre.raise_if_any()

  def make(path: Path, leaf) -> IA3:
    stack, inputs = _layout(path, leaf, axes)
    return IA3(weight=path[-1], stack=stack, inputs=inputs,
               feedforward=_matches(feedforward, path, leaf), name=name)

  return _lorify.add_methods(params, make, key=jax.random.key(0), targets=targets,
                             trainable=trainable, dtype=dtype, what="IA3 vectors")


def dora(params: Any, rank: int | dict, *, key: jax.Array, targets: Targets = None,
         alpha: float | dict | None = None, axes: Axes | dict | None = None,
         trainable: Targets = None, rslora: bool = False, dropout: float = 0.0,
         name: str = DEFAULT_NAME, dtype=None) -> Any:
  """Adds DoRA adapters (``dora_a``, ``dora_b``, magnitude ``dora_m``).

  Same options as `lorify` (``rank``/``alpha``/``axes`` may be
  ``{regex: value}``); ``B`` starts at zero and ``m`` at the weight's norm
  per output, so the model starts out unchanged. See `DoRA`.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"dense": {"kernel": jnp.ones((4, 6))}}
    >>> p = jlora.dora(params, 2, key=jax.random.key(0))
    >>> p["dense"]["dora_m"]  # ‖W‖ over the inputs, per output
    Array([2., 2., 2., 2., 2., 2.], dtype=float32)
    >>> y = jlora.lora(lambda p, x: x @ p["dense"]["kernel"])(p, jnp.ones(4))
    >>> bool(jnp.allclose(y, 4.0))
    True
  """
  pre = Problems("jlora: cannot add DoRA adapters")
  _lorify.check_name(name, pre)
  if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
    pre.add(f"dropout must be a number in [0, 1), got {dropout!r}")
  for field, value, integer in (("rank", rank, True), ("alpha", alpha, False)):
    values = [] if value is None else (
        value.items() if isinstance(value, dict) else [(None, value)])
    for pattern, v in values:
      msg = _targets.check_number(v, field if pattern is None else f"{field}[{pattern!r}]",
                                  integer=integer)
      if msg:
        pre.add(msg)
  pre.raise_if_any()

  def make(path: Path, leaf) -> DoRA:
    where = path_str(path)
    r = _targets.per_path(rank, where, name="rank")
    a = r if alpha is None else _targets.per_path(alpha, where, name="alpha")
    stack, inputs = _layout(path, leaf, axes)
    n_in = math.prod(leaf.shape[stack:stack + inputs])
    n_out = math.prod(leaf.shape[stack + inputs:])
    if r > min(n_in, n_out):
      raise ValueError(f"{where}: rank {r} > min(in={n_in}, out={n_out}); lower the "
                       "rank or exclude this path")
    return DoRA(rank=int(r), alpha=float(a), weight=path[-1], stack=stack, inputs=inputs,
                rslora=rslora, dropout=float(dropout), name=name)

  return _lorify.add_methods(params, make, key=key, targets=targets, trainable=trainable,
                             dtype=dtype, what="DoRA adapters")


__all__: Sequence[str] = ("IA3", "DoRA", "ia3", "dora")
