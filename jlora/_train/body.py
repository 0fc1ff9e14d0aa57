"""The step body every form shares: gradients of the adapters only,
micro-batch accumulation, bf16 compute, and the optimizer update."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jlora import _optim, _tree
from jlora._errors import LoraError
from jlora._train.state import TrainState


@jax.tree_util.register_static
class Static:
  """A non-array leaf of the frozen half (an ``equinox.Module``'s activation
  function, a dropout rate), carried in the treedef: the step sees it as the
  Python value it is, never as a traced array."""

  def __init__(self, value):
    self.value = value

  def __eq__(self, other):
    if not isinstance(other, Static):
      return False
    if self.value is other.value:
      return True
    try:
      return type(self.value) is type(other.value) and bool(self.value == other.value)
    except Exception:  # values without a usable ==
      return False

  def __hash__(self):
    try:
      return hash((type(self.value), self.value))
    except TypeError:
      return hash(type(self.value))

  def __repr__(self):
    return f"Static({self.value!r})"


def wrap_static(frozen: Any) -> Any:
  """``frozen`` with each non-array leaf held in a `Static`."""
  return jax.tree.map(lambda x: x if _tree.is_array(x) or isinstance(x, np.generic)
                      else Static(x), frozen, is_leaf=_tree.is_quantized)


def unwrap_static(frozen: Any) -> Any:
  """The inverse of `wrap_static`."""
  return jax.tree.map(lambda x: x.value if isinstance(x, Static) else x, frozen,
                      is_leaf=lambda x: isinstance(x, Static) or _tree.is_quantized(x))


def _is_float(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.floating)


def cast(tree: Any, dtype) -> Any:
  """``tree`` with its floating leaves cast to ``dtype``."""
  return jax.tree.map(lambda x: x.astype(dtype) if _is_float(x) else x, tree,
                      is_leaf=_tree.is_quantized)  # a quantized weight: its logical dtype


def micro_batches(batch: Any, accumulate: int, mesh: Mesh | None) -> Any:
  """Rows ``i, i+k, i+2k, ...`` of every leaf form micro-batch ``i``."""
  names = None if mesh is None else tuple(mesh.axis_names)

  def split(x):
    rows = x.shape[0] if x.ndim else 0
    if rows % accumulate:
      raise LoraError([f"a batch leaf of shape {tuple(x.shape)} has {rows} rows"],
                      header=(f"jlora: accumulate={accumulate} needs every batch leaf's "
                              "leading axis (per device, in the pmap form) to divide "
                              "evenly; change the batch size or `accumulate`"))
    x = x.reshape((rows // accumulate, accumulate) + x.shape[1:]).swapaxes(0, 1)
    if mesh is not None and (rows // accumulate) % mesh.size == 0:
      x = lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, names)))
    return x

  return jax.tree.map(split, batch)


def make_body(loss_fn: Callable[..., Any], tx: optax.GradientTransformation, *,
              accumulate: int, compute_dtype, has_aux: bool, axis_name: str | None,
              mesh: Mesh | None) -> Callable:
  """``body(state, frozen, batch) -> (state, metrics)`` for any form."""

  def grad_of(adapters, frozen, batch, key):
    def loss_of(adapters):
      full = _optim.combine(adapters, unwrap_static(frozen))
      b = batch
      if compute_dtype is not None:
        full, b = cast(full, compute_dtype), cast(batch, compute_dtype)
      out = loss_fn(full, b) if key is None else loss_fn(full, b, key)
      if has_aux and not (isinstance(out, (tuple, list)) and len(out) == 2):
        got = (f"an array of shape {tuple(jnp.shape(out))}" if hasattr(out, "shape")
               else f"a {type(out).__name__}" + (f" of length {len(out)}"
                                                if isinstance(out, (tuple, list)) else ""))
        raise LoraError([f"loss_fn returned {got}"], header=(
            "jlora: with has_aux=True, loss_fn must return (loss, aux); return that "
            "pair, or build the step with has_aux=False"))
      loss, aux = out if has_aux else (out, None)
      if jnp.ndim(loss) != 0:
        raise LoraError([f"got shape {jnp.shape(loss)}"], header=(
            "jlora: loss_fn must return a scalar (the mean loss over the batch); "
            "reduce it with .mean()" + (", and return (loss, aux) with has_aux=True"
                                        if not has_aux else "")))
      return jnp.asarray(loss, jnp.float32), aux
    return jax.value_and_grad(loss_of, has_aux=True)(adapters)

  def accumulated(adapters, frozen, batch, key):
    micro = micro_batches(batch, accumulate, mesh)

    def one(carry, inp):
      i, mb = inp
      k = None if key is None else jax.random.fold_in(key, i)
      (l, aux), g = grad_of(adapters, frozen, mb, k)
      total, gsum = carry
      return (total + l, jax.tree.map(jnp.add, gsum, g)), aux

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, adapters))
    (loss, grads), aux = lax.scan(one, zeros, (jnp.arange(accumulate), micro))
    return (loss / accumulate, aux), jax.tree.map(lambda g: g / accumulate, grads)

  def body(state: TrainState, frozen, batch):
    key = None if state.key is None else jax.random.fold_in(state.key, state.step)
    if key is not None and axis_name is not None:  # pmap: each device its own key
      key = jax.random.fold_in(key, lax.axis_index(axis_name))
    grads_fn = grad_of if accumulate == 1 else accumulated
    (loss, aux), grads = grads_fn(state.adapters, frozen, batch, key)
    if axis_name is not None:
      loss, grads = lax.pmean((loss, grads), axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.adapters)
    adapters = optax.apply_updates(state.adapters, updates)
    metrics = {"loss": loss}
    if has_aux:
      metrics["aux"] = aux
    return TrainState(state.step + 1, adapters, opt_state, state.key), metrics

  return body
