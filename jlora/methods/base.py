"""The interface every adapter method implements, and what all methods share.

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

Every method shares the placement fields (``weight``, ``stack``, ``inputs``,
``order``, ``name``), declared once here as keyword-only fields, and the
rank/alpha checks (`check_low_rank`, `check_rank_fits`). A new method is one
module: a subclass with its own fields and hooks, and an entry point that
hands a ``make(path, weight) -> Method`` to `jlora.add_adapters`, which does
target selection, validation and the tree rebuild. A learned scalar gate
``W' = g·W``, end to end:

>>> import dataclasses, os, tempfile
>>> import jax, jax.numpy as jnp, jlora
>>> @dataclasses.dataclass(frozen=True)
... class Gate(jlora.Method):
...   prefix = "gate"        # keys: gate (the record), gate_g (the array)
...   leaves = ("g",)
...   def shapes(self, weight_shape):
...     return ((),)
...   def create(self, key, weight, *, dtype):
...     return (jnp.ones((), dtype),), weight
...   def labels(self, weight, tag):
...     return ((),)
...   def fold(self, w, w_labels, arrays, labels):
...     return w * arrays[0].astype(w.dtype)
...   def dot(self, use, arrays, labels, inner):
...     y = inner(use.x)
...     return y * arrays[0].astype(y.dtype)
>>> base = {"dense": {"kernel": jnp.ones((3, 2))}}
>>> gated = jlora.add_adapters(base, lambda path, w: Gate(weight=path[-1]),
...                            key=jax.random.key(0))
>>> gated = jax.tree.map(lambda x: 2 * x if x.ndim == 0 else x, gated)  # g = 2
>>> fn = lambda p, x: x @ p["dense"]["kernel"]
>>> jlora.lora(fn)(gated, jnp.ones(3))
Array([6., 6.], dtype=float32)
>>> jlora.merge(gated)["dense"]["kernel"]
Array([[2., 2.],
       [2., 2.],
       [2., 2.]], dtype=float32)
>>> path = os.path.join(tempfile.mkdtemp(), "gate")
>>> jlora.save_adapters(gated, path)
>>> jlora.load_adapters(base, path)["dense"]["gate_g"]
Array(2., dtype=float32)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
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
  # ``(w, w_labels)``: the base weight as a plain array, given only to the
  # innermost method (whose ``inner`` is exactly ``x·W``) so that it may fold
  # its own update into the same matmul (`LoRA.dot`). None otherwise.
  weight: Any = None


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


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
class Method:
  """Base class for adapter methods; subclasses are frozen dataclasses.

  Subclasses declare ``prefix`` (the key stem, e.g. ``"lora"``), ``leaves``
  (their array names, e.g. ``("a", "b")``), their own fields and the hooks
  below. The placement fields are shared, keyword-only:

  Attributes:
    weight: key of the adapted weight in its mapping, e.g. ``"kernel"``.
    stack: number of leading stacked (scan/layer) axes of the weight.
    inputs: number of input axes after the stacked ones; the rest are outputs.
    order: position of this method among those on the same weight; methods
      apply in increasing order.
    name: the adapter's name; ``"default"`` keeps the plain prefix, any other
      gives ``prefix@name`` keys (several adapters on one weight).
    layout: the weight's axes in role order, stacked then inputs then outputs
      (``(1, 0)`` for an ``(out, in)`` weight such as equinox's
      ``Linear.weight``); ``()`` when the weight is already in that order.
      Adapter arrays are always in role order: ``A`` is stack + inputs +
      rank, ``B`` stack + rank + outputs.
  """

  weight: str = "kernel"
  stack: int = 0
  inputs: int = 1
  order: int = 0
  name: str = DEFAULT_NAME
  layout: tuple[int, ...] = ()

  def __post_init__(self):  # a tuple, also when rebuilt from a JSON list
    object.__setattr__(self, "layout", tuple(int(k) for k in self.layout))

  prefix: ClassVar[str]
  leaves: ClassVar[tuple[str, ...]]

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    if "prefix" in cls.__dict__:
      jax.tree_util.register_static(cls)
    if "__repr__" not in cls.__dict__:  # `dataclass` then keeps this one
      cls.__repr__ = Method.__repr__

  def __repr__(self) -> str:
    """Own fields first (defaults omitted), then non-default placement."""
    shared = {f.name for f in dataclasses.fields(Method)}
    own = [f for f in dataclasses.fields(self) if f.name not in shared]
    parts = []
    for f in own + [f for f in dataclasses.fields(self) if f.name in shared]:
      value = getattr(self, f.name)
      required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
      if required or value != f.default:
        parts.append(f"{f.name}={value:g}" if isinstance(value, float)
                     else f"{f.name}={value!r}")
    return f"{type(self).__name__}({', '.join(parts)})"

  # -- naming -----------------------------------------------------------
  @property
  def adapter_name(self) -> str:
    return self.name

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
  def in_role_order(self, items: Sequence[Any]) -> tuple:
    """The weight's axes (labels or sizes) reordered by `layout`."""
    items = tuple(items)
    return tuple(items[k] for k in self.layout) if self.layout else items

  def weight_labels(self, labels: Sequence[str]) -> WeightLabels:
    s, i = self.stack, self.inputs
    labels = self.in_role_order(labels)
    return WeightLabels(labels[:s], labels[s:s + i], labels[s + i:])

  def split_shape(self, shape: Sequence[int]):
    """``(stack, inputs, outputs)`` sizes of a weight of this ``shape``."""
    s, i = self.stack, self.inputs
    shape = self.in_role_order(shape)
    return shape[:s], shape[s:s + i], shape[s + i:]

  def to_role_order(self, weight: jax.Array) -> jax.Array:
    """``weight`` transposed into role order (stack, inputs, outputs)."""
    return weight.transpose(self.layout) if self.layout else weight

  def from_role_order(self, weight: jax.Array) -> jax.Array:
    """The inverse of `to_role_order`."""
    if not self.layout:
      return weight
    inverse = sorted(range(len(self.layout)), key=self.layout.__getitem__)
    return weight.transpose(inverse)

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

  # -- PEFT files (`jlora.peft`) ------------------------------------------
  # A method with a PEFT form names its ``peft_type`` and overrides the hooks
  # below. They see the adapter of one 2-D weight ``(in, out)``: `jlora.peft`
  # flattens multi-axis weights, and fuses or splits modules, around them.
  peft_type: ClassVar[str | None] = None

  @classmethod
  def peft_reads(cls, config: Mapping[str, Any]) -> bool:
    """Whether this method holds the adapters a PEFT config describes."""
    return False

  def peft_tensors(self, arrays, *, embedding: bool) -> dict[str, Any]:
    """PEFT's tensors of one module, by name suffix (``"lora_A.weight"``)."""
    raise NotImplementedError

  @classmethod
  def peft_config(cls, methods: Mapping[str, "Method"]) -> dict[str, Any]:
    """The PEFT config fields for these ``{torch module: method}``.

    Raises:
      ValueError: methods that one PEFT config cannot describe.
    """
    raise NotImplementedError

  @classmethod
  def from_peft(cls, config: Mapping[str, Any], module: str, tensors: dict[str, Any], *,
                shape: tuple[int, int], embedding: bool, name: str):
    """``(method, arrays)`` of one module from PEFT's tensors.

    Pops the tensors it uses from ``tensors`` (suffix -> array); ``shape`` is
    the 2-D ``(in, out)`` of the weight.

    Raises:
      ValueError: tensors missing, or shapes that don't fit.
    """
    raise NotImplementedError

  @classmethod
  def peft_fuse(cls, parts):
    """``(method, arrays)`` on a fused module from its parts, in order.

    Each part is ``(method, arrays, n_out, weight)``: the part's method and
    arrays (both None for a part without this adapter), its output size and
    its 2-D weight. Raises ValueError when the fused module cannot hold the
    parts exactly.
    """
    raise ValueError(f"{cls.__name__} adapters cannot be fused into one module")

  def peft_split(self, arrays, sizes: tuple[int, ...]):
    """``[(method, arrays)]`` per output slice of ``sizes`` of a fused module."""
    raise ValueError(f"{type(self).__name__} adapters cannot be split")


# -----------------------------------------------------------------------------
# Checks every low-rank method shares.


def check_number(value: Any, name: str, *, integer: bool) -> str | None:
  """A problem with a positive finite number (an int if ``integer``), or None."""
  kind = numbers.Integral if integer else numbers.Real
  if isinstance(value, bool) or not isinstance(value, kind):
    return f"{name} must be {'an int' if integer else 'a number'}, got {value!r}"
  if not math.isfinite(value) or value <= 0:
    return f"{name} must be positive and finite, got {value!r}"
  return None


def check_low_rank(rank: Any, alpha: Any, problems) -> None:
  """Adds a problem for each bad ``rank``/``alpha`` (each may be ``{regex: v}``)."""
  if rank is None:
    problems.add("rank must be a positive int (or {regex: rank}), got None; "
                 "use a positive integer rank such as 8")
  for field, value, integer in (("rank", rank, True), ("alpha", alpha, False)):
    if value is None:
      continue
    values = value.items() if isinstance(value, Mapping) else [(None, value)]
    for pattern, v in values:
      label = field if pattern is None else f"{field}[{pattern!r}]"
      msg = check_number(v, label, integer=integer)
      if msg:
        problems.add(msg + ("; use a positive integer rank such as 8" if integer else
                            "; alpha scales the update by alpha/rank, e.g. alpha=2*rank"))


def check_rate(value: Any, name: str, problems) -> None:
  """Adds a problem unless ``value`` is a number in [0, 1) (a dropout rate)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
    problems.add(f"{name} must be a number in [0, 1), got {value!r}")


def check_rank_fits(where: str, method: Any, shape: Sequence[int]) -> None:
  """Raises ValueError when ``method.rank > min(in, out)`` for a weight of
  ``shape`` under ``method``'s layout."""
  _, inputs, outputs = method.split_shape(shape)
  n_in, n_out = math.prod(inputs), math.prod(outputs)
  if method.rank > min(n_in, n_out):
    raise ValueError(f"{where}: rank {method.rank} > min(in={n_in}, out={n_out}); lower "
                     "the rank or exclude this path")
