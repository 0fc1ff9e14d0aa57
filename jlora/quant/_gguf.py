"""GGUF tensors kept in their own blocks, read straight from a GGUF file."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from jlora._errors import Problems
from jlora.quant._array import Quantized
from jlora.quant._formats import GGUF_TYPES

_PLAIN = ("F32", "F16", "BF16")


def _type_name(tensor) -> str:
  return getattr(tensor.tensor_type, "name", str(tensor.tensor_type))


def _check(tensor, rows, problems) -> None:
  name = getattr(tensor, "name", "?")
  kind = _type_name(tensor)
  if kind not in GGUF_TYPES and kind not in _PLAIN:
    problems.add(f"{name}: GGUF tensor type {kind} is not supported; supported are "
                 f"{sorted(GGUF_TYPES) + list(_PLAIN)}. Dequantize it with "
                 "`gguf.quants.dequantize` and `jlora.quantize` the float array instead")
  if rows is not None:
    n = int(tensor.shape[1]) if len(tensor.shape) >= 2 else 1
    r = np.asarray(rows)
    if r.shape != (n,) or not np.array_equal(np.sort(r), np.arange(n)):
      problems.add(f"{name}: rows must be a permutation of its {n} rows, got shape "
                   f"{r.shape}")


def from_gguf(tensor: Any, *, transpose: bool = False, rows: Any = None,
              dtype: Any = jnp.float32) -> Any:
  """One tensor of a ``gguf.GGUFReader``, kept in its blocks as stored.

  GGUF's numpy layout is ``reversed(ne)``: a linear layer is ``(out, in)``
  with its blocks along ``in``. ``transpose=True`` gives the ``(in, out)``
  kernel Flax wants, as a view: the blocks stay as they are and only the
  recorded block axis moves. ``rows`` reorders the rows (``out``), whole
  blocks at a time, e.g. to undo llama.cpp's rotary permutation of Q and K
  without dequantizing.

  Args:
    tensor: a ``gguf.gguf_reader.ReaderTensor``.
    transpose: swap the last two axes (as a view).
    rows: a permutation of the rows (GGUF's second dimension), or ``None``.
    dtype: the logical float dtype.

  Returns:
    A `Quantized` leaf for a block format; a plain array (``dtype``) for
    F32, F16 and BF16 tensors.

  Raises:
    LoraError: for a tensor type that is not supported, or bad ``rows``.

  Example:
    >>> import gguf, numpy as np, os, tempfile, jlora
    >>> Q4_1 = gguf.GGMLQuantizationType.Q4_1
    >>> w = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32)  # (out, in)
    >>> path = os.path.join(tempfile.mkdtemp(), "tiny.gguf")
    >>> writer = gguf.GGUFWriter(path, "llama")
    >>> writer.add_tensor("w", gguf.quants.quantize(w, Q4_1), raw_dtype=Q4_1)
    >>> writer.write_header_to_file(); writer.write_kv_data_to_file()
    >>> writer.write_tensors_to_file(); writer.close()
    >>> t = gguf.GGUFReader(path).tensors[0]
    >>> kernel = jlora.quant.from_gguf(t, transpose=True)
    >>> kernel
    Quantized(q4_1, shape=(64, 8), dtype=float32, block_size=32, axis=-2)
    >>> exact = gguf.quants.dequantize(t.data, t.tensor_type).T
    >>> bool(np.array_equal(np.asarray(kernel.dequantize()), exact))
    True
  """
  problems = Problems("jlora.quant.from_gguf")
  _check(tensor, rows, problems)
  problems.raise_if_any()
  return _convert(tensor, transpose, rows, dtype)


def read_gguf(source: Any, *, dtype: Any = jnp.float32) -> dict[str, Any]:
  """Every tensor of a GGUF file by name, block formats kept in their blocks.

  Args:
    source: a path or a ``gguf.GGUFReader``.
    dtype: the logical float dtype.

  Returns:
    ``{name: leaf}`` in GGUF's own layout (see `from_gguf`).

  Raises:
    LoraError: naming every tensor whose type is not supported.
  """
  import gguf
  reader = source if isinstance(source, gguf.GGUFReader) else gguf.GGUFReader(source)
  problems = Problems("jlora.quant.read_gguf")
  for t in reader.tensors:
    _check(t, None, problems)
  problems.raise_if_any()
  return {t.name: _convert(t, False, None, dtype) for t in reader.tensors}


def _convert(tensor, transpose, rows, dtype):
  kind = _type_name(tensor)
  shape = tuple(int(n) for n in reversed(tensor.shape))
  data = np.asarray(tensor.data)
  if kind in _PLAIN:
    import gguf
    values = gguf.quants.dequantize(data, tensor.tensor_type).reshape(shape)
    if rows is not None:
      values = values[..., np.asarray(rows), :]
    if transpose:
      values = np.swapaxes(values, -1, -2)
    return jnp.asarray(values, dtype)
  block, type_size, _, _ = GGUF_TYPES[kind]
  blocks = data.view(np.uint8).reshape(*shape[:-1], shape[-1] // block, type_size)
  if rows is not None:
    blocks = blocks[..., np.asarray(rows), :, :]
  q = Quantized({"blocks": jnp.asarray(blocks)}, kind.lower(), np.dtype(dtype), block, -1)
  return q.mT if transpose else q
