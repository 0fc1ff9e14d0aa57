"""Tests of the real pretrained-model ports and data loaders in experiments/.

Needs the data from ``experiments/fetch_data.sh`` (``make data``); without it
the fixtures fail with a FileNotFoundError that names the missing path.
Heavy models load once per module (module-scoped fixtures).
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from experiments import data

# Measured with this port (float32, Q4_1 weights dequantised): chapter 1
# without its "CHAPTER 1. Loomings." heading is 2847 tokens; non-overlapping
# 256-token windows give perplexity 68.63 (512-token windows: 60.76).
PPL_SEQ_LEN = 256
PPL_RANGE = (55.0, 90.0)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def minilm():
    from experiments.models import bert

    return bert.load_minilm()


@pytest.fixture(scope="module")
def smollm2():
    from experiments.models import llama

    return llama.load_smollm2()


def _cos(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# --------------------------------------------------------------------------- MiniLM


def test_minilm_matches_sentence_transformers_reference(minilm):
    from experiments.models import bert

    # Values printed in the sentence-transformers quickstart for
    # all-MiniLM-L6-v2: similarity matrix [[1, .6660, .1046], [.6660, 1, .1411], ...].
    e = bert.embed(
        ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."],
        model=minilm,
    )
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    sims = e @ e.T
    np.testing.assert_allclose(
        [sims[0, 1], sims[0, 2], sims[1, 2]], [0.6660, 0.1046, 0.1411], atol=3e-3
    )


def test_minilm_paraphrase_vs_unrelated(minilm):
    from experiments.models import bert

    e = bert.embed(
        [
            "A man is playing a guitar.",
            "Someone plays the guitar.",
            "A man is eating food.",
            "A man is eating a piece of bread.",
            "The stock market crashed today.",
            "The new movie is awesome",
        ],
        model=minilm,
    )
    assert 0.6 < _cos(e[0], e[1]) < 0.9  # measured 0.841
    assert 0.6 < _cos(e[2], e[3]) < 0.9  # measured 0.755
    assert abs(_cos(e[0], e[4])) < 0.2  # measured -0.078
    assert abs(_cos(e[2], e[5])) < 0.2  # measured -0.040


def test_minilm_padding_invariance_and_bf16(minilm):
    from experiments.models import bert

    config, params, tok = minilm
    batch = bert.tokenize(tok, ["Someone plays the guitar.", "x " * 40])
    assert batch["input_ids"].shape[1] > 16  # first sentence carries lots of padding
    padded = bert.encode(params, config, batch)
    alone = bert.encode(params, config, bert.tokenize(tok, ["Someone plays the guitar."]))
    np.testing.assert_allclose(np.asarray(padded[0]), np.asarray(alone[0]), atol=1e-4)
    half = bert.encode(params, config, batch, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    assert float(jnp.min(jnp.sum(half * padded, axis=-1))) > 0.99


def test_minilm_param_tree_names(minilm):
    config, params, _ = minilm
    layer = params["encoder"]["layer_0"]
    d, f = config.hidden_size, config.intermediate_size
    for name in ("query", "key", "value", "out"):
        assert layer["attention"][name]["kernel"].shape == (d, d)
    assert layer["intermediate"]["kernel"].shape == (d, f)
    assert layer["output"]["kernel"].shape == (f, d)
    assert params["embeddings"]["word_embeddings"]["embedding"].shape == (config.vocab_size, d)
    assert len(params["encoder"]) == config.num_hidden_layers == 6


def test_bert_classifier_head(minilm):
    from experiments.models import bert

    config, params, tok = minilm
    cls_params = bert.init_classifier_params(config, params, num_labels=8)
    assert set(cls_params) == {"bert", "classifier"}
    batch = bert.tokenize(tok, ["Hello world", "Another, longer sentence here."])
    model = bert.BertClassifier(config, num_labels=8)
    out = jax.jit(model.apply)({"params": cls_params}, batch["input_ids"], batch["attention_mask"])
    assert out.shape == (2, 8) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))


# --------------------------------------------------------------------------- SmolLM2


def test_smollm2_greedy_paris(smollm2):
    from experiments.models import llama

    config, params, tok = smollm2
    text = llama.generate(params, "The capital of France is", 20, config=config, tokenizer=tok)
    assert text.startswith(" Paris"), text


def test_smollm2_perplexity_moby_dick_chapter1(smollm2):
    from experiments.models import llama

    config, params, tok = smollm2
    ids = llama.encode(tok, data.moby_dick_chapters()[0])
    assert 2700 < len(ids) < 3000
    ppl = llama.perplexity(params, ids, seq_len=PPL_SEQ_LEN, config=config)
    assert PPL_RANGE[0] < ppl < PPL_RANGE[1], ppl


def test_smollm2_tokenizer(smollm2):
    from experiments.models import llama

    config, params, tok = smollm2
    text = "Call me Ishmael—in 1851, naïvely.\n\tDone!"
    assert llama.decode(tok, llama.encode(tok, text)) == text
    assert llama.encode(tok, "The capital of France is") == [504, 3575, 282, 4649, 314]
    assert tok.encode("in 1851", add_special_tokens=False).tokens[-4:] == ["1", "8", "5", "1"]
    assert llama.encode(tok, "<|im_start|>user")[0] == 1
    assert tok.get_vocab_size() == config.vocab_size == 49152


def test_smollm2_param_tree(smollm2):
    config, params, _ = smollm2
    assert config.num_hidden_layers == 30 and config.rope_theta == 100000.0
    m = params["model"]
    attn, mlp = m["layers_0"]["self_attn"], m["layers_0"]["mlp"]
    assert attn["q_proj"]["kernel"].shape == (576, 576)
    assert attn["k_proj"]["kernel"].shape == (576, 192)
    assert attn["v_proj"]["kernel"].shape == (576, 192)
    assert attn["o_proj"]["kernel"].shape == (576, 576)
    assert mlp["gate_proj"]["kernel"].shape == (576, 1536)
    assert mlp["up_proj"]["kernel"].shape == (576, 1536)
    assert mlp["down_proj"]["kernel"].shape == (1536, 576)
    assert m["embed_tokens"]["embedding"].shape == (49152, 576)
    assert "lm_head" not in params and "lm_head" not in m  # tied embeddings


# --------------------------------------------------------------------------- LLaMA unit tests


def _gguf_permute(w, n_heads):
    """llama.cpp converter's Q/K permutation (HF layout -> GGUF layout)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape
    )


def test_unpermute_qk_inverts_gguf_and_matches_interleaved_rope():
    from experiments.models import llama

    rng = np.random.default_rng(0)
    heads, hd, d_in, t = 3, 8, 5, 4
    w_hf = rng.normal(size=(heads * hd, d_in)).astype(np.float32)
    w_gguf = _gguf_permute(w_hf, heads)
    np.testing.assert_array_equal(llama.unpermute_qk(w_gguf, heads), w_hf)

    # HF rotate_half RoPE on HF weights == GGML adjacent-pair RoPE on GGUF weights.
    x = rng.normal(size=(1, t, d_in)).astype(np.float32)
    cos, sin = llama.rope_tables(jnp.arange(t), hd, 10000.0)
    q_hf = llama.apply_rope(jnp.asarray((x @ w_hf.T).reshape(1, t, heads, hd)), cos, sin)
    q_g = (x @ w_gguf.T).reshape(1, t, heads, hd // 2, 2)
    c, s = np.asarray(cos)[:, : hd // 2][None, :, None], np.asarray(sin)[:, : hd // 2][None, :, None]
    a, b = q_g[..., 0], q_g[..., 1]
    q_inter = np.stack([a * c - b * s, a * s + b * c], axis=-1).reshape(1, t, heads * hd)
    back = llama.unpermute_qk(q_inter.reshape(t, heads * hd).T, heads).T
    np.testing.assert_allclose(back, np.asarray(q_hf).reshape(t, heads * hd), atol=1e-5)


def test_tiny_llama_is_causal():
    from experiments.models import llama

    cfg = llama.LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            intermediate_size=48)
    model = llama.LlamaForCausalLM(cfg)
    ids = jnp.array([[3, 7, 11, 2, 9, 4]])
    params = jax.jit(model.init)(jax.random.PRNGKey(0), ids)["params"]
    apply = jax.jit(model.apply)
    out1 = apply({"params": params}, ids)
    out2 = apply({"params": params}, ids.at[0, 4].set(13))
    assert out1.shape == (1, 6, 50)
    np.testing.assert_allclose(out1[:, :4], out2[:, :4], atol=1e-5)
    assert float(jnp.max(jnp.abs(out1[:, 4:] - out2[:, 4:]))) > 1e-4
    # bfloat16 compute with float32 params (valid under strict dtype promotion).
    half = jax.jit(llama.LlamaForCausalLM(cfg, dtype=jnp.bfloat16).apply)({"params": params}, ids)
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(half, out1, atol=0.1)


# --------------------------------------------------------------------------- data


def test_fortunes_counts_and_classes():
    texts, labels, names = data.load_fortunes()
    assert len(names) == 8 and set(np.unique(labels)) == set(range(8))
    assert 4500 < len(texts) < 5000  # 4715 with Debian's fortunes 1.99.1
    assert all(t and t == t.strip() and t != "%" for t in texts)
    counts = np.bincount(labels, minlength=8)
    assert counts.min() >= 150


def test_fortunes_split_stratified_and_deterministic():
    texts, labels, _ = data.load_fortunes()
    s1 = data.fortunes_split(seed=0)
    s2 = data.fortunes_split(seed=0)
    s3 = data.fortunes_split(seed=1)
    assert s1.train_texts == s2.train_texts and s1.test_texts == s2.test_texts
    np.testing.assert_array_equal(s1.test_labels, s2.test_labels)
    assert s1.test_texts != s3.test_texts
    assert sorted(s1.train_texts + s1.test_texts) == sorted(texts)
    for name, (n_train, n_test) in s1.counts().items():
        assert abs(n_test - 0.2 * (n_train + n_test)) <= 1, name
    # Labels stay attached to their texts.
    by_text = {}
    for t, l in zip(texts, labels):
        by_text.setdefault(t, set()).add(int(l))
    assert all(int(l) in by_text[t] for t, l in zip(s1.test_texts, s1.test_labels))


def test_moby_dick_chapters_and_split():
    chapters = data.moby_dick_chapters()
    assert len(chapters) == 135
    assert chapters[0].startswith("Call me Ishmael.")
    assert data.moby_dick_chapters(include_heading=True)[0].startswith("CHAPTER 1. Loomings.")
    for seed in (None, 0):
        train, held = data.moby_dick_split(n_heldout=10, seed=seed)
        assert len(held) == 10 and not set(train) & set(held)
        assert sorted(train + held) == list(range(135))
    assert data.moby_dick_split(seed=None)[1] == list(range(125, 135))
    assert data.moby_dick_split(seed=3) == data.moby_dick_split(seed=3)
    held_text = {chapters[i] for i in data.moby_dick_split()[1]}
    assert not held_text & {chapters[i] for i in data.moby_dick_split()[0]}


def test_chunk_tokens():
    ids = np.arange(23)
    rows = data.chunk_tokens(ids, 5)
    assert rows.shape == (4, 5) and rows[1, 0] == 5
    padded = data.chunk_tokens(ids, 5, drop_last=False)
    assert padded.shape == (5, 5) and padded[4, 2] == 22 and padded[4, 3] == 0
    batches = data.chunk_tokens(ids, 5, batch_size=2)
    assert batches.shape == (2, 2, 5) and batches[1, 1, 4] == 19
    stream = data.tokenize_chapters(["ab", "c"], lambda s: [ord(ch) for ch in s], sep_id=0)
    np.testing.assert_array_equal(stream, [97, 98, 0, 99, 0])


def test_missing_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="fetch_data.sh"):
        data.load_fortunes(root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="fetch_data.sh"):
        data.moby_dick_chapters(root=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="chapter"):
        data.moby_dick_chapters(root=str(tmp_path))
