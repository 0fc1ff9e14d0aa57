"""Train steps: one shared body, three forms (``jit``, mesh, ``pmap``).

The recipe, for a model whose loss runs its base function through `lora`::

  params = jlora.lorify(model.init(key, x), 8, key=key)

  def loss_fn(params, batch):
    logits = jlora.lora(model.apply)(params, batch["x"])
    return cross_entropy(logits, batch["y"]).mean()

  trainer = jlora.train_step(loss_fn, optax.adamw(1e-3), params)
  state, frozen = trainer.init(params)
  for i in range(steps):
    state, metrics = trainer.step(state, frozen, trainer.shard_batch(batch(i)))
  params = trainer.params(state, frozen)

What the step does:

* It differentiates only the adapters half of `partition` (adapter arrays and
  leaves trained in full). The frozen half is an *argument* of the compiled
  step, never a constant baked into it, so it is neither copied into the
  program nor differentiated.
* The training state (adapters, optimizer state, step counter, PRNG key) is
  donated: each step updates it in place.
* ``accumulate=k`` splits the batch into ``k`` equal micro-batches (rows
  ``i, i+k, i+2k, ...`` form micro-batch ``i``), runs them one after another
  under ``lax.scan`` and averages their losses and gradients. For a loss that
  is a mean over rows, this equals one step on the whole batch.
* ``compute_dtype=jnp.bfloat16`` runs the forward and backward passes in
  bf16: the floating leaves of the combined tree and of the batch are cast
  inside the step, while the adapters and the optimizer state stay in their
  own dtype (f32 "master" adapters) and the loss is returned in f32.

The forms share that body:

* ``mesh=None``: ``jax.jit`` on one device.
* ``mesh=jax.make_mesh(...)``: ``jax.jit`` with ``NamedSharding``: the batch
  is split over every mesh axis (data parallel); the training state is
  replicated; the frozen weights are replicated, or with ``fsdp=True`` split
  over the devices along their largest evenly divisible axis. XLA inserts the
  gradient all-reduce and the weight all-gathers. This is the primary form,
  and the one that spans processes (`jax.distributed.initialize`).
* ``pmap=True``: ``jax.pmap`` over the local devices with an explicit
  ``lax.pmean`` of loss and gradients: every array carries a leading device
  axis. Offered because users ask for it; ``pmap`` is in maintenance mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jlora import _optim
from jlora._errors import LoraError, Problems

_PMAP_AXIS = "batch"


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


def _is_float(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.floating)


def _cast(tree: Any, dtype) -> Any:
  return jax.tree.map(lambda x: x.astype(dtype) if _is_float(x) else x, tree)


def _fsdp_spec(shape: tuple[int, ...], n: int, names: tuple[str, ...]) -> P:
  """Shards the largest axis that ``n`` divides (earliest on ties)."""
  best = None
  for axis, size in enumerate(shape):
    if size % n == 0 and size >= n and (best is None or size > shape[best]):
      best = axis
  if best is None:
    return P()
  spec = [None] * len(shape)
  spec[best] = names
  return P(*spec)


def _place(tree: Any, sharding: Any) -> Any:
  """Puts arrays that every process holds in full onto global shardings.

  ``sharding`` is one sharding or a tree of them matching ``tree``. Goes
  through host memory: each device receives its slice, no program is
  compiled, and no result shares a buffer with ``tree`` (the step donates
  the state, and the caller's arrays must stay valid).
  """
  def one(x, sharding):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = one(jax.random.key_data(x), sharding)
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

  if isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(lambda x: one(x, sharding), tree)
  return jax.tree.map(one, tree, sharding)


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


def _check_structure(params: Any, expected: jax.tree_util.PyTreeDef, what: str) -> None:
  got = jax.tree.structure(params)
  if got != expected:
    raise LoraError([f"expected {expected}", f"got      {got}"], header=(
        f"jlora: {what} is not the tree train_step was built for; pass the same "
        "lorified tree (same targets, rank and model) to train_step and init"))


def train_step(loss_fn: Callable[..., Any], tx: optax.GradientTransformation,
               params: Any, *, accumulate: int = 1, compute_dtype=None,
               mesh: Mesh | None = None, fsdp: bool = False, pmap: bool = False,
               has_aux: bool = False, donate: bool = True) -> TrainStep:
  """Builds a train step that trains only the adapters of ``params``.

  The recipe (see the module docs for the mesh and multi-process forms)::

    trainer = jlora.train_step(loss_fn, optax.adam(1e-3), params)
    state, frozen = trainer.init(params)
    for batch in batches:
      state, metrics = trainer.step(state, frozen, trainer.shard_batch(batch))
    params = trainer.params(state, frozen)

  Args:
    loss_fn: ``loss_fn(params, batch)`` (or ``loss_fn(params, batch, key)``
      when the state holds a key) returning a scalar loss, the mean over the
      batch's rows; with ``has_aux``, ``(loss, aux)``. ``params`` is the full
      lorified tree; run the model with ``jlora.lora(model.apply)(params, ...)``,
      or with ``jlora.lora(model.apply, rng=key)`` for adapter dropout.
    tx: the optax transformation for the adapters; it sees only the adapters
      half, so it needs no masking.
    params: the lorified tree (used for its structure, shapes and, with
      ``fsdp``, its shardings; `TrainStep.init` takes the values).
    accumulate: number of micro-batches each batch is split into; the batch
      (per device, in the ``pmap`` form) must divide evenly.
    compute_dtype: e.g. ``jnp.bfloat16``: cast floating leaves of the combined
      tree and of the batch to this dtype for the forward and backward
      passes; adapters and optimizer state keep their dtype.
    mesh: a `jax.sharding.Mesh`, e.g. ``jax.make_mesh((n,), ("data",),
      axis_types=(jax.sharding.AxisType.Auto,))``: data parallel over all of
      its axes.
    fsdp: with ``mesh``, split each frozen weight over the devices along its
      largest axis that the device count divides.
    pmap: use ``jax.pmap`` over the local devices instead.
    has_aux: ``loss_fn`` returns ``(loss, aux)``.
    donate: donate the state's buffers to the step.

  Returns:
    A `TrainStep`.

  Raises:
    LoraError: listing every problem with the options, or a tree with nothing
      to train.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jlora
    >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
    >>> params = jlora.lorify(params, 2, key=jax.random.key(0))
    >>> def loss_fn(p, batch):
    ...   y = jlora.lora(lambda p, x: x @ p["dense"]["kernel"])(p, batch["x"])
    ...   return jnp.mean((y - batch["y"]) ** 2)
    >>> trainer = jlora.train_step(loss_fn, optax.sgd(0.1), params, accumulate=2)
    >>> state, frozen = trainer.init(params)
    >>> batch = {"x": jnp.ones((4, 4)), "y": jnp.zeros((4, 3))}
    >>> state, metrics = trainer.step(state, frozen, batch)
    >>> int(state.step), float(metrics["loss"])
    (1, 16.0)
    >>> jlora.merge(trainer.params(state, frozen))["dense"]["kernel"].shape
    (4, 3)
  """
  problems = Problems("jlora: cannot build the train step")
  if not callable(loss_fn):
    problems.add(f"loss_fn must be callable, got {loss_fn!r}")
  if not (hasattr(tx, "init") and hasattr(tx, "update")):
    problems.add(f"tx must be an optax GradientTransformation, got {tx!r}")
  if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
    problems.add(f"accumulate must be a positive integer, got {accumulate!r}")
  if compute_dtype is not None:
    try:
      ok = jnp.issubdtype(jnp.dtype(compute_dtype), jnp.floating)
    except TypeError:
      ok = False
    if not ok:
      problems.add(f"compute_dtype must be a floating dtype such as jnp.bfloat16, "
                   f"got {compute_dtype!r}")
  if mesh is not None and not isinstance(mesh, Mesh):
    problems.add(f"mesh must be a jax.sharding.Mesh (jax.make_mesh), got {mesh!r}")
  if mesh is not None and pmap:
    problems.add("pass either mesh= (jit over a mesh) or pmap=True, not both")
  if fsdp and mesh is None:
    problems.add("fsdp=True needs mesh=: the frozen weights are split over its devices")
  problems.raise_if_any()
  try:
    mask = _optim.trainable_mask(params)
  except LoraError as e:
    raise LoraError(e.problems, header="jlora: train_step got a tree with malformed "
                    "adapters") from None
  if not any(jax.tree.leaves(mask)):
    problems.add("params has no adapters or trainable leaves; add them with "
                 "jlora.lorify(params, rank, key=...) first")
  problems.raise_if_any()

  structure = jax.tree.structure(params)
  compute_dtype = None if compute_dtype is None else jnp.dtype(compute_dtype)
  axis_name = _PMAP_AXIS if pmap else None
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

  def grad_of(adapters, frozen, batch, key):
    def loss_of(adapters):
      full = _optim.combine(adapters, frozen)
      b = batch
      if compute_dtype is not None:
        full, b = _cast(full, compute_dtype), _cast(batch, compute_dtype)
      out = loss_fn(full, b) if key is None else loss_fn(full, b, key)
      loss, aux = out if has_aux else (out, None)
      if jnp.ndim(loss) != 0:
        raise LoraError([f"got shape {jnp.shape(loss)}"], header=(
            "jlora: loss_fn must return a scalar (the mean loss over the batch); "
            "reduce it with .mean()" + (", and return (loss, aux) with has_aux=True"
                                        if not has_aux else "")))
      return jnp.asarray(loss, jnp.float32), aux
    return jax.value_and_grad(loss_of, has_aux=True)(adapters)

  def body(state: TrainState, frozen, batch):
    key = None if state.key is None else jax.random.fold_in(state.key, state.step)
    if key is not None and axis_name is not None:  # pmap: each device its own key
      key = jax.random.fold_in(key, lax.axis_index(axis_name))
    if accumulate == 1:
      (loss, aux), grads = grad_of(state.adapters, frozen, batch, key)
    else:
      micro = jax.tree.map(split, batch)

      def one(carry, inp):
        i, mb = inp
        k = None if key is None else jax.random.fold_in(key, i)
        (l, aux), g = grad_of(state.adapters, frozen, mb, k)
        total, gsum = carry
        return (total + l, jax.tree.map(jnp.add, gsum, g)), aux

      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.adapters))
      (loss, grads), aux = lax.scan(one, zeros, (jnp.arange(accumulate), micro))
      loss = loss / accumulate
      grads = jax.tree.map(lambda g: g / accumulate, grads)
    if axis_name is not None:
      loss, grads = lax.pmean((loss, grads), axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.adapters)
    adapters = optax.apply_updates(state.adapters, updates)
    metrics = {"loss": loss}
    if has_aux:
      metrics["aux"] = aux
    return TrainState(state.step + 1, adapters, opt_state, state.key), metrics

  donate_argnums = (0,) if donate else ()

  def fresh(params, key):
    _check_structure(params, structure, "the tree passed to init")
    adapters, frozen = _optim.partition(params)
    state = TrainState(jnp.zeros((), jnp.int32), adapters, tx.init(adapters), key)
    return state, frozen

  if mesh is None and not pmap:
    step = jax.jit(body, donate_argnums=donate_argnums)

    def init(params, key):
      state, frozen = fresh(params, key)
      # A copy: the step donates the state, and the caller keeps `params`.
      return jax.device_put(state, may_alias=False), jax.device_put(frozen)

    return TrainStep(step=step, init=init, shard_batch=jax.device_put,
                     to_params=lambda s, f: _optim.combine(s.adapters, f),
                     mesh=None, state_sharding=None, frozen_sharding=None,
                     batch_sharding=None)

  if pmap:
    devices = jax.local_devices()
    n = len(devices)
    step = jax.pmap(body, axis_name=_PMAP_AXIS, donate_argnums=donate_argnums)
    local = Mesh(np.array(devices), ("devices",))
    stacked = NamedSharding(local, P("devices"))

    # One program for the whole tree: a fresh, stacked copy per device.
    replicate = jax.jit(
        lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), tree),
        out_shardings=stacked)

    def init(params, key):
      return replicate(fresh(params, key))

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
      return _optim.combine(*jax.tree.map(lambda x: x[0], (state.adapters, frozen)))

    return TrainStep(step=step, init=init, shard_batch=shard_batch, to_params=to_params,
                     mesh=None, state_sharding=None, frozen_sharding=None,
                     batch_sharding=None)

  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(names))
  _, frozen_like = _optim.partition(params)
  if fsdp:
    frozen_sharding = jax.tree.map(
        lambda x: NamedSharding(mesh, _fsdp_spec(tuple(x.shape), mesh.size, names)),
        frozen_like)
  else:
    frozen_sharding = jax.tree.map(lambda _: replicated, frozen_like)
  # The whole state is replicated, and every batch leaf split over its rows:
  # one sharding serves as a tree prefix for each.
  state_sharding = replicated
  step = jax.jit(body, donate_argnums=donate_argnums,
                 in_shardings=(state_sharding, frozen_sharding, batch_sharding),
                 out_shardings=(state_sharding, replicated))

  def init(params, key):
    _check_structure(params, structure, "the tree passed to init")
    adapters, frozen = _optim.partition(params)
    adapters = _place(adapters, replicated)
    frozen = _place(frozen, frozen_sharding)
    opt_state = jax.jit(tx.init, out_shardings=replicated)(adapters)
    step0 = _place(np.zeros((), np.int32), replicated)
    key = None if key is None else _place(key, replicated)
    return TrainState(step0, adapters, opt_state, key), frozen

  def shard_batch(batch):
    def one(x):
      x = np.asarray(x) if not isinstance(x, jax.Array) else x
      return jax.make_array_from_process_local_data(batch_sharding, x)
    return jax.tree.map(one, batch)

  return TrainStep(step=step, init=init, shard_batch=shard_batch,
                   to_params=lambda s, f: _optim.combine(s.adapters, f), mesh=mesh,
                   state_sharding=state_sharding, frozen_sharding=frozen_sharding,
                   batch_sharding=batch_sharding)
