"""PEFT format export/import round trips (LoRA, DoRA, IA3) on the BERT and
LLaMA ports (no torch).

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


def bert_run(params):
  ids = jnp.arange(8, dtype=jnp.int32)[None] % BERT.vocab_size
  model = bert.BertModel(BERT)
  return jlora.lora(lambda p: model.apply(p, ids))(params)


def llama_run(params):
  ids = jnp.arange(8, dtype=jnp.int32)[None] % LLAMA.vocab_size
  model = llama.LlamaForCausalLM(LLAMA)
  return jlora.lora(lambda p: model.apply(p, ids))(params)


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
  config = jlora.export_peft(p, d, module_path=bert.bert_module_path)
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
  back = jlora.import_peft(base, d, module_path=bert.bert_module_path)
  assert_trees_close(back, p, rtol=0, atol=0)


def test_llama_round_trip_named_adapter_and_table_mapping():
  base = llama_params()
  p = jlora.lorify(base, 2, key=jax.random.key(1), name="chat",
                   targets=("q_proj", "v_proj", "down_proj"))
  p = randomize_adapters(p, jax.random.key(2))
  d = tempfile.mkdtemp()
  jlora.export_peft(p, d, module_path=llama.llama_module_path, name="chat")
  keys = load_file(os.path.join(d, "adapter_model.safetensors"))
  assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
  back = jlora.import_peft(base, d, module_path=llama.llama_module_path, name="chat")
  assert_trees_close(back, p, rtol=0, atol=0)
  # A plain table works as the mapping too.
  table = {f"params/model/layers_{i}/{m}": f"model.layers.{i}.{m.replace('/', '.')}"
           for i in range(2) for m in ("self_attn/q_proj", "self_attn/v_proj", "mlp/down_proj")}
  again = jlora.import_peft(base, d, module_path=table, name="chat")
  assert_trees_close(again, p, rtol=0, atol=0)


def test_errors_name_path_and_fix():
  base = bert_params()
  p = jlora.lorify(base, 2, key=jax.random.key(1), targets=("query",))
  with pytest.raises(jlora.LoraError, match="maps .* to no torch module"):
    jlora.export_peft(p, tempfile.mkdtemp(), module_path=lambda path: None)
  d = tempfile.mkdtemp()
  jlora.export_peft(p, d, module_path=bert.bert_module_path)
  with pytest.raises(jlora.LoraError, match="tensors match no kernel"):
    jlora.import_peft(llama_params(), d, module_path=llama.llama_module_path)


def test_bert_dora_round_trip_keys_layout_and_outputs():
  base = bert_params()
  p = jlora.dora(base, {"value": 4, ".*": 2}, key=jax.random.key(1),
                 alpha={"query": 8.0, ".*": 4.0},
                 targets=("query", "value", "intermediate", "output"))
  p = randomize_adapters(p, jax.random.key(2))
  d = tempfile.mkdtemp()
  config = jlora.export_peft(p, d, module_path=bert.bert_module_path)
  assert (config["peft_type"], config["use_dora"], config["r"], config["lora_alpha"]) == (
      "LORA", True, 2, 4.0)
  assert config["rank_pattern"] == {r"^encoder\.layer\.0\.attention\.self\.value": 4,
                                    r"^encoder\.layer\.1\.attention\.self\.value": 4}
  tensors = load_file(os.path.join(d, "adapter_model.safetensors"))
  key = "base_model.model.encoder.layer.1.intermediate.dense."
  layer = p["params"]["encoder"]["layer_1"]["intermediate"]
  assert tensors[key + "lora_A.weight"].shape == (2, 16)  # (r, in)
  assert tensors[key + "lora_B.weight"].shape == (32, 2)  # (out, r)
  assert tensors[key + "lora_magnitude_vector"].shape == (32,)  # one per output
  assert (tensors[key + "lora_magnitude_vector"] == layer["dora_m"]).all()
  assert (tensors[key + "lora_A.weight"] == layer["dora_a"].T).all()
  assert len(tensors) == 3 * 2 * 4
  back = jlora.import_peft(base, d, module_path=bert.bert_module_path)
  assert isinstance(back["params"]["encoder"]["layer_0"]["output"]["dora"], jlora.DoRA)
  assert_trees_close(back, p, rtol=0, atol=0)
  out = bert_run(p)
  assert not jnp.allclose(out, bert_run(base), atol=1e-3)  # the adapter matters
  assert (bert_run(back) == out).all()


def test_llama_dora_round_trip_named_adapter():
  base = llama_params()
  p = jlora.dora(base, 2, key=jax.random.key(1), alpha=8.0, name="chat",
                 targets=("q_proj", "v_proj", "down_proj"))
  p = randomize_adapters(p, jax.random.key(2))
  d = tempfile.mkdtemp()
  jlora.export_peft(p, d, module_path=llama.llama_module_path, name="chat")
  tensors = load_file(os.path.join(d, "adapter_model.safetensors"))
  assert tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector"
                 ].shape == (8,)  # one KV head of 8
  back = jlora.import_peft(base, d, module_path=llama.llama_module_path, name="chat")
  assert "dora@chat_m" in back["params"]["model"]["layers_0"]["mlp"]["down_proj"]
  assert_trees_close(back, p, rtol=0, atol=0)
  assert (llama_run(back) == llama_run(p)).all()


def test_bert_ia3_round_trip_feedforward_layout_and_outputs():
  base = bert_params()
  # PEFT's BERT default: keys, values, and the FFN down projection on its input.
  p = jlora.ia3(base, targets=("key", "value", "output"), feedforward=("output",))
  p = randomize_adapters(p, jax.random.key(2))
  d = tempfile.mkdtemp()
  config = jlora.export_peft(p, d, module_path=bert.bert_module_path)
  assert config["peft_type"] == "IA3"
  assert config["feedforward_modules"] == ["encoder.layer.0.output.dense",
                                           "encoder.layer.1.output.dense"]
  assert len(config["target_modules"]) == 6
  with open(os.path.join(d, "adapter_config.json")) as f:
    assert json.load(f) == config
  tensors = load_file(os.path.join(d, "adapter_model.safetensors"))
  ffn = p["params"]["encoder"]["layer_1"]["output"]["ia3_l"]
  assert tensors["base_model.model.encoder.layer.1.output.dense.ia3_l"].shape == (1, 32)
  assert (tensors["base_model.model.encoder.layer.1.output.dense.ia3_l"][0] == ffn).all()
  assert tensors["base_model.model.encoder.layer.0.attention.self.key.ia3_l"].shape == (16, 1)
  assert len(tensors) == 6
  back = jlora.import_peft(base, d, module_path=bert.bert_module_path)
  assert back["params"]["encoder"]["layer_0"]["output"]["ia3"].feedforward
  assert not back["params"]["encoder"]["layer_0"]["attention"]["key"]["ia3"].feedforward
  assert_trees_close(back, p, rtol=0, atol=0)
  out = bert_run(p)
  assert not jnp.allclose(out, bert_run(base), atol=1e-3)
  assert (bert_run(back) == out).all()


def test_llama_ia3_round_trip_and_regex_feedforward():
  base = llama_params()
  p = jlora.ia3(base, targets=("k_proj", "v_proj", "down_proj"), feedforward=("down_proj",))
  p = randomize_adapters(p, jax.random.key(2))
  d = tempfile.mkdtemp()
  config = jlora.export_peft(p, d, module_path=llama.llama_module_path)
  assert config["feedforward_modules"] == ["model.layers.0.mlp.down_proj",
                                           "model.layers.1.mlp.down_proj"]
  tensors = load_file(os.path.join(d, "adapter_model.safetensors"))
  assert tensors["base_model.model.model.layers.0.mlp.down_proj.ia3_l"].shape == (1, 32)
  assert tensors["base_model.model.model.layers.0.self_attn.k_proj.ia3_l"].shape == (8, 1)
  back = jlora.import_peft(base, d, module_path=llama.llama_module_path)
  assert_trees_close(back, p, rtol=0, atol=0)
  assert (llama_run(back) == llama_run(p)).all()
  # PEFT may hold feedforward_modules as one regex, matched against the whole name.
  config["feedforward_modules"] = r".*\.mlp\.down_proj"
  with open(os.path.join(d, "adapter_config.json"), "w") as f:
    json.dump(config, f)
  again = jlora.import_peft(base, d, module_path=llama.llama_module_path)
  assert_trees_close(again, p, rtol=0, atol=0)
  # A feedforward_modules that misses down_proj: its ia3_l (1, in) fits no output side.
  config["feedforward_modules"] = []
  with open(os.path.join(d, "adapter_config.json"), "w") as f:
    json.dump(config, f)
  with pytest.raises(jlora.LoraError, match=r"(?s)params/model/layers_0/mlp/down_proj/kernel: "
                     r"ia3_l \(1, 32\) does not fit .*expected \(16, 1\).*feedforward_modules"):
    jlora.import_peft(base, d, module_path=llama.llama_module_path)


def test_mixed_methods_name_paths_and_export_one_method_at_a_time():
  base = bert_params()
  p = jlora.lorify(base, 2, key=jax.random.key(1), targets=("query",))
  p = jlora.ia3(p, targets=("key", "value"))
  p = randomize_adapters(p, jax.random.key(2))
  with pytest.raises(jlora.LoraError) as err:
    jlora.export_peft(p, tempfile.mkdtemp(), module_path=bert.bert_module_path)
  (msg,) = err.value.problems
  assert "adapter 'default' mixes methods" in msg
  assert "LoRA on params/encoder/layer_0/attention/query/kernel and 1 more" in msg
  assert "IA3 on params/encoder/layer_0/attention/key/kernel and 3 more" in msg
  assert "method='lora' / method='ia3'" in msg
  # The fix: one directory per method; both import back onto the base.
  d_lora, d_ia3 = tempfile.mkdtemp(), tempfile.mkdtemp()
  c = jlora.export_peft(p, d_lora, module_path=bert.bert_module_path, method="lora")
  assert c["peft_type"] == "LORA" and len(c["target_modules"]) == 2
  c = jlora.export_peft(p, d_ia3, module_path=bert.bert_module_path, method="ia3")
  assert c["peft_type"] == "IA3" and len(c["target_modules"]) == 4
  back = jlora.import_peft(base, d_lora, module_path=bert.bert_module_path)
  back = jlora.import_peft(back, d_ia3, module_path=bert.bert_module_path)
  assert_trees_close(back, p, rtol=0, atol=0)
  assert (bert_run(back) == bert_run(p)).all()


def test_mixed_lora_and_dora_and_selection_errors():
  base = bert_params()
  p = jlora.lorify(base, 2, key=jax.random.key(1), targets=("query",))
  p = jlora.dora(p, 2, key=jax.random.key(1), targets=("value",))
  with pytest.raises(jlora.LoraError, match=r"mixes methods \(LoRA on params/encoder/layer_0/"
                     r"attention/query/kernel and 1 more; DoRA on params/encoder/layer_0/"
                     r"attention/value/kernel and 1 more\).*method='lora' / method='dora'"):
    jlora.export_peft(p, tempfile.mkdtemp(), module_path=bert.bert_module_path)
  with pytest.raises(jlora.LoraError, match=r"no IA3 adapter named 'default'; adapters: "
                     r"\['default \(DoRA\(rank=2, alpha=2\)\)', 'default \(LoRA"):
    jlora.export_peft(p, tempfile.mkdtemp(), module_path=bert.bert_module_path, method="ia3")
  with pytest.raises(jlora.LoraError, match=r"method='DoRA': choose one of \['dora', 'ia3', "
                     r"'lora'\]"):
    jlora.export_peft(p, tempfile.mkdtemp(), module_path=bert.bert_module_path, method="DoRA")
  # Adapters under other names are not part of the export, so they do not mix.
  q = jlora.lorify(base, 2, key=jax.random.key(1), targets=("query",))
  q = jlora.ia3(q, targets=("key",), name="x")
  c = jlora.export_peft(q, tempfile.mkdtemp(), module_path=bert.bert_module_path)
  assert c["peft_type"] == "LORA"
  c = jlora.export_peft(q, tempfile.mkdtemp(), module_path=bert.bert_module_path, name="x")
  assert c["peft_type"] == "IA3"
