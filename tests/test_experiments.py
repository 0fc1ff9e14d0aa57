"""Smoke tests of the experiments (their ``--quick`` modes) and of the settings files.

The smoke tests run each script in a subprocess, as a user would, and check
what it wrote. They need the data of ``experiments/fetch_data.sh``.
"""

import json
import os
import subprocess
import sys

import pytest

from experiments import config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)
  return proc


def _ok(proc: subprocess.CompletedProcess) -> str:
  assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  return proc.stdout


# --------------------------------------------------------------------------- settings


def test_config_defaults_and_overrides():
  cfg = config.load(["--steps=7", "--lr=5e-4", "--targets=query,key", "--progress=false",
                     "--rank=1e1"])
  assert cfg["config"] == "minilm_fortunes" and not cfg["quick"]
  assert cfg["steps"] == 7 and isinstance(cfg["steps"], int)
  assert cfg["lr"] == 5e-4 and cfg["rank"] == 10
  assert cfg["targets"] == ("query", "key") and cfg["progress"] is False
  defaults, _ = config.load_file("minilm_fortunes")
  assert config.load([])["steps"] == defaults["steps"]


def test_config_quick_then_command_line():
  _, quick = config.load_file("minilm_fortunes")
  cfg = config.load(["--quick", "--steps=3"])
  assert cfg["quick"] and cfg["steps"] == 3
  assert cfg["max_len"] == quick["max_len"]


def test_config_other_file_and_bare_bool():
  cfg = config.load(["--config=smollm2_mobydick", "--progress", "--targets="])
  assert cfg["task"] == "mobydick" and cfg["progress"] is True and cfg["targets"] == ()


@pytest.mark.parametrize("argv, message", [
    (["--stpes=3"], "valid keys"),
    (["--steps=three"], "expected an integer"),
    (["--progress=maybe"], "expected true or false"),
    (["steps=3"], "--key=value"),
    (["--steps"], "needs a value"),
    (["--config=nope"], "available"),
])
def test_config_rejects(argv, message):
  with pytest.raises(config.ConfigError, match=message):
    config.load(argv)


def test_unknown_key_lists_valid_keys_on_the_command_line():
  proc = _run("experiments.finetune", "--stpes=3", timeout=120)
  assert proc.returncode != 0
  assert "unknown setting(s) --stpes" in proc.stderr
  assert "steps" in proc.stderr.split("valid keys:")[1]


def test_every_config_file_loads_with_its_quick_overrides():
  for name in config.available():
    settings, quick = config.load_file(name)
    assert set(quick) <= set(settings), name
    assert settings["task"] in ("fortunes", "mobydick"), name


# --------------------------------------------------------------------------- smoke runs


def test_finetune_quick():
  out = _ok(_run("experiments.finetune", "--quick", "--progress=false"))
  assert "merge check" in out and "head-only probe" in out
  run = os.path.join(REPO, "runs", "quick-minilm")
  with open(os.path.join(run, "results.json")) as f:
    res = json.load(f)
  assert res["merge_check"]["unexplained_disagreements"] == 0
  assert res["merge_check"]["max_abs_logit_diff"] < 1e-3
  with open(os.path.join(run, "config.json")) as f:
    cfg = json.load(f)
  assert cfg["quick"] and cfg["steps"] == 4
  # every checkpoint holds the settings it came from
  steps = sorted(os.listdir(os.path.join(run, "checkpoints")))
  assert steps == ["2", "4"]
  for step in steps:
    with open(os.path.join(run, "checkpoints", step, "jlora", "metadata")) as f:
      record = json.load(f)
    assert record["data"]["config"] == cfg and record["data"]["step"] == int(step)
  assert os.path.isdir(os.path.join(run, "adapters"))


def test_param_count_quick():
  out = _ok(_run("experiments.param_count", "--quick"))
  assert "400 adapter parameters vs 10,000 (96% fewer)" in out
  assert "18,874,368" in out


def test_fortunes_sweeps_quick():
  out = _ok(_run("experiments.fortunes_sweeps", "--quick"))
  for heading in ("## 2.", "## 3.", "## 4.", "## 5."):
    assert heading in out
  for png in ("compare.png", "rank.png", "matrices.png", "phi.png", "spectrum.png"):
    assert os.path.isfile(os.path.join(REPO, "runs", "quick", png)), png


def test_methods_compare_quick(tmp_path):
  out = _ok(_run("experiments.methods_compare", "--quick", "--seeds=1", f"--out_dir={tmp_path}"))
  for method in ("lora", "ia3", "dora"):
    assert f"\n{method} " in out, method
  with open(tmp_path / "methods_compare.json") as f:
    rows = json.load(f)["rows"]
  assert sorted(r["method"] for r in rows) == ["dora", "ia3", "lora"]
  assert all(r["merged_max_abs_logit_diff"] < 1e-4 for r in rows)
  assert len(os.listdir(tmp_path / "methods")) == 3  # one cached run per method


def test_mobydick_lm_quick():
  """Also the main job's second config (finetune.run_mobydick), on 2 layers."""
  out = _ok(_run("experiments.mobydick_lm", "--quick", "--progress=false"))
  assert "merge check" in out and "full fine-tuning" in out and "before:" in out
  with open(os.path.join(REPO, "runs", "quick", "mobydick_lm.json")) as f:
    res = json.load(f)
  assert res["full"]["trainable_params"] > 100 * res["lora"]["trainable_params"]
