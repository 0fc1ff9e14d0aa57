"""MiniLM on the 8-way fortune task: data, head-only probe, LoRA and full fine-tuning.

Shared by the main job (``experiments/finetune.py``) and the sweeps
(``experiments/fortunes_sweeps.py``). Three methods, one loop:

* ``probe``: the classification head alone, trained on mean-pooled features of
  the frozen encoder (computed once and cached under ``runs/cache``); this is
  exactly head-only training, since the frozen encoder's output never changes.
* ``lora``: adapters on ``targets`` plus the head, via `jlora.lorify`,
  `jlora.lora` and `jlora.train_step`.
* ``full``: every weight, a plain ``jax.jit`` Adam step.

Training is deterministic (no dropout) so that the three differ only in what
they train. The head gets its own learning rate (``head_lr``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from experiments import data as data_lib
from experiments import utils
from experiments.config import REPO_ROOT
from experiments.models import bert


@dataclasses.dataclass
class Split:
  """Tokenized quotes: int32 ``ids``, ``mask`` (n, max_len) and ``labels`` (n,)."""

  ids: np.ndarray
  mask: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return int(self.labels.shape[0])


@dataclasses.dataclass
class Task:
  """The tokenized task with the pretrained encoder."""

  train: Split
  val: Split
  test: Split
  label_names: tuple[str, ...]
  config: bert.BertConfig
  encoder: Any  # pretrained BertModel params
  max_len: int
  key: str  # identifies the data for the feature cache


@functools.lru_cache(maxsize=4)
def load_task(max_len: int, split_seed: int = 0, test_fraction: float = 0.2,
              val_size: int = 256, train_size: int = 0, test_size: int = 0) -> Task:
  """Loads and tokenizes the fortunes (fixed length ``max_len``).

  The first ``val_size`` quotes of the (seeded, shuffled) training split are
  held out for periodic evaluation; the test split is only used at the end.
  ``train_size`` / ``test_size`` (0: all) keep only the first quotes of
  those splits, for smoke tests.
  """
  split = data_lib.fortunes_split(test_fraction=test_fraction, seed=split_seed)
  config, encoder, _ = bert.load_minilm()
  tok = bert.load_tokenizer(max_length=max_len, pad_to_multiple_of=None)
  tok.enable_padding(pad_id=0, pad_token="[PAD]", length=max_len)

  def encode(texts, labels) -> Split:
    b = bert.tokenize(tok, texts)
    return Split(b["input_ids"], b["attention_mask"], np.asarray(labels, np.int32))

  train = encode(split.train_texts, split.train_labels)
  pick = lambda s, sl: Split(s.ids[sl], s.mask[sl], s.labels[sl])  # noqa: E731
  key = f"T{max_len}-s{split_seed}-f{test_fraction}-v{val_size}-n{train_size}-t{test_size}"
  test = encode(split.test_texts, split.test_labels)
  return Task(train=pick(train, slice(val_size, val_size + train_size if train_size else None)),
              val=pick(train, slice(0, val_size)),
              test=pick(test, slice(0, test_size or None)), label_names=split.label_names,
              config=config, encoder=encoder, max_len=max_len, key=key)


def task_from(cfg: Mapping[str, Any]) -> Task:
  return load_task(cfg["max_len"], cfg["split_seed"], cfg["test_fraction"], cfg["val_size"],
                   cfg["train_size"], cfg["test_size"])


# --------------------------------------------------------------------------- model


@functools.lru_cache(maxsize=4)
def classifier(config: bert.BertConfig, num_labels: int) -> bert.BertClassifier:
  return bert.BertClassifier(config, num_labels, pooling="mean")


def base_params(task: Task, seed: int) -> dict:
  """The pretrained encoder plus a fresh head (initialised from ``seed``)."""
  return bert.init_classifier_params(task.config, task.encoder, len(task.label_names),
                                     rng=jax.random.key(seed))


def apply_fn(task: Task) -> Callable:
  """``apply(params, ids, mask) -> logits`` for the plain (or merged) tree."""
  model = classifier(task.config, len(task.label_names))
  return lambda p, ids, mask: model.apply({"params": p}, ids, mask)


def lorify(task: Task, cfg: Mapping[str, Any], seed: int) -> dict:
  """Base params with LoRA adapters on ``cfg["targets"]`` and a trainable head."""
  return jlora.lorify(base_params(task, seed), cfg["rank"], key=jax.random.key(seed + 10_000),
                      targets=tuple(cfg["targets"]), alpha=cfg["alpha"],
                      trainable=tuple(cfg["head"]) or None)


def batches(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
  """Endless seeded epochs of row indices (each epoch a fresh permutation)."""
  rng = np.random.default_rng(seed)
  while True:
    order = rng.permutation(n)
    for i in range(0, n - batch_size + 1, batch_size):
      yield order[i:i + batch_size]


def _batch(split: Split, idx: np.ndarray) -> dict[str, np.ndarray]:
  return {"ids": split.ids[idx], "mask": split.mask[idx], "labels": split.labels[idx]}


def predict(fn: Callable, params: Any, split: Split, batch: int) -> np.ndarray:
  """Logits of ``fn(params, ids, mask)`` (a jitted function) over a split.

  Every call has the same shape (the last batch is padded), so ``fn``
  compiles once.
  """
  out = []
  n = len(split)
  for i in range(0, n, batch):
    idx = np.arange(i, i + batch) % n
    out.append(np.asarray(fn(params, split.ids[idx], split.mask[idx]))[: min(batch, n - i)])
  return np.concatenate(out)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(np.argmax(logits, -1) == labels))


# --------------------------------------------------------------------------- probe


def features(task: Task, batch: int = 64, cache: bool = True) -> dict[str, np.ndarray]:
  """Mean-pooled features of the frozen encoder for train/val/test (cached on disk)."""
  path = os.path.join(REPO_ROOT, "runs", "cache", f"minilm-features-{task.key}.npz")
  if cache and os.path.isfile(path):
    with np.load(path) as f:
      return dict(f)
  model = bert.BertModel(task.config)
  fn = jax.jit(lambda p, ids, mask: bert.mean_pool(model.apply({"params": p}, ids, mask), mask))
  out = {name: predict(fn, task.encoder, getattr(task, name), batch)
         for name in ("train", "val", "test")}
  if cache:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path + ".tmp.npz", **out)
    os.replace(path + ".tmp.npz", path)
  return out


def train_probe(task: Task, cfg: Mapping[str, Any], seed: int) -> dict[str, Any]:
  """Trains the head alone on cached frozen features; returns its accuracies."""
  feats = features(task, cfg["eval_batch"])
  head = base_params(task, seed)["classifier"]
  steps = cfg["probe_steps"]
  tx = optax.adamw(_schedule(cfg["head_lr"], cfg["warmup"], steps),
                   weight_decay=cfg["weight_decay"])
  logits_of = lambda h, x: x @ h["kernel"] + h["bias"]  # noqa: E731 - the Dense head

  @jax.jit
  def step(h, opt, x, y):
    loss, g = jax.value_and_grad(
        lambda h: optax.softmax_cross_entropy_with_integer_labels(logits_of(h, x), y).mean())(h)
    upd, opt = tx.update(g, opt, h)
    return optax.apply_updates(h, upd), opt, loss

  opt = tx.init(head)
  it = batches(len(task.train), cfg["batch_size"], seed)
  for _ in range(steps):
    idx = next(it)
    head, opt, _ = step(head, opt, feats["train"][idx], task.train.labels[idx])
  acc = {name: accuracy(np.asarray(logits_of(head, feats[name])), getattr(task, name).labels)
         for name in ("val", "test")}
  return {"method": "probe", "seed": seed, "val_acc": acc["val"], "test_acc": acc["test"],
          "trainable_params": utils.tree_size(head),
          "total_params": utils.tree_size(base_params(task, seed)),
          "opt_state_bytes": utils.tree_bytes(opt)}


# --------------------------------------------------------------------------- training


def _schedule(peak: float, warmup: int, steps: int) -> optax.Schedule:
  warmup = max(min(warmup, steps - 1), 0)
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, warmup + 1), 0.0)


def _is_head(keypath, head: tuple[str, ...]) -> bool:
  return any(getattr(k, "key", None) in head for k in keypath)


def make_tx(cfg: Mapping[str, Any], body_lr: float) -> optax.GradientTransformation:
  """AdamW with warm-up + cosine decay; the head (``cfg["head"]``) at ``head_lr``."""
  head = tuple(cfg.get("head", ()))
  adam = lambda lr: optax.adamw(_schedule(lr, cfg["warmup"], cfg["steps"]),  # noqa: E731
                                weight_decay=cfg["weight_decay"])
  if not head:
    return adam(body_lr)
  labels = lambda tree: jax.tree_util.tree_map_with_path(  # noqa: E731
      lambda kp, _: "head" if _is_head(kp, head) else "body", tree)
  return optax.multi_transform({"body": adam(body_lr), "head": adam(cfg["head_lr"])}, labels)


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
        method: "lora" (trains the adapters and marked leaves of ``like``)
            or "full" (trains every leaf).
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


def _loss(apply: Callable) -> Callable:
  def loss_fn(params, batch):
    logits = apply(params, batch["ids"], batch["mask"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
  return loss_fn


_RUNNERS: dict[tuple, tuple[Runner, Callable]] = {}


def runner_for(task: Task, cfg: Mapping[str, Any], like: Any) -> tuple[Runner, Callable]:
  """A cached (runner, jitted predict) pair: seeds of one setting share compiled steps."""
  keys = ("method", "rank", "alpha", "targets", "head", "lr", "full_lr", "head_lr", "warmup",
          "steps", "weight_decay")
  key = (task.key,) + tuple(repr(cfg[k]) for k in keys)
  if key not in _RUNNERS:
    apply = apply_fn(task)
    if cfg["method"] == "lora":
      apply = jlora.lora(apply)
    lr = cfg["lr"] if cfg["method"] == "lora" else cfg["full_lr"]
    _RUNNERS[key] = (Runner(cfg["method"], _loss(apply), make_tx(cfg, lr), like),
                     jax.jit(apply))
  return _RUNNERS[key]


def train(task: Task, cfg: Mapping[str, Any], seed: int, *,
          on_eval: Callable[[int, dict], None] | None = None,
          ckpts: jlora.Checkpoints | None = None, progress: bool = False,
          measure_memory: bool = True) -> dict[str, Any]:
  """Trains with ``cfg["method"]`` ("lora" or "full") and evaluates on the test set.

  Args:
      task: From :func:`load_task`.
      cfg: The run's settings (see ``configs/minilm_fortunes.py``).
      seed: Seed of the head, the adapters and the batch order.
      on_eval: Called as ``on_eval(step, metrics)`` after each evaluation.
      ckpts: Where to save the training state every ``ckpt_every`` steps
          (its ``data`` holds the settings and the step).
      progress: Show a tqdm progress bar.
      measure_memory: Add XLA's memory analysis of the compiled step.

  Returns:
      Accuracies, parameter counts, timings, memory, the loss curve and the
      trained tree (``"params"``; for LoRA the lorified tree).
  """
  from tqdm.auto import tqdm

  params = lorify(task, cfg, seed) if cfg["method"] == "lora" else base_params(task, seed)
  runner, fwd = runner_for(task, cfg, params)
  state, frozen = runner.init(params)
  it = batches(len(task.train), cfg["batch_size"], seed)
  timer, losses, evals = utils.StepTimer(), [], []
  memory = {}
  bar = tqdm(range(1, cfg["steps"] + 1), desc=f"{cfg['method']} seed {seed}", disable=not progress,
             dynamic_ncols=True, leave=progress)
  for step in bar:
    batch = _batch(task.train, next(it))
    if step == 2 and measure_memory:  # after the first (compiling) step
      memory = utils.compiled_memory(runner.jitted, state, frozen, batch)
    timer.start()
    state, metrics = runner.step(state, frozen, batch)
    loss = float(metrics["loss"])
    timer.stop()
    losses.append(loss)
    if not math.isfinite(loss):
      raise FloatingPointError(f"loss is {loss} at step {step}; lower the learning rate")
    last = step == cfg["steps"]
    if step % cfg["eval_every"] == 0 or last:
      val = accuracy(predict(fwd, runner.params(state, frozen), task.val, cfg["eval_batch"]),
                     task.val.labels)
      evals.append({"step": step, "val_acc": val, "loss": loss})
      bar.set_postfix(loss=f"{loss:.3f}", val_acc=f"{val:.3f}")
      if on_eval:
        on_eval(step, evals[-1])
    elif step % 5 == 0:
      bar.set_postfix(loss=f"{loss:.3f}", **({"val_acc": f"{evals[-1]['val_acc']:.3f}"}
                                              if evals else {}))
    if ckpts is not None and (step % cfg["ckpt_every"] == 0 or last):
      ckpts.save(state, data={"config": dict(cfg), "step": step, "seed": seed}, force=last)
  bar.close()
  trained = runner.params(state, frozen)
  test_logits = predict(fwd, trained, task.test, cfg["eval_batch"])
  counts = _counts(trained, cfg["method"])
  return {
      "method": cfg["method"], "seed": seed, "rank": cfg["rank"], "targets": list(cfg["targets"]),
      "test_acc": accuracy(test_logits, task.test.labels), "val_acc": evals[-1]["val_acc"],
      "test_logits": test_logits, **counts,
      "opt_state_bytes": utils.tree_bytes(state.opt_state),
      "step_time_s": timer.median, "first_step_s": timer.first, "memory": memory,
      "losses": losses, "evals": evals, "params": trained,
  }


def _counts(tree: Any, method: str) -> dict[str, int]:
  if method == "lora":
    s = jlora.summary(tree)
    return {"trainable_params": s.trainable_params, "total_params": s.total_params}
  n = utils.tree_size(tree)
  return {"trainable_params": n, "total_params": n}


def merge_check(task: Task, cfg: Mapping[str, Any], lorified: Any,
                factored_logits: np.ndarray) -> dict[str, Any]:
  """Runs the merged tree with the plain model and compares it with the factored one.

  Returns:
      The largest absolute logit difference, the number of test predictions
      that agree, and those that differ only where the top-2 margin is within
      that difference (a floating-point tie).
  """
  merged = jlora.merge(lorified)
  plain = jax.jit(apply_fn(task))
  merged_logits = predict(plain, merged, task.test, cfg["eval_batch"])
  diff = float(np.max(np.abs(merged_logits - factored_logits)))
  agree = np.argmax(merged_logits, -1) == np.argmax(factored_logits, -1)
  top2 = np.sort(factored_logits, -1)[:, -2:]
  ties = (top2[:, 1] - top2[:, 0]) <= 2 * diff
  return {"max_abs_logit_diff": diff, "agree": int(agree.sum()), "n": int(agree.size),
          "unexplained_disagreements": int(np.sum(~agree & ~ties)),
          "merged_test_acc": accuracy(merged_logits, task.test.labels),
          "same_structure_as_base": jax.tree.structure(merged) == jax.tree.structure(
              base_params(task, 0))}
