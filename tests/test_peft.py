"""PEFT format export/import round trips on the BERT and LLaMA ports (no torch).

The comparison against real PEFT (torch) is `experiments/peft_equivalence.py`,
run with a Python that has peft installed.
"""

import json
import os
import tempfile

import jax
import jax.numpy as jnp
import pytest
from safetensors.numpy import load_file

import jlora
from experiments.models import bert, llama
from helpers import assert_trees_close, randomize_adapters

BERT = bert.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=32,
                       max_position_embeddings=16)
LLAMA = llama.LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                          intermediate_size=32)


def bert_params():
  ids = jnp.zeros((1, 8), jnp.int32)
  return bert.BertModel(BERT).init(jax.random.key(0), ids)


def llama_params():
  ids = jnp.zeros((1, 8), jnp.int32)
  return llama.LlamaForCausalLM(LLAMA).init(jax.random.key(0), ids)


def test_bert_round_trip_with_per_module_rank_and_alpha():
  base = bert_params()
  p = jlora.lorify(base, {"value": 4, ".*": 2}, key=jax.random.key(1),
                   alpha={"query": 8.0, ".*": 4.0},
                   targets=("query", "value", "out", "intermediate", "output"))
  p = randomize_adapters(p, jax.random.key(2))
  d = tempfile.mkdtemp()
  config = jlora.export_peft(p, d, module_path=jlora.bert_module_path)
  assert config["r"] == 2 and config["lora_alpha"] == 4.0
  assert config["rank_pattern"] == {r"^encoder\.layer\.0\.attention\.self\.value": 4,
                                    r"^encoder\.layer\.1\.attention\.self\.value": 4}
  assert "encoder.layer.1.output.dense" in config["target_modules"]
  tensors = load_file(os.path.join(d, "adapter_model.safetensors"))
  key = "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"
  assert tensors[key].shape == (2, 16)  # torch (r, in)
  assert tensors[key.replace("lora_A", "lora_B")].shape == (16, 2)  # (out, r)
  with open(os.path.join(d, "adapter_config.json")) as f:
    assert json.load(f)["peft_type"] == "LORA"
  back = jlora.import_peft(d, base, module_path=jlora.bert_module_path)
  assert_trees_close(back, p, rtol=0, atol=0)


def test_llama_round_trip_named_adapter_and_table_mapping():
  base = llama_params()
  p = jlora.lorify(base, 2, key=jax.random.key(1), name="chat",
                   targets=("q_proj", "v_proj", "down_proj"))
  p = randomize_adapters(p, jax.random.key(2))
  d = tempfile.mkdtemp()
  jlora.export_peft(p, d, module_path=jlora.llama_module_path, name="chat")
  keys = load_file(os.path.join(d, "adapter_model.safetensors"))
  assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
  back = jlora.import_peft(d, base, module_path=jlora.llama_module_path, name="chat")
  assert_trees_close(back, p, rtol=0, atol=0)
  # A plain table works as the mapping too.
  table = {f"params/model/layers_{i}/{m}": f"model.layers.{i}.{m.replace('/', '.')}"
           for i in range(2) for m in ("self_attn/q_proj", "self_attn/v_proj", "mlp/down_proj")}
  again = jlora.import_peft(d, base, module_path=table, name="chat")
  assert_trees_close(again, p, rtol=0, atol=0)


def test_errors_name_path_and_fix():
  base = bert_params()
  p = jlora.dora(base, 2, key=jax.random.key(1), targets=("query",))
  with pytest.raises(jlora.LoraError, match="DoRA.*has no PEFT LoRA form"):
    jlora.export_peft(p, tempfile.mkdtemp(), module_path=jlora.bert_module_path)
  p = jlora.lorify(base, 2, key=jax.random.key(1), targets=("query",))
  with pytest.raises(jlora.LoraError, match="maps .* to no torch module"):
    jlora.export_peft(p, tempfile.mkdtemp(), module_path=lambda path: None)
  d = tempfile.mkdtemp()
  jlora.export_peft(p, d, module_path=jlora.bert_module_path)
  with pytest.raises(jlora.LoraError, match="tensors match no kernel"):
    jlora.import_peft(d, llama_params(), module_path=jlora.llama_module_path)
