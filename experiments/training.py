"""The one training loop of the experiments, shared by classification and LM.

``experiments/fortunes.py`` (MiniLM on fortunes) and ``experiments/lm.py``
(SmolLM2 on Moby Dick) each supply a loss, an index stream and a batch
builder; everything else is here:

* `Runner`: one step for LoRA (`jlora.train_step`, adapters only) or full
  fine-tuning (every weight), state in, state out, both a `jlora.TrainState`.
* `make_tx`: AdamW with warm-up and cosine decay, the head at its own rate.
* `fit`: the loop, with its hooks: evaluation every ``eval_every`` steps,
  checkpoints every ``ckpt_every`` (`jlora.Checkpoints`, the data position,
  losses and evaluations in ``data``), exact resume from the latest
  checkpoint, XLA's memory analysis of the compiled step, and a progress bar.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

import jlora
from experiments import utils


def schedule(peak: float, warmup: int, steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to ``peak`` over ``warmup`` steps, then cosine decay to 0."""
  warmup = max(min(warmup, steps - 1), 0)
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, warmup + 1), 0.0)


def _is_head(keypath, head: tuple[str, ...]) -> bool:
  return any(getattr(k, "key", None) in head for k in keypath)


def make_tx(cfg: Mapping[str, Any], body_lr: float) -> optax.GradientTransformation:
  """AdamW on `schedule`; the modules in ``cfg["head"]`` at ``cfg["head_lr"]``."""
  head = tuple(cfg.get("head", ()))
  adam = lambda lr: optax.adamw(schedule(lr, cfg["warmup"], cfg["steps"]),  # noqa: E731
                                weight_decay=cfg["weight_decay"])
  if not head or "head_lr" not in cfg:
    return adam(body_lr)
  labels = lambda tree: jax.tree_util.tree_map_with_path(  # noqa: E731
      lambda kp, _: "head" if _is_head(kp, head) else "body", tree)
  return optax.multi_transform({"body": adam(body_lr), "head": adam(cfg["head_lr"])}, labels)


QUANTIZE = ("", "nf4", "int4", "int8")  # formats of `quantize_base` ("" = float)


def quantize_base(base: Any, cfg: Mapping[str, Any]) -> Any:
  """The frozen base as the run trains on it: QLoRA's, with ``cfg["quantize"]``.

  Every linear layer's ``kernel`` outside ``cfg["head"]`` becomes a
  `jlora.quant.Quantized` in that format (``double_quant`` for nf4 and
  int4); embeddings, norms, biases and the head stay float, as in QLoRA and
  bitsandbytes. ``""`` (float) and ``"gguf"`` (a tree the loader already
  read in its GGUF blocks) return ``base`` itself.
  """
  fmt = cfg.get("quantize", "")
  if fmt in ("", "gguf"):
    return base
  head = tuple(cfg.get("head", ()))
  def linear(path: str, leaf) -> bool:
    parts = path.split("/")
    return parts[-1] == "kernel" and not set(parts) & set(head)
  return jlora.quantize(base, fmt, targets=linear,
                        double_quant=bool(cfg.get("double_quant")) and fmt in ("nf4", "int4"))


def add_lora(base: Any, cfg: Mapping[str, Any], *, key: jax.Array) -> Any:
  """``base`` with adapters on ``cfg["targets"]`` and ``cfg["head"]`` trained in full."""
  return jlora.lorify(base, cfg["rank"], key=key, targets=tuple(cfg["targets"]),
                      alpha=cfg["alpha"], trainable=tuple(cfg["head"]) or None)


def counts(tree: Any, method: str) -> dict[str, int]:
  """Trainable and total parameters of a trained tree."""
  if method == "lora":
    s = jlora.summary(tree)
    return {"trainable_params": s.trainable_params, "total_params": s.total_params}
  n = utils.tree_size(tree)
  return {"trainable_params": n, "total_params": n}


class Runner:
  """One training method behind one interface (state in, state out).

  The state is a `jlora.TrainState` plus the frozen half (``None`` for full
  fine-tuning, whose ``adapters`` slot holds every parameter), so both
  save with `jlora.Checkpoints`.
  """

  def __init__(self, method: str, loss_fn: Callable, tx: optax.GradientTransformation,
               like: Any):
    """Builds the step.

    Args:
      method: "lora" (trains the adapters and marked leaves of ``like``; any
        jlora method: LoRA, DoRA, IA3) or "full" (trains every leaf).
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      tx: The optimizer.
      like: A tree of the structure that will be trained.
    """
    self.method = method
    if method == "lora":
      self._trainer = jlora.train_step(loss_fn, tx, like)
      self.jitted = self._trainer.step
    elif method == "full":
      self._tx = tx

      def body(state: jlora.TrainState, frozen, batch):
        del frozen
        loss, g = jax.value_and_grad(loss_fn)(state.adapters, batch)
        upd, opt = tx.update(g, state.opt_state, state.adapters)
        return (jlora.TrainState(state.step + 1, optax.apply_updates(state.adapters, upd),
                                 opt, None), {"loss": loss})

      self.jitted = jax.jit(body, donate_argnums=(0,))
    else:
      raise ValueError(f"method must be 'lora' or 'full', got {method!r}")

  def init(self, params: Any) -> tuple[jlora.TrainState, Any]:
    if self.method == "lora":
      return self._trainer.init(params)
    params = jax.device_put(params, may_alias=False)
    return jlora.TrainState(jnp.zeros((), jnp.int32), params, self._tx.init(params), None), None

  def step(self, state, frozen, batch):
    return self.jitted(state, frozen, batch)

  def params(self, state, frozen) -> Any:
    if self.method == "lora":
      return self._trainer.params(state, frozen)
    return state.adapters


@dataclasses.dataclass
class Fit:
  """What `fit` returns.

  Attributes:
    params: The trained tree (lorified for LoRA).
    opt_state_bytes: Bytes of the optimizer state.
    losses: Training loss of every step (resumed steps included).
    evals: ``{"step", "loss", **evaluate(params)}`` at every evaluation.
    resumed_from: The checkpoint step the loop started from (0: a fresh start).
    steps_run: Steps this call trained (0 when the checkpoint was the last step).
    timer: Wall time of this call's steps.
    memory: XLA's memory analysis of the compiled step (empty if not measured).
  """

  params: Any
  opt_state_bytes: int
  losses: list[float]
  evals: list[dict[str, Any]]
  resumed_from: int
  steps_run: int
  timer: utils.StepTimer
  memory: dict[str, int]

  def summary(self) -> dict[str, Any]:
    """The JSON-able part: losses, evaluations, timings, memory."""
    return {"losses": self.losses, "evals": self.evals, "resumed_from": self.resumed_from,
            "steps_run": self.steps_run, "step_time_s": self.timer.median,
            "first_step_s": self.timer.first, "memory": self.memory,
            "opt_state_bytes": self.opt_state_bytes}


def fit(runner: Runner, params: Any, *, steps: int, indices: Iterator, make_batch: Callable,
        evaluate: Callable[[Any], dict[str, float]] | None = None, eval_every: int = 0,
        ckpts: jlora.Checkpoints | None = None, ckpt_every: int = 0,
        ckpt_data: Mapping[str, Any] | None = None, progress: bool = False, desc: str = "train",
        measure_memory: bool = True) -> Fit:
  """Trains ``steps`` steps from ``params`` (or from the latest checkpoint in ``ckpts``).

  The data order is a function of the step: batch ``s`` is
  ``make_batch(the s-th item of indices)``, so a resumed run skips the
  indices of the steps it restored and ends bit-identical to an
  uninterrupted one.

  Args:
    runner: The step.
    params: The tree to train (its structure also shapes a restored state).
    steps: The total number of steps.
    indices: An iterator of batch indices (seeded, endless).
    make_batch: ``make_batch(index) -> batch``.
    evaluate: ``evaluate(params) -> metrics``, every ``eval_every`` steps and
      after the last.
    eval_every: Steps between evaluations (0: only after the last).
    ckpts: Where to save and resume the state; each checkpoint's ``data``
      holds ``ckpt_data``, the step, the losses and the evaluations so far.
    ckpt_every: Steps between checkpoints (the last step is always saved).
    ckpt_data: JSON-able values stored in every checkpoint (the settings).
    progress: Show a tqdm bar.
    desc: The bar's label.
    measure_memory: Add XLA's memory analysis of the compiled step.

  Returns:
    A `Fit`.

  Raises:
    FloatingPointError: If the loss is not finite.
  """
  from tqdm.auto import tqdm

  state, frozen = runner.init(params)
  losses: list[float] = []
  evals: list[dict[str, Any]] = []
  start = 0
  if ckpts is not None and ckpts.latest_step() is not None:
    state, data = ckpts.restore(state)
    start, losses, evals = int(state.step), list(data["losses"]), list(data["evals"])
  indices = itertools.islice(indices, start, None)  # the data position: skip restored steps
  timer, memory = utils.StepTimer(), {}
  bar = tqdm(range(start + 1, steps + 1), desc=desc, disable=not progress, dynamic_ncols=True,
             initial=start, total=steps, leave=progress)
  for step in bar:
    batch = make_batch(next(indices))
    if step == start + 2 and measure_memory:  # after the first (compiling) step
      memory = utils.compiled_memory(runner.jitted, state, frozen, batch)
    timer.start()
    state, metrics = runner.step(state, frozen, batch)
    loss = float(metrics["loss"])
    timer.stop()
    losses.append(loss)
    if not math.isfinite(loss):
      raise FloatingPointError(f"loss is {loss} at step {step}; lower the learning rate")
    last = step == steps
    if evaluate is not None and ((eval_every and step % eval_every == 0) or last):
      evals.append({"step": step, "loss": loss, **evaluate(runner.params(state, frozen))})
    bar.set_postfix(loss=f"{loss:.3f}", **{k: f"{v:.3f}" for k, v in (evals[-1] if evals else {})
                                          .items() if k not in ("step", "loss")})
    if ckpts is not None and ((ckpt_every and step % ckpt_every == 0) or last):
      ckpts.save(state, data={**(ckpt_data or {}), "step": step, "losses": losses,
                              "evals": evals}, force=last)
  bar.close()
  return Fit(runner.params(state, frozen), utils.tree_bytes(state.opt_state), losses, evals,
             start, steps - start, timer, memory)
