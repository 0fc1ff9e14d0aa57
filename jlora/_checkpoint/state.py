"""`Checkpoints`: the full training state every few steps, with orbax."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._errors import LoraError, Problems
from jlora._checkpoint.files import (ARRAYS_ITEM, RECORD_ITEM, STATE, VERSION,
                                    compare_leaves, digest, first_line, host,
                                    ocp_module,
                                    read_arrays, read_record, sha)


def _is_key(x: Any) -> bool:
  return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _cause(saved: dict[str, tuple], have: dict[str, tuple]) -> str:
  """The likeliest reason a checkpoint and a target state differ, and its fix."""
  only = set(saved) ^ set(have)
  common = [p for p in saved if p in have and saved[p] != have[p]]
  if only and all(p.endswith(".key") for p in only) and not common:
    side = "the checkpoint" if any(p in saved for p in only) else "the target"
    return (f"and the target differ only in the PRNG key, which only {side} holds; "
            "build the target with the same key= to trainer.init as the saved run")
  if common and not only and all(
      saved[p][1:] == have[p] or have[p][1:] == saved[p] for p in common):
    return ("and the target differ by a leading axis on every array: one comes from "
            "the pmap form (a copy per device); restore with the form it was saved "
            "with, or onto a target of that form")
  return ("was written for another state (model, rank, targets or optimizer); "
          "restore with the trainer it was saved with, or start a new checkpoint "
          "directory")


def check_state(state: Any, name: str, problems: Problems) -> None:
  """Adds a problem unless ``state`` is a `TrainState` (or shaped like one)."""
  from jlora._train.state import TrainState
  if isinstance(state, TrainState):
    return
  fields = ("step", "adapters", "opt_state", "key")
  if all(hasattr(state, f) for f in fields) and hasattr(state.step, "dtype"):
    return
  got = "None" if state is None else f"{type(state).__name__}"
  problems.add(f"{name}: got {got}, expected a jlora.TrainState (the state from "
               "trainer.init or trainer.step, not the frozen half or a params tree); "
               "pass that state")


class Checkpoints:
  """Full training state every ``every`` steps, keeping the last ``keep``.

  Wraps an ``orbax.checkpoint.CheckpointManager``. Each checkpoint holds a
  `TrainState` (adapters, optimizer state, step, PRNG key), never the frozen
  weights, plus a JSON-able ``data`` value for the data iterator's position.
  Saves are asynchronous: training continues while orbax writes, and a crash
  mid-save leaves the previous checkpoints intact (orbax renames a finished
  temporary directory into place).

  Restoring takes a target state, such as a fresh one from
  ``trainer.init``: its shapes, dtypes and shardings say what to restore onto,
  so a run saved on 8 devices resumes on 1, or with FSDP on another mesh. The
  state of the ``pmap`` form carries a leading device axis and restores only
  onto the same local device count.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jlora, tempfile
    >>> params = jlora.lorify({"d": {"kernel": jnp.ones((4, 4))}}, 2, key=jax.random.key(0))
    >>> loss = lambda p, b: jlora.lora(lambda p, x: x @ p["d"]["kernel"])(p, b).sum()
    >>> trainer = jlora.train_step(loss, optax.sgd(0.1), params)
    >>> state, frozen = trainer.init(params)
    >>> with jlora.Checkpoints(tempfile.mkdtemp(), every=2, keep=2) as ckpts:
    ...   for i in range(5):
    ...     state, _ = trainer.step(state, frozen, jnp.ones((2, 4)))
    ...     saved = ckpts.save(state, data={"next_batch": i + 1})
    ...   ckpts.wait()
    ...   fresh, _ = trainer.init(params)
    ...   restored, data = ckpts.restore(fresh)
    ...   ckpts.all_steps(), int(restored.step), data
    ([2, 4], 4, {'next_batch': 4})
  """

  def __init__(self, directory: str | os.PathLike, *, every: int = 1, keep: int | None = 3,
               async_save: bool = True):
    problems = Problems("jlora: cannot open checkpoints")
    if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
      problems.add(f"directory: got {directory!r}, expected a directory path (a str or "
                   "pathlib.Path) such as 'runs/ckpt'")
    if not isinstance(async_save, bool):
      problems.add(f"async_save: got {async_save!r}, expected True or False")
    for name, value, none_ok in (("every", every, False), ("keep", keep, True)):
      if value is None and none_ok:
        continue
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.add(f"{name} must be a positive integer, got {value!r}")
    problems.raise_if_any()
    self.directory = os.path.abspath(os.fspath(directory))
    ocp = ocp_module()
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every, max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  # context manager: waits for pending saves and closes the manager
  def __enter__(self) -> Checkpoints:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def all_steps(self) -> list[int]:
    """Steps with a complete checkpoint, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or ``None``."""
    return self._manager.latest_step()

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are written.

    Raises:
      LoraError: a pending save failed (a full disk); the previous
        checkpoints are intact.
    """
    with self._writing("a pending save"):
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    with self._writing("a pending save"):
      self._manager.close()

  @contextlib.contextmanager
  def _writing(self, what: str):
    """Turns a failed write (here or in orbax's background thread) into a
    `LoraError` that names the directory."""
    try:
      yield
    except LoraError:
      raise
    except Exception as e:  # OSError (ENOSPC, EACCES) or orbax's wrapping of it
      cause = e
      while cause.__cause__ is not None and not isinstance(cause, OSError):
        cause = cause.__cause__
      raise LoraError([f"{self.directory}: {type(cause).__name__}: {first_line(cause)}"],
                      header=(f"jlora: {what} of the training checkpoint failed; the "
                              f"complete checkpoints ({self._complete()}) are intact; "
                              "free space or fix the folder, then save again")) from e

  def _complete(self) -> str:
    try:
      steps = self.all_steps()
    except Exception:  # the directory itself is unreadable
      return "unknown"
    return f"steps {steps}" if steps else "none yet"

  def save(self, state: Any, *, data: Any = None, force: bool = False) -> bool:
    """Saves ``state`` if its step is a multiple of ``every`` (or ``force``).

    Args:
      state: a `TrainState` (from ``trainer.step``).
      data: a JSON-serialisable value to restore with it, such as the data
        iterator's position.
      force: save regardless of ``every``.

    Returns:
      Whether a save was started.

    Raises:
      LoraError: ``state`` is not a `TrainState`, ``data`` is not JSON, or
        writing failed (this save, or the previous asynchronous one); the
        complete checkpoints are intact.
    """
    problems = Problems("jlora: cannot save the training checkpoint")
    check_state(state, "state", problems)
    if not isinstance(force, bool):
      problems.add(f"force: got {force!r}, expected True or False")
    try:
      json.dumps(data)
    except (TypeError, ValueError) as e:
      problems.add(f"data: {e}; the data position must be JSON-serialisable "
                   "(numbers, strings, lists, dicts)")
    problems.raise_if_any()
    step = int(np.asarray(host(state.step)).reshape(-1)[0])
    if not force and not self._manager.should_save(step):
      return False
    items, record = _snapshot(state, step, data)
    ocp = ocp_module()
    with self._writing(f"the save of step {step} (or the one before it)"):
      return self._manager.save(step, args=ocp.args.Composite(**{
          ARRAYS_ITEM: ocp.args.StandardSave(items),
          RECORD_ITEM: ocp.args.JsonSave(record)}), force=force)

  def restore(self, like: Any, *, step: int | None = None) -> tuple[Any, Any]:
    """Restores a saved state onto the layout of ``like``.

    Args:
      like: a state of the same structure, e.g. ``trainer.init(params)[0]``
        (its values are not used; its shapes, dtypes and shardings are).
      step: the step to restore (default: the newest).

    Returns:
      ``(state, data)``.

    Raises:
      LoraError: no checkpoint; or one written for another model, rank or
        optimizer; or a truncated or corrupted one. Nothing is loaded
        partially.
    """
    problems = Problems("jlora: cannot restore the training checkpoint")
    check_state(like, "like", problems)
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
      problems.add(f"step: got {step!r}, expected None (the newest) or an int from "
                   "all_steps()")
    self.wait()
    steps = self.all_steps()
    if step is None and not steps:
      problems.add(f"{self.directory}: no complete checkpoint, so nothing to restore; "
                   "check `latest_step()` is not None first")
    problems.raise_if_any()
    step = steps[-1] if step is None else step
    where, record, fix = _read_step(self.directory, step, steps)
    template, treedef = _template(like)
    _check_fits(record, template, where)
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    values = read_arrays(where, record["leaves"],
                          lambda i: template[i][4] or default,
                          what="training checkpoint", fix=fix)
    values = [jax.random.wrap_key_data(v, impl=t[3]) if t[3] else v
              for v, t in zip(values, template)]
    return jax.tree_util.tree_unflatten(treedef, values), record["data"]


# -- the pieces of a save and a restore ------------------------------------------


def _snapshot(state: Any, step: int, data: Any) -> tuple[dict, dict]:
  """Host copies of ``state``'s leaves (keys as their data) and its record."""
  flat, leaves = [], []
  for kp, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    impl = None
    if _is_key(x):
      impl = str(jax.random.key_impl(x))
      x = jax.random.key_data(x)
    h = host(x)
    # Host copies: the next step donates the state's device buffers.
    flat.append(h if h is not None else x)
    leaves.append({"path": jax.tree_util.keystr(kp), "shape": list(x.shape),
                   "dtype": jnp.dtype(x.dtype).name, "key_impl": impl,
                   "sha256": sha(h)})
  record = {"format": STATE, "version": VERSION, "step": step, "leaves": leaves,
            "data": data}
  record["checksum"] = digest(record)
  return {f"{i:05d}": x for i, x in enumerate(flat)}, record


def _read_step(directory: str, step: int, steps: list[int]) -> tuple[str, dict, str]:
  """``(where, record, fix)`` of a complete step, its record checked."""
  where = os.path.join(directory, str(step))
  if step not in steps:
    raise LoraError([f"{where}: not a complete checkpoint; complete: {steps}"],
                    header="jlora: no checkpoint at that step; pick one of all_steps()")
  earlier = [s for s in steps if s < step]
  fix = (f"pass step={earlier[-1]} (or delete {where}) to resume from the previous "
         "checkpoint" if earlier else "start the run afresh (no earlier checkpoint)")
  record = read_record(where, kind=STATE, what="training checkpoint", fix=fix)
  if record.get("step") != step:
    raise LoraError([f"{where}: the checkpoint records step {record.get('step')!r}, its "
                     f"directory says {step}"], header=(
        "jlora: the checkpoint directory was renamed or copied; rename it back to "
        f"{record.get('step')!r}, or delete it and {fix}"))
  return where, record, fix


def _template(like: Any) -> tuple[list[tuple], Any]:
  """``(path, shape, dtype, key impl, sharding)`` per leaf of ``like``."""
  kps, treedef = jax.tree_util.tree_flatten_with_path(like)
  template = []
  for kp, x in kps:
    impl = str(jax.random.key_impl(x)) if _is_key(x) else None
    shape = jax.eval_shape(jax.random.key_data, x).shape if impl else x.shape
    dtype = "uint32" if impl else jnp.dtype(x.dtype).name
    template.append((jax.tree_util.keystr(kp), tuple(shape), dtype, impl,
                     getattr(x, "sharding", None)))
  return template, treedef


def _check_fits(record: dict, template: list[tuple], where: str) -> None:
  """Raises, naming every mismatch, unless the record fits the template."""
  saved = [[[e["path"]], e["shape"], e["dtype"]] for e in record["leaves"]]
  have = [[[p], list(s), d] for p, s, d, _, _ in template]
  problems = compare_leaves(saved, have, saved_name="checkpoint", have_name="target")
  problems += [f"{t[0]}: key implementation {e['key_impl']!r} saved, "
               f"{t[3]!r} in the target" for e, t in zip(record["leaves"], template)
               if e["key_impl"] != t[3]]
  if problems:
    raise LoraError(problems, header=f"jlora: the checkpoint at {where} " + _cause(
        {e["path"]: tuple(e["shape"]) for e in record["leaves"]},
        {t[0]: t[1] for t in template}))
