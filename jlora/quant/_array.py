"""The quantized weight: a pytree of packed integer arrays and scales.

Why not qwix's ``QArray`` (qwix 0.1.8, checked before writing this):

- it keeps ``qvalue`` at the logical shape in a sub-byte dtype (``jnp.int4``,
  ``jnp.uint4``), so whether four bits take half a byte is left to the
  backend; here two codes are packed into each ``uint8`` explicitly, so the
  stored bytes are what ``nbytes`` says on every backend and in every
  checkpoint;
- it has no double quantization of the scales (QLoRA's 8-bit scales in
  blocks of 256) and no way to hold GGUF's blocks as shipped: Q4_1 is
  ``d·q + m`` with f16 ``d`` and ``m``, Q4_K and Q6_K nest 6- and 8-bit
  scales inside 256-value super-blocks, none of which is ``(q - z)·s``
  bit for bit;
- its ``dtype`` is the scale's dtype, not the logical float dtype the model
  code was written for, and a transposed GGUF matrix would need a float copy.

`Quantized` instead stores, for every format, a dict of child arrays laid out
as ``(*others, blocks, bytes_per_block)``: the block axis of the logical
weight is moved last and cut into blocks; every other axis keeps its place in
front, so leading (``nn.scan``-stacked) axes stay leading in every child and
``lax.scan``, ``vmap`` and sharding slice them like any array. Nothing about
the leading axes is static: ``shape`` is derived from the children, so a
sliced leaf is again a valid leaf. The static part (format, logical dtype,
block size, block axis) is the pytree's aux data.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _shape_of(x: Any) -> tuple[int, ...]:
  """An array's shape; a tuple of ints stands for itself (``tree.map(jnp.shape, ...)``)."""
  if isinstance(x, tuple) and all(isinstance(n, (int, np.integer)) for n in x):
    return tuple(x)
  return tuple(x.shape)


def _child_nbytes(x: Any) -> int:
  if x is None:  # the adapters half of `jlora.partition` holds no arrays here
    return 0
  return int(math.prod(x.shape)) * np.dtype(x.dtype).itemsize


@dataclasses.dataclass(frozen=True, eq=False)
class Quantized:
  """A frozen weight kept quantized; a pytree whose leaves are its arrays.

  Build one with `jlora.quantize` or `jlora.quant.from_gguf`, not by hand.

  Attributes:
    arrays: the stored arrays by name (codes, scales, raw GGUF blocks), each
      ``(*others, blocks, ...)``.
    format: the format's name, e.g. ``"nf4"`` or ``"q4_1"``.
    logical_dtype: the float dtype the weight stands for.
    block_size: values per block along the block axis.
    axis: the block axis of the logical weight, counted from the end (< 0).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> w = jax.random.normal(jax.random.key(0), (128, 32))
    >>> q = jlora.quantize({"kernel": w}, "nf4")["kernel"]
    >>> q
    Quantized(nf4, shape=(128, 32), dtype=float32, block_size=64, axis=-2)
    >>> jax.tree.map(jnp.shape, q.arrays)
    {'codes': (32, 2, 32), 'scale': (32, 2)}
    >>> q.shape, q.dtype, q.nbytes, w.nbytes
    ((128, 32), dtype('float32'), 2304, 16384)
    >>> q.dequantize().shape
    (128, 32)
  """

  arrays: Mapping[str, Any]
  format: str
  logical_dtype: Any
  block_size: int
  axis: int

  @property
  def spec(self):
    from jlora.quant import _formats
    return _formats.FORMATS[self.format]

  @property
  def shape(self) -> tuple[int, ...]:
    """The logical shape, derived from the stored arrays."""
    *others, blocks, _ = _shape_of(self.arrays[self.spec.main])
    ndim = len(others) + 1
    pos = ndim + self.axis
    return tuple(others[:pos]) + (blocks * self.block_size,) + tuple(others[pos:])

  @property
  def dtype(self) -> np.dtype:
    """The logical float dtype (what `dequantize` returns by default)."""
    return np.dtype(self.logical_dtype)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(math.prod(self.shape))

  @property
  def nbytes(self) -> int:
    """Bytes actually stored: codes, scales and any nested scales."""
    return sum(_child_nbytes(a) for a in self.arrays.values())

  def astype(self, dtype: Any) -> "Quantized":
    """The same stored arrays standing for another float dtype (no copy):
    what a ``compute_dtype=`` cast of the whole tree does to a quantized
    weight, which then dequantizes straight to ``dtype``."""
    return dataclasses.replace(self, logical_dtype=np.dtype(dtype))

  def shape_dtype(self) -> jax.ShapeDtypeStruct:
    """A ``ShapeDtypeStruct`` of the logical shape and dtype."""
    return jax.ShapeDtypeStruct(self.shape, self.dtype)

  def dequantize(self, dtype: Any = None) -> jax.Array:
    """The weight as a float array of the logical shape.

    Values are computed in float32 (bit for bit what the format defines)
    and then cast to ``dtype``.

    Args:
      dtype: result dtype; the logical dtype when ``None``.

    Returns:
      A ``jax.Array`` of shape ``self.shape``.
    """
    values = self.spec.decode(self.arrays, self.block_size)  # (*others, nb, B)
    values = values.reshape(*values.shape[:-2], -1)
    values = jnp.moveaxis(values, -1, self.axis)
    return values.astype(self.dtype if dtype is None else dtype)

  @property
  def mT(self) -> "Quantized":  # noqa: N802 - numpy's name
    """The last two axes swapped, as a view: no block moves, only `axis`.

    Raises:
      LoraError: when the block axis is not one of the last two.
    """
    if self.axis not in (-1, -2) or self.ndim < 2:
      from jlora._errors import LoraError
      raise LoraError([f"{self!r}: mT needs the block axis among the last two; "
                       "dequantize it first"], header="jlora.quant.Quantized.mT:")
    return dataclasses.replace(self, axis=-3 - self.axis)

  def __repr__(self):
    try:
      shape = self.shape
    except (AttributeError, KeyError, TypeError, ValueError):  # children mapped to non-arrays
      return f"Quantized({self.format}, {dict(self.arrays)!r})"
    return (f"Quantized({self.format}, shape={shape}, dtype={self.dtype}, "
            f"block_size={self.block_size}, axis={self.axis})")


def _flatten_with_keys(q: Quantized):
  names = tuple(sorted(q.arrays))
  children = tuple((jax.tree_util.GetAttrKey(n), q.arrays[n]) for n in names)
  return children, (names, q.format, np.dtype(q.logical_dtype), q.block_size, q.axis)


def _flatten(q: Quantized):
  children, aux = _flatten_with_keys(q)
  return tuple(c for _, c in children), aux


def _unflatten(aux, children):
  names, fmt, dtype, block_size, axis = aux
  return Quantized(dict(zip(names, children)), fmt, dtype, block_size, axis)


jax.tree_util.register_pytree_with_keys(Quantized, _flatten_with_keys, _unflatten, _flatten)


def is_quantized(x: Any) -> bool:
  """True for a `Quantized` leaf (use as ``is_leaf=`` in tree maps)."""
  return isinstance(x, Quantized)
