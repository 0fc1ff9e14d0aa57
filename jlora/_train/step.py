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
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jlora import _optim
from jlora._add import check_dtype
from jlora._errors import LoraError, Problems
from jlora._train.body import make_body
from jlora._train.forms import PMAP_AXIS, jit_form, mesh_form, pmap_form
from jlora._train.state import TrainStep


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
  check_dtype(compute_dtype, problems, name="compute_dtype",
              none="compute in the tree's own dtypes")
  if mesh is not None and not isinstance(mesh, Mesh):
    problems.add(f"mesh must be a jax.sharding.Mesh (jax.make_mesh), got {mesh!r}")
  if mesh is not None and pmap:
    problems.add("pass either mesh= (jit over a mesh) or pmap=True, not both")
  for flag, value in (("fsdp", fsdp), ("pmap", pmap), ("has_aux", has_aux),
                      ("donate", donate)):
    if not isinstance(value, bool):
      problems.add(f"{flag}: got {value!r}, expected True or False")
  if fsdp is True and mesh is None:
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
  body = make_body(loss_fn, tx, accumulate=accumulate, compute_dtype=compute_dtype,
                   has_aux=has_aux, axis_name=PMAP_AXIS if pmap else None, mesh=mesh)
  donate_argnums = (0,) if donate else ()
  if pmap:
    trainer = pmap_form(body, tx, structure, donate=donate_argnums)
  elif mesh is not None:
    trainer = mesh_form(body, tx, structure, params, mesh=mesh, fsdp=fsdp,
                        donate=donate_argnums)
  else:
    trainer = jit_form(body, tx, structure, donate=donate_argnums)
  trainer._loss_fn = loss_fn  # `init` checks a key against its signature
  return trainer
