"""The interface every adapter method implements.

A method instance is a frozen dataclass stored in the parameter tree beside
the weight it adapts (``params[...]["lora"] = LoRA(rank=8, alpha=16)``). It is
registered as a *static* pytree node: it has no leaves, so ``jax.tree.map``,
optax and ``jit`` carry it along untouched, while every jlora function can read
the rank, alpha and layout straight from the tree.

Its arrays are ordinary leaves in the same mapping, named
``f"{prefix}_{leaf}"`` (``lora_a``, ``lora_b``) for a ``kernel`` or
``embedding`` weight and ``f"{weight}_{prefix}_{leaf}"`` for a weight with any
other name. A method with a ``name`` other than ``"default"`` (a *named
adapter*) uses ``f"{prefix}@{name}"`` in place of the prefix:
``lora@task1``, ``lora@task1_a``, ``lora@task1_b``.

A method supplies a few hooks, all in terms of labelled axes (see
`jlora._labels`):

* ``shapes`` / ``create``: the adapter arrays for a weight.
* ``labels``: the label of each adapter axis, given the weight's labels.
* ``prepare`` (optional): turns the stored arrays into the arrays in flight,
  once per call, when the weight enters the runtime or `merge` (DoRA turns
  its magnitude into ``m / ‖W + s·A·B‖`` here).
* ``fold``: the dense effective weight; used by `merge` and as the runtime's
  fallback.
* ``dot`` / ``conv`` / ``gather``: the factored form of a use of the weight.
  Returning ``None`` means "not supported here"; the runtime then falls back
  to ``fold``, correctly, and warns once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax

from jlora._labels import Labels

STANDARD_WEIGHTS = ("kernel", "embedding")
DEFAULT_NAME = "default"  # the adapter name that keeps the plain prefix


@dataclasses.dataclass(frozen=True)
class WeightLabels:
  """The labels of one weight's axes, grouped by role."""

  stack: Labels
  inputs: Labels
  outputs: Labels

  @property
  def all(self) -> Labels:
    return self.stack + self.inputs + self.outputs


@dataclasses.dataclass(frozen=True)
class DotUse:
  """A ``dot_general`` of ``x`` with the adapted weight, in labelled form."""

  x: jax.Array
  x_labels: Labels
  out_labels: Labels
  precision: Any
  preferred_element_type: Any
  rng: Any = None  # a PRNG key for this use when `lora(fn, rng=key)` got one
  # ``(t, t_labels)``: ``x`` already contracted with this method's `Method.down`
  # factor and scaled, computed once for all weights that share ``x`` (labels:
  # x's free labels, then the factor's own). None: the method computes it.
  down: Any = None


@dataclasses.dataclass(frozen=True)
class ConvUse:
  """A ``conv_general_dilated`` with the adapted weight as the kernel."""

  x: jax.Array
  bind: Callable[[jax.Array, jax.Array], jax.Array]  # the original conv
  kernel_labels: Labels   # labels of the weight, in kernel axis order
  out_feature: str        # label of the kernel's output-feature axis
  out_feature_axis: int   # where the output features sit in the result
  rng: Any = None         # a PRNG key for this use (adapter dropout), or None


@dataclasses.dataclass(frozen=True)
class GatherUse:
  """A ``gather`` (an embedding lookup) from the adapted weight."""

  indices: jax.Array
  weight_labels: Labels
  dimension_numbers: Any
  slice_sizes: tuple[int, ...]
  bind: Callable[..., jax.Array]  # bind(operand, indices, **param_overrides)


class Method:
  """Base class for adapter methods; subclasses are frozen dataclasses.

  Attributes every method has (dataclass fields declared by subclasses):
    weight: key of the adapted weight in its mapping, e.g. ``"kernel"``.
    stack: number of leading stacked (scan/layer) axes of the weight.
    inputs: number of input axes after the stacked ones; the rest are outputs.
    order: position of this method among those on the same weight; methods
      apply in increasing order.
  """

  prefix: ClassVar[str]
  leaves: ClassVar[tuple[str, ...]]

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    if "prefix" in cls.__dict__:
      jax.tree_util.register_static(cls)

  # -- naming -----------------------------------------------------------
  @property
  def adapter_name(self) -> str:
    return getattr(self, "name", DEFAULT_NAME)

  @property
  def tag(self) -> str:
    """``prefix``, or ``prefix@name`` for a named adapter."""
    name = self.adapter_name
    return self.prefix if name == DEFAULT_NAME else f"{self.prefix}@{name}"

  @property
  def spec_key(self) -> str:
    return self.tag if self.weight in STANDARD_WEIGHTS else f"{self.weight}_{self.tag}"

  def leaf_key(self, leaf: str) -> str:
    return f"{self.spec_key}_{leaf}"

  @property
  def leaf_keys(self) -> tuple[str, ...]:
    return tuple(self.leaf_key(l) for l in self.leaves)

  @property
  def trainable_leaves(self) -> tuple[str, ...]:
    return self.leaves

  # -- layout -----------------------------------------------------------
  def weight_labels(self, labels: Sequence[str]) -> WeightLabels:
    s, i = self.stack, self.inputs
    labels = tuple(labels)
    return WeightLabels(labels[:s], labels[s:s + i], labels[s + i:])

  def split_shape(self, shape: Sequence[int]):
    s, i = self.stack, self.inputs
    shape = tuple(shape)
    return shape[:s], shape[s:s + i], shape[s + i:]

  # -- hooks ------------------------------------------------------------
  def shapes(self, weight_shape: Sequence[int]) -> tuple[tuple[int, ...] | None, ...]:
    """The shape of each leaf; ``None`` for a leaf of any shape."""
    raise NotImplementedError

  def create(self, key: jax.Array, weight: jax.Array, *, dtype) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """Returns ``(adapter arrays, new weight)``; most methods keep the weight."""
    raise NotImplementedError

  def labels(self, weight: WeightLabels, tag: str) -> tuple[Labels, ...]:
    raise NotImplementedError

  def prepare(self, w_labels: Labels, arrays, labels,
              inner_weight: Callable[[], jax.Array]):
    """The arrays in flight, from the stored ones; called once per call.

    Args:
      w_labels: the weight's labels.
      arrays, labels: this method's stored arrays and their labels.
      inner_weight: returns the dense weight after the methods below this
        one (the frozen weight itself when there are none).

    Returns:
      ``(arrays, labels)`` that ``fold``/``dot``/... receive.
    """
    return arrays, labels

  def fold(self, w: jax.Array, w_labels: Labels, arrays, labels) -> jax.Array:
    raise NotImplementedError

  def dot(self, use: DotUse, arrays, labels, inner) -> jax.Array | None:
    return None

  def down(self, arrays, labels, *, training: bool):
    """The factor a `dot` contracts with ``x`` first, for shared-input fusion.

    Returns ``(factor, factor_labels, scale)`` or None (the default: no
    fusion). When several weights are used with the same ``x`` (q, k and v of
    one attention layer), the runtime concatenates their factors into one
    matmul and hands each method its scaled slice as ``DotUse.down``; `dot`
    must then use it in place of ``scale · x·factor``. The factor's labels must
    be the weight's contracted labels plus labels of its own.
    """
    return None

  def conv(self, use: ConvUse, arrays, labels, inner) -> jax.Array | None:
    return None

  def gather(self, use: GatherUse, arrays, labels, inner) -> jax.Array | None:
    return None

  def describe(self) -> str:
    return type(self).__name__
