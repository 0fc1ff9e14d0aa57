"""Ready-made `ModuleMap`\\ s for common model families (Hugging Face names).

Each maps a Flax tree that mirrors the ``transformers`` module names (lists
as Linen names them, ``layers_0``; kernels ``(in, out)``, embeddings
``(vocab, features)``) to those names:

* `LLAMA`: LLaMA, and the families with its names: `MISTRAL`, `QWEN2`,
  `QWEN3`, and Gemma's HF ports `GEMMA2`, `GEMMA3` (``Gemma3ForCausalLM``).
* `PHI3`: fused ``qkv_proj`` and ``gate_up_proj``; a tree with separate
  ``q_proj``/``k_proj``/``v_proj`` and ``gate_proj``/``up_proj`` maps onto
  them as fused parts.
* `GPT2`: ``Conv1D`` layers (torch weight ``(in, out)``), fused ``c_attn``
  (or separate ``q_proj``/``k_proj``/``v_proj`` as its parts).
* `BERT` (``BertModel``), `BERT_CLS` (``BertForSequenceClassification``),
  `ROBERTA` and `ROBERTA_CLS`.
* `GEMMA_LIB`: the Gemma library's own Flax tree (``layer_0/attn/q_einsum/w``,
  multi-axis einsum kernels, ``kv_einsum`` and ``gating_einsum`` split into
  two modules each) -> HF Gemma 2/3 names.

A new family is a few rules; the first match wins, ``{name}`` placeholders
are shared by both templates:

>>> from jlora.peft import ModuleMap, Rule, Conv1D, Embedding
>>> falcon = ModuleMap((
...     Rule("transformer/word_embeddings/embedding", "transformer.word_embeddings",
...          Embedding()),
...     Rule("transformer/h_{i}/self_attention/{p:query_key_value|dense}/kernel",
...          "transformer.h.{i}.self_attention.{p}"),
...     Rule("transformer/h_{i}/mlp/{p:dense_h_to_4h|dense_4h_to_h}/kernel",
...          "transformer.h.{i}.mlp.{p}"),
... ), task_type="CAUSAL_LM", name="Falcon")
>>> falcon.resolve(("transformer", "h_2", "mlp", "dense_4h_to_h", "kernel")).module
'transformer.h.2.mlp.dense_4h_to_h'
"""

from __future__ import annotations

from jlora.peft._map import Conv1D, Embedding, Linear, ModuleMap, Rule

_ATTN = "q_proj|k_proj|v_proj|o_proj"
_MLP = "gate_proj|up_proj|down_proj"

LLAMA = ModuleMap((
    Rule("model/embed_tokens/embedding", "model.embed_tokens", Embedding()),
    Rule(f"model/layers_{{i}}/self_attn/{{p:{_ATTN}}}/kernel", "model.layers.{i}.self_attn.{p}"),
    Rule(f"model/layers_{{i}}/mlp/{{p:{_MLP}}}/kernel", "model.layers.{i}.mlp.{p}"),
    Rule("lm_head/kernel", "lm_head"),
    Rule("score/kernel", "score"),
    # The same layers stacked by nn.scan (a leading layer axis): one module each.
    Rule(f"model/layers/self_attn/{{p:{_ATTN}}}/kernel", "model.layers.{layer}.self_attn.{p}"),
    Rule(f"model/layers/mlp/{{p:{_MLP}}}/kernel", "model.layers.{layer}.mlp.{p}"),
), task_type="CAUSAL_LM", name="LLaMA")
MISTRAL = QWEN2 = QWEN3 = GEMMA2 = GEMMA3 = LLAMA

PHI3 = ModuleMap((
    Rule("model/embed_tokens/embedding", "model.embed_tokens", Embedding()),
    Rule("model/layers_{i}/self_attn/{p:qkv_proj|o_proj}/kernel",
         "model.layers.{i}.self_attn.{p}"),
    Rule("model/layers_{i}/self_attn/q_proj/kernel", "model.layers.{i}.self_attn.qkv_proj",
         Linear(part=0, parts=3)),
    Rule("model/layers_{i}/self_attn/k_proj/kernel", "model.layers.{i}.self_attn.qkv_proj",
         Linear(part=1, parts=3)),
    Rule("model/layers_{i}/self_attn/v_proj/kernel", "model.layers.{i}.self_attn.qkv_proj",
         Linear(part=2, parts=3)),
    Rule("model/layers_{i}/mlp/{p:gate_up_proj|down_proj}/kernel", "model.layers.{i}.mlp.{p}"),
    Rule("model/layers_{i}/mlp/gate_proj/kernel", "model.layers.{i}.mlp.gate_up_proj",
         Linear(part=0, parts=2)),
    Rule("model/layers_{i}/mlp/up_proj/kernel", "model.layers.{i}.mlp.gate_up_proj",
         Linear(part=1, parts=2)),
    Rule("lm_head/kernel", "lm_head"),
), task_type="CAUSAL_LM", name="Phi-3")

GPT2 = ModuleMap((
    Rule("transformer/wte/embedding", "transformer.wte", Embedding()),
    Rule("transformer/h_{i}/attn/{p:c_attn|c_proj}/kernel", "transformer.h.{i}.attn.{p}",
         Conv1D()),
    Rule("transformer/h_{i}/attn/q_proj/kernel", "transformer.h.{i}.attn.c_attn",
         Conv1D(part=0, parts=3)),
    Rule("transformer/h_{i}/attn/k_proj/kernel", "transformer.h.{i}.attn.c_attn",
         Conv1D(part=1, parts=3)),
    Rule("transformer/h_{i}/attn/v_proj/kernel", "transformer.h.{i}.attn.c_attn",
         Conv1D(part=2, parts=3)),
    Rule("transformer/h_{i}/mlp/{p:c_fc|c_proj}/kernel", "transformer.h.{i}.mlp.{p}",
         Conv1D()),
    Rule("lm_head/kernel", "lm_head"),
), task_type="CAUSAL_LM", name="GPT-2")

_ENCODER = (
    Rule("embeddings/word_embeddings/embedding", "embeddings.word_embeddings", Embedding()),
    Rule("encoder/layer_{i}/attention/self/{p:query|key|value}/kernel",
         "encoder.layer.{i}.attention.self.{p}"),
    Rule("encoder/layer_{i}/attention/output/dense/kernel",
         "encoder.layer.{i}.attention.output.dense"),
    Rule("encoder/layer_{i}/{p:intermediate|output}/dense/kernel",
         "encoder.layer.{i}.{p}.dense"),
    Rule("pooler/dense/kernel", "pooler.dense"),
)
BERT = ModuleMap(_ENCODER, name="BERT")
BERT_CLS = BERT.prefixed("bert", "bert", rules=(Rule("classifier/kernel", "classifier"),))
ROBERTA = ModuleMap(_ENCODER, name="RoBERTa")
ROBERTA_CLS = ROBERTA.prefixed(
    "roberta", "roberta",
    rules=(Rule("classifier/{p:dense|out_proj}/kernel", "classifier.{p}"),))

# The Gemma library's own Flax tree (gemma.gm.nn, Gemma 2 and 3: GQA, the
# transposed gating einsum) -> HF Gemma names. Its einsum kernels are not
# inputs-then-outputs, so adapters on them need the matching axes, e.g.
# ``jlora.Axes(inputs=(1,), outputs=(0, 2))`` for q_einsum's (heads, d,
# head_dim); kv_einsum (2, kv_heads, d, head_dim) and gating_einsum (2,
# hidden, d) are each two HF modules, split along their leading axis.
GEMMA_LIB = ModuleMap((
    Rule("embedder/input_embedding", "model.embed_tokens", Embedding()),
    Rule("layer_{i}/attn/q_einsum/w", "model.layers.{i}.self_attn.q_proj",
         Linear(order=(1, 0, 2), inputs=1)),
    Rule("layer_{i}/attn/kv_einsum/w", "model.layers.{i}.self_attn.{part}",
         Linear(order=(2, 0, 1, 3), inputs=1, split=("k_proj", "v_proj"))),
    Rule("layer_{i}/attn/qkv_einsum/w", "model.layers.{i}.self_attn.{part}",
         Linear(order=(2, 0, 1, 3), inputs=1, split=("q_proj", "k_proj", "v_proj"))),
    Rule("layer_{i}/attn/attn_vec_einsum/w", "model.layers.{i}.self_attn.o_proj",
         Linear(inputs=2)),
    Rule("layer_{i}/mlp/gating_einsum", "model.layers.{i}.mlp.{part}",
         Linear(order=(2, 0, 1), inputs=1, split=("gate_proj", "up_proj"))),
    Rule("layer_{i}/mlp/linear", "model.layers.{i}.mlp.down_proj", Linear(inputs=1)),
), task_type="CAUSAL_LM", name="Gemma library")

__all__ = ("BERT", "BERT_CLS", "GEMMA2", "GEMMA3", "GEMMA_LIB", "GPT2", "LLAMA", "MISTRAL", "PHI3",
           "QWEN2", "QWEN3", "ROBERTA", "ROBERTA_CLS")
