"""LoRA fine-tuning of all-MiniLM-L6-v2 on 8-way fortune classification.

The default config of ``make run`` (``python -m experiments.finetune``): the
shared settings of ``configs/base.py`` plus the task's own. Every setting can
be overridden on the command line as ``--key=value`` (``--help`` lists them).
"""

BASE = "base"

# -- task and data
task = "fortunes"         # "fortunes" (classification) or "mobydick" (causal LM)
split_seed = 0            # seed of the stratified train/test split (fixed across runs)
test_fraction = 0.2       # share of each category held out as the test set
val_size = 256            # training quotes held out for periodic evaluation
max_len = 64              # tokens per quote (truncated / padded to this length)
train_size = 0            # keep only the first N training quotes (0: all; for smoke tests)
test_size = 0             # keep only the first N test quotes (0: all; for smoke tests)

# -- optimization
head_lr = 2e-3            # peak learning rate of the classification head
probe_steps = 2000        # steps of the head-only probe (on cached frozen features)

# CI-sized smoke run (--quick): a few steps on short inputs.
QUICK = dict(steps=4, max_len=16, batch_size=8, val_size=32, train_size=256, test_size=128,
             probe_steps=20, run_name="quick-minilm")
