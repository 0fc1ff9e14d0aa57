"""PEFT files without torch: export/import round trips (LoRA, DoRA, IA3) on the
BERT and LLaMA ports, the module maps and layouts (fused, multi-axis,
embeddings, modules_to_save), and every bad input of issue 12's list.

The comparison against real PEFT is `tests/test_peft_oracle.py` (skipped
here: it needs peft), and logit-level `experiments/peft_equivalence.py`.
"""

import dataclasses
import json
import os
import re
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


# -- module maps, layouts, fused modules, what travels (no torch) ------------


def decoder_tree(*, fused=False, layers=2, d=8, kv=4, inter=12, vocab=10):
  """A tree with HF LLaMA / Phi-3 names, as `jlora.peft.maps` expects."""
  key = iter(jax.random.split(jax.random.key(0), 64))
  w = lambda *shape: jax.random.normal(next(key), shape) / 3  # noqa: E731
  tree = {"model": {"embed_tokens": {"embedding": w(vocab, d)}}, "lm_head": {"kernel": w(d, vocab)}}
  for i in range(layers):
    if fused:
      attn = {"qkv_proj": {"kernel": w(d, d + 2 * kv)}, "o_proj": {"kernel": w(d, d)}}
      mlp = {"gate_up_proj": {"kernel": w(d, 2 * inter)}, "down_proj": {"kernel": w(inter, d)}}
    else:
      attn = {"q_proj": {"kernel": w(d, d)}, "k_proj": {"kernel": w(d, kv)},
              "v_proj": {"kernel": w(d, kv)}, "o_proj": {"kernel": w(d, d)}}
      mlp = {"gate_proj": {"kernel": w(d, inter)}, "up_proj": {"kernel": w(d, inter)},
             "down_proj": {"kernel": w(inter, d)}}
    tree["model"][f"layers_{i}"] = {"self_attn": attn, "mlp": mlp}
  return {"params": tree}


def fuse(tree):
  """The Phi-3 layout of a separate-q/k/v tree (kernels concatenated)."""
  out = jax.tree.map(lambda x: x, tree)
  for name, layer in out["params"]["model"].items():
    if not name.startswith("layers_"):
      continue
    a, m = layer["self_attn"], layer["mlp"]
    a["qkv_proj"] = {"kernel": jnp.concatenate([a.pop(p)["kernel"] for p in
                                                ("q_proj", "k_proj", "v_proj")], 1)}
    m["gate_up_proj"] = {"kernel": jnp.concatenate([m.pop(p)["kernel"] for p in
                                                    ("gate_proj", "up_proj")], 1)}
  return out


def test_maps_name_every_family_and_invert():
  from jlora.peft import maps
  cases = [
      (maps.LLAMA, "model/layers_3/self_attn/k_proj/kernel", "model.layers.3.self_attn.k_proj"),
      (maps.QWEN3, "model/layers_0/mlp/down_proj/kernel", "model.layers.0.mlp.down_proj"),
      (maps.GEMMA3, "model/embed_tokens/embedding", "model.embed_tokens"),
      (maps.PHI3, "model/layers_1/self_attn/qkv_proj/kernel", "model.layers.1.self_attn.qkv_proj"),
      (maps.PHI3, "model/layers_1/mlp/up_proj/kernel", "model.layers.1.mlp.gate_up_proj"),
      (maps.GPT2, "transformer/h_2/attn/c_attn/kernel", "transformer.h.2.attn.c_attn"),
      (maps.GPT2, "transformer/h_2/mlp/c_proj/kernel", "transformer.h.2.mlp.c_proj"),
      (maps.BERT_CLS, "bert/encoder/layer_1/attention/self/value/kernel",
       "bert.encoder.layer.1.attention.self.value"),
      (maps.BERT_CLS, "classifier/kernel", "classifier"),
      (maps.ROBERTA_CLS, "roberta/encoder/layer_0/output/dense/kernel",
       "roberta.encoder.layer.0.output.dense"),
      (maps.ROBERTA_CLS, "classifier/out_proj/kernel", "classifier.out_proj"),
  ]
  for m, path, module in cases:
    target = m.resolve(("params",) + tuple(path.split("/")))
    assert target is not None and target.module == module, (m.name, path, target)
    if not target.layout.fused:
      assert m.tree_path(module) == tuple(path.split("/")), (m.name, module)
  assert maps.GPT2.resolve(("transformer", "h_0", "attn", "c_attn", "kernel")).layout.fan_in_fan_out
  assert maps.PHI3.resolve(("model", "layers_0", "self_attn", "v_proj", "kernel")).layout == \
      jlora.peft.Linear(part=2, parts=3)
  assert maps.LLAMA.resolve(("model", "layers_0", "self_attn", "qkv_proj", "kernel")) is None
  assert maps.LLAMA.tree_path("model.layers.0.self_attn.q_norm") is None
  with pytest.raises(ValueError, match="same placeholders"):
    jlora.peft.Rule("a/{i}/kernel", "a.{j}")


def test_fused_export_is_exact_and_imports_back_onto_either_layout():
  from jlora.peft import maps
  base = decoder_tree()
  p = jlora.lorify(base, {"v_proj": 3, ".*": 2}, key=jax.random.key(1),
                   alpha={"q_proj": 8.0, ".*": 2.0},
                   targets=("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"))
  p = randomize_adapters(p, jax.random.key(2))
  d = os.path.join(tempfile.mkdtemp(), "a")
  config = jlora.export_peft(p, d, module_path=maps.PHI3)
  assert "model.layers.0.self_attn.qkv_proj" in config["target_modules"]
  tensors = load_file(os.path.join(d, "adapter_model.safetensors"))
  a = tensors["base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"]
  assert a.shape == (2 + 3, 8)  # rank of q + rank of v; k has none
  assert config["rank_pattern"][r"^model\.layers\.0\.self_attn\.qkv_proj"] == 5
  # The fused module's update is each part's update in its slice (k: zero).
  merged = jlora.merge(p)
  fused_base = fuse(base)
  again = jlora.import_peft(fused_base, d, module_path=maps.PHI3)
  assert_trees_close(jlora.merge(again), fuse(merged), rtol=1e-5, atol=1e-6)
  # Onto separate q/k/v: the fused adapter is split, exactly, rank 5 each.
  back = jlora.import_peft(base, d, module_path=maps.PHI3)
  assert back["params"]["model"]["layers_1"]["self_attn"]["k_proj"]["lora"].rank == 5
  assert_trees_close(jlora.merge(back), merged, rtol=1e-5, atol=1e-6)


def test_fused_export_refuses_what_it_cannot_write_exactly():
  from jlora.peft import maps
  base = decoder_tree()
  del base["params"]["model"]["layers_1"]["self_attn"]["v_proj"]
  p = jlora.lorify(base, 2, key=jax.random.key(1), targets=("q_proj",))
  with pytest.raises(jlora.LoraError, match=r"model\.layers\.1\.self_attn\.qkv_proj: a fused "
                     r"module of 3 parts, but the tree has no weight for part\(s\) \[2\]"):
    jlora.export_peft(p, tempfile.mkdtemp(), module_path=maps.PHI3)
  q = jlora.ia3(decoder_tree(), targets=("q_proj", "k_proj", "v_proj"),
                feedforward=("q_proj", "k_proj", "v_proj"))
  q = randomize_adapters(q, jax.random.key(3))
  with pytest.raises(jlora.LoraError, match="cannot write one exact PEFT adapter for this "
                     "fused module from its parts: input-side IA3"):
    jlora.export_peft(q, tempfile.mkdtemp(), module_path=maps.PHI3)
  r = jlora.lorify(decoder_tree(), 2, key=jax.random.key(1), targets=("q_proj",))
  r = jlora.lorify(r, 2, key=jax.random.key(1), targets=("k_proj",), rslora=True)
  with pytest.raises(jlora.LoraError, match="qkv_proj: cannot write one exact PEFT adapter "
                     "for this fused module from its parts: the parts' adapters differ in "
                     "rslora or dropout"):
    jlora.export_peft(r, tempfile.mkdtemp(), module_path=maps.PHI3)


def test_embedding_adapters_travel_as_lora_embedding_tensors():
  from jlora.peft import maps
  base = decoder_tree()
  p = jlora.lorify(base, 3, key=jax.random.key(1), targets=("embed_tokens", "q_proj"))
  p = randomize_adapters(p, jax.random.key(2))
  d = os.path.join(tempfile.mkdtemp(), "a")
  jlora.export_peft(p, d, module_path=maps.LLAMA)
  tensors = load_file(os.path.join(d, "adapter_model.safetensors"))
  emb = "base_model.model.model.embed_tokens."
  assert tensors[emb + "lora_embedding_A"].shape == (3, 10)  # (r, vocab)
  assert tensors[emb + "lora_embedding_B"].shape == (8, 3)   # (features, r)
  assert not any(k.startswith(emb + "lora_A") for k in tensors)
  layer = p["params"]["model"]["embed_tokens"]
  assert (tensors[emb + "lora_embedding_A"] == layer["lora_a"].T).all()
  back = jlora.import_peft(base, d, module_path=maps.LLAMA)
  assert_trees_close(back, p, rtol=0, atol=0)


def test_modules_to_save_travel_both_ways():
  from jlora.peft import maps
  base = decoder_tree()
  p = jlora.lorify(base, 2, key=jax.random.key(1), targets=("q_proj",), trainable=("lm_head",))
  p = randomize_adapters(p, jax.random.key(2))
  d = os.path.join(tempfile.mkdtemp(), "a")
  config = jlora.export_peft(p, d, module_path=maps.LLAMA, base_model_name_or_path="tiny")
  assert config["modules_to_save"] == ["lm_head"]
  assert (config["task_type"], config["base_model_name_or_path"]) == ("CAUSAL_LM", "tiny")
  tensors = load_file(os.path.join(d, "adapter_model.safetensors"))
  head = p["params"]["lm_head"]["kernel"]
  assert (tensors["base_model.model.lm_head.weight"] == head.T).all()  # torch (out, in)
  back = jlora.import_peft(base, d, module_path=maps.LLAMA)
  assert isinstance(back["params"]["lm_head"]["trainable"], jlora.FullyTrainable)
  assert (back["params"]["lm_head"]["kernel"] == head).all()
  assert_trees_close(back, p, rtol=0, atol=0)
  assert jlora.trainable_mask(back)["params"]["lm_head"]["kernel"]
  # A trained leaf the map cannot name is refused, not dropped.
  q = jlora.lorify(base, 2, key=jax.random.key(1), targets=("q_proj",),
                   trainable=re.compile("layers_0/mlp/down_proj"))
  q["params"]["model"]["layers_0"]["mlp"]["down_proj"]["scale"] = jnp.ones(3)
  q["params"]["model"]["layers_0"]["mlp"]["down_proj"]["trainable"] = jlora.FullyTrainable(
      ("kernel", "scale"))
  with pytest.raises(jlora.LoraError, match=r"down_proj/scale: trained in full, but a "
                     r"Linear\(\) module has no torch parameter for 'scale'"):
    jlora.export_peft(q, tempfile.mkdtemp(), module_path=maps.LLAMA)
  with pytest.raises(jlora.LoraError, match="task_type='SEQ_CLS': PEFT then loads the head"):
    jlora.export_peft(jlora.lorify(base, 2, key=jax.random.key(1), targets=("q_proj",)),
                      tempfile.mkdtemp(), module_path=maps.LLAMA, task_type="SEQ_CLS")


def test_multi_axis_kernels_flatten_to_torch_layout():
  rules = jlora.peft.ModuleMap((
      jlora.peft.Rule("attn/{p:query|key}/kernel", "attn.{p}"),
      jlora.peft.Rule("attn/out/kernel", "attn.out")))
  key = jax.random.split(jax.random.key(0), 3)
  base = {"attn": {"query": {"kernel": jax.random.normal(key[0], (8, 2, 4))},   # (d, h, hd)
                   "key": {"kernel": jax.random.normal(key[1], (8, 2, 4))},
                   "out": {"kernel": jax.random.normal(key[2], (2, 4, 8))}}}    # (h, hd, d)
  for add in (lambda b: jlora.lorify(b, 2, key=jax.random.key(1)),
              lambda b: jlora.dora(b, 2, key=jax.random.key(1)),
              lambda b: jlora.ia3(b, targets=("query", "key", "out"), feedforward=("out",))):
    p = randomize_adapters(add(base), jax.random.key(2))
    d = os.path.join(tempfile.mkdtemp(), "a")
    jlora.export_peft(p, d, module_path=rules)
    tensors = load_file(os.path.join(d, "adapter_model.safetensors"))
    if "base_model.model.attn.out.lora_A.weight" in tensors:
      assert tensors["base_model.model.attn.out.lora_A.weight"].shape == (2, 8)  # (r, h*hd)
      assert tensors["base_model.model.attn.query.lora_B.weight"].shape == (8, 2)
    back = jlora.import_peft(base, d, module_path=rules)
    assert_trees_close(back, p, rtol=0, atol=0)


# -- bad input: one LoraError, naming the file and the fix --------------------


def lora_dir(**changes):
  """A valid exported LoRA directory, its config then changed by ``changes``."""
  base = {"m": {"kernel": jnp.ones((4, 3))}}
  p = randomize_adapters(jlora.lorify(base, 2, key=jax.random.key(0)), jax.random.key(1))
  d = os.path.join(tempfile.mkdtemp(), "a")
  config = jlora.export_peft(p, d, module_path={"m": "layer.m"})
  config.update(changes)
  for k in [k for k, v in changes.items() if v is _DROP]:
    del config[k]
  with open(os.path.join(d, "adapter_config.json"), "w") as f:
    json.dump(config, f)
  return base, d


_DROP = object()


@pytest.mark.parametrize("changes,match", [
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' is not implemented"),
    ({"init_lora_weights": "olora"}, "init_lora_weights='olora' is not implemented"),
    ({"alora_invocation_tokens": [1, 2]}, r"alora_invocation_tokens=\[1, 2\] is not implemented"),
    ({"use_rslora": "false"}, "use_rslora must be true or false, got 'false'"),
    ({"lora_alpha": -4}, "lora_alpha must be a positive finite number, got -4"),
    ({"lora_alpha": "16"}, "lora_alpha must be a positive finite number, got '16'"),
    ({"lora_dropout": 1.5}, r"lora_dropout must be a number in \[0, 1\), got 1.5"),
    ({"lora_dropout": "0.1"}, r"lora_dropout must be a number in \[0, 1\), got '0.1'"),
    ({"r": _DROP}, "no 'r'"),
    ({"r": "2"}, "r must be a positive int, got '2'"),
    ({"bias": "all"}, "bias='all' is not implemented"),
    ({"lora_bias": True}, "lora_bias=True is not implemented"),
    ({"trainable_token_indices": [3]}, "trainable_token_indices"),
    ({"layer_replication": [[0, 1]]}, "layer_replication"),
    ({"brand_new_option": 3}, "unknown field brand_new_option=3"),
    ({"peft_type": "LOHA"}, "peft_type 'LOHA'; only LORA"),
    ({"rank_pattern": {"[": 2}}, r"rank_pattern: '\[' is not a valid regex"),
    ({"rank_pattern": {"m": 0}}, r"rank_pattern\['m'\] must be a positive int, got 0"),
    ({"alpha_pattern": "x"}, "alpha_pattern must be an object"),
])
def test_import_refuses_unsupported_or_bad_config_fields(changes, match):
  base, d = lora_dir(**changes)
  with pytest.raises(jlora.LoraError, match=match) as err:
    jlora.import_peft(base, d, module_path={"m": "layer.m"})
  assert "adapter_config.json" in str(err.value)
  assert str(err.value).count("cannot import the PEFT adapter") == 1


def test_import_accepts_default_values_of_unimplemented_fields():
  base, d = lora_dir(init_lora_weights="gaussian", alora_invocation_tokens=None,
                     loftq_config={}, fan_in_fan_out=True, megatron_core="megatron.core")
  jlora.import_peft(base, d, module_path={"m": "layer.m"})


def write_config(d, text):
  with open(os.path.join(d, "adapter_config.json"), "w") as f:
    f.write(text)


@pytest.mark.parametrize("damage,match", [
    ("missing dir", "does not exist"),
    ("file", "is a file, not a directory"),
    ("garbage config", "not valid JSON"),
    ("empty config", "not valid JSON"),
    ("list config", "holds list"),
    ("object without type", "peft_type None"),
    ("no config", "adapter_config.json: missing"),
    ("garbage safetensors", "not a valid safetensors file"),
    ("empty safetensors", "holds no tensors"),
    ("pickle only", "adapter_model.bin \\(a pickle\\)"),
    ("module_path None", "module_path must be a jlora.peft.ModuleMap"),
    ("dtype", "dtype must be"),
])
def test_import_bad_files_and_arguments_give_one_lora_error(damage, match):
  from safetensors.numpy import save_file
  base, d = lora_dir()
  module_path, dtype = {"m": "layer.m"}, None
  weights = os.path.join(d, "adapter_model.safetensors")
  if damage == "missing dir":
    d = d + "-nowhere"
  elif damage == "file":
    d = weights
  elif damage == "garbage config":
    write_config(d, "{not json")
  elif damage == "empty config":
    write_config(d, "")
  elif damage == "list config":
    write_config(d, "[1, 2]")
  elif damage == "object without type":
    write_config(d, "{}")
  elif damage == "no config":
    os.remove(os.path.join(d, "adapter_config.json"))
  elif damage == "garbage safetensors":
    with open(weights, "wb") as f:
      f.write(b"\x00garbage" * 10)
  elif damage == "empty safetensors":
    save_file({}, weights)
  elif damage == "pickle only":
    os.rename(weights, os.path.join(d, "adapter_model.bin"))
  elif damage == "module_path None":
    module_path = None
  elif damage == "dtype":
    dtype = "no-such-dtype"
  with pytest.raises(jlora.LoraError, match=match):
    jlora.import_peft(base, d, module_path=module_path, dtype=dtype)


def test_hostile_rank_pattern_is_refused_in_well_under_a_second():
  import signal
  import time

  def hang(signum, frame):
    raise TimeoutError("import_peft hung on a hostile rank_pattern")

  base = {"m" * 60: {"kernel": jnp.ones((4, 3))}}
  names = {"m" * 60: "a." * 40 + "b" * 40}
  p = jlora.lorify(base, 2, key=jax.random.key(0))
  d = os.path.join(tempfile.mkdtemp(), "a")
  config = jlora.export_peft(p, d, module_path=names)
  for hostile in ("(.|.)*;", "(a+)+$", "((a|b)*)*c"):
    config["rank_pattern"] = {hostile: 4}
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
      json.dump(config, f)
    start = time.monotonic()
    signal.signal(signal.SIGALRM, hang)
    signal.alarm(5)  # a hang fails the test instead of stalling the suite
    try:
      with pytest.raises(jlora.LoraError, match="exponential matching time"):
        jlora.import_peft(base, d, module_path=names)
    finally:
      signal.alarm(0)
    assert time.monotonic() - start < 1.0
  config["rank_pattern"] = {r"a\.a\..*b+": 2}  # an ordinary pattern still matches
  with open(os.path.join(d, "adapter_config.json"), "w") as f:
    json.dump(config, f)
  jlora.import_peft(base, d, module_path=names)


def test_export_is_atomic_and_replaces_only_adapter_directories(monkeypatch):
  import safetensors.numpy
  base = {"m": {"kernel": jnp.ones((4, 3))}}
  p = randomize_adapters(jlora.lorify(base, 2, key=jax.random.key(0)), jax.random.key(1))
  q = randomize_adapters(p, jax.random.key(5))
  root = tempfile.mkdtemp()
  d = os.path.join(root, "adapter")
  jlora.export_peft(p, d, module_path={"m": "layer.m"})
  with pytest.raises(jlora.LoraError, match="already holds a PEFT adapter; pass force=True"):
    jlora.export_peft(q, d, module_path={"m": "layer.m"})

  def fail(tensors, path, metadata=None):
    with open(path, "wb") as f:
      f.write(b"half a file")
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(safetensors.numpy, "save_file", fail)
  with pytest.raises(OSError, match="No space left"):
    jlora.export_peft(q, d, module_path={"m": "layer.m"}, force=True)
  monkeypatch.undo()
  assert sorted(os.listdir(root)) == ["adapter"]  # no temporary left behind
  back = jlora.import_peft(base, d, module_path={"m": "layer.m"})
  assert_trees_close(back, p, rtol=0, atol=0)  # the previous adapter, intact
  jlora.export_peft(q, d, module_path={"m": "layer.m"}, force=True)
  assert_trees_close(jlora.import_peft(base, d, module_path={"m": "layer.m"}), q,
                     rtol=0, atol=0)
  other = os.path.join(root, "notes")
  os.makedirs(other)
  with open(os.path.join(other, "todo.txt"), "w") as f:
    f.write("mine")
  with pytest.raises(jlora.LoraError, match="exists and is not a PEFT adapter directory"):
    jlora.export_peft(q, other, module_path={"m": "layer.m"}, force=True)
  assert os.listdir(other) == ["todo.txt"]
  with pytest.raises(jlora.LoraError, match="exists and is not a PEFT adapter directory"):
    jlora.export_peft(q, os.path.join(other, "todo.txt"), module_path={"m": "layer.m"},
                      force=True)


def test_export_killed_mid_write_leaves_the_previous_adapter(tmp_path):
  import signal
  import subprocess
  import sys
  base = {"m": {"kernel": jnp.ones((64, 48))}}
  p = randomize_adapters(jlora.lorify(base, 8, key=jax.random.key(0)), jax.random.key(1))
  d = str(tmp_path / "adapter")
  jlora.export_peft(p, d, module_path={"m": "layer.m"})
  child = subprocess.Popen([sys.executable, "-c", f"""
import jax, jax.numpy as jnp, jlora, sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
from helpers import randomize_adapters
base = {{"m": {{"kernel": jnp.ones((64, 48))}}}}
p = jlora.lorify(base, 8, key=jax.random.key(0))
print("ready", flush=True)
for i in range(100000):
  q = randomize_adapters(p, jax.random.key(i + 10))
  jlora.export_peft(q, {d!r}, module_path={{"m": "layer.m"}}, force=True)
"""], stdout=subprocess.PIPE, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert child.stdout.readline().strip() == b"ready"
  import time
  time.sleep(1.5)
  child.send_signal(signal.SIGKILL)
  child.wait()
  child.stdout.close()
  back = jlora.import_peft(base, d, module_path={"m": "layer.m"})  # some complete adapter
  assert back["m"]["lora"] == p["m"]["lora"]


def test_gemma_library_tree_round_trips_and_refuses_other_axes():
  from jlora.peft import maps
  keys = iter(jax.random.split(jax.random.key(0), 8))
  w = lambda *shape: jax.random.normal(next(keys), shape) / 3  # noqa: E731
  base = {"params": {"embedder": {"input_embedding": w(10, 8)},
                     "layer_0": {"attn": {"q_einsum": {"w": w(2, 8, 4)},       # (N, D, H)
                                          "kv_einsum": {"w": w(2, 1, 8, 4)},   # (2, K, D, H)
                                          "attn_vec_einsum": {"w": w(2, 4, 8)}},
                                 "mlp": {"gating_einsum": w(2, 12, 8),         # (2, F, D)
                                         "linear": w(12, 8)}}}}
  axes = {"q_einsum": jlora.Axes(inputs=(1,), outputs=(0, 2)),
          "kv_einsum": jlora.Axes(inputs=(2,), outputs=(0, 1, 3)),
          "gating_einsum": jlora.Axes(inputs=(2,), outputs=(0, 1)),
          "attn_vec_einsum": jlora.Axes(inputs=2), ".*": jlora.Axes(inputs=1)}
  targets = re.compile(r"einsum/w$|gating_einsum$|linear$")
  p = jlora.lorify(base, 2, key=jax.random.key(1), targets=targets, axes=axes)
  p = randomize_adapters(p, jax.random.key(2))
  d = os.path.join(tempfile.mkdtemp(), "a")
  config = jlora.export_peft(p, d, module_path=maps.GEMMA_LIB)
  assert config["target_modules"] == sorted(
      f"model.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                      "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                      "mlp.down_proj"))
  tensors = load_file(os.path.join(d, "adapter_model.safetensors"))
  pre = "base_model.model.model.layers.0."
  assert tensors[pre + "self_attn.q_proj.lora_B.weight"].shape == (8, 2)  # (N*H, r)
  assert tensors[pre + "self_attn.v_proj.lora_B.weight"].shape == (4, 2)  # one kv head
  assert tensors[pre + "self_attn.o_proj.lora_A.weight"].shape == (2, 8)  # (r, N*H)
  # k and v share kv_einsum's A; gate and up share gating_einsum's.
  assert (tensors[pre + "self_attn.k_proj.lora_A.weight"] ==
          tensors[pre + "self_attn.v_proj.lora_A.weight"]).all()
  back = jlora.import_peft(base, d, module_path=maps.GEMMA_LIB)
  # Split modules come back fused into one exact adapter of the summed rank.
  assert back["params"]["layer_0"]["attn"]["kv_einsum"]["w_lora"].rank == 4
  assert_trees_close(jlora.merge(back), jlora.merge(p), rtol=1e-5, atol=1e-6)
  wrong = jlora.lorify(base, 2, key=jax.random.key(1), targets=re.compile("q_einsum/w$"),
                       axes=jlora.Axes(stack=1))  # per-head adapters: no PEFT module
  with pytest.raises(jlora.LoraError, match="stacked axes"):
    jlora.export_peft(wrong, tempfile.mkdtemp(), module_path=maps.GEMMA_LIB)
  wrong = jlora.lorify(base, 2, key=jax.random.key(1), targets=re.compile("q_einsum/w$"),
                       axes=jlora.Axes(inputs=(0,), outputs=(1, 2)))
  with pytest.raises(jlora.LoraError, match=r"q_einsum/w: adapted with axes in role order "
                     r"\(0, 1, 2\).*axes=jlora.Axes\(inputs=\(1,\), outputs=\(0, 2\)\)"):
    jlora.export_peft(wrong, tempfile.mkdtemp(), module_path=maps.GEMMA_LIB)


def test_bfloat16_adapters_round_trip():
  from jlora.peft import maps
  base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), decoder_tree())
  p = jlora.lorify(base, 2, key=jax.random.key(1), targets=("q_proj", "k_proj", "v_proj"))
  p = randomize_adapters(p, jax.random.key(2))
  d = os.path.join(tempfile.mkdtemp(), "a")
  jlora.export_peft(p, d, module_path=maps.PHI3)  # fused: computed in f32, stored bf16
  tensors = load_file(os.path.join(d, "adapter_model.safetensors"))
  assert {str(t.dtype) for t in tensors.values()} == {"bfloat16"}
  back = jlora.import_peft(base, d, module_path=maps.PHI3)
  assert back["params"]["model"]["layers_0"]["self_attn"]["q_proj"]["lora_a"].dtype == jnp.bfloat16
  with jax.numpy_dtype_promotion("standard"):
    assert_trees_close(jax.tree.map(lambda x: x.astype(jnp.float32), jlora.merge(back)),
                       jax.tree.map(lambda x: x.astype(jnp.float32), jlora.merge(p)),
                       rtol=0.05, atol=0.05)


def test_scan_stacked_layers_export_one_module_per_layer_and_back():
  from jlora.peft import maps
  layered = decoder_tree(layers=3)["params"]["model"]
  stacked = {"params": {"model": {"layers": jax.tree.map(
      lambda *xs: jnp.stack(xs), *[layered[f"layers_{i}"] for i in range(3)])}}}
  for add in (lambda b: jlora.lorify(b, {"v_proj": 3, ".*": 2}, key=jax.random.key(1),
                                     targets=("q_proj", "v_proj", "down_proj"),
                                     axes=jlora.Axes(stack=1)),
              lambda b: jlora.dora(b, 2, key=jax.random.key(1), targets=("q_proj",),
                                   axes=jlora.Axes(stack=1)),
              lambda b: jlora.ia3(b, targets=("k_proj", "down_proj"),
                                  feedforward=("down_proj",), axes=jlora.Axes(stack=1))):
    p = randomize_adapters(add(stacked), jax.random.key(2))
    d = os.path.join(tempfile.mkdtemp(), "a")
    config = jlora.export_peft(p, d, module_path=maps.LLAMA)
    assert any("model.layers.2." in m for m in config["target_modules"])
    tensors = load_file(os.path.join(d, "adapter_model.safetensors"))
    # The same file as from the unstacked tree, layer by layer.
    unstacked = {"params": {"model": {f"layers_{i}": jax.tree.map(lambda x: x[i], p["params"][
        "model"]["layers"]) for i in range(3)}}}
    for i in range(3):
      for m in unstacked["params"]["model"][f"layers_{i}"].values():
        for holder in m.values():
          for k, v in list(holder.items()):
            if isinstance(v, jlora.Method):
              holder[k] = dataclasses.replace(v, stack=0)
    e = os.path.join(tempfile.mkdtemp(), "a")
    jlora.export_peft(unstacked, e, module_path=maps.LLAMA)
    other = load_file(os.path.join(e, "adapter_model.safetensors"))
    assert sorted(other) == sorted(tensors)
    for key in tensors:
      assert (tensors[key] == other[key]).all(), key
    back = jlora.import_peft(stacked, d, module_path=maps.LLAMA)
    assert_trees_close(jlora.merge(back), jlora.merge(p), rtol=1e-6, atol=1e-6)
  # Adapters on some layers only (or of different ranks) cannot be one stacked adapter.
  p = randomize_adapters(jlora.lorify(decoder_tree(layers=3), 2, key=jax.random.key(1),
                                      targets=re.compile("layers_[01]/self_attn/q_proj")),
                         jax.random.key(2))
  d = os.path.join(tempfile.mkdtemp(), "a")
  jlora.export_peft(p, d, module_path=maps.LLAMA)
  with pytest.raises(jlora.LoraError, match=r"the file adapts layers \[0, 1\] of this "
                     r"stacked weight's 3"):
    jlora.import_peft(stacked, d, module_path=maps.LLAMA)
