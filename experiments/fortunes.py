"""MiniLM on the 8-way fortune task: data, head-only probe, LoRA and full fine-tuning.

Shared by the main job (``experiments/finetune.py``) and the sweeps
(``experiments/fortunes_sweeps.py``). Three methods, one loop:

* ``probe``: the classification head alone, trained on mean-pooled features of
  the frozen encoder (computed once and cached under ``runs/cache``); this is
  exactly head-only training, since the frozen encoder's output never changes.
* ``lora``: adapters on ``targets`` plus the head, via `jlora.lorify`,
  `jlora.lora` and `jlora.train_step`.
* ``full``: every weight, a plain ``jax.jit`` Adam step.

All three train with the shared loop of ``experiments/training.py``.

Training is deterministic (no dropout) so that the three differ only in what
they train. The head gets its own learning rate (``head_lr``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import optax

import jlora
from experiments import data as data_lib
from experiments import training, utils
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
              val_size: int = 256, train_size: int = 0, test_size: int = 0,
              progress: bool = False) -> Task:
  """Loads and tokenizes the fortunes (fixed length ``max_len``).

  The first ``val_size`` quotes of the (seeded, shuffled) training split are
  held out for periodic evaluation; the test split is only used at the end.
  ``train_size`` / ``test_size`` (0: all) keep only the first quotes of
  those splits, for smoke tests. ``progress`` shows the tokenization.
  """
  from tqdm.auto import tqdm

  split = data_lib.fortunes_split(test_fraction=test_fraction, seed=split_seed)
  config, encoder, _ = bert.load_minilm()
  tok = bert.load_tokenizer(max_length=max_len, pad_to_multiple_of=None)
  tok.enable_padding(pad_id=0, pad_token="[PAD]", length=max_len)

  def encode(texts, labels, what: str) -> Split:
    chunks = [bert.tokenize(tok, texts[i:i + 512])
              for i in tqdm(range(0, len(texts), 512), desc=f"tokenizing {what} quotes",
                            disable=not progress, dynamic_ncols=True, leave=False)]
    return Split(np.concatenate([c["input_ids"] for c in chunks]),
                 np.concatenate([c["attention_mask"] for c in chunks]),
                 np.asarray(labels, np.int32))

  train = encode(split.train_texts, split.train_labels, "training")
  pick = lambda s, sl: Split(s.ids[sl], s.mask[sl], s.labels[sl])  # noqa: E731
  key = f"T{max_len}-s{split_seed}-f{test_fraction}-v{val_size}-n{train_size}-t{test_size}"
  test = encode(split.test_texts, split.test_labels, "test")
  return Task(train=pick(train, slice(val_size, val_size + train_size if train_size else None)),
              val=pick(train, slice(0, val_size)),
              test=pick(test, slice(0, test_size or None)), label_names=split.label_names,
              config=config, encoder=encoder, max_len=max_len, key=key)


def task_from(cfg: Mapping[str, Any]) -> Task:
  return load_task(cfg["max_len"], cfg["split_seed"], cfg["test_fraction"], cfg["val_size"],
                   cfg["train_size"], cfg["test_size"], cfg.get("progress", False))


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
  """Base params (quantized by ``cfg["quantize"]``) with LoRA adapters and a trainable head."""
  base = training.quantize_base(base_params(task, seed), cfg)
  return training.add_lora(base, cfg, key=jax.random.key(seed + 10_000))


def batches(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
  """Endless seeded epochs of row indices (each epoch a fresh permutation)."""
  rng = np.random.default_rng(seed)
  while True:
    order = rng.permutation(n)
    for i in range(0, n - batch_size + 1, batch_size):
      yield order[i:i + batch_size]


def _batch(split: Split, idx: np.ndarray) -> dict[str, np.ndarray]:
  return {"ids": split.ids[idx], "mask": split.mask[idx], "labels": split.labels[idx]}


def predict(fn: Callable, params: Any, split: Split, batch: int, *, progress: bool = False,
            desc: str = "predict") -> np.ndarray:
  """Logits of ``fn(params, ids, mask)`` (a jitted function) over a split.

  Every call has the same shape (the last batch is padded), so ``fn``
  compiles once. ``progress`` shows a bar labelled ``desc``.
  """
  from tqdm.auto import tqdm

  out = []
  n = len(split)
  for i in tqdm(range(0, n, batch), desc=desc, disable=not progress, dynamic_ncols=True,
                leave=False):
    idx = np.arange(i, i + batch) % n
    out.append(np.asarray(fn(params, split.ids[idx], split.mask[idx]))[: min(batch, n - i)])
  return np.concatenate(out)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(np.argmax(logits, -1) == labels))


# --------------------------------------------------------------------------- probe


def features(task: Task, batch: int = 64, *, cache: bool = True,
             progress: bool = False) -> dict[str, np.ndarray]:
  """Mean-pooled features of the frozen encoder for train/val/test (cached on disk)."""
  path = os.path.join(REPO_ROOT, "runs", "cache", f"minilm-features-{task.key}.npz")
  if cache and os.path.isfile(path):
    with np.load(path) as f:
      return dict(f)
  model = bert.BertModel(task.config)
  fn = jax.jit(lambda p, ids, mask: bert.mean_pool(model.apply({"params": p}, ids, mask), mask))
  out = {name: predict(fn, task.encoder, getattr(task, name), batch, progress=progress,
                       desc=f"probe features ({name})") for name in ("train", "val", "test")}
  if cache:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path + ".tmp.npz", **out)
    os.replace(path + ".tmp.npz", path)
  return out


def train_probe(task: Task, cfg: Mapping[str, Any], seed: int, *,
                progress: bool = False, eval_every: int = 0) -> dict[str, Any]:
  """Trains the head alone on cached frozen features; returns its accuracies.

  The same loop as every other run (`training.fit`, the head as a "full"
  run of ``probe_steps`` steps at ``head_lr``), with the validation accuracy
  every ``eval_every`` steps (0: after the last) in ``"evals"``.
  """
  feats = features(task, cfg["eval_batch"], progress=progress)
  head = base_params(task, seed)["classifier"]
  logits_of = lambda h, x: x @ h["kernel"] + h["bias"]  # noqa: E731 - the Dense head

  def loss_fn(h, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits_of(h, batch["x"]),
                                                           batch["y"]).mean()

  probe_cfg = dict(cfg, steps=cfg["probe_steps"], head=())
  runner = training.Runner("full", loss_fn, training.make_tx(probe_cfg, cfg["head_lr"]), head)
  acc_of = lambda h, name: accuracy(np.asarray(logits_of(h, feats[name])),  # noqa: E731
                                    getattr(task, name).labels)
  run = training.fit(runner, head, steps=cfg["probe_steps"],
                     indices=batches(len(task.train), cfg["batch_size"], seed),
                     make_batch=lambda idx: {"x": feats["train"][idx], "y": task.train.labels[idx]},
                     evaluate=lambda h: {"val_acc": acc_of(h, "val")}, eval_every=eval_every,
                     progress=progress, desc="probe (head only)", measure_memory=False)
  return {"method": "probe", "seed": seed, "val_acc": acc_of(run.params, "val"),
          "test_acc": acc_of(run.params, "test"), "trainable_params": utils.tree_size(head),
          "total_params": utils.tree_size(base_params(task, seed)),
          "opt_state_bytes": run.opt_state_bytes, "losses": run.losses, "evals": run.evals}


# --------------------------------------------------------------------------- training


def _loss(apply: Callable) -> Callable:
  def loss_fn(params, batch):
    logits = apply(params, batch["ids"], batch["mask"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
  return loss_fn


_RUNNERS: dict[tuple, tuple[training.Runner, Callable]] = {}


def runner_for(task: Task, cfg: Mapping[str, Any], like: Any,
               lr: float | None = None) -> tuple[training.Runner, Callable]:
  """A cached (runner, jitted predict) pair: seeds of one setting share compiled steps."""
  keys = ("method", "rank", "alpha", "targets", "head", "lr", "full_lr", "head_lr", "warmup",
          "steps", "weight_decay")
  key = (task.key, jax.tree.structure(like), lr) + tuple(repr(cfg[k]) for k in keys)
  if key not in _RUNNERS:
    apply = apply_fn(task)
    if cfg["method"] == "lora":
      apply = jlora.lora(apply)
    if lr is None:
      lr = cfg["lr"] if cfg["method"] == "lora" else cfg["full_lr"]
    _RUNNERS[key] = (training.Runner(cfg["method"], _loss(apply), training.make_tx(cfg, lr), like),
                     jax.jit(apply))
  return _RUNNERS[key]


def train(task: Task, cfg: Mapping[str, Any], seed: int, *, params: Any = None,
          lr: float | None = None, ckpts: jlora.Checkpoints | None = None,
          progress: bool = False, measure_memory: bool = True) -> dict[str, Any]:
  """Trains with ``cfg["method"]`` ("lora" or "full") and evaluates on the test set.

  Args:
    task: From :func:`load_task`.
    cfg: The run's settings (see ``configs/minilm_fortunes.py``).
    seed: Seed of the head, the adapters and the batch order.
    params: The tree to train (default: :func:`lorify` for "lora", the base
      params for "full"); any jlora method's tree trains as "lora".
    lr: The body's peak learning rate (default ``lr`` or ``full_lr``).
    ckpts: Where to save the training state every ``ckpt_every`` steps
      (its ``data`` holds the settings and the step) and to resume from.
    progress: Show progress bars.
    measure_memory: Add XLA's memory analysis of the compiled step.

  Returns:
    Accuracies, parameter counts, timings, memory, the loss curve, the
    evaluations and the trained tree (``"params"``; for LoRA the lorified tree).
  """
  if params is None:
    params = lorify(task, cfg, seed) if cfg["method"] == "lora" else base_params(task, seed)
  runner, fwd = runner_for(task, cfg, params, lr)
  def val_acc(p):
    return {"val_acc": accuracy(predict(fwd, p, task.val, cfg["eval_batch"]), task.val.labels)}

  run = training.fit(runner, params, steps=cfg["steps"],
                     indices=batches(len(task.train), cfg["batch_size"], seed),
                     make_batch=lambda idx: _batch(task.train, idx), evaluate=val_acc,
                     eval_every=cfg["eval_every"], ckpts=ckpts, ckpt_every=cfg["ckpt_every"],
                     ckpt_data={"config": dict(cfg), "seed": seed}, progress=progress,
                     desc=f"{cfg['method']} seed {seed}", measure_memory=measure_memory)
  test_logits = predict(fwd, run.params, task.test, cfg["eval_batch"], progress=progress,
                        desc="test set")
  return {
      "method": cfg["method"], "seed": seed, "rank": cfg["rank"], "targets": list(cfg["targets"]),
      "test_acc": accuracy(test_logits, task.test.labels), "val_acc": run.evals[-1]["val_acc"],
      "test_logits": test_logits, **training.counts(run.params, cfg["method"]), **run.summary(),
      "params": run.params,
  }


def merge_check(task: Task, cfg: Mapping[str, Any], lorified: Any,
                factored_logits: np.ndarray, *, progress: bool = False) -> dict[str, Any]:
  """Runs the merged tree with the plain model and compares it with the factored one.

  Returns:
      The largest absolute logit difference, the number of test predictions
      that agree, and those that differ only where the top-2 margin is within
      that difference (a floating-point tie).
  """
  merged = jlora.merge(lorified)
  plain = jax.jit(apply_fn(task))
  merged_logits = predict(plain, merged, task.test, cfg["eval_batch"], progress=progress,
                          desc="merge check (merged tree, test set)")
  diff = float(np.max(np.abs(merged_logits - factored_logits)))
  agree = np.argmax(merged_logits, -1) == np.argmax(factored_logits, -1)
  top2 = np.sort(factored_logits, -1)[:, -2:]
  ties = (top2[:, 1] - top2[:, 0]) <= 2 * diff
  return {"max_abs_logit_diff": diff, "agree": int(agree.sum()), "n": int(agree.size),
          "unexplained_disagreements": int(np.sum(~agree & ~ties)),
          "merged_test_acc": accuracy(merged_logits, task.test.labels),
          "same_structure_as_base": jax.tree.structure(merged) == jax.tree.structure(
              base_params(task, 0))}
