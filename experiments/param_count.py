"""python -m experiments.param_count [--quick]

Experiment 1, parameter arithmetic: how many parameters LoRA trains.

* A 100 x 100 weight with r = 2: 2 * 100 * 2 = 400 adapter parameters vs
  10,000 (96% fewer), counted by `jlora.summary` on a lorified tree.
* MiniLM (all-MiniLM-L6-v2 + an 8-way head) and SmolLM2-135M at the ranks and
  targets of their configs (``configs/*.py``), counted by `jlora.summary` on
  the real lorified trees (``--quick`` uses `jax.eval_shape` trees of the
  same shapes, so nothing is loaded).
* GPT-3 175B with r = 4 on Wq and Wv (96 layers, d_model 12,288): counted by
  `jlora.summary` on a shape-only tree of the 96 Wq, Wv weights, next to the
  formula 2 * 96 * (2 * 12,288 * 4) and the published 175B total.

Writes ``experiments/results/param_count.{json,md}`` (``--quick``: under
``runs/quick``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

import jlora
from experiments import config as config_lib
from experiments import utils

OWN = {
    "gpt3_layers": (96, "layers of GPT-3 175B"),
    "gpt3_d_model": (12288, "model width of GPT-3 175B"),
    "gpt3_rank": (4, "LoRA paper, Sec. 4.2: r = 4 on Wq and Wv"),
    "gpt3_total": (175e9, "published parameter count of GPT-3 175B"),
    "toy_d": (100, "width of the toy square weight"),
    "toy_rank": (2, "rank of the toy weight's adapter"),
}


def _zeros(shapes: Any) -> Any:
  """Zero arrays of the shapes of a ``jax.ShapeDtypeStruct`` tree."""
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _count(name: str, tree: Any, rank: int, targets, alpha: float, head=()) -> dict[str, Any]:
  lorified = jlora.lorify(tree, rank, key=jax.random.key(0), targets=tuple(targets), alpha=alpha,
                          trainable=tuple(head) or None)
  s = jlora.summary(lorified)
  base = s.total_params - sum(r.adapter_params for r in s.rows)
  adapted = sum(r.weight_params for r in s.rows)
  return {"model": name, "rank": rank, "targets": list(targets), "head": list(head),
          "adapted_weights": len(s.rows), "adapted_weight_params": adapted,
          "adapter_params": sum(r.adapter_params for r in s.rows),
          "trainable_params": s.trainable_params, "base_params": base,
          "trainable_pct_of_base": 100 * s.trainable_params / base,
          "adapter_pct_of_adapted": 100 * sum(r.adapter_params for r in s.rows) / adapted}


def toy(cfg) -> dict[str, Any]:
  d, r = cfg["toy_d"], cfg["toy_rank"]
  row = _count(f"{d}x{d} weight", {"w": {"kernel": jnp.zeros((d, d))}}, r, ("w",), float(r))
  row["fewer_pct"] = 100 * (1 - row["adapter_params"] / row["adapted_weight_params"])
  return row


def minilm(quick: bool) -> dict[str, Any]:
  from experiments.models import bert

  fcfg, _ = config_lib.load_file("minilm_fortunes")
  if quick:
    params = _zeros(bert.classifier_shapes(bert.BertConfig(), 8))
  else:
    config, encoder, _ = bert.load_minilm()
    params = bert.init_classifier_params(config, encoder, 8)
  return _count("MiniLM-L6 + 8-way head", params, fcfg["rank"], fcfg["targets"], fcfg["alpha"],
                fcfg["head"])


def smollm2(quick: bool) -> dict[str, Any]:
  from experiments.models import llama

  lcfg, _ = config_lib.load_file("smollm2_mobydick")
  if quick:
    params = _zeros(llama.shapes(llama.LlamaConfig()))
  else:
    _, params, _ = llama.load_smollm2()
  return _count("SmolLM2-135M", params, lcfg["rank"], lcfg["targets"], lcfg["alpha"])


def gpt3(cfg) -> dict[str, Any]:
  n, d, r = cfg["gpt3_layers"], cfg["gpt3_d_model"], cfg["gpt3_rank"]
  # Shape-only (2 x 96 x 12288^2 floats would be 116 GB): lorify runs under
  # jax.eval_shape, and summary counts the resulting shapes.
  tree = {f"layer_{i}": {"wq": {"kernel": jax.ShapeDtypeStruct((d, d), jnp.float32)},
                         "wv": {"kernel": jax.ShapeDtypeStruct((d, d), jnp.float32)}}
          for i in range(n)}
  lorified = jax.eval_shape(lambda t: jlora.lorify(t, r, key=jax.random.key(0),
                                                  targets=("wq", "wv"), alpha=float(r)), tree)
  s = jlora.summary(lorified)
  counted = sum(row.adapter_params for row in s.rows)
  formula = 2 * n * (2 * d * r)
  assert counted == formula, (counted, formula)
  return {"model": "GPT-3 175B (Wq, Wv)", "rank": r, "layers": n, "d_model": d,
          "adapter_params": counted, "formula": f"2 x {n} x (2 x {d} x {r}) = {formula:,}",
          "trainable_pct_of_base": 100 * counted / cfg["gpt3_total"],
          "vs_total": cfg["gpt3_total"], "adapted_weights": len(s.rows)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  cfg = config_lib.resolve(OWN, argv or [], usage=__doc__)
  rows = {"toy": toy(cfg), "minilm": minilm(cfg["quick"]), "smollm2": smollm2(cfg["quick"]),
          "gpt3": gpt3(cfg)}
  t = rows["toy"]
  lines = [
      "## 1. Parameter arithmetic\n",
      f"{t['model']}, r={t['rank']}: {t['adapter_params']:,} adapter parameters vs "
      f"{t['adapted_weight_params']:,} ({t['fewer_pct']:.0f}% fewer).\n",
      utils.table(
          ["model", "r", "targets", "adapted weights", "their params", "trainable (adapters+head)",
           "base params", "trainable % of base"],
          [[r["model"], r["rank"], "+".join(r["targets"]) + (" + " + "+".join(r["head"])
                                                            if r["head"] else ""),
            r["adapted_weights"], f"{r['adapted_weight_params']:,}",
            f"{r['trainable_params']:,}", f"{r['base_params']:,}",
            f"{r['trainable_pct_of_base']:.3f}%"] for r in (rows["minilm"], rows["smollm2"])]),
      "",
      f"GPT-3 175B, r={rows['gpt3']['rank']} on Wq and Wv: {rows['gpt3']['formula']} trainable "
      f"(counted by jlora.summary on a shape-only tree of {rows['gpt3']['adapted_weights']} "
      f"weights) = {rows['gpt3']['trainable_pct_of_base']:.4f}% of 175B.",
  ]
  md = "\n".join(lines) + "\n"
  print(md)
  utils.write_json(utils.out_path(cfg["quick"], "param_count.json"),
                   {**rows, "provenance": utils.provenance()})
  with open(utils.out_path(cfg["quick"], "param_count.md"), "w") as f:
    f.write(md)
  return rows


if __name__ == "__main__":
  config_lib.run_main(main, None)
