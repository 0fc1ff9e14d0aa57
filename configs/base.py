"""Settings shared by every experiment config (never run on its own).

``configs/minilm_fortunes.py`` and ``configs/smollm2_mobydick.py`` name this
file as their ``BASE`` and hold only their overrides and their own keys.
"""

# -- method
method = "lora"           # "lora" (adapters + head), "full" (every weight), "probe" (head only; fortunes)
rank = 8                  # LoRA rank r
alpha = 16.0              # LoRA scale numerator: the update is scaled by alpha / rank
targets = ("query", "value")  # module names that get adapters (Wq, Wv as in the paper)
head = ("classifier",)    # modules trained in full next to the adapters
quantize = ""             # frozen base in low precision, as QLoRA: "" (float), "nf4", "int4" or "int8" on every linear kernel outside the head (embeddings and norms stay float)
double_quant = True       # with quantize nf4 or int4: block scales in 8 bits (QLoRA's double quantization)

# -- optimization
seed = 0                  # seed of the head, the adapters and the batch order
steps = 150               # optimizer steps
batch_size = 32           # examples per optimizer step
lr = 2e-3                 # peak learning rate of the adapters (AdamW)
full_lr = 1e-4            # peak learning rate of the weights when method == "full"
warmup = 15               # linear warm-up steps, then cosine decay to 0
weight_decay = 0.0        # AdamW weight decay

# -- evaluation, checkpoints, output
eval_every = 50           # steps between evaluations on held-out data
eval_batch = 64           # examples per evaluation batch
ckpt_every = 50           # steps between orbax checkpoints of the training state
ckpt_keep = 2             # checkpoints kept
out_dir = "runs"          # root of run folders (relative: to the repository)
run_name = ""             # run folder under out_dir (default: config name + method)
fresh = False             # delete an existing run folder and start again (else: resume it)
progress = True           # show progress bars
compile_cache = "runs/.jax_cache"  # persistent XLA compilation cache ("" disables)

# CI-sized smoke run (--quick), shared by the variants.
QUICK = dict(warmup=1, eval_every=2, ckpt_every=2)
