"""The real-PEFT oracle: jlora's PEFT files against PEFT itself, per model family.

Needs torch, transformers and peft, which never enter the main test venv, so
tests/conftest.py collects this file only where peft is installed; run it in
a PEFT venv (``python3 -m venv /work/peftvenv && /work/peftvenv/bin/pip
install torch==2.13.0 && /work/peftvenv/bin/pip install -e '.[peft,test,data]'``)::

  /work/peftvenv/bin/python -m pytest -q tests/test_peft_oracle.py

No model is downloaded and no JAX port of any family is needed: each family
is a tiny random ``transformers`` model built from its config; its state dict
becomes the jlora tree through the family's `jlora.peft.maps` map. Then, for
LoRA, DoRA and IA3:

* jlora -> PEFT: random adapters (and a head trained in full, for LoRA)
  are exported with `jlora.export_peft`, loaded with
  ``PeftModel.from_pretrained`` with no missing or unexpected keys, and
  ``merge_and_unload()`` must give the weights of `jlora.merge`;
* PEFT -> jlora: a random PEFT adapter is saved with ``save_pretrained``,
  imported with `jlora.import_peft`, and `jlora.merge` must give PEFT's
  merged weights.

The one documented difference: PEFT's IA3 also scales the bias of an
output-side module, jlora does not (`jlora.IA3`); on those biases the test
checks PEFT's value is exactly jlora's times ``l``.
"""

import re
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # collected only where peft (and so torch) is installed: tests/conftest.py
import transformers as T  # noqa: E402
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

import jlora  # noqa: E402
from jlora.peft import maps  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

SMALL = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=32, tie_word_embeddings=False)
DECODER_LORA = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|embed_tokens)$"
DECODER_IA3 = (r"(k_proj|v_proj|down_proj)$", r"down_proj$")


def _decoder(model_cls, config_cls, **extra):
  return lambda: model_cls(config_cls(**SMALL, **extra))


# family: (make model, map, LoRA/DoRA module regex, (IA3 regex, feedforward regex),
#          modules to save, separate-q/k/v tree for a fused model)
FAMILIES = {
    "llama": (_decoder(T.LlamaForCausalLM, T.LlamaConfig, num_key_value_heads=1, head_dim=8),
              maps.LLAMA, DECODER_LORA, DECODER_IA3, ("lm_head",), False),
    "mistral": (_decoder(T.MistralForCausalLM, T.MistralConfig, num_key_value_heads=1,
                         head_dim=8), maps.MISTRAL, DECODER_LORA, DECODER_IA3, ("lm_head",),
                False),
    "qwen2": (_decoder(T.Qwen2ForCausalLM, T.Qwen2Config, num_key_value_heads=1),
              maps.QWEN2, DECODER_LORA, DECODER_IA3, ("lm_head",), False),
    "qwen3": (_decoder(T.Qwen3ForCausalLM, T.Qwen3Config, num_key_value_heads=1, head_dim=8),
              maps.QWEN3, DECODER_LORA, DECODER_IA3, ("lm_head",), False),
    "gemma2": (_decoder(T.Gemma2ForCausalLM, T.Gemma2Config, num_key_value_heads=1,
                        head_dim=8), maps.GEMMA2, DECODER_LORA, DECODER_IA3, ("lm_head",),
               False),
    "gemma3": (_decoder(T.Gemma3ForCausalLM, T.Gemma3TextConfig, num_key_value_heads=1,
                        head_dim=8), maps.GEMMA3, DECODER_LORA, DECODER_IA3, ("lm_head",),
               False),
    "phi3": (_decoder(T.Phi3ForCausalLM, T.Phi3Config, num_key_value_heads=1, pad_token_id=0),
             maps.PHI3, r"(qkv_proj|o_proj|gate_up_proj|down_proj|embed_tokens)$",
             (r"(qkv_proj|down_proj)$", r"down_proj$"), ("lm_head",), False),
    "phi3-separate-qkv": (
        _decoder(T.Phi3ForCausalLM, T.Phi3Config, num_key_value_heads=1, pad_token_id=0),
        maps.PHI3, r"(qkv_proj|o_proj|gate_up_proj|down_proj)$",
        (r"(qkv_proj|down_proj)$", r"down_proj$"), ("lm_head",), True),
    "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(
        vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32,
        tie_word_embeddings=False)), maps.GPT2, r"(c_attn|attn\.c_proj|c_fc|mlp\.c_proj|wte)$",
        (r"(c_attn|mlp\.c_proj)$", r"mlp\.c_proj$"), ("lm_head",), False),
    "gpt2-separate-qkv": (lambda: T.GPT2LMHeadModel(T.GPT2Config(
        vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32,
        tie_word_embeddings=False)), maps.GPT2, r"(c_attn|attn\.c_proj|c_fc|mlp\.c_proj)$",
        (r"(c_attn|mlp\.c_proj)$", r"mlp\.c_proj$"), ("lm_head",), True),
    "bert": (lambda: T.BertForSequenceClassification(T.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=3)),
        maps.BERT_CLS, r"(query|key|value|attention\.output\.dense|intermediate\.dense|"
        r"layer\.\d+\.output\.dense|word_embeddings)$",
        (r"(key|value|layer\.\d+\.output\.dense)$", r"layer\.\d+\.output\.dense$"),
        ("classifier",), False),
    "roberta": (lambda: T.RobertaForSequenceClassification(T.RobertaConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=40, num_labels=3, pad_token_id=1)),
        maps.ROBERTA_CLS, r"(query|key|value|attention\.output\.dense|intermediate\.dense|"
        r"layer\.\d+\.output\.dense|classifier\.dense)$",
        (r"(key|value|layer\.\d+\.output\.dense)$", r"layer\.\d+\.output\.dense$"),
        ("classifier.out_proj",), False),
}
METHODS = ("lora", "dora", "ia3")


def make(family):
  torch.manual_seed(0)
  return FAMILIES[family][0]().eval()


def set_path(tree, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def to_tree(state, mmap):
  """A jlora tree (numpy leaves) from a torch state dict, through the map."""
  tree = {}
  for key, t in state.items():
    module, param = key.rsplit(".", 1)
    path = mmap.tree_path(module, param)
    if path is None:
      continue
    weight_path = mmap.tree_path(module, "weight")
    layout = mmap.resolve(weight_path).layout
    value = t.detach().numpy().astype(np.float32)
    set_path(tree, path, layout.from_torch(value) if param == "weight" else value)
  return tree


def split_fused(tree):
  """Phi-3 / GPT-2 tree with separate q/k/v (and gate/up) kernels, as a port
  of another family would have them."""
  tree = jax.tree.map(lambda x: x, tree)
  for holder, fused, names in (("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
                               ("mlp", "gate_up_proj", ("gate_proj", "up_proj")),
                               ("attn", "c_attn", ("q_proj", "k_proj", "v_proj"))):
    for layers in (tree.get("model", {}), tree.get("transformer", {})):
      for layer in [v for k, v in layers.items() if re.fullmatch(r"(layers|h)_\d+", k)]:
        if holder not in layer or fused not in layer[holder]:
          continue
        w = layer[holder].pop(fused)
        n = w["kernel"].shape[1]
        sizes = [n // 2, n // 4, n // 4] if fused == "qkv_proj" else [n // len(names)] * len(names)
        cuts = np.cumsum([0] + sizes)
        for name, lo, hi in zip(names, cuts[:-1], cuts[1:]):
          layer[holder][name] = {k: v[..., lo:hi] for k, v in w.items()}
  return tree


def to_torch(tree, mmap):
  """Torch state entries of a (merged, plain) jlora tree, fused parts joined."""
  flat = {tuple(str(k.key) for k in kp): np.asarray(v)
          for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  out, parts = {}, {}
  for path, leaf in flat.items():
    if path[-1] == "bias":
      target = next((mmap.resolve(path[:-1] + (w,)) for w in ("kernel", "embedding")
                     if path[:-1] + (w,) in flat), None)
      param = "bias"
    else:
      target, param = mmap.resolve(path), "weight"
    if target is None:
      continue
    layout = target.layout
    value = layout.to_torch(leaf) if param == "weight" else leaf
    if layout.fused:
      parts.setdefault((target.module, param), {})[layout.part] = (value, layout)
    else:
      out[f"{target.module}.{param}"] = value
  for (module, param), got in parts.items():
    layout = got[0][1]
    axis = 0 if param == "bias" or not layout.fan_in_fan_out else 1
    out[f"{module}.{param}"] = np.concatenate([got[p][0] for p in sorted(got)], axis=axis)
  return out


def module_names(model, regex):
  return sorted(n for n, _ in model.named_modules() if n and re.search(regex, n))


def adapt(tree, mmap, family, method):
  """Random adapters on the tree, of ``method``, on the family's modules."""
  _, _, lora_re, (ia3_re, ff_re), save, _ = FAMILIES[family]

  def picks(regex):
    def pick(path, leaf):
      target = mmap.resolve(tuple(path.split("/")))
      if target is None:
        return False
      name = target.module
      if target.layout.fused:  # the part stands for the fused module's own name
        return bool(re.search(regex, name))
      return bool(re.search(regex, name))
    return pick

  key = jax.random.key(1)
  params = jax.tree.map(jnp.asarray, tree)
  if method == "ia3":
    params = jlora.ia3(params, targets=picks(ia3_re), feedforward=picks(ff_re))
  elif method == "dora":
    params = jlora.dora(params, {"v_proj|value|c_fc": 4, ".*": 2}, key=key,
                        alpha={"q_proj|query": 8.0, ".*": 4.0},
                        targets=lambda p, l: picks(lora_re)(p, l) and "embed" not in p
                        and "wte" not in p)
  else:
    params = jlora.lorify(params, {"v_proj|value|c_fc": 4, ".*": 2}, key=key,
                          alpha={"q_proj|query": 8.0, ".*": 4.0}, targets=picks(lora_re),
                          trainable=tuple(s.split(".")[-1] for s in save))
  rng = np.random.default_rng(2)
  mask = jlora.trainable_mask(params)
  leaves, treedef = jax.tree.flatten(params)
  new = [jnp.asarray(l + 0.3 * rng.standard_normal(l.shape).astype(np.float32))
         if m else l for l, m in zip(leaves, jax.tree.leaves(mask))]
  return jax.tree.unflatten(treedef, new)


def assert_merged_equal(ours, theirs, tensors, *, what):
  """``theirs`` (PEFT merged state) equals ``ours`` on every key jlora maps;
  IA3's output-side biases differ by the documented factor ``l``."""
  assert ours, "no weights mapped"
  scaled = {}
  for key, t in tensors.items():
    if key.endswith(".ia3_l") and t.shape[1] == 1:
      scaled[key[len("base_model.model."):-len(".ia3_l")] + ".bias"] = t[:, 0]
  for key, value in sorted(ours.items()):
    expected = value * scaled[key] if key in scaled else value
    got = theirs[key].detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6,
                               err_msg=f"{what}: {key}")


def base_state(family):
  model = make(family)
  return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_jlora_export_loads_in_peft_and_merges_the_same(family, method):
  mmap, separate = FAMILIES[family][1], FAMILIES[family][5]
  model = make(family)
  tree = to_tree(model.state_dict(), mmap)
  if separate:
    tree = split_fused(tree)
  params = adapt(tree, mmap, family, method)
  d = tempfile.mkdtemp()
  config = jlora.export_peft(params, d + "/adapter", module_path=mmap,
                             base_model_name_or_path=f"tiny-{family}")
  tensors = load_file(d + "/adapter/adapter_model.safetensors")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    loaded = PeftModel.from_pretrained(model, d + "/adapter")
  bad = [str(w.message) for w in caught
         if re.search(r"missing|unexpected", str(w.message), re.I)]
  assert not bad, bad
  state = get_peft_model_state_dict(loaded)
  assert sorted(state) == sorted(tensors), "PEFT holds other adapter tensors than the file"
  for key, t in tensors.items():
    np.testing.assert_array_equal(state[key].detach().numpy(), t, err_msg=key)
  if method == "lora":
    assert config["modules_to_save"] == list(FAMILIES[family][4])
  merged = loaded.merge_and_unload().state_dict()
  ours = to_torch(jlora.merge(params), mmap)
  assert_merged_equal(ours, merged, tensors, what=f"{family} {method} jlora->PEFT")
  # The adapter matters: the merged weights are not the base's.
  base = base_state(family)
  assert any(not np.allclose(merged[k].numpy(), base[k].numpy()) for k in ours)


def peft_config(family, model, method):
  _, _, lora_re, (ia3_re, ff_re), save, separate = FAMILIES[family]
  if method == "ia3":
    return IA3Config(target_modules=module_names(model, ia3_re),
                     feedforward_modules=module_names(model, ff_re))
  targets = module_names(model, lora_re)
  if method == "dora":
    targets = [t for t in targets if "embed" not in t and "wte" not in t]
  return LoraConfig(r=2, lora_alpha=4, target_modules=targets, use_dora=method == "dora",
                    rank_pattern={r".*\.1\..*(v_proj|value|c_fc|qkv_proj|c_attn)": 3},
                    alpha_pattern={r".*\.0\..*": 6}, use_rslora=family == "qwen2",
                    modules_to_save=list(save) if method == "lora" else None,
                    init_lora_weights=False)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_peft_adapter_imports_and_merges_the_same(family, method):
  mmap, separate = FAMILIES[family][1], FAMILIES[family][5]
  model = make(family)
  tree = to_tree(model.state_dict(), mmap)
  if separate:
    tree = split_fused(tree)
  peft_model = get_peft_model(model, peft_config(family, model, method))
  gen = torch.Generator().manual_seed(3)
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if p.requires_grad:  # adapters and modules to save: random, non-zero
        p.add_(0.3 * torch.randn(p.shape, generator=gen))
  d = tempfile.mkdtemp()
  peft_model.save_pretrained(d)
  tensors = load_file(d + "/adapter_model.safetensors")
  imported = jlora.import_peft(jax.tree.map(jnp.asarray, tree), d, module_path=mmap)
  merged = peft_model.merge_and_unload().state_dict()
  ours = to_torch(jlora.merge(imported), mmap)
  assert_merged_equal(ours, merged, tensors, what=f"{family} {method} PEFT->jlora")
  base = base_state(family)
  assert any(not np.allclose(merged[k].numpy(), base[k].numpy()) for k in ours)


def test_embedding_dora_round_trips_through_peft():
  """DoRA on an embedding: PEFT's DoraEmbeddingLayer norms per feature."""
  family = "llama"
  model = make(family)
  tree = to_tree(model.state_dict(), maps.LLAMA)
  params = jlora.dora(jax.tree.map(jnp.asarray, tree), 2, key=jax.random.key(0),
                      targets=("embed_tokens",))
  rng = np.random.default_rng(0)
  mask = jlora.trainable_mask(params)
  leaves, treedef = jax.tree.flatten(params)
  params = jax.tree.unflatten(treedef, [
      jnp.asarray(l + 0.3 * rng.standard_normal(l.shape).astype(np.float32)) if m else l
      for l, m in zip(leaves, jax.tree.leaves(mask))])
  d = tempfile.mkdtemp() + "/a"
  jlora.export_peft(params, d, module_path=maps.LLAMA)
  loaded = PeftModel.from_pretrained(model, d)
  merged = loaded.merge_and_unload().state_dict()
  ours = to_torch(jlora.merge(params), maps.LLAMA)
  assert_merged_equal(ours, merged, {}, what="llama dora embedding")


# -- The Gemma library's own Flax tree (multi-axis einsums, split modules) ----

GEMMA_AXES = {"q_einsum": jlora.Axes(inputs=(1,), outputs=(0, 2)),      # (N, D, H)
              "kv_einsum": jlora.Axes(inputs=(2,), outputs=(0, 1, 3)),  # (2, K, D, H)
              "attn_vec_einsum": jlora.Axes(inputs=2),                  # (N, H, D)
              "gating_einsum": jlora.Axes(inputs=(2,), outputs=(0, 1)),  # (2, F, D)
              "linear": jlora.Axes(inputs=1),                           # (F, D)
              "input_embedding": jlora.Axes(inputs=1)}


def gemma_lib_tree(state, n=2, k=1, h=8):
  """The Gemma library's tree of a HF Gemma 3 state dict (its own layouts)."""
  get = lambda key: state[key].detach().numpy().astype(np.float32)  # noqa: E731
  tree = {"embedder": {"input_embedding": get("model.embed_tokens.weight")}}
  i = 0
  while f"model.layers.{i}.self_attn.q_proj.weight" in state:
    pre = f"model.layers.{i}."
    heads = lambda w, m: w.reshape(m, h, -1).transpose(0, 2, 1)  # noqa: E731 (m*h, d) -> (m, d, h)
    tree[f"layer_{i}"] = {
        "attn": {"q_einsum": {"w": heads(get(pre + "self_attn.q_proj.weight"), n)},
                 "kv_einsum": {"w": np.stack([heads(get(pre + f"self_attn.{p}_proj.weight"), k)
                                              for p in "kv"])},
                 "attn_vec_einsum": {"w": get(pre + "self_attn.o_proj.weight").T.reshape(n, h, -1)}},
        "mlp": {"gating_einsum": np.stack([get(pre + "mlp.gate_proj.weight"),
                                           get(pre + "mlp.up_proj.weight")]),
                "linear": get(pre + "mlp.down_proj.weight").T}}
    i += 1
  return tree


def gemma_lib_to_torch(tree):
  """HF names of a (merged) Gemma library tree: the inverse of `gemma_lib_tree`."""
  out = {"model.embed_tokens.weight": np.asarray(tree["embedder"]["input_embedding"])}
  for name, layer in tree.items():
    if not name.startswith("layer_"):
      continue
    pre = f"model.layers.{name[6:]}."
    flat = lambda w: np.asarray(w).transpose(0, 2, 1).reshape(-1, w.shape[1])  # noqa: E731
    attn, mlp = layer["attn"], layer["mlp"]
    out[pre + "self_attn.q_proj.weight"] = flat(attn["q_einsum"]["w"])
    out[pre + "self_attn.k_proj.weight"] = flat(attn["kv_einsum"]["w"][0])
    out[pre + "self_attn.v_proj.weight"] = flat(attn["kv_einsum"]["w"][1])
    w = np.asarray(attn["attn_vec_einsum"]["w"])
    out[pre + "self_attn.o_proj.weight"] = w.reshape(-1, w.shape[-1]).T
    out[pre + "mlp.gate_proj.weight"] = np.asarray(mlp["gating_einsum"][0])
    out[pre + "mlp.up_proj.weight"] = np.asarray(mlp["gating_einsum"][1])
    out[pre + "mlp.down_proj.weight"] = np.asarray(mlp["linear"]).T
  return out


def gemma_lib_adapt(tree, method):
  params = jax.tree.map(jnp.asarray, tree)
  key = jax.random.key(4)
  axes = {f"{k}": v for k, v in GEMMA_AXES.items()}
  if method == "ia3":
    params = jlora.ia3(params, targets=re.compile(r"(kv_einsum/w|mlp/linear)$"),
                       feedforward=re.compile(r"mlp/linear$"), axes=axes)
  elif method == "dora":
    params = jlora.dora(params, 2, key=key, alpha=4.0, axes=axes, targets=re.compile(
        r"(q_einsum|kv_einsum|attn_vec_einsum)/w$|mlp/(gating_einsum|linear)$"))
  else:
    params = jlora.lorify(params, {"kv_einsum": 3, ".*": 2}, key=key, alpha=4.0, axes=axes,
                          targets=re.compile(r"(q_einsum|kv_einsum|attn_vec_einsum)/w$|"
                                             r"mlp/(gating_einsum|linear)$|input_embedding$"))
  rng = np.random.default_rng(5)
  mask = jlora.trainable_mask(params)
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [
      jnp.asarray(l + 0.3 * rng.standard_normal(l.shape).astype(np.float32)) if m else l
      for l, m in zip(leaves, jax.tree.leaves(mask))])


def test_gemma_lib_tree_mirrors_hf_gemma():
  model = make("gemma3")
  state = model.state_dict()
  back = gemma_lib_to_torch(gemma_lib_tree(state))
  for key, value in back.items():
    np.testing.assert_array_equal(value, state[key].numpy(), err_msg=key)


@pytest.mark.parametrize("method", METHODS)
def test_gemma_lib_export_loads_in_peft_and_merges_the_same(method):
  model = make("gemma3")
  params = gemma_lib_adapt(gemma_lib_tree(model.state_dict()), method)
  d = tempfile.mkdtemp() + "/adapter"
  jlora.export_peft(params, d, module_path=maps.GEMMA_LIB)
  tensors = load_file(d + "/adapter_model.safetensors")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    loaded = PeftModel.from_pretrained(model, d)
  assert not [str(w.message) for w in caught
              if re.search(r"missing|unexpected", str(w.message), re.I)]
  state = get_peft_model_state_dict(loaded)
  assert sorted(state) == sorted(tensors)
  merged = loaded.merge_and_unload().state_dict()
  ours = gemma_lib_to_torch(jlora.merge(params))
  assert_merged_equal(ours, merged, tensors, what=f"gemma library {method} jlora->PEFT")
  base = base_state("gemma3")
  assert any(not np.allclose(merged[k].numpy(), base[k].numpy()) for k in ours)


@pytest.mark.parametrize("method", METHODS)
def test_peft_gemma_adapter_imports_onto_the_gemma_lib_tree(method):
  model = make("gemma3")
  tree = gemma_lib_tree(model.state_dict())
  if method == "ia3":
    config = IA3Config(target_modules=module_names(model, r"(k_proj|v_proj|down_proj)$"),
                       feedforward_modules=module_names(model, r"down_proj$"))
  else:
    targets = module_names(model, DECODER_LORA)
    if method == "dora":
      targets = [t for t in targets if "embed" not in t]
    config = LoraConfig(r=2, lora_alpha=4, target_modules=targets, use_dora=method == "dora",
                        rank_pattern={r".*\.1\..*v_proj": 3}, init_lora_weights=False)
  peft_model = get_peft_model(model, config)
  gen = torch.Generator().manual_seed(6)
  with torch.no_grad():
    for _, p in peft_model.named_parameters():
      if p.requires_grad:
        p.add_(0.3 * torch.randn(p.shape, generator=gen))
  d = tempfile.mkdtemp()
  peft_model.save_pretrained(d)
  tensors = load_file(d + "/adapter_model.safetensors")
  imported = jlora.import_peft(jax.tree.map(jnp.asarray, tree), d, module_path=maps.GEMMA_LIB)
  merged = peft_model.merge_and_unload().state_dict()
  ours = gemma_lib_to_torch(jlora.merge(imported))
  assert_merged_equal(ours, merged, tensors, what=f"gemma library {method} PEFT->jlora")


# -- Logit level on the project's LLaMA port (experiments/models/llama.py) ----


def llama_port_and_hf():
  """A tiny HF LLaMA and the project's Flax port with the same weights."""
  from experiments.models import llama
  torch.manual_seed(0)
  hf_config = T.LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                            intermediate_size=32, tie_word_embeddings=True)
  hf = T.LlamaForCausalLM(hf_config).eval()
  rope = getattr(hf_config, "rope_parameters", None) or {}
  theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
  config = llama.LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                             intermediate_size=32, rms_norm_eps=hf_config.rms_norm_eps,
                             rope_theta=float(theta), tie_word_embeddings=True)
  state = hf.state_dict()
  tree = to_tree(state, maps.LLAMA)
  tree.pop("lm_head", None)  # tied to the embedding in the port
  for key, t in state.items():
    if key.endswith("norm.weight"):
      set_path(tree, tuple(key[:-len(".weight")].replace("layers.", "layers_").split(".")
                           ) + ("scale",), t.numpy().copy())
  model = llama.LlamaForCausalLM(config)
  return hf, model, {"params": jax.tree.map(jnp.asarray, tree)}


IDS = np.array([[1, 5, 9, 2, 33, 7, 12, 4]])


def test_llama_port_logits_match_peft_both_ways():
  hf, model, base = llama_port_and_hf()
  run = lambda p: np.asarray(jlora.lora(lambda q: model.apply(q, jnp.asarray(IDS)))(p))  # noqa: E731
  with torch.no_grad():
    hf_logits = hf(torch.tensor(IDS)).logits.numpy()
  np.testing.assert_allclose(run(base), hf_logits, atol=2e-5)  # the port is the model
  # jlora -> PEFT
  # Not embed_tokens: the port ties it to the output projection, where jlora's
  # adapter applies too, and PEFT's lora_embedding only to the lookup.
  params = jlora.lorify(base, {"v_proj": 4, ".*": 2}, key=jax.random.key(7), alpha=4.0,
                        targets=("q_proj", "v_proj", "o_proj", "down_proj"))
  rng = np.random.default_rng(8)
  mask = jlora.trainable_mask(params)
  leaves, treedef = jax.tree.flatten(params)
  params = jax.tree.unflatten(treedef, [
      jnp.asarray(l + 0.3 * rng.standard_normal(l.shape).astype(np.float32)) if m else l
      for l, m in zip(leaves, jax.tree.leaves(mask))])
  d = tempfile.mkdtemp() + "/a"
  jlora.export_peft(params, d, module_path=maps.LLAMA)
  loaded = PeftModel.from_pretrained(hf, d).eval()
  with torch.no_grad():
    peft_logits = loaded(torch.tensor(IDS)).logits.numpy()
  ours = run(params)
  assert np.abs(ours - hf_logits).max() > 1e-2  # the adapter matters
  np.testing.assert_allclose(peft_logits, ours, atol=5e-5)
  # PEFT -> jlora
  hf2, _, _ = llama_port_and_hf()
  peft_model = get_peft_model(hf2, LoraConfig(
      r=2, lora_alpha=4, init_lora_weights=False,
      target_modules=module_names(hf2, r"(q_proj|v_proj|o_proj|down_proj)$")))
  gen = torch.Generator().manual_seed(9)
  with torch.no_grad():
    for _, p in peft_model.named_parameters():
      if p.requires_grad:
        p.add_(0.3 * torch.randn(p.shape, generator=gen))
  e = tempfile.mkdtemp()
  peft_model.save_pretrained(e)
  with torch.no_grad():
    theirs = peft_model(torch.tensor(IDS)).logits.numpy()
  imported = jlora.import_peft(base, e, module_path=maps.LLAMA)
  np.testing.assert_allclose(run(imported), theirs, atol=5e-5)
  assert np.abs(theirs - hf_logits).max() > 1e-2
