"""LoRA fine-tuning of SmolLM2-135M-Instruct on Moby Dick chapters.

``python -m experiments.finetune --config=smollm2_mobydick``: causal-LM
training on all but the last ``n_heldout`` chapters; reports held-out
perplexity and greedy samples before and after. The shared settings of
``configs/base.py``, these overrides and the task's own keys; every one can
be overridden as --key=value (``--help`` lists them).
"""

BASE = "base"

# -- task and data
task = "mobydick"         # causal language modelling on Moby Dick
n_heldout = 10            # the last 10 chapters are held out
seq_len = 128             # tokens per training row (the model sees seq_len, predicts the next)
eval_tokens = 4096        # held-out tokens scored for perplexity (from the first held-out chapter on)
layers = 0                # keep only the first N decoder layers (0: all 30; for smoke tests)

# -- method
method = "lora"           # "lora" or "full"
targets = ("q_proj", "v_proj")  # module names that get adapters; all: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
head = ()                 # nothing trained in full (the LM head is tied to embed_tokens)
quantize = ""             # frozen base: "" (float), "nf4", "int4", "int8" (QLoRA: every linear kernel, the embedding stays float), or "gguf" (the wheel's Q4_1 layers and Q8_0 embedding as shipped, never in float)

# -- optimization
steps = 40                # a modest default: ~40 x 4 x 128 = 20k training tokens
batch_size = 4            # rows of seq_len + 1 tokens per step
lr = 1e-3                 # peak learning rate of the adapters (AdamW)
full_lr = 2e-5            # peak learning rate of every weight when method == "full"
warmup = 4                # linear warm-up steps, then cosine decay to 0

# -- evaluation, checkpoints, output
eval_every = 20           # steps between held-out perplexity evaluations
eval_batch = 8            # rows per evaluation batch
prompts = ("The whale", "Captain Ahab stood upon the deck and")  # greedy samples before and after
sample_tokens = 24        # greedy tokens generated per prompt
ckpt_every = 20           # steps between orbax checkpoints of the training state

QUICK = dict(steps=2, seq_len=32, batch_size=2, eval_tokens=128, sample_tokens=4,
             prompts=("The whale",), layers=2, run_name="quick-smollm2")
