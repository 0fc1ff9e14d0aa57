"""DoRA (Liu et al., 2024): weight-decomposed low-rank adaptation, and `dora`."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora import _add, _labels, _targets
from jlora._errors import Problems
from jlora._targets import Axes, Targets
from jlora._tree import Path, path_str
from jlora.methods.base import (DEFAULT_NAME, Method, WeightLabels, check_low_rank,
                                check_rank_fits, check_rate)
from jlora.methods.lora import LoRA, peft_fuse_low_rank, peft_low_rank, peft_low_rank_config
from jlora.methods.scaling import scale_weight, scaled_conv, scaled_dot, scaled_gather


@dataclasses.dataclass(frozen=True)
class DoRA(Method):
  """DoRA (Liu et al., 2024): ``W' = m ⊙ (W + s·A·B) / ‖W + s·A·B‖``.

  A LoRA update on the direction plus a learned magnitude ``m`` per output
  (over the stacked and output axes), initialised to ``‖W‖``, the norm over
  the input axes, so the model starts out unchanged. As in the paper and
  PEFT, the norm is a constant for gradients (``stop_gradient``).

  Factored: ``y = (m / ‖·‖) ⊙ (x·W + s·(x·A)·B)``. The norm per output comes
  from ``‖W_o‖² + 2s·(Wᵀ·A)_o·b_o + s²·b_oᵀ·(Aᵀ·A)·b_o``, without a dense
  ``A·B``; it is computed once per call, when the weight enters `lora` (or
  `merge`). Slicing the weight along its *input* axes before using it is not
  supported (the norm runs over the input axes in hand).

  Attributes:
    rank, alpha, rslora, dropout: as in `LoRA` (dropout acts on the LoRA
      path only, as in PEFT).
    weight, stack, inputs, order, name: as in `LoRA`.
  """

  rank: int
  alpha: float
  rslora: bool = False
  dropout: float = 0.0

  prefix = "dora"
  leaves = ("a", "b", "m")

  @property
  def lora(self) -> LoRA:
    return LoRA(rank=self.rank, alpha=self.alpha, weight=self.weight, stack=self.stack,
                inputs=self.inputs, layout=self.layout, rslora=self.rslora,
                dropout=self.dropout)

  @property
  def scale(self) -> float:
    return self.lora.scale

  def describe(self) -> str:
    return f"DoRA(rank={self.rank}, alpha={self.alpha:g})"

  def shapes(self, weight_shape):
    s, _, o = self.split_shape(weight_shape)
    return self.lora.shapes(weight_shape) + (s + o,)

  def create(self, key, weight, *, dtype):
    (a, b), _ = self.lora.create(key, weight, dtype=dtype)
    s, i, _ = self.split_shape(weight.shape)
    axes = tuple(range(len(s), len(s) + len(i)))  # in role order: stack + outputs stay
    w = self.to_role_order(weight.astype(jnp.float32))
    m = jnp.sqrt(jnp.sum(w * w, axis=axes))
    return (a, b, m.astype(dtype)), weight

  def labels(self, weight: WeightLabels, tag: str):
    return self.lora.labels(weight, tag) + (weight.stack + weight.outputs,)

  def prepare(self, w_labels, arrays, labels, inner_weight):
    a, b, m = arrays
    al, bl, ml = labels
    w = lax.stop_gradient(inner_weight()).astype(jnp.float32)
    a = lax.stop_gradient(a).astype(jnp.float32)
    b = lax.stop_gradient(b).astype(jnp.float32)
    r = next(l for l in bl if l in al and l not in w_labels)
    r2 = _labels.fresh("r")
    bl2 = tuple(r2 if l == r else l for l in bl)
    rest = tuple(l for l in al if l in ml)  # stacked axes
    s = jnp.float32(self.scale)
    sq = _labels.einsum(ml, (w * w, w_labels))
    wa = _labels.einsum(rest + (r,) + tuple(l for l in ml if l not in rest),
                        (w, w_labels), (a, al))
    cross = _labels.einsum(ml, (wa, rest + (r,) + tuple(l for l in ml if l not in rest)),
                           (b, bl))
    gram = _labels.einsum(rest + (r, r2), (a, al),
                          (a, tuple(r2 if l == r else l for l in al)))
    quad = _labels.einsum(ml, (gram, rest + (r, r2)), (b, bl), (b, bl2))
    norm = jnp.sqrt(jnp.maximum(sq + 2 * s * cross + s * s * quad, 0.0))
    c = m / lax.stop_gradient(norm).astype(m.dtype)
    return (arrays[0], arrays[1], c), labels

  def fold(self, w, w_labels, arrays, labels):
    a, b, c = arrays
    folded = self.lora.fold(w, w_labels, (a, b), labels[:2])
    return scale_weight(folded, w_labels, c, labels[2])

  def dot(self, use, arrays, labels, inner):
    def compute(x):
      return self.lora.dot(dataclasses.replace(use, x=x), arrays[:2], labels[:2], inner)
    return scaled_dot(use, arrays[2], labels[2], compute)

  def conv(self, use, arrays, labels, inner):
    def compute(x):
      out = self.lora.conv(dataclasses.replace(use, x=x), arrays[:2], labels[:2], inner)
      if out is None:
        raise _NoConv
      return out
    try:
      return scaled_conv(use, arrays[2], labels[2], compute)
    except _NoConv:
      return None


  def gather(self, use, arrays, labels, inner):
    def compute():
      out = self.lora.gather(use, arrays[:2], labels[:2], inner)
      if out is None:
        raise _NoConv
      return out
    try:
      return scaled_gather(use, arrays[2], labels[2], compute)
    except _NoConv:
      return None


  # -- PEFT: LoraConfig with use_dora; LoRA's tensors + lora_magnitude_vector
  peft_type = "LORA"

  @classmethod
  def peft_reads(cls, config):
    return config.get("peft_type") == "LORA" and bool(config.get("use_dora"))

  def peft_tensors(self, arrays, *, embedding):
    tensors = self.lora.peft_tensors(arrays[:2], embedding=embedding)
    tensors["lora_magnitude_vector"] = arrays[2]  # (out,), as dora_m
    return tensors

  @classmethod
  def peft_config(cls, methods):
    return peft_low_rank_config(methods, use_dora=True)

  @classmethod
  def from_peft(cls, config, module, tensors, *, shape, embedding, name):
    options, (a, b) = peft_low_rank(config, module, tensors, shape=shape,
                                    embedding=embedding)
    m = tensors.pop("lora_magnitude_vector", None)
    if m is None:
      raise ValueError(f"lora_magnitude_vector missing for {module} (use_dora is set); "
                       "the file is incomplete")
    if m.shape != (shape[1],):
      raise ValueError(f"lora_magnitude_vector {m.shape} does not fit {module} (expected "
                       f"({shape[1]},), one per output); the adapter belongs to another "
                       "model")
    return cls(**options, name=name), (a, b, m)

  @classmethod
  def peft_fuse(cls, parts):
    # The norm runs per output, so each part keeps its own: m = [m_1 … m_k],
    # and ‖W_k‖ (its value at init) for a part without an adapter.
    options, (a, b) = peft_fuse_low_rank(
        [(m and m.lora, arrays and arrays[:2], n, w) for m, arrays, n, w in parts])
    ms = [np.asarray(arrays[2], np.float32) if m is not None else
          np.linalg.norm(np.asarray(w, np.float32), axis=0) for m, arrays, _, w in parts]
    name = next(m for m, *_ in parts if m is not None).name
    return cls(**options, name=name), (a, b, np.concatenate(ms).astype(a.dtype))

  def peft_split(self, arrays, sizes):
    a, b, m = arrays
    cuts = np.cumsum((0,) + tuple(sizes))
    return [(self, (a, b[:, lo:hi], m[lo:hi])) for lo, hi in zip(cuts[:-1], cuts[1:])]


class _NoConv(Exception):
  pass


def dora(params: Any, rank: int | dict, *, key: jax.Array, targets: Targets = None,
         alpha: float | dict | None = None, axes: Axes | dict | None = None,
         trainable: Targets = None, rslora: bool = False, dropout: float = 0.0,
         name: str = DEFAULT_NAME, dtype=None) -> Any:
  """Adds DoRA adapters (``dora_a``, ``dora_b``, magnitude ``dora_m``).

  Same options as `lorify` (``rank``/``alpha``/``axes`` may be
  ``{regex: value}``); ``B`` starts at zero and ``m`` at the weight's norm
  per output, so the model starts out unchanged. See `DoRA`.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"dense": {"kernel": jnp.ones((4, 6))}}
    >>> p = jlora.dora(params, 2, key=jax.random.key(0))
    >>> p["dense"]["dora_m"]  # ‖W‖ over the inputs, per output
    Array([2., 2., 2., 2., 2., 2.], dtype=float32)
    >>> y = jlora.lora(lambda p, x: x @ p["dense"]["kernel"])(p, jnp.ones(4))
    >>> bool(jnp.allclose(y, 4.0))
    True
  """
  pre = Problems("jlora: cannot add DoRA adapters")
  _add.check_name(name, pre)
  _add.check_flag(rslora, "rslora", pre)
  _targets.check_axes(axes, pre)
  check_rate(dropout, "dropout", pre)
  check_low_rank(rank, alpha, pre)

  def make(path: Path, leaf) -> DoRA:
    where = path_str(path)
    r = _targets.per_path(rank, where, name="rank")
    a = r if alpha is None else _targets.per_path(alpha, where, name="alpha")
    stack, inputs, layout = _targets.placement(path, leaf, axes)
    method = DoRA(rank=int(r), alpha=float(a), weight=path[-1], stack=stack,
                  inputs=inputs, layout=layout, rslora=rslora, dropout=float(dropout),
                  name=name)
    check_rank_fits(where, method, leaf.shape)
    return method

  return _add.add_adapters(params, make, key=key, targets=targets, trainable=trainable,
                           dtype=dtype, what="DoRA adapters", problems=pre)
