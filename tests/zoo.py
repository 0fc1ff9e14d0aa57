"""Small models of every kind the runtime must handle, for the tests."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

import jlora


@dataclasses.dataclass
class Case:
  name: str
  params: Any                    # the base variables/tree
  fn: Callable                   # fn(params, *inputs) -> array or tree
  inputs: tuple
  lorify: dict = dataclasses.field(default_factory=dict)
  tol: float = 1e-5


class Transformer(nn.Module):
  """A pre-LN transformer block stack built on Flax's own attention."""
  vocab: int = 37
  d: int = 16
  heads: int = 4
  layers: int = 2

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(self.vocab, self.d, name="embed")
    h = embed(tokens)
    for i in range(self.layers):
      y = nn.LayerNorm()(h)
      y = nn.MultiHeadDotProductAttention(num_heads=self.heads, name=f"attn_{i}")(
          y, mask=nn.make_causal_mask(tokens))
      h = h + y
      y = nn.LayerNorm()(h)
      y = nn.Dense(4 * self.d, name=f"up_{i}")(y)
      y = nn.Dense(self.d, name=f"down_{i}")(nn.gelu(y))
      h = h + y
    return embed.attend(nn.LayerNorm()(h))


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), name="conv1")(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x)
    x = nn.Conv(12, (3, 3), strides=2, padding="VALID", name="conv2")(x)
    x = x.mean(axis=(1, 2))
    return nn.Dense(5, name="head")(x)


class Block(nn.Module):
  d: int

  @nn.compact
  def __call__(self, h, _):
    y = nn.Dense(2 * self.d, name="up")(h)
    return h + nn.Dense(self.d, name="down")(jnp.tanh(y)), None


class Scanned(nn.Module):
  d: int = 12
  layers: int = 3
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    block = nn.remat(Block) if self.remat else Block
    stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                    length=self.layers)
    h, _ = stack(self.d, name="layers")(x, None)
    return h


class Mixed(nn.Module):
  """bf16 compute with f32 params; DenseGeneral and Einsum kernels."""

  @nn.compact
  def __call__(self, x):
    h = nn.DenseGeneral((3, 4), dtype=jnp.bfloat16, name="qkv")(x)
    h = nn.DenseGeneral(10, axis=(-2, -1), dtype=jnp.bfloat16, name="out")(h)
    h = nn.Einsum((10, 6), "bd,de->be", name="einsum", dtype=jnp.bfloat16)(h)
    return h.astype(jnp.float32)


class NNXMLP(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(6, 10, rngs=rngs)
    self.down = nnx.Linear(10, 4, rngs=rngs)

  def __call__(self, x):
    return self.down(nnx.relu(self.up(x)))


def plain_fn(p, x):
  h = jnp.tanh(x @ p["w1"]["kernel"] + p["w1"]["bias"])
  return jnp.einsum("bi,io->bo", h, p["w2"]["kernel"])


def cases() -> list[Case]:
  key = jax.random.key(0)
  out = []
  tokens = jax.random.randint(key, (2, 7), 0, 37)
  m = Transformer()
  out.append(Case("transformer", m.init(key, tokens), m.apply, (tokens,)))
  x = jax.random.normal(key, (2, 9, 9, 3))
  c = CNN()
  out.append(Case("cnn_batchnorm", c.init(key, x), c.apply, (x,)))
  x = jax.random.normal(key, (4, 12))
  s = Scanned()
  out.append(Case("scan", s.init(key, x), s.apply, (x,),
                  lorify=dict(axes=jlora.Axes(stack=1))))
  s = Scanned(remat=True)
  out.append(Case("scan_remat", s.init(key, x), s.apply, (x,),
                  lorify=dict(axes=jlora.Axes(stack=1))))
  x = jax.random.normal(key, (5, 8))
  mx = Mixed()
  out.append(Case("bf16_general", mx.init(key, x), mx.apply, (x,), tol=2e-2))
  model = NNXMLP(nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  def nnx_fn(pure, x):
    st = nnx.State(jax.tree.map(lambda v: v, state))
    nnx.replace_by_pure_dict(st, pure)
    return nnx.merge(graphdef, st)(x)

  out.append(Case("nnx", nnx.to_pure_dict(state), nnx_fn,
                  (jax.random.normal(key, (3, 6)),)))
  k1, k2 = jax.random.split(key)
  p = {"w1": {"kernel": jax.random.normal(k1, (6, 8)), "bias": jnp.zeros(8)},
       "w2": {"kernel": jax.random.normal(k2, (8, 3))}}
  out.append(Case("plain", p, plain_fn, (jax.random.normal(key, (4, 6)),)))
  return out
