"""Suite-wide settings: strict dtype promotion and a CI-sized hypothesis profile."""

import os

import hypothesis
import jax
import pytest

hypothesis.settings.register_profile(
    "ci", max_examples=int(os.environ.get("JLORA_HYPOTHESIS_EXAMPLES", 12)),
    deadline=None, derandomize=True, print_blob=True)
hypothesis.settings.load_profile("ci")


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
