"""PyTorch + PEFT worker for ``python -m benchmarks.reference --peft``.

The same GPT-2-style decoder as benchmarks/model.py, in PyTorch (layers named
q, k, v, o, fc1, fc2; tied LM head; pre-LN; causal attention written out as
the JAX model does it), with two Adam train steps:

* ``full``: full fine-tuning.
* ``peft``: ``peft.get_peft_model`` with ``LoraConfig(r, lora_alpha,
  target_modules)``; only the adapters train.

Protocol: it prints one JSON line describing itself, then reads step names
(``full`` or ``peft``) from stdin, one per line, runs one step each and prints
its seconds. The parent interleaves these with its JAX steps, so both are
timed under the same machine load. Only needs torch, peft and transformers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import peft
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
  def __init__(self, c):
    super().__init__()
    d = c["d"]
    self.heads = c["heads"]
    self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
    self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
    self.fc1, self.fc2 = nn.Linear(d, c["mlp"]), nn.Linear(c["mlp"], d)

  def forward(self, x):
    b, t, d = x.shape
    hd = d // self.heads
    h = self.ln1(x)
    q = self.q(h).view(b, t, self.heads, hd)
    k = self.k(h).view(b, t, self.heads, hd)
    v = self.v(h).view(b, t, self.heads, hd)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    att = scores.softmax(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d)
    x = x + self.o(out)
    return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.wte = nn.Embedding(c["vocab"], c["d"])
    self.wpe = nn.Parameter(torch.randn(c["seq"], c["d"]) * 0.01)
    self.blocks = nn.ModuleList(Block(c) for _ in range(c["layers"]))
    self.ln_f = nn.LayerNorm(c["d"])

  def forward(self, tokens):
    x = self.wte(tokens) + self.wpe[: tokens.shape[1]]
    for blk in self.blocks:
      x = blk(x)
    return F.linear(self.ln_f(x), self.wte.weight)


def loss_fn(logits, tokens):
  return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                         tokens[:, 1:].reshape(-1))


def make_step(model, tokens):
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.Adam(params, lr=1e-3)

  def step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(tokens), tokens)
    loss.backward()
    opt.step()
    return loss.detach().item()

  return step, sum(p.numel() for p in params)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--config", required=True, help="JSON of benchmarks.model.Config")
  p.add_argument("--targets", required=True)
  p.add_argument("--rank", type=int, required=True)
  p.add_argument("--alpha", type=float, required=True)
  a = p.parse_args()
  c = json.loads(a.config)
  torch.manual_seed(0)
  tokens = torch.randint(0, c["vocab"], (c["batch"], c["seq"]))

  full_model = GPT(c)
  full_step, total = make_step(full_model, tokens)
  base = GPT(c)
  base.load_state_dict(full_model.state_dict())
  cfg = peft.LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0,
                        target_modules=a.targets.split(","))
  peft_model = peft.get_peft_model(base, cfg)
  peft_step, trainable = make_step(peft_model, tokens)
  steps = {"full": full_step, "peft": peft_step}

  print(json.dumps({"torch": torch.__version__, "peft": peft.__version__,
                    "threads": torch.get_num_threads(), "trainable": trainable,
                    "total": total}), flush=True)
  with torch.inference_mode(False):
    for line in sys.stdin:
      name = line.strip()
      t0 = time.perf_counter()
      steps[name]()
      print(f"{time.perf_counter() - t0:.6f}", flush=True)


if __name__ == "__main__":
  main()
