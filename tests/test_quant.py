"""Quantized weights: formats against numpy references written here, GGUF bit for bit."""

from __future__ import annotations

import re
import statistics
import types

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import quant

import gguf

QT = gguf.GGMLQuantizationType

# QLoRA (Dettmers et al. 2023), appendix E, copied from the paper.
PAPER_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0]


# ----------------------------------------------------------------- numpy references


def ref_blocks(w, axis, block):
  moved = np.moveaxis(np.asarray(w, np.float32), axis, -1)
  return moved.reshape(*moved.shape[:-1], moved.shape[-1] // block, block)


def ref_unblock(values, axis):
  flat = values.reshape(*values.shape[:-2], -1)
  return np.moveaxis(flat, -1, axis)


def ref_unpack(packed):
  """Two codes a byte, element 2i in the low nibble."""
  packed = np.asarray(packed)
  out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
  out[..., 0::2] = packed & 0x0F
  out[..., 1::2] = packed >> 4
  return out


def ref_linear(blocks, qmax):
  absmax = np.abs(blocks).max(-1)
  safe = np.where(absmax > 0, absmax, np.float32(1))
  q = np.clip(np.round(blocks / safe[..., None] * np.float32(qmax)), -qmax, qmax)
  return q.astype(np.int32).astype(np.float32), absmax * np.float32(1 / qmax)  # codes are integers: no -0


def ref_nf4(blocks):
  code = np.asarray(PAPER_NF4, np.float32)
  absmax = np.abs(blocks).max(-1)
  safe = np.where(absmax > 0, absmax, np.float32(1))
  x = blocks / safe[..., None]
  idx = np.argmin(np.abs(x[..., None] - code), axis=-1).astype(np.uint8)
  return idx, absmax.astype(np.float32)


def ref_double_quant(scale, stack, mean):
  """Scales minus their per-layer mean, int8 absmax in blocks of 256, and back."""
  lead = scale.shape[:stack]
  flat = scale.reshape(*lead, -1)
  count = flat.shape[-1]
  centered = flat - mean[..., None]
  groups = -(-count // 256)
  centered = np.concatenate(
      [centered, np.zeros((*lead, groups * 256 - count), np.float32)], axis=-1)
  q, s2 = ref_linear(centered.reshape(*lead, groups, 256), 127)
  back = (q * s2[..., None] + mean[..., None, None]).reshape(*lead, -1)[..., :count]
  return q.astype(np.int8), s2, back.reshape(scale.shape).astype(np.float32)


def reference(w, fmt, axis, block, *, double_quant=False, stack=0, mean=None):
  """(codes, scale, dequantized) of the format, computed in numpy float32."""
  blocks = ref_blocks(w, axis, block)
  if fmt == "nf4":
    codes, scale = ref_nf4(blocks)
    values = np.asarray(PAPER_NF4, np.float32)[codes]
  else:
    qmax = {"int8": 127, "int4": 7}[fmt]
    codes, scale = ref_linear(blocks, qmax)
    values = codes
  used = scale
  if double_quant:
    _, _, used = ref_double_quant(scale, stack, mean)
  return codes, scale, ref_unblock(values * used[..., None], axis)


def stored_codes(q):
  codes = np.asarray(q.arrays["codes"])
  if q.format == "int8":
    return codes.astype(np.float32)
  u = ref_unpack(codes)
  return u if q.format == "nf4" else u.astype(np.float32) - 8


def bits_equal(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


# ----------------------------------------------------------------- the code book


def test_nf4_code_book_is_the_papers():
  assert list(quant.NF4) == PAPER_NF4


def test_nf4_code_book_is_normal_quantiles():
  """bitsandbytes' `create_normal_map(0.9677083)`, rebuilt with the stdlib."""
  offset, ppf = 0.9677083, statistics.NormalDist().inv_cdf
  pos = [ppf(offset + (0.5 - offset) * i / 8) for i in range(8)]
  neg = [-ppf(offset + (0.5 - offset) * i / 7) for i in range(7)]
  values = sorted(pos + neg + [0.0])
  values = [v / max(values) for v in values]
  np.testing.assert_allclose(quant.NF4, values, atol=2e-7)


# ----------------------------------------------------------------- our formats


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
@pytest.mark.parametrize("axis", [-1, -2])
@pytest.mark.parametrize("jit", [False, True])
def test_format_matches_numpy_reference(fmt, axis, jit):
  w = np.random.default_rng(0).normal(size=(256, 192)).astype(np.float32)
  w[:64, :] = 0.0  # whole zero blocks
  w[70, 5] = 9.0   # one outlier
  block = {"int8": None, "int4": 64, "nf4": 64}[fmt]
  run = jax.jit(lambda p: jlora.quantize(p, fmt, axis=axis)) if jit else \
      (lambda p: jlora.quantize(p, fmt, axis=axis))
  q = run({"kernel": jnp.asarray(w)})["kernel"]
  size = block or w.shape[axis]
  codes, scale, values = reference(w, fmt, axis, size)
  assert q.shape == w.shape and q.dtype == np.float32 and q.block_size == size
  assert np.array_equal(stored_codes(q), codes)
  assert bits_equal(q.arrays["scale"], scale)
  deq = jax.jit(lambda q: q.dequantize())(q) if jit else q.dequantize()
  assert bits_equal(deq, values)


@pytest.mark.parametrize("fmt", ["int4", "nf4"])
def test_double_quant_matches_numpy_reference(fmt):
  w = np.random.default_rng(1).normal(size=(3, 128, 96)).astype(np.float32)
  q = jlora.quantize({"kernel": jnp.asarray(w)}, fmt, double_quant=True, stack=1)["kernel"]
  scale = reference(w, fmt, -2, 64)[1]  # (3, 96, 2): 192 scales a layer, one group
  mean = np.asarray(q.arrays["scale_mean"])
  np.testing.assert_allclose(mean, scale.reshape(3, -1).mean(-1), rtol=1e-6)
  dq_codes, dq_scale, _ = ref_double_quant(scale, 1, mean)
  assert np.array_equal(np.asarray(q.arrays["scale_codes"]), dq_codes)
  assert bits_equal(q.arrays["scale_scale"], dq_scale)
  codes, _, values = reference(w, fmt, -2, 64, double_quant=True, stack=1, mean=mean)
  assert np.array_equal(stored_codes(q), codes)
  np.testing.assert_array_equal(np.asarray(q.dequantize()), values)
  assert "scale" not in q.arrays
  # 8-bit scales: fewer bytes than float32 ones.
  plain = jlora.quantize({"kernel": jnp.asarray(w)}, fmt)["kernel"]
  assert q.nbytes < plain.nbytes


def test_double_quant_pads_groups_per_layer():
  """5184 scales a layer (SmolLM2's 576 x 576 at block 64) is 20.25 groups of 256."""
  w = np.random.default_rng(2).normal(size=(2, 576, 576)).astype(np.float32)
  q = jlora.quantize({"kernel": jnp.asarray(w)}, "nf4", double_quant=True, stack=1)["kernel"]
  assert q.arrays["scale_codes"].shape == (2, 21, 256)
  mean = np.asarray(q.arrays["scale_mean"])
  _, _, values = reference(w, "nf4", -2, 64, double_quant=True, stack=1, mean=mean)
  np.testing.assert_array_equal(np.asarray(q.dequantize()), values)
  layer = jax.tree.map(lambda x: x[1], q)  # what lax.scan hands one layer
  np.testing.assert_array_equal(np.asarray(layer.dequantize()), values[1])


def test_bytes_per_parameter():
  w = jnp.zeros((576, 1536))
  sizes = {f: jlora.quantize({"kernel": w}, f)["kernel"].nbytes / w.size
           for f in ("int8", "int4", "nf4", "q8_0", "q4_0", "q4_1")}
  assert sizes == {"int8": 1 + 4 / 576, "int4": 0.5 + 4 / 64, "nf4": 0.5 + 4 / 64,
                   "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32}
  dq = jlora.quantize({"kernel": w}, "nf4", double_quant=True)["kernel"]
  assert dq.nbytes / w.size < 0.5 + 1.1 / 64  # 8-bit scales + a float per 256
  assert dq.nbytes / (w.size * 4) < 0.13


@hypothesis.given(
    fmt=st.sampled_from(["int8", "int4", "nf4"]),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    rows=st.integers(1, 5), blocks=st.integers(1, 3),
    block=st.sampled_from([2, 4, 8, 16, 64]), axis=st.sampled_from([-1, -2]),
    double_quant=st.booleans(), seed=st.integers(0, 2**16), scale=st.sampled_from([1e-3, 1.0, 50.0]))
def test_property_dequantize_is_reference_and_close(fmt, lead, rows, blocks, block, axis,
                                                    double_quant, seed, scale):
  n = blocks * block
  shape = (*lead, rows, n) if axis == -1 else (*lead, n, rows)
  w = (scale * np.random.default_rng(seed).standard_t(3, size=shape)).astype(np.float32)
  dq = double_quant and fmt != "int8"
  q = jlora.quantize({"kernel": jnp.asarray(w)}, fmt, axis=axis, block_size=block,
                     double_quant=dq, stack=len(lead))["kernel"]
  assert q.shape == w.shape and q.dtype == w.dtype and q.ndim == w.ndim
  mean = np.asarray(q.arrays["scale_mean"]) if dq else None
  codes, scale_ref, values = reference(w, fmt, axis, block, double_quant=dq,
                                       stack=len(lead), mean=mean)
  assert np.array_equal(stored_codes(q), codes)
  deq = np.asarray(q.dequantize())
  if dq:
    np.testing.assert_allclose(deq, values, rtol=1e-6, atol=1e-30)
  else:
    assert bits_equal(deq, values)
    # Error bound: half a step of the grid, times the block's absmax.
    half_step = {"int8": 0.5 / 127, "int4": 0.5 / 7,
                 "nf4": max(np.diff(PAPER_NF4)) / 2}[fmt]
    absmax = np.abs(ref_blocks(w, axis, block)).max(-1, keepdims=True)
    err = np.abs(ref_blocks(deq - w, axis, block))
    assert np.all(err <= absmax * half_step * (1 + 1e-5))
  # Leading axes slice like any array (lax.scan, vmap, sharding).
  if lead:
    first = jax.tree.map(lambda x: x[0], q)
    np.testing.assert_array_equal(np.asarray(first.dequantize()), deq[0])
  # Values already on the grid keep their codes (scales to rounding).
  if not dq:
    again = jlora.quantize({"kernel": jnp.asarray(deq)}, fmt, axis=axis, block_size=block)
    assert np.array_equal(stored_codes(again["kernel"]), codes)
    np.testing.assert_allclose(np.asarray(again["kernel"].dequantize()), deq, rtol=1e-6)


def test_bf16_weights_keep_their_dtype():
  w = jax.random.normal(jax.random.key(0), (128, 64), jnp.bfloat16)
  q = jlora.quantize({"kernel": w}, "nf4")["kernel"]
  assert q.dtype == jnp.bfloat16 and q.dequantize().dtype == jnp.bfloat16
  assert q.dequantize(jnp.float32).dtype == jnp.float32
  codes, scale, values = reference(np.asarray(w, np.float32), "nf4", -2, 64)
  np.testing.assert_array_equal(np.asarray(q.dequantize(jnp.float32)), values)


# ----------------------------------------------------------------- the pytree


def test_pytree_children_are_the_stored_arrays():
  params = {"dense": {"kernel": jnp.ones((128, 32)), "bias": jnp.zeros(32)},
            "embed": {"embedding": jnp.ones((10, 64))}}
  q = jlora.quantize(params, "nf4", double_quant=True)
  paths = sorted(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(q))
  assert paths == ["['dense']['bias']",
                   "['dense']['kernel'].codes", "['dense']['kernel'].scale_codes",
                   "['dense']['kernel'].scale_mean", "['dense']['kernel'].scale_scale",
                   "['embed']['embedding'].codes", "['embed']['embedding'].scale_codes",
                   "['embed']['embedding'].scale_mean", "['embed']['embedding'].scale_scale"]
  assert all(jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.float32
             for x in jax.tree.leaves(q))
  assert q["embed"]["embedding"].axis == -1   # blocks along the features of a table
  assert q["dense"]["kernel"].axis == -2      # and along a kernel's input axis
  out = jax.jit(lambda t: jlora.dequantize(t))(q)
  assert jax.tree.structure(out) == jax.tree.structure(params)
  # Static part in the treedef: same format and layout, same jit cache entry.
  assert jax.tree.structure(q) == jax.tree.structure(jlora.quantize(params, "nf4", double_quant=True))
  assert jax.tree.structure(q) != jax.tree.structure(jlora.quantize(params, "int4"))


def test_dequantize_leaves_other_leaves_alone_and_is_pure():
  params = {"a": {"kernel": jnp.ones((64, 4)), "bias": jnp.zeros(4)}, "step": jnp.int32(3)}
  q = jlora.quantize(params, "int4")
  before = jax.tree.map(np.asarray, q)
  back = jlora.dequantize(q, jnp.bfloat16)
  assert back["a"]["kernel"].dtype == jnp.bfloat16 and back["a"]["bias"].dtype == jnp.float32
  assert back["step"] is q["step"]
  assert jax.tree.all(jax.tree.map(np.array_equal, jax.tree.map(np.asarray, q), before))


def test_mT_is_a_view():
  w = np.random.default_rng(3).normal(size=(64, 96)).astype(np.float32)
  q = jlora.quantize({"kernel": jnp.asarray(w)}, "nf4")["kernel"]
  t = q.mT
  assert t.shape == (96, 64) and t.axis == -1 and t.arrays["codes"] is q.arrays["codes"]
  np.testing.assert_array_equal(np.asarray(t.dequantize()), np.asarray(q.dequantize()).T)
  assert t.mT.axis == q.axis


def test_lorified_tree_quantizes_only_the_weights():
  params = {"dense": {"kernel": jnp.ones((64, 32))}}
  lorified = jlora.lorify(params, 4, key=jax.random.key(0))
  q = jlora.quantize(lorified, "nf4")
  assert isinstance(q["dense"]["kernel"], quant.Quantized)
  for k in ("lora_a", "lora_b"):
    assert q["dense"][k] is lorified["dense"][k]


# ----------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def reader():
  try:
    from experiments.models.llama import gguf_path
    return gguf.GGUFReader(gguf_path())
  except FileNotFoundError as e:  # the data extra is part of `make test`
    pytest.fail(f"SmolLM2 GGUF file missing: {e}")


def _exact(t):
  shape = tuple(int(n) for n in reversed(t.shape))
  return gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)


def test_gguf_real_tensors_bit_for_bit(reader):
  """The embedding (Q8_0) and every tensor of two layers (Q4_1, F32)."""
  picked = [t for t in reader.tensors
            if t.name == "token_embd.weight" or t.name.startswith(("blk.0.", "blk.29."))]
  assert {t.tensor_type.name for t in picked} == {"Q8_0", "Q4_1", "F32"}
  for t in picked:
    leaf = quant.from_gguf(t)
    got = jax.jit(lambda x: x.dequantize())(leaf) if isinstance(leaf, quant.Quantized) else leaf
    assert bits_equal(got, _exact(t)), t.name
    if isinstance(leaf, quant.Quantized):
      assert leaf.nbytes == t.data.nbytes, t.name   # kept in its blocks, no more


def test_gguf_transpose_and_rows_are_views(reader):
  from experiments.models.llama import unpermute_qk
  t = next(t for t in reader.tensors if t.name == "blk.3.attn_q.weight")
  heads, out = 9, int(t.shape[1])
  rows = np.arange(out).reshape(heads, -1, 2).swapaxes(1, 2).reshape(-1)
  kernel = quant.from_gguf(t, transpose=True, rows=rows)
  want = np.ascontiguousarray(unpermute_qk(_exact(t), heads).T)  # what the port loads
  assert kernel.shape == want.shape and kernel.axis == -2
  assert bits_equal(kernel.dequantize(), want)
  assert kernel.nbytes == t.data.nbytes


def test_the_port_in_blocks_equals_the_port_in_float(reader):
  """`llama.convert_gguf(blocks=True)` (the QLoRA base) decodes bit for bit to
  the float tree the port loads, Q/K un-permutation included (3 layers)."""
  import dataclasses

  from experiments.models import llama
  config = dataclasses.replace(llama.config_from_gguf(reader), num_hidden_layers=3)
  blocks = llama.convert_gguf(reader, config, blocks=True)
  floats = llama.convert_gguf(reader, config)
  assert jax.tree.structure(floats) == jax.tree.structure(
      jax.tree.map(lambda x: 0, blocks, is_leaf=quant.is_quantized))
  n_quantized = 0
  for got, want in zip(jax.tree.leaves(blocks, is_leaf=quant.is_quantized),
                       jax.tree.leaves(floats)):
    if isinstance(got, quant.Quantized):
      n_quantized += 1
      got = jax.jit(lambda x: x.dequantize())(got)
    assert bits_equal(got, want)
  assert n_quantized == 1 + 7 * 3  # the embedding and every linear weight


def _tensor(qtype, raw, name="w"):
  """A stand-in for a `gguf` ReaderTensor (name, type, ne, data)."""
  return types.SimpleNamespace(name=name, tensor_type=qtype, data=raw,
                               shape=np.asarray(
                                   gguf.quants.quant_shape_from_byte_shape(raw.shape, qtype)[::-1]))


@hypothesis.given(qtype=st.sampled_from([QT.Q8_0, QT.Q4_0, QT.Q4_1]),
                  rows=st.integers(1, 6), blocks=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_gguf_random_blocks_from_gguf_quantize(qtype, rows, blocks, seed):
  w = np.random.default_rng(seed).normal(size=(rows, 32 * blocks)).astype(np.float32)
  raw = gguf.quants.quantize(w, qtype)
  leaf = quant.from_gguf(_tensor(qtype, raw))
  assert bits_equal(leaf.dequantize(), gguf.quants.dequantize(raw, qtype))
  # jlora.quantize to a GGUF format stores the very same bytes.
  q = jlora.quantize({"kernel": jnp.asarray(w)}, qtype.name.lower(), axis=-1)["kernel"]
  assert np.array_equal(np.asarray(q.arrays["blocks"]).reshape(raw.shape), raw)


@hypothesis.given(qtype=st.sampled_from([QT.Q4_K, QT.Q6_K]),
                  rows=st.integers(1, 4), blocks=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_gguf_k_quants_random_blocks(qtype, rows, blocks, seed):
  """`gguf` has no K quantizer: random block bytes with finite f16 scales."""
  rng = np.random.default_rng(seed)
  size = gguf.GGML_QUANT_SIZES[qtype][1]
  raw = rng.integers(0, 256, size=(rows, blocks, size), dtype=np.uint8)
  f16 = rng.normal(scale=0.05, size=(rows, blocks, 2)).astype(np.float16).view(np.uint8)
  if qtype == QT.Q4_K:
    raw[..., 0:4] = f16.reshape(rows, blocks, 4)       # d, dmin
  else:
    raw[..., 208:210] = f16[..., 0:2]                   # d
  raw = raw.reshape(rows, blocks * size)
  leaf = quant.from_gguf(_tensor(qtype, raw))
  assert leaf.shape == (rows, 256 * blocks)
  assert bits_equal(leaf.dequantize(), gguf.quants.dequantize(raw, qtype))


# ----------------------------------------------------------------- bad input


def _raises(fn, *patterns):
  with pytest.raises(jlora.LoraError) as info:
    fn()
  message = str(info.value)
  for p in patterns:
    assert re.search(p, message), f"{p!r} not in:\n{message}"
  return info.value


def test_error_block_size_does_not_divide():
  params = {"enc": {"kernel": jnp.ones((100, 64))}, "dec": {"kernel": jnp.ones((128, 64))}}
  err = _raises(lambda: jlora.quantize(params, "nf4"),
                r"enc/kernel: axis -2 of shape \(100, 64\) has 100 values, which block size 64",
                r"block_size=")
  assert len(err.problems) == 1                      # dec/kernel is fine
  _raises(lambda: jlora.quantize(params, "nf4", block_size=5), "must be even")
  _raises(lambda: jlora.quantize(params, "q4_1", block_size=64), "blocks of 32")
  _raises(lambda: jlora.quantize(params, "nf4", axis=2), "not an axis of a rank-2")


def test_error_integer_and_already_quantized_leaves():
  params = {"ids": {"kernel": jnp.ones((64, 64), jnp.int32)},
            "dense": {"kernel": jnp.ones((64, 64))}}
  _raises(lambda: jlora.quantize(params, "nf4", targets=re.compile("kernel")),
          r"ids/kernel: a int32 array cannot be quantized", "targets=")
  q = jlora.quantize(params, "nf4")                  # default targets skip integers
  assert isinstance(q["dense"]["kernel"], quant.Quantized) and q["ids"]["kernel"].dtype == jnp.int32
  _raises(lambda: jlora.quantize(q, "int8"), r"dense/kernel: already quantized \(nf4\)",
          "jlora.dequantize")


def test_error_unknown_format_and_all_problems_at_once():
  params = {"a": {"kernel": jnp.ones((64, 8))}, "b": {"kernel": jnp.ones((30, 8))}}
  err = _raises(lambda: jlora.quantize(params, {"^a": "nf5", "^b": "int4"}),
                r"a/kernel: unknown format 'nf5'; use one of \[", r"b/kernel: axis -2")
  assert len(err.problems) == 2
  _raises(lambda: jlora.quantize(params, {"^a": "nf4"}), r"b/kernel: no pattern in `format`")
  _raises(lambda: jlora.quantize(params, "q4_k"), "no quantizer in `gguf`")
  _raises(lambda: jlora.quantize(params, "int8", double_quant=True), "no double quantization")
  _raises(lambda: jlora.quantize(params, "nf4", stack=2), r"stack=2 must count leading axes")


def test_error_unsupported_gguf_type():
  raw = np.zeros((2, 176), np.uint8)                 # Q5_K: 176 bytes per 256 values
  err = _raises(lambda: quant.from_gguf(_tensor(QT.Q5_K, raw, "blk.0.ffn_up.weight")),
                r"blk.0.ffn_up.weight: GGUF tensor type Q5_K is not supported",
                r"gguf.quants.dequantize")
  assert len(err.problems) == 1
  raw = gguf.quants.quantize(np.ones((4, 32), np.float32), QT.Q4_1)
  _raises(lambda: quant.from_gguf(_tensor(QT.Q4_1, raw), rows=[0, 1, 1, 2]),
          "rows must be a permutation")


def test_error_mT_needs_block_axis_last_two():
  q = jlora.quantize({"kernel": jnp.ones((64, 2, 3))}, "nf4", axis=0)["kernel"]
  _raises(lambda: q.mT, "block axis among the last two")
