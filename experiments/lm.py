"""SmolLM2-135M on Moby Dick: causal-LM data, LoRA / full fine-tuning, perplexity, samples.

Used by the main job with ``--config=smollm2_mobydick`` and by
``experiments/mobydick_lm.py``. Training rows are consecutive ``seq_len + 1``
token windows of the training chapters (joined with EOS); held-out
perplexity scores the first ``eval_tokens`` tokens of the held-out chapters
in non-overlapping windows of the same length.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from experiments import data as data_lib
from experiments import utils
from experiments.fortunes import Runner
from experiments.models import llama


@dataclasses.dataclass
class Corpus:
  """Token rows ``(n, seq_len + 1)`` for training and held-out scoring."""

  train: np.ndarray
  heldout: np.ndarray
  config: llama.LlamaConfig
  params: Any
  tokenizer: Any


def _truncate(config: llama.LlamaConfig, params: dict, layers: int):
  """Keeps the first ``layers`` decoder layers (0: all), for smoke tests."""
  if not layers or layers >= config.num_hidden_layers:
    return config, params
  model = {k: v for k, v in params["model"].items()
           if not k.startswith("layers_") or int(k.split("_")[1]) < layers}
  return dataclasses.replace(config, num_hidden_layers=layers), {"model": model}


@functools.lru_cache(maxsize=2)
def load_corpus(seq_len: int, n_heldout: int, eval_tokens: int, layers: int = 0) -> Corpus:
  """Tokenizes the chapters; held-out = the last ``n_heldout`` chapters."""
  config, params, tok = llama.load_smollm2()
  config, params = _truncate(config, params, layers)
  chapters = data_lib.moby_dick_chapters()
  train_idx, held_idx = data_lib.moby_dick_split(n_heldout)
  encode = lambda t: llama.encode(tok, t)  # noqa: E731
  train = data_lib.tokenize_chapters([chapters[i] for i in train_idx], encode, config.eos_token_id)
  held = data_lib.tokenize_chapters([chapters[i] for i in held_idx], encode, config.eos_token_id)
  rows = lambda ids: data_lib.chunk_tokens(ids, seq_len + 1)  # noqa: E731
  n_eval = max(eval_tokens // (seq_len + 1), 1)
  return Corpus(rows(train), rows(held)[:n_eval], config, params, tok)


def corpus_from(cfg: Mapping[str, Any]) -> Corpus:
  return load_corpus(cfg["seq_len"], cfg["n_heldout"], cfg["eval_tokens"], cfg.get("layers", 0))


def apply_fn(config: llama.LlamaConfig) -> Callable:
  model = llama.LlamaForCausalLM(config)
  return lambda p, ids: model.apply({"params": p}, ids)


def _nll(apply: Callable) -> Callable:
  """Summed next-token NLL and token count of rows ``(b, seq_len + 1)``."""
  def nll(params, rows):
    logits = apply(params, rows[:, :-1])
    logp = jax.nn.log_softmax(logits, -1)
    tok = jnp.take_along_axis(logp, rows[:, 1:, None], -1)[..., 0]
    return -jnp.sum(tok), jnp.asarray(tok.size, jnp.float32)
  return nll


def perplexity(fn: Callable, params: Any, rows: np.ndarray, batch: int) -> float:
  """``exp(mean NLL)`` of a jitted ``_nll`` over ``rows`` (last batch wraps, then is cut)."""
  total, count = 0.0, 0.0
  n = rows.shape[0]
  for i in range(0, n, batch):
    take = min(batch, n - i)
    if take == batch:
      s, c = fn(params, rows[i:i + batch])
    else:  # score only the real rows of a padded last batch
      s, c = fn(params, rows[np.arange(i, i + take)])
    total, count = total + float(s), count + float(c)
  return float(math.exp(total / count))


def samples(corpus: Corpus, params: Any, prompts, n: int) -> list[str]:
  """Greedy continuations of each prompt (plain or merged tree)."""
  return [llama.decode(corpus.tokenizer, llama.generate_ids(
      params, corpus.config, llama.encode(corpus.tokenizer, p), n)) for p in prompts]


def lm_tx(cfg: Mapping[str, Any], lr: float) -> optax.GradientTransformation:
  warmup = max(min(cfg["warmup"], cfg["steps"] - 1), 0)
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(cfg["steps"], warmup + 1), 0.0)
  return optax.adamw(sched, weight_decay=cfg["weight_decay"])


def make_runner(corpus: Corpus, cfg: Mapping[str, Any], params: Any) -> Runner:
  """A `Runner` (LoRA or full) for the next-token loss."""
  apply = apply_fn(corpus.config)
  if cfg["method"] == "lora":
    apply = jlora.lora(apply)
  nll = _nll(apply)

  def loss_fn(p, batch):
    s, c = nll(p, batch["rows"])
    return s / c

  lr = cfg["lr"] if cfg["method"] == "lora" else cfg["full_lr"]
  return Runner(cfg["method"], loss_fn, lm_tx(cfg, lr), params)


def prepare(corpus: Corpus, cfg: Mapping[str, Any]) -> Any:
  """The tree to train: lorified (``method == "lora"``) or the base params."""
  if cfg["method"] == "lora":
    return jlora.lorify(corpus.params, cfg["rank"], key=jax.random.key(cfg["seed"]),
                        targets=tuple(cfg["targets"]), alpha=cfg["alpha"],
                        trainable=tuple(cfg["head"]) or None)
  return corpus.params


def train(corpus: Corpus, cfg: Mapping[str, Any], *, steps: int | None = None,
          ckpts: jlora.Checkpoints | None = None, progress: bool = False,
          on_eval: Callable[[int, dict], None] | None = None, evaluate: bool = True,
          measure_memory: bool = True) -> dict[str, Any]:
  """Trains for ``steps`` (default ``cfg["steps"]``) and scores held-out perplexity.

  Returns:
      Held-out perplexity (factored tree), the loss curve, step times,
      memory, parameter counts, optimizer-state bytes and the trained tree.
  """
  from tqdm.auto import tqdm

  steps = cfg["steps"] if steps is None else steps
  params = prepare(corpus, cfg)
  runner = make_runner(corpus, cfg, params)
  apply = apply_fn(corpus.config)
  nll = jax.jit(_nll(jlora.lora(apply) if cfg["method"] == "lora" else apply))
  state, frozen = runner.init(params)
  rng = np.random.default_rng(cfg["seed"])
  timer, losses, evals, memory = utils.StepTimer(), [], [], {}
  bar = tqdm(range(1, steps + 1), desc=f"{cfg['method']} SmolLM2", disable=not progress,
             dynamic_ncols=True, leave=progress)
  for step in bar:
    batch = {"rows": corpus.train[rng.integers(0, corpus.train.shape[0], cfg["batch_size"])]}
    if step == 2 and measure_memory:
      memory = utils.compiled_memory(runner.jitted, state, frozen, batch)
    timer.start()
    state, metrics = runner.step(state, frozen, batch)
    loss = float(metrics["loss"])
    timer.stop()
    losses.append(loss)
    if not math.isfinite(loss):
      raise FloatingPointError(f"loss is {loss} at step {step}; lower the learning rate")
    last = step == steps
    if evaluate and (step % cfg["eval_every"] == 0 or last):
      ppl = perplexity(nll, runner.params(state, frozen), corpus.heldout, cfg["eval_batch"])
      evals.append({"step": step, "heldout_ppl": ppl, "loss": loss})
      if on_eval:
        on_eval(step, evals[-1])
    bar.set_postfix(loss=f"{loss:.3f}", **({"ppl": f"{evals[-1]['heldout_ppl']:.2f}"}
                                           if evals else {}))
    if ckpts is not None and (step % cfg["ckpt_every"] == 0 or last):
      ckpts.save(state, data={"config": dict(cfg), "step": step}, force=last)
  bar.close()
  trained = runner.params(state, frozen)
  if cfg["method"] == "lora":
    s = jlora.summary(trained)
    counts = {"trainable_params": s.trainable_params, "total_params": s.total_params}
  else:
    counts = {"trainable_params": utils.tree_size(trained),
              "total_params": utils.tree_size(trained)}
  return {"method": cfg["method"], "losses": losses, "evals": evals,
          "heldout_ppl": evals[-1]["heldout_ppl"] if evals else None,
          "step_time_s": timer.median, "first_step_s": timer.first, "memory": memory,
          "opt_state_bytes": utils.tree_bytes(state.opt_state), **counts, "params": trained,
          "nll_fn": nll}
