"""LoRA fine-tuning of all-MiniLM-L6-v2 on 8-way fortune classification.

The default config of ``make run`` (``python -m experiments.finetune``).
Every setting can be overridden on the command line as ``--key=value``.
"""

# -- task and data
task = "fortunes"         # "fortunes" (classification) or "mobydick" (causal LM)
split_seed = 0            # seed of the stratified train/test split (fixed across runs)
test_fraction = 0.2       # share of each category held out as the test set
val_size = 256            # training quotes held out for periodic evaluation
max_len = 64              # tokens per quote (truncated / padded to this length)
train_size = 0            # keep only the first N training quotes (0: all; for smoke tests)
test_size = 0             # keep only the first N test quotes (0: all; for smoke tests)

# -- method
method = "lora"           # "lora" (adapters + head), "full" (every weight), "probe" (head only)
rank = 8                  # LoRA rank r
alpha = 16.0              # LoRA scale numerator: the update is scaled by alpha / rank
targets = ("query", "value")  # module names that get adapters (Wq, Wv as in the paper)
head = ("classifier",)    # modules trained in full next to the adapters

# -- optimization
seed = 0                  # seed of the head, the adapters and the batch order
steps = 150               # optimizer steps
batch_size = 32
lr = 2e-3                 # peak learning rate of the adapters (AdamW)
full_lr = 1e-4            # peak learning rate of the encoder when method == "full"
head_lr = 2e-3            # peak learning rate of the classification head
warmup = 15               # linear warm-up steps, then cosine decay to 0
weight_decay = 0.0
probe_steps = 2000        # steps of the head-only probe (on cached frozen features)

# -- evaluation, checkpoints, output
eval_every = 50           # steps between evaluations on the validation quotes
eval_batch = 64
ckpt_every = 50           # steps between orbax checkpoints of the training state
ckpt_keep = 2             # checkpoints kept
out_dir = "runs"          # root of run directories
run_name = ""             # run directory under out_dir (default: config name + method)
progress = True           # show a progress bar
compile_cache = "runs/.jax_cache"  # persistent XLA compilation cache ("" disables)

# CI-sized smoke run (--quick): a few steps on short inputs.
QUICK = dict(steps=4, max_len=16, batch_size=8, warmup=1, eval_every=2, ckpt_every=2,
             val_size=32, train_size=256, test_size=128, probe_steps=20, eval_batch=64,
             run_name="quick-minilm")
