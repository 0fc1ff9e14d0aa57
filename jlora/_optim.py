"""Masks, partitions and optimizer freezing."""

from __future__ import annotations

from typing import Any

import jax
import optax

from jlora import _structure
from jlora._errors import LoraError, Problems
from jlora._tree import keypath_to_path


def trainable_mask(params: Any) -> Any:
  """A tree of bools with ``params``' structure: True on leaves that train.

  Adapter arrays and leaves marked by ``lorify(..., trainable=...)`` are
  True; base weights are False. The tree can be handed to optax directly.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}
    >>> mask = jlora.trainable_mask(jlora.lorify(params, 2, key=jax.random.key(0)))
    >>> mask["dense"]["lora_a"], mask["dense"]["kernel"]
    (True, False)
  """
  paths = _structure.trainable_paths(params)
  return jax.tree_util.tree_map_with_path(
      lambda kp, _: keypath_to_path(kp) in paths, params)


def partition(params: Any) -> tuple[Any, Any]:
  """Splits a jlora tree into ``(adapters, frozen)``, as in equinox.

  Both halves keep ``params``' structure, with ``None`` where a leaf belongs
  to the other half, so ``jax.grad`` with respect to ``adapters`` alone
  computes no gradient for the frozen weights.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}
    >>> adapters, frozen = jlora.partition(jlora.lorify(params, 2, key=jax.random.key(0)))
    >>> sorted(k for k, v in adapters["dense"].items() if v is not None and k != "lora")
    ['lora_a', 'lora_b']

  Raises:
    LoraError: ``params`` has nothing to train (no adapters, no leaves
      trained in full): the adapters half would be empty.
  """
  mask = trainable_mask(params)
  if not any(jax.tree.leaves(mask)):
    raise LoraError(["params holds no adapters and no leaves trained in full, so the "
                     "adapters half would be empty and training would update nothing; "
                     "add adapters with jlora.lorify first"],
                    header="jlora: nothing to partition")
  adapters = jax.tree.map(lambda m, x: x if m else None, mask, params)
  frozen = jax.tree.map(lambda m, x: None if m else x, mask, params)
  return adapters, frozen


def combine(adapters: Any, frozen: Any) -> Any:
  """Inverse of `partition`: fills each ``None`` in one half from the other."""
  is_none = lambda x: x is None  # noqa: E731
  a_def = jax.tree.structure(adapters, is_leaf=is_none)
  f_def = jax.tree.structure(frozen, is_leaf=is_none)
  if a_def != f_def:
    raise LoraError([f"adapters: {a_def}", f"frozen:   {f_def}"], header=(
        "jlora.combine: the two halves have different structures; pass the "
        "pair returned by one jlora.partition call (after optimizer updates "
        "the adapters half keeps its structure)"))
  return jax.tree.map(lambda a, f: f if a is None else a, adapters, frozen,
                      is_leaf=is_none)


def frozen_mask(params: Any) -> Any:
  """The opposite of `trainable_mask`: True on leaves that stay frozen.

  The polarity of optax's ``freeze_mask`` (`optax.transforms.freeze`,
  `optax.transforms.selective_transform`), so it can be handed to them as is.
  """
  return jax.tree.map(lambda m: not m, trainable_mask(params))


def adapters_only(tx: optax.GradientTransformation,
                  params: Any) -> optax.GradientTransformation:
  """Wraps ``tx`` so that it trains only the adapters of ``params``.

  ``optax.transforms.selective_transform(tx, freeze_mask=frozen_mask(params))``:
  frozen leaves get zero updates and hold **no** optimizer state. Plain
  ``optax.masked`` is not enough: it passes the raw gradient through as the
  update of masked-out leaves.

  Args:
    tx: the optimizer for the trainable leaves.
    params: the jlora tree the optimizer will update.

  Returns:
    An optax transformation for the full jlora tree.

  Raises:
    LoraError: ``tx`` is not an optax transformation, or ``params`` has
      nothing to train (it would update nothing).

  Example:
    >>> import jax, jax.numpy as jnp, optax, jlora
    >>> params = {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}
    >>> params = jlora.lorify(params, 2, key=jax.random.key(0))
    >>> tx = jlora.adapters_only(optax.adam(1e-3), params)
    >>> state = tx.init(params)
    >>> sum(x.size for x in jax.tree.leaves(state))  # mu and nu of A and B, + count
    33
  """
  problems = Problems("jlora: cannot build an optimizer for the adapters")
  if not (hasattr(tx, "init") and hasattr(tx, "update")):
    problems.add(f"tx must be an optax GradientTransformation such as optax.adam(1e-3), "
                 f"got {tx!r}")
  problems.raise_if_any()
  frozen = frozen_mask(params)
  if all(jax.tree.leaves(frozen)):
    problems.add("params holds no adapters and no leaves trained in full, so the "
                 "optimizer would update nothing; add adapters with jlora.lorify first")
  problems.raise_if_any()
  return optax.transforms.selective_transform(tx, freeze_mask=frozen)


def freeze(tx: optax.GradientTransformation, params: Any) -> optax.GradientTransformation:
  """The former name of `adapters_only`, kept working.

  Note the polarity: ``optax.transforms.freeze(mask)`` freezes what ``mask``
  marks, while ``jlora.freeze(tx, params)`` trains the adapters of
  ``params`` (it is `adapters_only`).
  """
  return adapters_only(tx, params)
