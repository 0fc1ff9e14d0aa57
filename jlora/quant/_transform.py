"""`quantize` and `dequantize`: pure tree transforms between float and quantized weights."""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _targets, _tree
from jlora._errors import Problems
from jlora.quant._array import Quantized, is_quantized
from jlora.quant._formats import FORMATS, GGUF_QUANTIZERS


def _leaves(params):
  return jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)


def _default_axis(path) -> int:
  """The contraction axis: an ``Embed`` table's features, a kernel's (last) input axis."""
  return -1 if path and path[-1] == "embedding" else -2


def _setting(value, name, path_s, problems):
  try:
    return _targets.per_path(value, path_s, name=name)
  except KeyError as e:
    problems.add(str(e.args[0]))
    return None


def quantize(params: Any, format: Any, *, targets: _targets.Targets = None,
             block_size: Any = None, axis: Any = None, stack: Any = 0,
             double_quant: Any = False) -> Any:
  """Replaces the chosen float weights by `Quantized` ones; pure.

  Args:
    params: a parameter tree (lorified or not).
    format: ``"int8"``, ``"int4"``, ``"nf4"``, or a GGUF block format
      (``"q8_0"``, ``"q4_0"``, ``"q4_1"``); or ``{regex: format}``.
    targets: which weights, as for `jlora.lorify` (default: every ``kernel``
      and ``embedding`` of rank ≥ 2).
    block_size: values per block along ``axis``; ``None`` is the format's
      default (64 for int4 and nf4, the whole axis for int8, 32 for GGUF).
    axis: the block axis; ``None`` is the contraction axis, ``-2`` for a
      kernel (its input axis, as bitsandbytes and GGUF do) and ``-1`` for an
      ``embedding``.
    stack: leading axes that index layers (``nn.scan`` stacks); only double
      quantization needs it, to group the scales per layer.
    double_quant: store int4/nf4 block scales in 8 bits, blocks of 256.

  Every option but ``targets`` also takes ``{regex: value}`` (first match).

  Returns:
    A tree of the same structure with `Quantized` leaves in place of the
    chosen weights; everything else (adapters included) is untouched.

  Raises:
    LoraError: naming each path whose axis the block size does not divide,
      each integer or already quantized leaf chosen, an unknown format.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"dense": {"kernel": jnp.ones((128, 64)), "bias": jnp.zeros(64)}}
    >>> q = jlora.quantize(params, "nf4", double_quant=True)
    >>> jax.tree.map(jnp.shape, q)
    {'dense': {'bias': (64,), 'kernel': Quantized(nf4, shape=(128, 64), dtype=float32, block_size=64, axis=-2)}}
    >>> jax.tree.map(jnp.shape, q["dense"]["kernel"].arrays)
    {'codes': (64, 2, 32), 'scale_codes': (1, 256), 'scale_mean': (), 'scale_scale': (1,)}
    >>> bool(jnp.all(jlora.dequantize(q)["dense"]["kernel"] == 1.0))
    True
  """
  problems = Problems("jlora.quantize")
  leaves, treedef = _leaves(params)
  candidates = [(_tree.keypath_to_path(kp), leaf) for kp, leaf in leaves
                if _tree.is_array(leaf) or is_quantized(leaf)]
  chosen = _targets.select(candidates, targets, what="weight to quantize", problems=problems)
  chosen_paths = {p for p, _ in chosen}

  plans = {}
  for path, leaf in chosen:
    where = _tree.path_str(path)
    fmt = _setting(format, "format", where, problems)
    if fmt is None:
      continue
    spec = FORMATS.get(fmt) if isinstance(fmt, str) else None
    if spec is None:
      problems.add(f"{where}: unknown format {fmt!r}; use one of {sorted(FORMATS)}")
      continue
    if is_quantized(leaf):
      problems.add(f"{where}: already quantized ({leaf.format}); exclude it with "
                   "`targets=`, or `jlora.dequantize` the tree first to change its format")
      continue
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      problems.add(f"{where}: a {leaf.dtype} array cannot be quantized, only floating "
                   "weights can; exclude it with `targets=`")
      continue
    if spec.gguf_type and fmt not in GGUF_QUANTIZERS:
      problems.add(f"{where}: format {fmt!r} has no quantizer in `gguf` (only GGUF files "
                   f"hold it; read them with jlora.quant.from_gguf); use one of "
                   f"{sorted(GGUF_QUANTIZERS)} or 'nf4'")
      continue
    ax = _setting(axis, "axis", where, problems)
    ax = _default_axis(path) if ax is None else ax
    ndim = leaf.ndim
    if not isinstance(ax, (int, np.integer)) or not -ndim <= ax < ndim:
      problems.add(f"{where}: axis {ax!r} is not an axis of a rank-{ndim} weight; "
                   f"pass an int in [{-ndim}, {ndim})")
      continue
    ax = int(ax) - ndim if ax >= 0 else int(ax)
    n = leaf.shape[ax]
    bs = _setting(block_size, "block_size", where, problems)
    if spec.fixed_block is not None:
      if bs is not None and bs != spec.fixed_block:
        problems.add(f"{where}: format {fmt!r} has blocks of {spec.fixed_block}, "
                     f"got block_size={bs!r}; leave block_size unset for it")
        continue
      bs = spec.fixed_block
    if bs is None:
      bs = spec.default_block or n
    if isinstance(bs, bool) or not isinstance(bs, (int, np.integer)) or bs <= 0:
      problems.add(f"{where}: block_size must be a positive int, got {bs!r}")
      continue
    if spec.pairs and bs % 2:
      problems.add(f"{where}: format {fmt!r} packs two codes a byte, so block_size "
                   f"must be even, got {bs}")
      continue
    if n % bs:
      divisors = [d for d in range(2 if spec.pairs else 1, n + 1)
                  if n % d == 0 and (not spec.pairs or d % 2 == 0)]
      hint = (f"pass block_size= one of {divisors[-6:]}" if divisors and not spec.fixed_block
              else "leave this weight out with `targets=`")
      problems.add(f"{where}: axis {ax} of shape {tuple(leaf.shape)} has {n} values, which "
                   f"block size {bs} does not divide; {hint}, choose another `axis=`, "
                   "or exclude the path")
      continue
    dq = bool(_setting(double_quant, "double_quant", where, problems))
    if dq and not spec.double_quant:
      problems.add(f"{where}: format {fmt!r} has no double quantization; drop "
                   "double_quant or use 'nf4' / 'int4'")
      continue
    st = _setting(stack, "stack", where, problems)
    if isinstance(st, bool) or not isinstance(st, (int, np.integer)) or not 0 <= st <= ndim + ax:
      problems.add(f"{where}: stack={st!r} must count leading axes before the block axis "
                   f"({ndim + ax} of them here)")
      continue
    plans[path] = (spec, int(bs), ax, int(st), dq, leaf.dtype)
  problems.raise_if_any()

  out = []
  for kp, leaf in leaves:
    path = _tree.keypath_to_path(kp)
    if path in chosen_paths:
      out.append(_quantize_leaf(leaf, *plans[path]))
    else:
      out.append(leaf)
  return jax.tree.unflatten(treedef, out)


def _quantize_leaf(w, spec, block_size, axis, stack, double_quant, dtype) -> Quantized:
  w = jnp.moveaxis(jnp.asarray(w, jnp.float32), axis, -1)
  blocks = w.reshape(*w.shape[:-1], w.shape[-1] // block_size, block_size)
  arrays = spec.encode(blocks, stack, double_quant)
  return Quantized(arrays, spec.name, np.dtype(dtype), block_size, axis)


def dequantize(params: Any, dtype: Any = None) -> Any:
  """Replaces every `Quantized` leaf by its float array; pure.

  Args:
    params: a tree, possibly holding `Quantized` leaves.
    dtype: dtype of the dequantized weights; each one's logical dtype when
      ``None``. Other leaves are untouched.

  Returns:
    The tree with plain arrays in place of quantized ones.

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> q = jlora.quantize({"kernel": jnp.full((64, 8), 0.5)}, "int4")
    >>> jlora.dequantize(q, jnp.bfloat16)["kernel"].dtype
    dtype(bfloat16)
  """
  return jax.tree.map(lambda x: x.dequantize(dtype) if is_quantized(x) else x,
                      params, is_leaf=is_quantized)


def requantize(merged: Any, like: Any, format: Any = True) -> Any:
  """Quantizes again, in ``merged``, every weight that is quantized in ``like``.

  Args:
    merged: a float tree (e.g. `jlora.merge`'s result).
    like: a tree of the same structure whose `Quantized` leaves say which
      weights to quantize, and how.
    format: ``True`` keeps each weight's format, block size, axis and double
      quantization; a format name quantizes them all in that format (with
      its defaults, on the same axis).

  Returns:
    ``merged`` with those weights quantized.

  Raises:
    LoraError: ``like`` holds no quantized weight, or the format cannot
      hold a weight (see `quantize`).
  """
  found = {_tree.path_str(_tree.keypath_to_path(kp)): q for kp, q in _leaves(like)[0]
           if is_quantized(q)}
  if not found:
    problems = Problems("jlora: cannot requantize")
    problems.add("requantize= needs quantized weights, but the tree holds none; "
                 "leave requantize unset, or jlora.quantize the merged tree")
    problems.raise_if_any()

  def same(q):
    return format is True or format == q.format

  def each(fn):
    return {"^" + re.escape(p) + "$": fn(q) for p, q in found.items()}

  def dq(q):
    return "scale_mean" in q.arrays and same(q)

  return quantize(
      merged, each(lambda q: q.format) if format is True else format,
      targets=lambda p, _: p in found,
      block_size=each(lambda q: q.block_size if same(q) else None),
      axis=each(lambda q: q.axis), double_quant=each(dq),
      stack=each(lambda q: q.arrays["scale_mean"].ndim if dq(q) else 0))


def like(q: Quantized, w: Any) -> Quantized:
  """``w`` quantized exactly as ``q`` is: same format, block size, axis and
  double quantization (e.g. a PiSSA residual put back in place of ``q``)."""
  from jlora.quant._formats import FORMATS
  dq = "scale_mean" in q.arrays
  stack = q.arrays["scale_mean"].ndim if dq else 0
  return _quantize_leaf(w, FORMATS[q.format], q.block_size, q.axis, stack, dq, q.dtype)
