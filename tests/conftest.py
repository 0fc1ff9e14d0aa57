"""Suite-wide settings: strict dtype promotion and a CI-sized hypothesis profile."""

import importlib.util
import os

import hypothesis
import jax
import pytest

hypothesis.settings.register_profile(
    "ci", max_examples=int(os.environ.get("JLORA_HYPOTHESIS_EXAMPLES", 12)),
    deadline=None, derandomize=True, print_blob=True)
hypothesis.settings.load_profile("ci")

# Optional oracles that need torch, which never enters the main venv: each
# runs where its libraries are (see its docstring), and is not collected here.
collect_ignore = []
if importlib.util.find_spec("peft") is None:
  collect_ignore.append("test_peft_oracle.py")
if not os.environ.get("JLORA_BNB_PYTHON"):
  collect_ignore.append("test_quant_bnb.py")


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "standard_promotion: run with JAX's standard dtype promotion "
      "(optax's Adam bias correction raises `float ** int32` under strict)")


@pytest.fixture(autouse=True)
def strict_dtype_promotion(request):
  """Silent upcasts are bugs in a library that promises the base's dtypes."""
  if request.node.get_closest_marker("standard_promotion"):
    yield
    return
  with jax.numpy_dtype_promotion("strict"):
    yield
