"""LoRA fine-tuning of SmolLM2-135M-Instruct on Moby Dick chapters.

``python -m experiments.finetune --config=smollm2_mobydick``: causal-LM
training on all but the last ``n_heldout`` chapters; reports held-out
perplexity and greedy samples before and after. Its own settings (no
inheritance from minilm_fortunes); every one can be overridden as --key=value.
"""

# -- task and data
task = "mobydick"
n_heldout = 10            # the last 10 chapters are held out
seq_len = 128             # tokens per training row (the model sees seq_len, predicts the next)
eval_tokens = 4096        # held-out tokens scored for perplexity (from the first held-out chapter on)
layers = 0                # keep only the first N decoder layers (0: all 30; for smoke tests)

# -- method
method = "lora"           # "lora" or "full"
rank = 8
alpha = 16.0
targets = ("q_proj", "v_proj")  # or q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
head = ()                 # nothing trained in full (the LM head is tied to embed_tokens)

# -- optimization
seed = 0
steps = 40                # a modest default: ~40 x 4 x 128 = 20k training tokens
batch_size = 4
lr = 1e-3
full_lr = 2e-5
warmup = 4
weight_decay = 0.0

# -- evaluation, samples, checkpoints, output
eval_every = 20
eval_batch = 8
prompts = ("The whale", "Captain Ahab stood upon the deck and")
sample_tokens = 24        # greedy tokens generated per prompt
ckpt_every = 20
ckpt_keep = 2
out_dir = "runs"
run_name = ""
progress = True
compile_cache = "runs/.jax_cache"

QUICK = dict(steps=2, seq_len=32, batch_size=2, warmup=1, eval_tokens=128, eval_every=2,
             ckpt_every=2, sample_tokens=4, prompts=("The whale",), layers=2,
             run_name="quick-smollm2")
