"""The README's code blocks run as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).parent.parent / "README.md"


def blocks():
  """Every ```python block, except the multi-host launch (it needs several
  processes; tests/test_train_scale.py runs the same step across two)."""
  found = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  return [b for b in found if "jax.distributed.initialize" not in b]


@pytest.mark.standard_promotion
def test_readme_python_blocks_run_in_order(capsys):
  namespace: dict = {}
  code = blocks()
  assert len(code) >= 4
  for block in code:
    exec(compile(block, str(README), "exec"), namespace)
  printed = capsys.readouterr().out
  assert "'lora_a': (32, 4)" in printed and "trainable" in printed
