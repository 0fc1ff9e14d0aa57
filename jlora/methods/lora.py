"""LoRA: ``W + s·A·B`` with ``s = alpha / rank`` (Hu et al., 2021), and `lorify`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora import _add, _labels, _targets
from jlora._errors import Problems
from jlora._targets import Axes, Targets
from jlora._tree import Path, path_str
from jlora.methods.base import (ConvUse, DotUse, GatherUse, Method, WeightLabels,
                                check_low_rank, check_rank_fits, check_rate)

INITS = ("kaiming", "gaussian", "pissa")


@dataclasses.dataclass(frozen=True, repr=False)
class LoRA(Method):
  """Low-rank adaptation of one weight: ``W + (alpha / rank) · A·B``.

  ``A`` has the weight's (stacked and) input axes plus ``rank``; ``B`` has
  ``rank`` plus the output axes. ``B`` starts at zero, so the adapted model
  starts out equal to the base model.

  Attributes:
    rank: the rank ``r`` of the update.
    alpha: the scaling numerator; the update is scaled by ``alpha / rank``
      (or ``alpha / sqrt(rank)`` with ``rslora=True``).
    weight: key of the adapted weight in its mapping.
    stack: leading stacked axes (``nn.scan`` layers), kept in front of A and B.
    inputs: number of input axes of the weight after the stacked ones.
    order: position among the methods on the same weight.
    rslora: use rank-stabilised scaling ``alpha / sqrt(rank)``.
    init: ``"kaiming"`` (PEFT's default: A ~ U(±1/sqrt(fan_in))),
      ``"gaussian"`` (A ~ N(0, 1/rank²)), or ``"pissa"`` (PiSSA, Meng et al.
      2024: ``A = U_r·sqrt(S_r)``, ``B = sqrt(S_r)·V_rᵀ`` from the top-``r``
      SVD ``W = U·S·Vᵀ``, divided by ``sqrt(scale)`` so that ``s·A·B`` is the
      principal part; the weight becomes the residual ``W − s·A·B``, so the
      model is unchanged at init. Save that residual base with the adapters:
      `load_adapters` onto the original base would count the principal part
      twice).
    dropout: PEFT's ``lora_dropout``: inverted dropout on ``x`` before ``A``,
      active only when `lora` gets an ``rng`` (training).
    name: the adapter's name; ``"default"`` keeps the plain ``lora`` keys,
      any other name gives ``lora@name`` keys (several adapters on one weight).
  """

  rank: int
  alpha: float
  rslora: bool = False
  init: str = "kaiming"
  dropout: float = 0.0

  prefix = "lora"
  leaves = ("a", "b")

  @property
  def scale(self) -> float:
    denom = math.sqrt(self.rank) if self.rslora else self.rank
    return float(self.alpha) / denom

  def describe(self) -> str:
    extra = ", rslora" if self.rslora else ""
    return f"LoRA(rank={self.rank}, alpha={self.alpha:g}{extra})"

  def shapes(self, weight_shape):
    s, i, o = self.split_shape(weight_shape)
    return (s + i + (self.rank,), s + (self.rank,) + o)

  def create(self, key, weight, *, dtype):
    a_shape, b_shape = self.shapes(weight.shape)
    fan_in = math.prod(self.split_shape(weight.shape)[1])
    if self.init == "kaiming":
      bound = 1.0 / math.sqrt(fan_in)
      a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
    elif self.init == "gaussian":
      a = jax.random.normal(key, a_shape, dtype) / self.rank
    elif self.init == "pissa":
      return self._pissa(weight, dtype)
    else:  # validated by lorify
      raise ValueError(f"unknown init {self.init!r}")
    return (a, jnp.zeros(b_shape, dtype)), weight

  def _pissa(self, weight, dtype):
    s, i, o = self.split_shape(weight.shape)
    n_in, n_out = math.prod(i), math.prod(o)
    w = self.to_role_order(weight.astype(jnp.float32)).reshape((-1, n_in, n_out))
    u, sv, vt = jnp.linalg.svd(w, full_matrices=False)
    root = jnp.sqrt(sv[:, :self.rank] / self.scale)
    a = u[:, :, :self.rank] * root[:, None, :]
    b = root[:, :, None] * vt[:, :self.rank, :]
    residual = w - self.scale * jnp.einsum("sir,sro->sio", a, b)
    a_shape, b_shape = self.shapes(weight.shape)
    return ((a.reshape(a_shape).astype(dtype), b.reshape(b_shape).astype(dtype)),
            self.from_role_order(residual.reshape(s + i + o)).astype(weight.dtype))

  def labels(self, weight: WeightLabels, tag: str):
    r = f"r{tag}"
    return (weight.stack + weight.inputs + (r,), weight.stack + (r,) + weight.outputs)

  def fold(self, w, w_labels, arrays, labels):
    a, b = arrays
    dtype = jnp.promote_types(w.dtype, a.dtype)
    delta = _labels.einsum(w_labels, (a.astype(dtype), labels[0]),
                           (b.astype(dtype), labels[1]))
    return (w.astype(dtype) + delta * jnp.asarray(self.scale, dtype)).astype(w.dtype)

  def down(self, arrays, labels, *, training):
    if self.dropout and training:
      return None  # each use draws its own dropout mask of x
    return arrays[0], labels[0], self.scale

  def dot(self, use: DotUse, arrays, labels, inner):
    if use.weight is not None:  # x·W + t·B as one matmul [x | t]·[W ; B]
      y = _labels.fold_into_matmul(
          use.x, use.x_labels, *use.weight, arrays[1], labels[1], use.out_labels,
          t=use.down, a=(arrays[0], labels[0]),
          x_for_a=dropout(use.x, self.dropout, use.rng) if use.down is None else None,
          scale=self.scale, precision=use.precision,
          preferred_element_type=use.preferred_element_type)
      if y is not None:
        return y
    if use.down is not None:  # s·x·A was computed with other weights' A (fusion)
      base = inner(use.x)
      delta = _labels.contract(use.out_labels, use.down, (arrays[1], labels[1]),
                               precision=use.precision,
                               preferred_element_type=use.preferred_element_type)
      return base + delta.astype(base.dtype)
    delta = _labels.chain(dropout(use.x, self.dropout, use.rng), use.x_labels, list(zip(arrays, labels)),
                          use.out_labels, scale=self.scale,
                          precision=use.precision,
                          preferred_element_type=use.preferred_element_type)
    base = inner(use.x)
    return base + delta.astype(base.dtype)

  def conv(self, use: ConvUse, arrays, labels, inner):
    (a, al), (b, bl) = zip(arrays, labels)
    o = use.out_feature
    r = next(l for l in bl if l in al)
    if tuple(sorted(bl)) != tuple(sorted((r, o))) or o in al:
      return None
    kernel_labels = tuple(r if l == o else l for l in use.kernel_labels)
    if sorted(kernel_labels) != sorted(al):
      return None
    kernel = jnp.transpose(a, [al.index(l) for l in kernel_labels]).astype(use.x.dtype)
    t = use.bind(dropout(use.x, self.dropout, getattr(use, "rng", None)), kernel)  # the same conv, with rank-many output features
    t = t * jnp.asarray(self.scale, t.dtype)
    t_labels = [_labels.fresh() for _ in range(t.ndim)]
    t_labels[use.out_feature_axis] = r
    out_labels = list(t_labels)
    out_labels[use.out_feature_axis] = o
    delta = _labels.einsum(out_labels, (t, t_labels), (b.astype(t.dtype), bl))
    base = inner(use.x)
    return base + delta.astype(base.dtype)

  # -- PEFT: LoraConfig; lora_A (r, in), lora_B (out, r) ------------------
  peft_type = "LORA"

  @classmethod
  def peft_reads(cls, config):
    return config.get("peft_type") == "LORA" and not config.get("use_dora")

  def peft_tensors(self, arrays, *, embedding):
    a, b = arrays  # (in, r), (r, out)
    if embedding:  # PEFT's Embedding: ParameterDicts, looked up as A.T
      return {"lora_embedding_A": a.T, "lora_embedding_B": b.T}
    return {"lora_A.weight": a.T, "lora_B.weight": b.T}

  @classmethod
  def peft_config(cls, methods):
    return peft_low_rank_config(methods, use_dora=False)

  @classmethod
  def from_peft(cls, config, module, tensors, *, shape, embedding, name):
    options, arrays = peft_low_rank(config, module, tensors, shape=shape,
                                    embedding=embedding)
    return cls(**options, name=name), arrays

  @classmethod
  def peft_fuse(cls, parts):
    options, arrays = peft_fuse_low_rank(parts)
    return cls(**options, name=next(m for m, *_ in parts if m is not None).name), arrays

  def peft_split(self, arrays, sizes):
    a, b = arrays
    cuts = np.cumsum((0,) + tuple(sizes))
    return [(self, (a, b[:, lo:hi])) for lo, hi in zip(cuts[:-1], cuts[1:])]

  def gather(self, use: GatherUse, arrays, labels, inner):
    (a, al), (b, bl) = zip(arrays, labels)
    dn, wl = use.dimension_numbers, use.weight_labels
    if dn.operand_batching_dims:
      return None
    r = next(l for l in bl if l in al)
    b_only = [l for l in bl if l not in al]
    indexed = set(dn.start_index_map) | set(dn.collapsed_slice_dims)
    w_sizes = _labels.sizes_of((b, bl), (a, al))
    for d, l in enumerate(wl):
      if l in b_only and (d in indexed or use.slice_sizes[d] != w_sizes[l]):
        return None
    a_axes = [l for l in wl if l not in b_only] + [r]
    if sorted(a_axes) != sorted(al):
      return None
    n_batch = use.indices.ndim - 1
    n_offset = len(wl) - len(dn.collapsed_slice_dims)
    if tuple(dn.offset_dims) != tuple(range(n_batch, n_batch + n_offset)):
      return None
    pos = {l: k for k, l in enumerate(a_axes)}
    collapsed = tuple(sorted(pos[wl[d]] for d in dn.collapsed_slice_dims))
    new_dn = lax.GatherDimensionNumbers(
        offset_dims=tuple(range(n_batch, n_batch + len(a_axes) - len(collapsed))),
        collapsed_slice_dims=collapsed,
        start_index_map=tuple(pos[wl[d]] for d in dn.start_index_map),
        operand_batching_dims=(), start_indices_batching_dims=())
    slice_sizes = tuple(use.slice_sizes[wl.index(l)] if l != r else w_sizes[r]
                        for l in a_axes)
    operand = jnp.transpose(a, [al.index(l) for l in a_axes])
    t = use.bind(operand, use.indices, dimension_numbers=new_dn, slice_sizes=slice_sizes)
    t = t * jnp.asarray(self.scale, t.dtype)
    batch = [_labels.fresh() for _ in range(n_batch)]
    kept_w = [l for d, l in enumerate(wl) if d not in dn.collapsed_slice_dims]
    t_labels = batch + [l for k, l in enumerate(a_axes) if k not in collapsed]
    delta = _labels.einsum(batch + kept_w, (t, t_labels), (b.astype(t.dtype), bl))
    base = inner()
    return base + delta.astype(base.dtype)


def peft_low_rank_config(methods: Mapping[str, Any], *, use_dora: bool) -> dict:
  """LoraConfig fields for ``{module: LoRA or DoRA}``: the most common rank
  and alpha, and ``rank_pattern``/``alpha_pattern`` for the others."""
  import re

  if len({m.rslora for m in methods.values()}) > 1:
    raise ValueError("some adapters use rslora and some don't; PEFT has one use_rslora")
  if any(getattr(m, "init", None) == "pissa" for m in methods.values()):
    raise ValueError("a PiSSA adapter belongs to its residual base; export the residual "
                     "base too, or merge it")
  ranks = {mod: m.rank for mod, m in methods.items()}
  alphas = {mod: m.alpha for mod, m in methods.items()}
  r = max(set(ranks.values()), key=list(ranks.values()).count)
  alpha = max(set(alphas.values()), key=list(alphas.values()).count)
  return {
      "peft_type": "LORA", "r": r, "lora_alpha": alpha,
      "lora_dropout": max(m.dropout for m in methods.values()),
      "bias": "none", "use_rslora": bool(next(iter(methods.values())).rslora),
      "use_dora": use_dora, "init_lora_weights": True,
      "rank_pattern": {f"^{re.escape(k)}": v for k, v in ranks.items() if v != r},
      "alpha_pattern": {f"^{re.escape(k)}": v for k, v in alphas.items() if v != alpha},
  }


def peft_low_rank(config, module: str, tensors: dict, *, shape, embedding: bool):
  """``(options, (a, b))`` of one PEFT LoRA module: rank and alpha after
  ``rank_pattern``/``alpha_pattern``, A ``(in, r)`` and B ``(r, out)``."""
  from jlora.peft._config import pattern_value  # jlora.peft imports the methods

  names = ("lora_embedding_A", "lora_embedding_B") if embedding else (
      "lora_A.weight", "lora_B.weight")
  missing = [n for n in names if n not in tensors]
  if missing:
    other = ("lora_A.weight" if embedding else "lora_embedding_A") in tensors
    why = (f"; the file holds {'a linear' if embedding else 'an embedding'} adapter "
           "there, so the map's layout is wrong" if other else "; the file is incomplete")
    raise ValueError(f"{missing} missing for {module}{why}")
  a_t, b_t = tensors.pop(names[0]), tensors.pop(names[1])
  rank = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
  alpha = pattern_value(config.get("alpha_pattern") or {}, module,
                        config.get("lora_alpha", 8))
  n_in, n_out = shape
  if a_t.shape != (rank, n_in) or b_t.shape != (n_out, rank):
    raise ValueError(f"{names[0]} {a_t.shape} / {names[1]} {b_t.shape} do not fit a "
                     f"weight of {n_in} inputs and {n_out} outputs at rank {rank} "
                     f"(expected {(rank, n_in)} / {(n_out, rank)}); the adapter belongs "
                     "to another model, or the map's layout is wrong")
  options = dict(rank=int(rank), alpha=float(alpha), rslora=bool(config.get("use_rslora")),
                 dropout=float(config.get("lora_dropout") or 0.0))
  return options, (a_t.T, b_t.T)


def peft_fuse_low_rank(parts):
  """LoRA on the parts of a fused module -> one exact LoRA on the whole.

  ``A = [A_1 … A_k]`` (rank ``Σ r_k``) and ``B`` block-diagonal with each
  part's scale folded in, so the fused scale is 1 (``alpha = R``, or
  ``sqrt(R)`` under rslora): ``x·A·B`` is each part's ``s_k·x·A_k·B_k`` in
  its output slice, and zero for a part without an adapter.
  """
  present = [(m, arrays) for m, arrays, _, _ in parts if m is not None]
  if len({m.rslora for m, _ in present}) > 1 or len({m.dropout for m, _ in present}) > 1:
    raise ValueError("the parts' adapters differ in rslora or dropout, which one fused "
                     "PEFT module cannot hold; give them the same settings")
  total = sum(m.rank for m, _ in present)
  a = np.concatenate([np.asarray(arrays[0], np.float32) for _, arrays in present], axis=1)
  b = np.zeros((total, sum(n for _, _, n, _ in parts)), np.float32)
  row = col = 0
  for m, arrays, n_out, _ in parts:
    if m is not None:
      b[row:row + m.rank, col:col + n_out] = m.scale * np.asarray(arrays[1], np.float32)
      row += m.rank
    col += n_out
  rslora = present[0][0].rslora
  dtype = np.asarray(present[0][1][0]).dtype
  alpha = math.sqrt(total) if rslora else float(total)
  return (dict(rank=total, alpha=alpha, rslora=rslora, dropout=present[0][0].dropout),
          (a.astype(dtype), b.astype(dtype)))


def dropout(x: jax.Array, rate: float, rng) -> jax.Array:
  """Inverted dropout of ``x`` (PEFT's ``lora_dropout``); identity without a key."""
  if not rate or rng is None:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def lorify(params: Any, rank: int | Mapping[str, int], *, key: jax.Array,
           targets: Targets = None, alpha: float | Mapping[str, float] | None = None,
           axes: Axes | Mapping[str, Axes] | None = None,
           trainable: Targets = None, rslora: bool = False,
           init: str = "kaiming", dropout: float = 0.0, name: str = "default",
           dtype=None, like: tuple | None = None) -> Any:
  """Adds LoRA adapters beside the chosen weights of a parameter tree.

  Pure: returns a new tree and leaves ``params`` untouched. Each adapted weight
  gains sibling leaves ``lora_a`` (its input axes + ``(rank,)``) and
  ``lora_b`` (``(rank,)`` + its output axes), plus a static ``lora`` entry,
  a `LoRA` record of the rank, alpha and layout, which carries no arrays. ``B``
  starts at zero, so the model's function is unchanged; ``A`` is
  Kaiming-uniform as in PEFT.

  Args:
    params: a tree of arrays: Linen variables, a pure-dict NNX state, a dict.
    rank: the rank ``r``, or ``{regex: rank}`` matched against the
      ``/``-joined path (first match wins).
    key: a PRNG key for ``A``.
    targets: ``None`` for every ``kernel``/``embedding``; a sequence of module
      names (the key of the dict that holds the weight, e.g.
      ``("query", "value")``); a compiled regex searched in the path; or a
      predicate ``(path, leaf) -> bool``.
    alpha: the scaling numerator (default: ``rank``, i.e. scale 1), or
      ``{regex: alpha}``. The update is scaled by ``alpha / rank``.
    axes: `Axes` for stacked layers or multi-axis kernels, or
      ``{regex: Axes}``; by default inferred (no stacked axes; balanced
      input/output split).
    trainable: leaves to train in full, like PEFT's ``modules_to_save``
      (e.g. ``("classifier",)``): same forms as ``targets``, but names select
      every leaf of the named module.
    rslora: scale by ``alpha / sqrt(rank)`` instead.
    init: ``"kaiming"`` or ``"gaussian"`` for ``A``, or ``"pissa"``: ``A``
      and ``B`` from the top-``rank`` SVD of the weight, which becomes the
      residual (see `LoRA`).
    dropout: PEFT's ``lora_dropout`` on the adapter input; active only when
      `lora` is given an ``rng``.
    name: the adapter's name; a name other than ``"default"`` stores it under
      ``lora@name`` keys, so several named adapters can share a weight (see
      `select`).
    dtype: dtype of the adapters (default: the weight's dtype).
    like: ``(fn, *example_args)``: read every weight's axes from how
      ``fn(params, *example_args)`` contracts it (`jlora.infer_axes`), so any
      kernel layout gets standard LoRA; with ``targets=None`` every weight
      ``fn`` contracts is adapted. Excludes ``axes``.

  Returns:
    The lorified tree.

  Raises:
    LoraError: listing every problem: a bad rank or alpha, a rank above
      ``min(in, out)``, targets that match nothing, non-array leaves, a weight
      that already has LoRA adapters.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"dense": {"kernel": jnp.ones((16, 32)), "bias": jnp.zeros(32)}}
    >>> lorified = jlora.lorify(params, 4, key=jax.random.key(0), alpha=8)
    >>> jax.tree.map(jnp.shape, lorified)
    {'dense': {'bias': (32,), 'kernel': (16, 32), 'lora': LoRA(rank=4, alpha=8), 'lora_a': (16, 4), 'lora_b': (4, 32)}}
  """
  pre = Problems("jlora: cannot add LoRA adapters")
  if init not in INITS:
    pre.add(f"init must be one of {INITS}, got {init!r}")
  _targets.check_axes(axes, pre)
  check_rate(dropout, "dropout", pre)
  _add.check_flag(rslora, "rslora", pre)
  _add.check_name(name, pre)
  check_low_rank(rank, alpha, pre)
  for option, value in (("rank", rank), ("alpha", alpha), ("axes", axes)):
    _add.check_patterns(value, option, pre)
  if like is not None:
    axes, targets = _axes_from_use(params, like, axes, targets, pre)

  def make(path: Path, leaf) -> LoRA:
    where = path_str(path)
    if like is not None and where not in axes:
      raise ValueError(f"{where}: the function in `like` never contracts this weight, so "
                       "adapting it would do nothing; exclude it from targets")
    r = _targets.per_path(rank, where, name="rank")
    a = r if alpha is None else _targets.per_path(alpha, where, name="alpha")
    stack, inputs, layout = _targets.placement(path, leaf, axes)
    method = LoRA(rank=int(r), alpha=float(a), weight=path[-1], stack=stack,
                  inputs=inputs, layout=layout, rslora=rslora, init=init,
                  dropout=float(dropout), name=name)
    check_rank_fits(where, method, leaf.shape)
    return method

  return _add.add_adapters(params, make, key=key, targets=targets, trainable=trainable,
                           dtype=dtype, what="LoRA adapters", problems=pre)


def _axes_from_use(params, like, axes, targets, problems):
  """``(axes, targets)`` read from ``like = (fn, *example_args)``."""
  if not (isinstance(like, tuple) and like and callable(like[0])):
    problems.add(f"like must be a tuple (fn, *example_args), e.g. (model.apply, x), "
                 f"got {like!r}")
    return axes, targets
  if axes is not None:
    problems.add("pass axes= or like=, not both: like= reads every weight's axes from "
                 "its use")
    return axes, targets
  from jlora._infer import contracted, infer_axes
  found = infer_axes(like[0], params, *like[1:])
  return found, (contracted(found) if targets is None else targets)
