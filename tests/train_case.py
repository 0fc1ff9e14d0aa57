"""A tiny language model, its loss and a deterministic data stream, shared by
the training and checkpoint tests (and their subprocess scripts)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora

VOCAB, D, HIDDEN, SEQ = 64, 32, 128, 8


class TinyLM(nn.Module):
  """Embedding, one residual MLP with dropout, tied output projection."""

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    embed = nn.Embed(VOCAB, D, name="embed")
    h = embed(tokens)
    y = nn.gelu(nn.Dense(HIDDEN, name="up")(h))
    y = nn.Dropout(0.25, deterministic=not train)(y)
    h = h + nn.Dense(D, name="down")(y)
    return embed.attend(h)


MODEL = TinyLM()


def base_params(seed: int = 0):
  return MODEL.init(jax.random.key(seed), jnp.zeros((1, SEQ), jnp.int32))


def lorified(seed: int = 0, rank: int = 4):
  return jlora.lorify(base_params(seed), rank, key=jax.random.key(seed + 1), alpha=2 * rank)


def loss_fn(params, batch, key=None):
  """Next-token cross entropy; dropout when a key is given."""
  tokens = batch["tokens"]
  kwargs = {} if key is None else {"rngs": {"dropout": key}}
  logits = jlora.lora(MODEL.apply)(params, tokens[:, :-1], key is not None, **kwargs)
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), tokens[:, 1:]).mean()


def batch(step: int, rows: int = 16, seed: int = 0) -> dict:
  """Batch number ``step``: a function of (seed, step) alone.

  Each row counts upwards (mod VOCAB) from a random start, so the next token
  is learnable.
  """
  rng = np.random.default_rng([seed, step])
  start = rng.integers(0, VOCAB, (rows, 1))
  return {"tokens": ((start + np.arange(SEQ + 1)) % VOCAB).astype(np.int32)}


def optimizer():
  """SGD with momentum: optax's Adam mixes a Python float with an int32 count,
  which the suite's strict dtype promotion (tests/conftest.py) rejects."""
  return optax.sgd(0.3, momentum=0.9)


def flat(tree) -> dict[str, np.ndarray]:
  """``{path: host array}`` for every leaf (for comparisons and npz files)."""
  def host(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)
  return {jax.tree_util.keystr(kp): host(x)
          for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
