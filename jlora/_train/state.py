"""What a train step updates (`TrainState`) and what `train_step` returns
(`TrainStep`)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax


class TrainState(NamedTuple):
  """Everything a train step updates; donated to the step.

  Attributes:
    step: number of steps taken, an ``int32`` scalar.
    adapters: the adapters half of `partition` (``None`` where a leaf is
      frozen), in its own dtype.
    opt_state: the optimizer state of ``adapters``.
    key: a PRNG key, or ``None``. When set, the loss function receives
      ``fold_in(key, step)`` as its third argument; with accumulation, that
      folded in again with the micro-batch index; in the ``pmap`` form,
      folded in first with the device index (the other forms see one global
      batch, so one key serves every device).
  """

  step: jax.Array
  adapters: Any
  opt_state: Any
  key: jax.Array | None


class TrainStep:
  """A compiled train step and the helpers that go with it.

  Built by `train_step`; see there for the recipe.

  Attributes:
    step: ``step(state, frozen, batch) -> (state, metrics)``, the compiled
      step (``jax.jit`` or ``jax.pmap``; ``.lower`` works on it). ``state``
      is donated. ``metrics`` holds ``"loss"`` (the mean over the batch, in
      f32) and, with ``has_aux``, ``"aux"``.
    mesh: the mesh of the mesh form, else ``None``.
    state_sharding: the (replicated) sharding of every `TrainState` leaf
      (mesh form), else ``None``.
    frozen_sharding: shardings of the frozen half (mesh form), else ``None``.
    batch_sharding: the sharding of every batch leaf (mesh form), else
      ``None``.
  """

  def __init__(self, *, step, init, shard_batch, to_params, mesh, state_sharding,
               frozen_sharding, batch_sharding):
    self.step = step
    self._init = init
    self._shard_batch = shard_batch
    self._to_params = to_params
    self.mesh = mesh
    self.state_sharding = state_sharding
    self.frozen_sharding = frozen_sharding
    self.batch_sharding = batch_sharding

  def init(self, params: Any, *, key: jax.Array | None = None) -> tuple[TrainState, Any]:
    """Splits ``params`` into a fresh `TrainState` and the frozen half.

    Both are placed where the step expects them (replicated, sharded, or with
    a leading device axis). In a multi-process run every process passes the
    same ``params`` and ``key``.

    Args:
      params: the lorified tree, of the structure given to `train_step`.
      key: an optional PRNG key for the loss function (dropout).

    Returns:
      ``(state, frozen)``.
    """
    return self._init(params, key)

  def shard_batch(self, batch: Any) -> Any:
    """Places this process's rows of a batch for the step.

    Mesh form: each process passes its own rows (its ``1/process_count``
    share of the global batch, in process order); the result is one global
    array per leaf, split over the mesh. ``pmap`` form: each leaf is
    reshaped to ``(local devices, rows per device, ...)``. ``jit`` form: the
    batch is put on the default device.
    """
    return self._shard_batch(batch)

  def params(self, state: TrainState, frozen: Any) -> Any:
    """The lorified tree of a state: `combine` of its adapters and ``frozen``.

    For the ``pmap`` form, the first device's copy.
    """
    return self._to_params(state, frozen)
