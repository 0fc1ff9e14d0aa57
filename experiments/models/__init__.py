"""Flax Linen ports of small pretrained models (MiniLM BERT, SmolLM2 LLaMA).

The modules are imported lazily by callers (``from experiments.models import
bert``) so importing this package does not load any weights.
"""
