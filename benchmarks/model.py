"""The reference model for the benchmarks: a small GPT-2-style decoder in Linen.

Pre-LN blocks with causal multi-head attention (``q``, ``k``, ``v``, ``o`` as
separate ``nn.Dense`` layers) and a GELU MLP (``fc1``, ``fc2``); learned
positions; the LM head is tied to the token embedding via ``nn.Embed.attend``.
The default config is the one in BENCHMARKS.md: 6 layers, d 384, 6 heads,
MLP 1536, vocab 8192, sequence 128.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Config:
  layers: int = 6
  d: int = 384
  heads: int = 6
  mlp: int = 1536
  vocab: int = 8192
  seq: int = 128
  batch: int = 8


QUICK = Config(layers=2, d=64, heads=4, mlp=256, vocab=512, seq=32, batch=4)


class Block(nn.Module):
  cfg: Config

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    b, t, d = x.shape
    hd = d // cfg.heads
    h = nn.LayerNorm(name="ln1")(x)
    q = nn.Dense(d, name="q")(h).reshape(b, t, cfg.heads, hd)
    k = nn.Dense(d, name="k")(h).reshape(b, t, cfg.heads, hd)
    v = nn.Dense(d, name="v")(h).reshape(b, t, cfg.heads, hd)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(hd)).astype(q.dtype)
    causal = jnp.tril(jnp.ones((t, t), bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    att = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d)
    x = x + nn.Dense(d, name="o")(out)
    h = nn.LayerNorm(name="ln2")(x)
    h = nn.Dense(cfg.mlp, name="fc1")(h)
    h = nn.gelu(h)
    return x + nn.Dense(d, name="fc2")(h)


class GPT(nn.Module):
  cfg: Config

  @nn.compact
  def __call__(self, tokens):
    cfg = self.cfg
    wte = nn.Embed(cfg.vocab, cfg.d, name="wte",
                   embedding_init=nn.initializers.normal(0.02))
    wpe = self.param("wpe", nn.initializers.normal(0.01), (cfg.seq, cfg.d))
    x = wte(tokens) + wpe[: tokens.shape[1]]
    for i in range(cfg.layers):
      x = Block(cfg, name=f"h{i}")(x)
    x = nn.LayerNorm(name="ln_f")(x)
    return wte.attend(x)


def next_token_loss(logits, tokens):
  """Mean next-token cross-entropy: position t predicts token t+1."""
  logp = jax.nn.log_softmax(logits[:, :-1])
  target = tokens[:, 1:]
  return -jnp.mean(jnp.take_along_axis(logp, target[..., None], axis=-1))


@jax.custom_vjp
def _nll(logits, target):
  """Per-position ``logsumexp(logits) - logits[target]``; its backward is written out."""
  return _nll_fwd(logits, target)[0]


def _nll_fwd(logits, target):
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
  return lse - picked, (logits, lse, target)


def _nll_bwd(res, g):
  logits, lse, target = res
  classes = jnp.arange(logits.shape[-1], dtype=target.dtype)
  onehot = (target[..., None] == classes).astype(logits.dtype)
  return g[..., None] * (jnp.exp(logits - lse[..., None]) - onehot), None


_nll.defvjp(_nll_fwd, _nll_bwd)


def next_token_loss_explicit(logits, tokens):
  """`next_token_loss` with its backward written out: ``softmax - onehot`` from the
  saved logits and log-normaliser, in one elementwise pass (no shifted copy, no
  scatter), to tell the loss's buffers from the model's in memory profiles."""
  return jnp.mean(_nll(logits[:, :-1], tokens[:, 1:]))


LOSSES = {"standard": next_token_loss, "explicit": next_token_loss_explicit}
