"""KV-cached generation for the SmolLM2 port, with adapters merged, unmerged and banked.

A truncated SmolLM2 (its first 2 layers, the real weights) keeps this fast.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from helpers import randomize_adapters

TEXTS = ("The capital of France is", "Call me Ishmael.", "def main():\n   ",
         "Once upon a time")
TARGETS = re.compile(r"(q|k|v|o|gate|up|down)_proj/kernel")
N = 8


@pytest.fixture(scope="module")
def model():
  from experiments import lm
  from experiments.models import llama
  config, params, tok = llama.load_smollm2()
  config, params = lm.truncate(config, params, 2)
  prompts = [llama.encode(tok, t) for t in TEXTS]
  assert len({len(p) for p in prompts}) > 1  # ragged: each sequence at its own positions
  return config, params, prompts


@pytest.fixture(scope="module")
def adapters(model):
  config, params, _ = model
  # Ranks and alphas differ; adapters large enough to change the tokens.
  specs = [(1, 2.0), (4, 4.0), (2, 8.0)]
  return [randomize_adapters(jlora.lorify(params, r, key=jax.random.key(k), alpha=a,
                                          targets=TARGETS), jax.random.key(20 + k), scale=0.1)
          for k, (r, a) in enumerate(specs)]


def test_cached_greedy_equals_uncached_generate_ids(model):
  from experiments.models import decode, llama
  config, params, prompts = model
  got = decode.generate(params, config, prompts, N)
  for row, prompt in zip(got, prompts):
    assert row.tolist() == llama.generate_ids(params, config, prompt, N)
  # A cache longer than needed changes nothing (the masked tail is never read).
  longer = decode.generate(params, config, prompts, N, cache_len=80)
  np.testing.assert_array_equal(longer, got)


def test_cached_sampling_equals_uncached_with_the_same_key(model):
  from experiments.models import decode
  config, params, prompts = model
  keys = jax.random.split(jax.random.key(3), len(prompts))
  got = decode.generate(params, config, prompts, N, key=keys, temperature=1.5)
  for row, prompt, k in zip(got, prompts, keys):
    assert row.tolist() == decode.generate_uncached(params, config, prompt, N, key=k,
                                                    temperature=1.5)
  greedy = decode.generate(params, config, prompts, N)
  assert (got != greedy).any()  # it did sample
  # One key for the batch: every sequence samples with it, as it would alone.
  one = decode.generate(params, config, prompts, N, key=keys[0], temperature=1.5)
  assert one[0].tolist() == got[0].tolist()
  assert one[1].tolist() == decode.generate(params, config, prompts[1:2], N, key=keys[0],
                                            temperature=1.5)[0].tolist()


def test_unmerged_and_merged_adapter_agree(model, adapters):
  from experiments.models import decode
  config, _, prompts = model
  tree = adapters[1]
  merged = decode.generate(tree, config, prompts, N, mode="merged")
  unmerged = decode.generate(tree, config, prompts, N, mode="unmerged")
  np.testing.assert_array_equal(unmerged, merged)
  assert (merged != decode.generate(model[1], config, prompts, N)).any()  # adapters matter


# "auto" routes this small bank grouped; every path against the others and
# against merged references: tests/test_bank_routing.py.
@pytest.mark.parametrize("routing", ("auto", "gather", "onehot"))
def test_each_sequence_of_a_mixed_bank_batch_decodes_as_alone_with_its_merged_adapter(
    model, adapters, routing):
  from experiments.models import decode
  from jlora.methods import bank as bank_lib
  config, _, prompts = model
  bank = jlora.stack_adapters(adapters)
  index = np.array([2, 0, 1, 2], np.int32)
  with bank_lib.routing(routing):
    got = decode.generate(bank, config, prompts, N, mode="bank", index=index)
  alone = [decode.generate(adapters[k], config, [p], N, mode="merged")[0]
           for k, p in zip(index, prompts)]
  np.testing.assert_array_equal(got, np.stack(alone))
  # Different adapters on one prompt give different tokens: the routing is real.
  other = decode.generate(adapters[0], config, [prompts[0]], N, mode="merged")[0]
  assert index[0] != 0 and (alone[0] != other).any()


def test_bad_input_is_one_lora_error_naming_the_fix(model, adapters):
  from experiments.models import decode
  config, params, prompts = model
  bank = jlora.stack_adapters(adapters)
  cases = [
      (dict(params=bank, mode="bank", index=np.array([[0, 1, 2, 0]])), r"index: shape \(1, 4\)"),
      (dict(params=bank, mode="bank", index=np.array([0.0, 1, 2, 0])), "dtype float"),
      (dict(params=bank, mode="bank", index=np.array([0, 1, 3, 0])), r"K=3 adapters"),
      (dict(params=bank, mode="bank"), "index: missing"),
      (dict(params=params, mode="bank", index=np.zeros(4, np.int32)), "holds no bank"),
      (dict(params=bank, mode="merged"), r"holds a bank \(K=3\)"),
      (dict(params=params, mode="merged", cache_len=10), "cache_len=10: too short"),
      (dict(params=params, mode="fused"), "mode='fused'"),
      (dict(params=params, key=jax.random.key(0), temperature=0.0), "temperature=0.0"),
  ]
  for kwargs, message in cases:
    p = kwargs.pop("params")
    with pytest.raises(jlora.LoraError, match=message):
      decode.generate(p, config, prompts, N, **kwargs)
  with pytest.raises(jlora.LoraError) as info:  # every problem at once
    decode.generate(bank, config, prompts, 0, mode="bank", index=np.zeros(3, np.int32),
                    cache_len=4)
  assert len(info.value.problems) == 3
