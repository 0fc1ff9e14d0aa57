"""The formats: how a block of float values becomes codes and scales, and back.

Every format works on blocks laid out ``(*others, blocks, block_size)`` (the
block axis moved last and cut; see `jlora.quant.Quantized`) and stores a dict
of arrays whose leading axes are ``others``. Decoding computes in float32,
exactly as the format defines, so a GGUF tensor decodes bit for bit like
``gguf.quants.dequantize``.

Our own formats:

- ``"int8"``: symmetric absmax, ``q = round(w / absmax · 127)``, one scale
  per block; the default block is the whole axis, i.e. one scale per output
  channel of a ``Dense`` kernel.
- ``"int4"``: the same with 7 levels each side, two codes per byte (low
  nibble first), blockwise (64 by default).
- ``"nf4"``: QLoRA's NormalFloat-4: each block divided by its absmax and
  rounded to the nearest of `NF4`'s 16 normal quantiles, two codes a byte.

``double_quant=True`` (int4 and nf4) stores the per-block scales as QLoRA
does: minus their mean, then 8-bit absmax in blocks of 256 (symmetric linear
int8 here; bitsandbytes uses its dynamic 8-bit map for this second level).
Scales are grouped per layer of a stack (``stack`` leading axes), so a
stacked weight can still be sliced layer by layer.

GGUF's ``"q8_0"``, ``"q4_0"``, ``"q4_1"`` (32 values a block) and ``"q4_k"``,
``"q6_k"`` (256-value super-blocks) are kept as GGUF's own block bytes, one
``uint8`` row of ``type_size`` bytes per block; ``quantize`` to them goes
through ``gguf.quants.quantize`` (which has no quantizer for the K formats,
so those only come from files, see `jlora.quant.from_gguf`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# QLoRA (Dettmers et al. 2023), appendix E; the same constants as
# bitsandbytes' `get_4bit_type("nf4")`.
NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)

DOUBLE_QUANT_BLOCK = 256


@dataclasses.dataclass(frozen=True)
class Format:
  """One storage format.

  Attributes:
    name: the name `jlora.quantize` takes.
    main: the child whose shape is ``(*others, blocks, bytes_per_block)``.
    default_block: block size when none is given (``None``: the whole axis).
    fixed_block: the only block size the format allows (GGUF), or ``None``.
    pairs: codes are packed two a byte, so the block size must be even.
    double_quant: whether the scales may be double-quantized.
    encode: ``(blocks f32 (*others, nb, B), stack, double_quant) -> arrays``.
    decode: ``(arrays, block_size) -> f32 (*others, nb, B)``.
    gguf_type: the ``gguf.GGMLQuantizationType`` name, for GGUF formats.
  """

  name: str
  main: str
  default_block: int | None
  fixed_block: int | None
  pairs: bool
  double_quant: bool
  encode: Callable[..., dict]
  decode: Callable[[Mapping[str, Any], int], jax.Array]
  gguf_type: str | None = None


# ----------------------------------------------------------------- helpers


def _pack_pairs(u):
  """uint8 codes < 16, (..., B) -> (..., B/2): element 2i low nibble, 2i+1 high."""
  u = u.astype(jnp.uint8)
  return u[..., 0::2] | (u[..., 1::2] << 4)


def _unpack_pairs(p):
  """(..., B/2) uint8 -> (..., B) uint8 codes, inverse of `_pack_pairs`."""
  both = jnp.stack([p & 0x0F, p >> 4], axis=-1)
  return both.reshape(*p.shape[:-1], p.shape[-1] * 2)


def _absmax(blocks):
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  return absmax, jnp.where(absmax > 0, absmax, jnp.ones_like(absmax))


def _linear(blocks, qmax):
  """Symmetric absmax codes in [-qmax, qmax] and the scale ``absmax · (1/qmax)``.

  A product by the float32 reciprocal, not a quotient: XLA rewrites division
  by a constant that way, and the stored scale must not depend on whether it
  did.
  """
  absmax, safe = _absmax(blocks)
  q = jnp.clip(jnp.round(blocks / safe[..., None] * qmax), -qmax, qmax)
  return q, absmax * np.float32(1 / qmax)


def _nearest_nf4(x):
  """Index of the nearest `NF4` value (the first one on a tie), elementwise."""
  best = jnp.zeros(x.shape, jnp.uint8)
  best_d = jnp.abs(x - NF4[0])
  for i, c in enumerate(NF4[1:], start=1):
    d = jnp.abs(x - jnp.float32(c))
    closer = d < best_d
    best = jnp.where(closer, jnp.uint8(i), best)
    best_d = jnp.where(closer, d, best_d)
  return best


def _encode_scales(scale, stack: int, double_quant: bool) -> dict:
  if not double_quant:
    return {"scale": scale}
  lead = scale.shape[:stack]
  flat = scale.reshape(*lead, -1)
  count = flat.shape[-1]
  mean = jnp.mean(flat, axis=-1)
  centered = flat - mean[..., None]
  groups = -(-count // DOUBLE_QUANT_BLOCK)
  pad = groups * DOUBLE_QUANT_BLOCK - count
  centered = jnp.pad(centered, [(0, 0)] * len(lead) + [(0, pad)])
  q, scale2 = _linear(centered.reshape(*lead, groups, DOUBLE_QUANT_BLOCK), 127)
  return {"scale_codes": q.astype(jnp.int8), "scale_scale": scale2, "scale_mean": mean}


def scales(arrays: Mapping[str, Any], main: str) -> jax.Array:
  """The per-block float32 scales ``(*others, nb)``, undoing double quant."""
  if "scale" in arrays:
    return arrays["scale"]
  shape = arrays[main].shape[:-1]
  mean = arrays["scale_mean"]
  stack = mean.ndim
  values = (arrays["scale_codes"].astype(jnp.float32) * arrays["scale_scale"][..., None]
            + mean[..., None, None])
  values = values.reshape(*shape[:stack], -1)[..., :math.prod(shape[stack:])]
  return values.reshape(shape)


# ----------------------------------------------------------------- our formats


def _encode_int8(blocks, stack, double_quant):
  q, scale = _linear(blocks, 127)
  return {"codes": q.astype(jnp.int8), **_encode_scales(scale, stack, double_quant)}


def _decode_int8(arrays, block_size):
  return arrays["codes"].astype(jnp.float32) * scales(arrays, "codes")[..., None]


def _encode_int4(blocks, stack, double_quant):
  q, scale = _linear(blocks, 7)
  return {"codes": _pack_pairs(q + 8), **_encode_scales(scale, stack, double_quant)}


def _decode_int4(arrays, block_size):
  q = _unpack_pairs(arrays["codes"]).astype(jnp.float32) - 8.0
  return q * scales(arrays, "codes")[..., None]


def _encode_nf4(blocks, stack, double_quant):
  absmax, safe = _absmax(blocks)
  codes = _nearest_nf4(blocks / safe[..., None])
  return {"codes": _pack_pairs(codes), **_encode_scales(absmax, stack, double_quant)}


def _nf4_values(codes):
  """`NF4`[codes] as a chain of selects: elementwise, so XLA fuses it with
  the unpacking and the scaling (a gather from the table may not fuse)."""
  values = jnp.full(codes.shape, NF4[-1], jnp.float32)
  for i in range(len(NF4) - 2, -1, -1):
    values = jnp.where(codes == i, jnp.float32(NF4[i]), values)
  return values


def _decode_nf4(arrays, block_size):
  values = _nf4_values(_unpack_pairs(arrays["codes"]))
  return values * scales(arrays, "codes")[..., None]


# ----------------------------------------------------------------- GGUF blocks


def _f16(raw):
  """Two bytes (..., 2) -> float32 (...), through float16 as GGUF stores it."""
  return jax.lax.bitcast_convert_type(raw, jnp.float16).astype(jnp.float32)


def _low_high(qs):
  """GGUF's 4-bit order: low nibbles are the first half, high the second."""
  return jnp.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _decode_q8_0(arrays, block_size):
  b = arrays["blocks"]
  d = _f16(b[..., 0:2])
  x = jax.lax.bitcast_convert_type(b[..., 2:], jnp.int8).astype(jnp.float32)
  return x * d[..., None]


def _decode_q4_0(arrays, block_size):
  b = arrays["blocks"]
  d = _f16(b[..., 0:2])
  q = (_low_high(b[..., 2:]).astype(jnp.int8) - jnp.int8(8)).astype(jnp.float32)
  return d[..., None] * q


def _decode_q4_1(arrays, block_size):
  b = arrays["blocks"]
  d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
  q = _low_high(b[..., 4:]).astype(jnp.float32)
  return d[..., None] * q + m[..., None]


def _q4_k_scale_min(s):
  """The 8 six-bit scales and mins of a Q4_K super-block, (..., 12) -> (..., 8)."""
  d, m, m_d = s[..., 0:4], s[..., 4:8], s[..., 8:12]
  sc = jnp.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
  mn = jnp.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
  return sc, mn


def _decode_q4_k(arrays, block_size):
  b = arrays["blocks"]
  lead = b.shape[:-1]
  d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
  sc, mn = _q4_k_scale_min(b[..., 4:16])
  d = (d[..., None] * sc.astype(jnp.float32))[..., None]        # (..., 8, 1)
  dm = (dmin[..., None] * mn.astype(jnp.float32))[..., None]
  qs = b[..., 16:].reshape(*lead, 4, 32)                          # 4 chunks of 32 bytes
  q = jnp.stack([qs & 0x0F, qs >> 4], axis=-2).reshape(*lead, 8, 32).astype(jnp.float32)
  return (d * q - dm).reshape(*lead, 256)


def _decode_q6_k(arrays, block_size):
  b = arrays["blocks"]
  lead = b.shape[:-1]
  ql, qh = b[..., 0:128], b[..., 128:192]
  sc = jax.lax.bitcast_convert_type(b[..., 192:208], jnp.int8).astype(jnp.float32)
  d = _f16(b[..., 208:210])
  d = (d[..., None] * sc).reshape(*lead, 16, 1)
  ql = ql.reshape(*lead, 2, 1, 64) >> jnp.array([0, 4], jnp.uint8).reshape(2, 1)
  ql = (ql & 0x0F).reshape(*lead, 8, 32)
  qh = qh.reshape(*lead, 2, 1, 32) >> jnp.array([0, 2, 4, 6], jnp.uint8).reshape(4, 1)
  qh = (qh & 0x03).reshape(*lead, 8, 32)
  q = ((ql | (qh << 4)).astype(jnp.int8) - jnp.int8(32)).reshape(*lead, 16, 16)
  return (d * q.astype(jnp.float32)).reshape(*lead, 256)


def _gguf_encoder(type_name):
  def encode(blocks, stack, double_quant):
    import gguf
    qtype = gguf.GGMLQuantizationType[type_name]
    rows = np.asarray(blocks, np.float32)
    rows = rows.reshape(*rows.shape[:-2], -1)
    raw = gguf.quants.quantize(rows, qtype)
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return {"blocks": jnp.asarray(raw.reshape(*blocks.shape[:-1], type_size))}
  return encode


def _no_encoder(type_name):
  def encode(blocks, stack, double_quant):  # pragma: no cover - rejected up front
    raise NotImplementedError(type_name)
  return encode


GGUF_TYPES = {  # name -> (block size, bytes per block, decoder, has a gguf quantizer)
    "Q8_0": (32, 34, _decode_q8_0, True),
    "Q4_0": (32, 18, _decode_q4_0, True),
    "Q4_1": (32, 20, _decode_q4_1, True),
    "Q4_K": (256, 144, _decode_q4_k, False),
    "Q6_K": (256, 210, _decode_q6_k, False),
}


FORMATS: dict[str, Format] = {
    "int8": Format("int8", "codes", None, None, False, False, _encode_int8, _decode_int8),
    "int4": Format("int4", "codes", 64, None, True, True, _encode_int4, _decode_int4),
    "nf4": Format("nf4", "codes", 64, None, True, True, _encode_nf4, _decode_nf4),
}
for _name, (_block, _size, _decode, _quantizes) in GGUF_TYPES.items():
  FORMATS[_name.lower()] = Format(
      _name.lower(), "blocks", _block, _block, False, False,
      _gguf_encoder(_name) if _quantizes else _no_encoder(_name), _decode,
      gguf_type=_name)

GGUF_QUANTIZERS = frozenset(n.lower() for n, v in GGUF_TYPES.items() if v[3])
