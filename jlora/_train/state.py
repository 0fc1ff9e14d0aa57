"""What a train step updates (`TrainState`) and what `train_step` returns
(`TrainStep`)."""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jlora._errors import LoraError, Problems


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
      step (``jax.jit`` or ``jax.pmap``; ``.lower`` works on it) behind a
      check of its arguments (a swapped state and frozen half, batches the
      device count does not divide: a `LoraError` naming them). ``state``
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
               frozen_sharding, batch_sharding, loss_fn=None, pmap_devices=None):
    self.step = CheckedStep(step, mesh, pmap_devices)
    self._loss_fn = loss_fn
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

    Raises:
      LoraError: ``key`` is not a PRNG key, or it does not fit ``loss_fn``
        (a key for a two-argument loss, none for a three-argument one).
    """
    problems = Problems("jlora: cannot start the training state")
    if key is not None and not (isinstance(key, jax.Array) and (
        jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        or (key.dtype == jnp.uint32 and key.shape[-1:] == (2,)))):
      problems.add(f"key: got {key!r}, expected None or a PRNG key such as "
                   "jax.random.key(0)")
    takes = _positional_count(self._loss_fn)
    if takes is not None:
      lo, hi = takes
      n = 3 if key is not None else 2
      if not lo <= n <= hi:
        problems.add(
            "key: given, but loss_fn takes (params, batch); the step would call "
            "loss_fn(params, batch, key): add a key parameter to loss_fn, or call "
            "init without key" if key is not None else
            f"key: missing, but loss_fn needs {lo} arguments; the step calls "
            "loss_fn(params, batch, key) only when init gets key=jax.random.key(...)")
    problems.raise_if_any()
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


def _positional_count(fn) -> tuple[int, float] | None:
  """``(required, most)`` positional arguments of ``fn``, or None if unknown."""
  if fn is None:
    return None
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):
    return None
  lo, hi = 0, 0
  for p in sig.parameters.values():
    if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
      hi += 1
      lo += p.default is p.empty
    elif p.kind is p.VAR_POSITIONAL:
      hi = float("inf")
  return lo, hi


class CheckedStep:
  """The compiled step, behind a check of its arguments: a state and a frozen
  half swapped, or a params tree for the state, are named before JAX sees
  them. Everything else (``lower``, ``trace``, ...) is the compiled step's."""

  def __init__(self, step, mesh, pmap_devices=None):
    self._step = step
    self._mesh = mesh
    self._pmap_devices = pmap_devices

  def __getattr__(self, name):
    return getattr(self._step, name)

  def _check(self, state, frozen, batch) -> None:
    problems = Problems("jlora: bad arguments to trainer.step(state, frozen, batch)")
    n = self._mesh.size if self._mesh is not None else self._pmap_devices
    for kp, x in jax.tree_util.tree_flatten_with_path(batch)[0]:
      shape = tuple(getattr(x, "shape", ()))
      where = f"batch{jax.tree_util.keystr(kp)}"
      if self._pmap_devices is not None and (not shape or shape[0] != n):
        problems.add(f"{where}: shape {shape}, expected a leading axis of {n} (one slice "
                     "per local device); pass the batch through trainer.shard_batch")
      elif self._mesh is not None and (not shape or shape[0] % n):
        problems.add(f"{where}: shape {shape}; its rows are split over the mesh's {n} "
                     f"devices, so make the batch size a multiple of {n} (and place it "
                     "with trainer.shard_batch)")
    if not isinstance(state, TrainState):
      swapped = isinstance(frozen, TrainState)
      problems.add(f"state: got {type(state).__name__}, expected the jlora.TrainState "
                   "from trainer.init or the previous step" +
                   ("; state and frozen are swapped: call trainer.step(state, frozen, "
                    "batch)" if swapped else ""))
    elif isinstance(frozen, TrainState):
      problems.add("frozen: got a TrainState, expected the frozen half from "
                   "trainer.init(params)")
    problems.raise_if_any()

  def __call__(self, state, frozen, batch):
    self._check(state, frozen, batch)
    try:
      return self._step(state, frozen, batch)
    except ValueError as e:
      text = str(e)
      if self._mesh is None or not any(w in text.lower() for w in ("sharding", "mesh",
                                                                   "device")):
        raise
      raise LoraError([f"{type(e).__name__}: {text.splitlines()[0][:300]}"], header=(
          "jlora: the arrays passed to trainer.step are placed for another mesh "
          f"(this trainer's: {dict(self._mesh.shape)}); use the state and frozen "
          "from this trainer's init, restore a saved state onto "
          "trainer.init(params)[0], and place batches with trainer.shard_batch")) from e

  def lower(self, state, frozen, batch, *args, **kwargs):
    self._check(state, frozen, batch)
    return self._step.lower(state, frozen, batch, *args, **kwargs)
