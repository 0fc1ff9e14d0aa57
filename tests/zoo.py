"""Small models of every kind the runtime must handle, for the tests."""

from __future__ import annotations

import dataclasses
import functools
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


_BUILDERS: dict[str, Callable[[], Case]] = {}


def _builder(fn):
  _BUILDERS[fn.__name__.removeprefix("_")] = fn
  return fn


KEY = jax.random.key(0)


@_builder
def _transformer():
  tokens = jax.random.randint(KEY, (2, 7), 0, 37)
  m = Transformer()
  return Case("transformer", m.init(KEY, tokens), m.apply, (tokens,))


@_builder
def _cnn_batchnorm():
  x = jax.random.normal(KEY, (2, 9, 9, 3))
  c = CNN()
  return Case("cnn_batchnorm", c.init(KEY, x), c.apply, (x,))


@_builder
def _scan():
  x = jax.random.normal(KEY, (4, 12))
  s = Scanned()
  return Case("scan", s.init(KEY, x), s.apply, (x,), lorify=dict(axes=jlora.Axes(stack=1)))


@_builder
def _scan_remat():
  x = jax.random.normal(KEY, (4, 12))
  s = Scanned(remat=True)
  return Case("scan_remat", s.init(KEY, x), s.apply, (x,),
              lorify=dict(axes=jlora.Axes(stack=1)))


@_builder
def _bf16_general():
  x = jax.random.normal(KEY, (5, 8))
  mx = Mixed()
  return Case("bf16_general", mx.init(KEY, x), mx.apply, (x,), tol=2e-2)


@_builder
def _nnx():
  model = NNXMLP(nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  def nnx_fn(pure, x):
    st = nnx.State(jax.tree.map(lambda v: v, state))
    nnx.replace_by_pure_dict(st, pure)
    return nnx.merge(graphdef, st)(x)

  return Case("nnx", nnx.to_pure_dict(state), nnx_fn, (jax.random.normal(KEY, (3, 6)),))


@_builder
def _plain():
  k1, k2 = jax.random.split(KEY)
  p = {"w1": {"kernel": jax.random.normal(k1, (6, 8)), "bias": jnp.zeros(8)},
       "w2": {"kernel": jax.random.normal(k2, (8, 3))}}
  return Case("plain", p, plain_fn, (jax.random.normal(KEY, (4, 6)),))


NAMES = tuple(_BUILDERS)


@functools.cache
def case(name: str) -> Case:
  """The named case, built once per test process."""
  return _BUILDERS[name]()
