"""The three forms of a train step over one shared body: ``jit`` on one
device, ``pmap`` over the local devices, and ``jit`` over a mesh.

Each builder returns a `TrainStep` whose ``init`` places a fresh state and
the frozen half where its step expects them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jlora import _optim
from jlora._errors import LoraError
from jlora._train.body import unwrap_static, wrap_static
from jlora._train.placement import fsdp_spec, place
from jlora._train.state import TrainState, TrainStep

PMAP_AXIS = "batch"


def check_structure(params: Any, expected: jax.tree_util.PyTreeDef, what: str) -> None:
  got = jax.tree.structure(params)
  if got != expected:
    raise LoraError([f"expected {expected}", f"got      {got}"], header=(
        f"jlora: {what} is not the tree train_step was built for; pass the same "
        "lorified tree (same targets, rank and model) to train_step and init"))


def fresh_state(tx: optax.GradientTransformation, params: Any, key, structure):
  """``(TrainState at step 0, frozen half)`` of ``params``, unplaced."""
  check_structure(params, structure, "the tree passed to init")
  adapters, frozen = _optim.partition(params)
  return (TrainState(jnp.zeros((), jnp.int32), adapters, tx.init(adapters), key),
          wrap_static(frozen))


def _to_params(state, frozen):
  return _optim.combine(state.adapters, unwrap_static(frozen))


def jit_form(body: Callable, tx, structure, *, donate: tuple[int, ...]) -> TrainStep:
  step = jax.jit(body, donate_argnums=donate)

  def init(params, key):
    state, frozen = fresh_state(tx, params, key, structure)
    # A copy: the step donates the state, and the caller keeps `params`.
    return jax.device_put(state, may_alias=False), jax.device_put(frozen)

  return TrainStep(step=step, init=init, shard_batch=jax.device_put, to_params=_to_params,
                   mesh=None, state_sharding=None, frozen_sharding=None,
                   batch_sharding=None)


def pmap_form(body: Callable, tx, structure, *, donate: tuple[int, ...]) -> TrainStep:
  devices = jax.local_devices()
  n = len(devices)
  step = jax.pmap(body, axis_name=PMAP_AXIS, donate_argnums=donate)
  stacked = NamedSharding(Mesh(np.array(devices), ("devices",)), P("devices"))
  # One program for the whole tree: a fresh, stacked copy per device.
  replicate = jax.jit(
      lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), tree),
      out_shardings=stacked)

  def init(params, key):
    return replicate(fresh_state(tx, params, key, structure))

  def shard_batch(batch):
    def per_device(x):
      x = np.asarray(x) if not isinstance(x, jax.Array) else x
      if x.ndim == 0 or x.shape[0] % n:
        raise LoraError([f"a batch leaf has shape {tuple(x.shape)}"], header=(
            f"jlora: the pmap form splits each batch leaf's leading axis over "
            f"{n} local devices; make the batch size a multiple of {n}"))
      return jax.device_put(x.reshape((n, x.shape[0] // n) + x.shape[1:]), stacked)
    return jax.tree.map(per_device, batch)

  def to_params(state, frozen):
    adapters, frozen = jax.tree.map(lambda x: x[0], (state.adapters, frozen))
    return _optim.combine(adapters, unwrap_static(frozen))

  return TrainStep(step=step, init=init, shard_batch=shard_batch, to_params=to_params,
                   mesh=None, state_sharding=None, frozen_sharding=None,
                   batch_sharding=None, pmap_devices=n)


def mesh_form(body: Callable, tx, structure, params: Any, *, mesh: Mesh, fsdp: bool,
              donate: tuple[int, ...]) -> TrainStep:
  names = tuple(mesh.axis_names)
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(names))
  frozen_like = wrap_static(_optim.partition(params)[1])
  if fsdp:
    frozen_sharding = jax.tree.map(
        lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), mesh.size, names)),
        frozen_like)
  else:
    frozen_sharding = jax.tree.map(lambda _: replicated, frozen_like)
  # The whole state is replicated, and every batch leaf split over its rows:
  # one sharding serves as a tree prefix for each.
  step = jax.jit(body, donate_argnums=donate,
                 in_shardings=(replicated, frozen_sharding, batch_sharding),
                 out_shardings=(replicated, replicated))

  def init(params, key):
    check_structure(params, structure, "the tree passed to init")
    adapters, frozen = _optim.partition(params)
    frozen = wrap_static(frozen)
    adapters = place(adapters, replicated)
    frozen = place(frozen, frozen_sharding)
    opt_state = jax.jit(tx.init, out_shardings=replicated)(adapters)
    step0 = place(np.zeros((), np.int32), replicated)
    key = None if key is None else place(key, replicated)
    return TrainState(step0, adapters, opt_state, key), frozen

  def shard_batch(batch):
    def one(x):
      x = np.asarray(x) if not isinstance(x, jax.Array) else x
      rows = x.shape[0] if x.ndim else 0
      local = mesh.size // jax.process_count()
      if x.ndim == 0 or rows % max(local, 1):
        raise LoraError([f"a batch leaf has shape {tuple(x.shape)}"], header=(
            f"jlora: the mesh form splits each batch leaf's rows over {mesh.size} "
            f"devices ({local} on this process); make this process's batch size a "
            f"multiple of {local}"))
      return jax.make_array_from_process_local_data(batch_sharding, x)
    return jax.tree.map(one, batch)

  return TrainStep(step=step, init=init, shard_batch=shard_batch, to_params=_to_params,
                   mesh=mesh, state_sharding=replicated, frozen_sharding=frozen_sharding,
                   batch_sharding=batch_sharding)
