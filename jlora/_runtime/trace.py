"""Tracing ``fn(params, *args)`` on a base tree: what `jlora.lora` evaluates
and what `jlora.infer_axes` reads."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore

from jlora._tree import Path, is_array, is_quantized, keypath_to_path


def is_dynamic(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


@dataclasses.dataclass(frozen=True)
class Traced:
  """``fn``'s jaxpr and what its inputs are, in the jaxpr's order.

  Attributes:
    jaxpr: the closed jaxpr; its inputs are ``leaves`` then ``args``.
    out_tree: the structure of ``fn``'s output.
    paths: the tree path of each of ``leaves``.
    leaves: the base tree's traced leaves (arrays and `jlora.Quantized`);
      its other leaves (an equinox Module's activation functions, a flag)
      passed through as they are.
    args: the traced argument values (arrays; the rest were static).
  """

  jaxpr: jcore.ClosedJaxpr
  out_tree: Any
  paths: list[Path]
  leaves: list[Any]
  args: list[Any]


def trace(fn: Callable, base: Any, args: tuple, kwargs: dict) -> Traced:
  """Traces ``fn(base, *args, **kwargs)``; a quantized weight is traced as its
  logical float array."""
  base_kp, base_def = jax.tree_util.tree_flatten_with_path(base, is_leaf=is_quantized)
  base_leaves = [v for _, v in base_kp]
  traced_base = [is_array(v) or is_dynamic(v) for v in base_leaves]
  arg_leaves, arg_def = jax.tree_util.tree_flatten((args, kwargs))
  traced_args = [is_dynamic(a) for a in arg_leaves]

  def flat_fn(base_vals, arg_vals):
    it = iter(arg_vals)
    a, kw = jax.tree_util.tree_unflatten(
        arg_def, [next(it) if d else a for a, d in zip(arg_leaves, traced_args)])
    it = iter(base_vals)
    tree = [next(it) if d else v for v, d in zip(base_leaves, traced_base)]
    return fn(jax.tree_util.tree_unflatten(base_def, tree), *a, **kw)

  leaves = [v for v, d in zip(base_leaves, traced_base) if d]
  arg_vals = [a for a, d in zip(arg_leaves, traced_args) if d]
  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(
      [v.shape_dtype() if is_quantized(v) else v for v in leaves], arg_vals)
  paths = [keypath_to_path(kp) for (kp, _), d in zip(base_kp, traced_base) if d]
  return Traced(closed, jax.tree_util.tree_structure(out_shape), paths, leaves, arg_vals)
