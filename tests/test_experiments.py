"""Smoke tests of the experiments (their ``--quick`` modes) and of the settings files.

The smoke tests run each script in a subprocess, as a user would, and check
what it wrote. They need the data of ``experiments/fetch_data.sh``.
"""

import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import pytest

from experiments import config, data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str, timeout: int = 900, cwd: str = REPO) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True,
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


def test_a_variant_config_holds_only_overrides_of_the_base():
  base, _ = config.load_file("base")
  for name in config.available():
    settings, quick = config.load_file(name)
    assert set(base) <= set(settings), name
    assert quick["ckpt_every"] == 2, name  # the base's QUICK applies to every variant
  # the comment of each setting comes with it, also for keys set only in the base
  assert config.read("smollm2_mobydick").comments["ckpt_keep"] == "checkpoints kept"


SCRIPTS = ["finetune", "fortunes_sweeps", "methods_compare", "mobydick_lm", "param_count",
           "data_parallel", "peft_equivalence", "predict", "protocol"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_setting_with_its_default_and_comment(script):
  proc = _run(f"experiments.{script}", "--help", timeout=120)
  out = _ok(proc)
  assert out.startswith(f"python -m experiments.{script}"), out[:200]
  flags = [line.split()[0] for line in out.splitlines() if line.startswith("  --")]
  assert flags and all("=" in f for f in flags), out
  if script in ("finetune", "fortunes_sweeps", "methods_compare"):
    assert re.search(r"^  --rank=8 +LoRA rank r( \[quick: \d+\])?$", out, re.M), out
  if script == "finetune":
    settings, _ = config.load_file("minilm_fortunes")
    assert {f.split("=")[0][2:] for f in flags} == set(settings)


def test_bad_target_fails_before_any_run_folder_exists(tmp_path):
  t0 = time.perf_counter()
  proc = _run("experiments.finetune", "--targets=qeury,value", f"--out_dir={tmp_path}", timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert "qeury" in proc.stderr and "available module names" in proc.stderr, proc.stderr
  assert "Traceback" not in proc.stderr
  assert "loading" not in proc.stdout  # no data, no weights
  assert os.listdir(tmp_path) == []
  assert time.perf_counter() - t0 < 60
  proc = _run("experiments.finetune", "--config=smollm2_mobydick", "--rank=0", "--max_len=3",
              f"--out_dir={tmp_path}", timeout=120)
  assert proc.returncode == 2 and "--max_len" in proc.stderr  # not a key of this config
  proc = _run("experiments.finetune", "--rank=0", "--test_fraction=2", f"--out_dir={tmp_path}",
              timeout=120)
  assert proc.returncode == 2
  assert "--rank: must be > 0" in proc.stderr and "--test_fraction" in proc.stderr
  assert os.listdir(tmp_path) == []


def test_every_config_file_loads_with_its_quick_overrides():
  for name in config.available():
    settings, quick = config.load_file(name)
    assert set(quick) <= set(settings), name
    assert settings["task"] in ("fortunes", "mobydick"), name


def test_module_path_doctests_of_the_ports():
  """bert_module_path / llama_module_path (PEFT names of the ports) run their examples."""
  import doctest

  from experiments.models import bert, llama

  for module in (bert, llama):
    result = doctest.testmod(module)
    assert result.attempted >= 1 and result.failed == 0, module.__name__
  assert bert.bert_module_path(("params", "bert", "encoder", "layer_2", "attention", "query")) \
      == "bert.encoder.layer.2.attention.self.query"
  assert bert.bert_module_path(("params", "classifier")) is None
  assert llama.llama_module_path(("params", "model", "layers_0", "mlp", "down_proj")) \
      == "model.layers.0.mlp.down_proj"
  assert llama.llama_module_path(("params", "model", "embed_tokens")) is None


# --------------------------------------------------------------------------- the main job


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  """One ``--quick`` main-job run in a fresh out_dir: ``(run folder, stdout, out_dir)``."""
  out_dir = tmp_path_factory.mktemp("runs")
  out = _ok(_run("experiments.finetune", "--quick", "--progress=false", f"--out_dir={out_dir}"))
  return os.path.join(out_dir, "quick-minilm"), out, str(out_dir)


def _results(run: str) -> dict:
  with open(os.path.join(run, "results.json")) as f:
    return json.load(f)


def test_finetune_quick(quick_run):
  run, out, _ = quick_run
  assert "merge check" in out and "head-only probe" in out
  assert "SMOKE TEST" in out.split("| method")[0] and "| method (SMOKE TEST" in out
  res = _results(run)
  assert res["smoke_test"] and "mean nothing" in res["smoke_test"]
  assert {"date", "load_average_1_5_15", "versions"} <= set(res["provenance"])
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
  for name in ("adapters", "curves.png", "labels.json", "base.json"):
    assert os.path.exists(os.path.join(run, name)), name
  # the summary says where everything went, and the settings are a table
  for name in ("adapters", "results.json", "curves.png"):
    assert os.path.join(run, name) in out, name
  assert re.search(r"^\| steps +\| 4 +\| default 150 +\|$", out, re.M), out


def test_second_run_resumes_or_reports(quick_run):
  run, first_out, out_dir = quick_run
  first = _results(run)
  stamp = os.path.getmtime(os.path.join(run, "results.json"))
  # complete: reported in seconds, no training step, nothing rewritten
  proc = _run("experiments.finetune", "--quick", "--progress=false", f"--out_dir={out_dir}")
  out = _ok(proc)
  assert "0 training steps" in out and not re.search(r"\btrained \d+ steps", out), out
  assert "loading" not in out  # no data, no weights
  assert os.path.getmtime(os.path.join(run, "results.json")) == stamp
  assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["2", "4"]
  assert f"{first['lora']['test_acc']:.4f}" in out
  # other settings against this folder: an error naming them
  proc = _run("experiments.finetune", "--quick", "--steps=6", "--lr=1e-3", f"--out_dir={out_dir}")
  assert proc.returncode == 2
  assert "--steps: the run has 4, now 6" in proc.stderr and "--lr" in proc.stderr
  assert "--fresh" in proc.stderr and "--run_name" in proc.stderr
  # interrupted after step 2: continues from that checkpoint, ends where the first run did
  os.remove(os.path.join(run, "results.json"))
  shutil.rmtree(os.path.join(run, "checkpoints", "4"))
  out = _ok(_run("experiments.finetune", "--quick", "--progress=false", f"--out_dir={out_dir}"))
  assert "resumed from the checkpoint of step 2, trained 2 steps" in out, out
  again = _results(run)
  assert again["lora"]["losses"] == first["lora"]["losses"]
  assert again["lora"]["test_acc"] == first["lora"]["test_acc"]
  assert again["lora"]["resumed_from"] == 2 and again["lora"]["steps_run"] == 2


def test_predict_on_a_quick_run(quick_run):
  run, _, _ = quick_run
  with open(os.path.join(run, "labels.json")) as f:
    labels = json.load(f)
  assert labels == list(data.FORTUNE_CATEGORIES)
  out = _ok(_run("experiments.predict", f"--run={run}", "Real programmers count from zero.",
                 cwd=str(pathlib.Path(run).parent)))  # no PYTHONPATH, any folder
  label, prob = re.fullmatch(r"(\S+) \((0\.\d+|1\.000)\)\tReal programmers count from zero\.\n",
                             out).groups()
  assert label in labels and 1 / len(labels) <= float(prob) <= 1
  # the README's snippet gives the same answer from the same folder
  readme = (pathlib.Path(REPO) / "README.md").read_text()
  snippet = re.search(r"## Use the trained adapters\n.*?```py\n(.*?)```", readme, re.S).group(1)
  assert 'run = "runs/minilm_fortunes-lora"' in snippet
  snippet = snippet.replace('run = "runs/minilm_fortunes-lora"', f"run = {run!r}")
  proc = subprocess.run([sys.executable, "-c", snippet], cwd=REPO, capture_output=True, text=True,
                        timeout=600)
  assert _ok(proc).split() == [label, prob], proc.stdout


def test_run_folder_is_not_replaced_by_another_kind_of_folder(tmp_path):
  (tmp_path / "quick-minilm").mkdir()
  (tmp_path / "quick-minilm" / "mine.txt").write_text("keep")
  proc = _run("experiments.finetune", "--quick", "--fresh", f"--out_dir={tmp_path}", timeout=120)
  assert proc.returncode == 2 and "not a run folder" in proc.stderr
  assert (tmp_path / "quick-minilm" / "mine.txt").read_text() == "keep"


def test_bad_quantize_settings_fail_before_any_run_folder_exists(tmp_path):
  cases = [(["--quantize=gguf"], "--quantize: for task 'fortunes' expected one of"),
           (["--quantize=fp8", "--config=smollm2_mobydick"], "'gguf'"),
           (["--quantize=nf4", "--method=full"], "needs --method=lora"),
           (["--quantize=int8", "--head=query"], "--quantize=int8")]
  for args, message in cases:
    proc = _run("experiments.finetune", *args, f"--out_dir={tmp_path}", timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
    assert "Traceback" not in proc.stderr and "loading" not in proc.stdout
  assert os.listdir(tmp_path) == []


def test_quantize_base_takes_every_linear_kernel_but_the_head():
  """QLoRA's choice: NF4 kernels; embeddings, norms, biases and the head stay float."""
  import jax

  import jlora
  from experiments import training
  from experiments.models import bert

  shapes = bert.classifier_shapes(bert.BertConfig(), 8)
  cfg = {"quantize": "nf4", "double_quant": True, "head": ("classifier",)}
  tree = jax.eval_shape(lambda t: training.quantize_base(t, cfg), shapes)
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=jlora.quant.is_quantized)
  paths = {jax.tree_util.keystr(kp, simple=True, separator="/"): leaf for kp, leaf in leaves}
  quantized = {p for p, leaf in paths.items() if jlora.quant.is_quantized(leaf)}
  kernels = {p for p in paths if p.endswith("/kernel") and "classifier" not in p}
  assert quantized == kernels and len(kernels) == 6 * 6  # q, k, v, out, intermediate, output
  assert all(leaf.format == "nf4" and "scale_codes" in leaf.arrays for p, leaf in paths.items()
             if p in quantized)
  assert training.quantize_base(shapes, {"quantize": "gguf"}) is shapes


@pytest.mark.parametrize("config_name,fmt", [("minilm_fortunes", "nf4"),
                                             ("smollm2_mobydick", "gguf")])
def test_main_job_on_a_quantized_base(tmp_path, config_name, fmt):
  """--quantize: QLoRA in the main job; merged = factored; predict and resume work."""
  args = ("experiments.finetune", f"--config={config_name}", "--quick", f"--quantize={fmt}",
          "--progress=false", f"--out_dir={tmp_path}", "--run_name=q")
  out = _ok(_run(*args))
  run = os.path.join(tmp_path, "q")
  res = _results(run)
  with open(os.path.join(run, "base.json")) as f:
    assert json.load(f)["quantize"] == fmt
  if fmt == "gguf":
    assert "base model (gguf base): held-out perplexity" in out, out
    assert res["merge_check"]["argmax_agreement"] == 1.0
    assert abs(res["merge_check"]["merged_ppl"] / res["heldout_ppl"] - 1) < 1e-3
    text = _ok(_run("experiments.predict", f"--run={run}", "The whale"))
    assert text.startswith("'The whale' -> "), text
  else:
    assert res["merge_check"]["unexplained_disagreements"] == 0
    text = _ok(_run("experiments.predict", f"--run={run}", "Real programmers count from zero."))
    assert text.split(" (")[0] in data.FORTUNE_CATEGORIES, text
  # a run folder made before `quantize` existed resumes as a float run (its default)
  if fmt == "nf4":
    with open(os.path.join(run, "config.json")) as f:
      cfg = json.load(f)
    proc = _run(*args)
    assert "0 training steps" in _ok(proc)
    for key in ("quantize", "double_quant"):
      del cfg[key]
    with open(os.path.join(run, "config.json"), "w") as f:
      json.dump(cfg, f)
    proc = _run(*args)
    assert proc.returncode == 2 and "--quantize: the run has '', now 'nf4'" in proc.stderr


# --------------------------------------------------------------------------- the experiments


def test_param_count_quick():
  out = _ok(_run("experiments.param_count", "--quick"))
  assert "400 adapter parameters vs 10,000 (96% fewer)" in out
  assert "18,874,368" in out


def test_fortunes_sweeps_quick():
  out = _ok(_run("experiments.fortunes_sweeps", "--quick"))
  for heading in ("## 2.", "## 3.", "## 4.", "## 5."):
    assert heading in out
  assert "SMOKE TEST" in out
  for png in ("compare.png", "rank.png", "matrices.png", "phi.png", "spectrum.png"):
    assert os.path.isfile(os.path.join(REPO, "runs", "quick", png)), png
  assert "Two seeds at the same rank, r=1 and r=2" in out  # the paper's Fig. 4
  assert "paired vs r=2" in out and "paired vs Wq+Wv" in out
  with open(os.path.join(REPO, "runs", "quick", "fortunes_sweeps.json")) as f:
    res = json.load(f)
  phi = res["structure"]["phi"]["value"]
  assert 0 <= phi["phi_1_1_seeds_mean_over_layers"] <= 1
  assert 0 <= phi["phi_r2_r2_seeds_r2_mean_over_layers"] <= 1
  r1 = {x["seed"]: x["test_acc"] for x in res["rank"]["1"]}
  r2 = {x["seed"]: x["test_acc"] for x in res["rank"]["2"]}
  assert res["rank_paired"]["1"]["diffs"] == [r1[s] - r2[s] for s in (0, 1)]
  os.remove(os.path.join(REPO, "runs", "quick", "rank.png"))
  out = _ok(_run("experiments.fortunes_sweeps", "--quick", "--plot"))  # redrawn from the JSON
  assert "redrew" in out and os.path.isfile(os.path.join(REPO, "runs", "quick", "rank.png"))


@pytest.mark.standard_promotion  # the experiment's training code, as its scripts run it
def test_fortunes_sweeps_cache_starts_from_nothing(tmp_path, monkeypatch):
  """On a fresh clone the first cached run may be a LoRA seed-0 run, which keeps its A
  beside its JSON (``--sections=matrices`` starts with one)."""
  from experiments import config as config_lib
  from experiments import fortunes_sweeps

  monkeypatch.setattr(fortunes_sweeps, "CACHE", str(tmp_path / "runs" / "sweeps"))
  sweep = config_lib.load(["--quick", "--rates=config"], default="minilm_fortunes",
                          own=fortunes_sweeps.OWN, own_quick=fortunes_sweeps.QUICK,
                          over=fortunes_sweeps.OVER, fixed=True, usage="")
  res = fortunes_sweeps.cached_run(fortunes_sweeps.run_cfg(sweep), 0)
  saved = sorted(os.listdir(tmp_path / "runs" / "sweeps"))
  assert [os.path.splitext(f)[1] for f in saved] == [".json", ".npz"], saved
  assert fortunes_sweeps.cached_run(fortunes_sweeps.run_cfg(sweep), 0) == res  # from the cache


def test_fortunes_sweeps_reuse_the_runs_that_committed_results_record(tmp_path, monkeypatch):
  """A fresh clone's empty cache: a run that a results JSON records is taken from it, not
  trained; one it lacks, or whose arrays are needed, is trained."""
  from experiments import config as config_lib
  from experiments import fortunes, fortunes_sweeps

  sweep = config_lib.load(["--quick", "--rates=config"], default="minilm_fortunes",
                          own=fortunes_sweeps.OWN, own_quick=fortunes_sweeps.QUICK,
                          over=fortunes_sweeps.OVER, fixed=True, usage="")
  cfg = fortunes_sweeps.run_cfg(sweep, rank=2)
  settings = {k: cfg[k] for k in fortunes_sweeps._RUN_KEYS} | {"seed": 1}
  run = {"method": "lora", "seed": 1, "rank": 2, "test_acc": 0.625, "key": settings}
  (tmp_path / "fortunes_sweeps-rank.json").write_text(json.dumps({"rank": {"2": [run]}}))
  monkeypatch.setattr(fortunes_sweeps, "RECORDS", str(tmp_path))
  monkeypatch.setattr(fortunes_sweeps, "CACHE", str(tmp_path / "empty"))
  trained = []

  def train(task, cfg, seed, **kw):
    trained.append((cfg["rank"], seed))
    raise RuntimeError("trained")

  monkeypatch.setattr(fortunes, "task_from", lambda cfg: None)
  monkeypatch.setattr(fortunes, "train", train)
  got = fortunes_sweeps.cached_run(cfg, 1)
  assert {k: got[k] for k in run} == json.loads(json.dumps(run))
  assert got["recorded_in"].endswith("fortunes_sweeps-rank.json")
  (note,) = fortunes_sweeps._reused({2: [got]}, lambda r: f"r={r}")  # said under the table
  assert "fortunes_sweeps-rank.json" in note and "r=2 (seeds 1)" in note
  assert trained == []
  for seed, arrays in ((0, False), (1, True)):  # not recorded; recorded without its arrays
    with pytest.raises(RuntimeError, match="trained"):
      fortunes_sweeps.cached_run(cfg, seed, arrays=arrays)
  assert trained == [(2, 0), (2, 1)]


def test_fortunes_sweeps_rates_come_from_the_protocol_or_fail_clearly():
  proc = _run("experiments.fortunes_sweeps", "--rates=tuned", timeout=120)
  assert proc.returncode == 2 and "--rates: 'tuned'; valid: 'protocol', 'config'" in proc.stderr
  assert "Traceback" not in proc.stderr and "loading" not in proc.stdout


def test_fortunes_sweeps_take_the_rates_selected_at_their_own_budget(tmp_path, monkeypatch):
  """lora's final selection is at 300 steps; a 150-step sweep takes its 150-step rate."""
  from experiments import fortunes_sweeps, utils

  def sel(steps, lr, final):
    return {"steps": steps, "lr": lr, "final": final}

  summary = {"methods": {
      "lora": {"selection": sel(300, 5e-4, True), "other_budgets": [sel(150, 5e-3, False)]},
      "full": {"selection": sel(150, 1e-4, True), "other_budgets": [sel(300, 3e-5, False)]},
      "probe": {}}}
  (tmp_path / "protocol_fortunes.json").write_text(json.dumps(summary))
  monkeypatch.setattr(utils, "RESULTS_DIR", str(tmp_path))
  sweep = {"rates": "protocol", "quick": False, "steps": 150}
  assert fortunes_sweeps.protocol_rates(sweep) == {"lr": 5e-3, "full_lr": 1e-4}
  assert fortunes_sweeps.protocol_rates(dict(sweep, steps=300)) == {"lr": 5e-4, "full_lr": 3e-5}
  with pytest.raises(config.ConfigError, match=r"no rate selected at 600 steps .*"
                     r"'lora': \[150, 300\]"):
    fortunes_sweeps.protocol_rates(dict(sweep, steps=600))
  with pytest.raises(config.ConfigError, match=r"--methods=lora,full,probe` first \(every "
                     "method the summary holds"):  # the advice the protocol accepts
    fortunes_sweeps.protocol_rates(dict(sweep, steps=600))


def test_protocol_budget_is_enough_when_doubling_it_does_not_help(tmp_path, monkeypatch):
  """Two synthetic methods. lora's validation curve flattens at half of any budget, as
  under a cosine schedule: the in-run check passes at 150 steps, but 300 steps score
  higher, so 150 is not enough. full's curve is flat from step 100: 300 steps gain
  nothing, so its seeds run at 150."""
  from experiments import protocol
  trained = []

  def body(data, cfg, method, seed, lr):
    trained.append(lr)
    flat_from = cfg["steps"] // 2 if method == "lora" else 100
    curve = [{"step": t, "val_acc": 0.3 if lr > 1e-2 else 0.5 + lr * min(t, flat_from)}
             for t in range(25, cfg["steps"] + 1, 25)]
    return {"val_acc": curve[-1]["val_acc"], "test_acc": 0.0, "evals": curve, "losses": [],
            "trainable_params": 1, "total_params": 1}

  monkeypatch.setattr(protocol.Setup, "folder", lambda self, quick: str(tmp_path))
  grid = (1e-4, 2e-3, 1e-3, 5e-2)  # 5e-2: above the best and far behind it
  setup = dataclasses.replace(protocol.SETUPS["minilm_fortunes"], body=body,
                              grids={"lora": grid, "full": grid})
  cfg = {"quick": False, "steps": 150, "select_seed": 0, "plateau": 0.01, "doublings": 1,
         "doublings_for": (), "drop": 0.05, "extend": 2}
  short, long = protocol.select(setup, None, cfg, "lora")
  assert short["lr"] == long["lr"] == 2e-3 and (short["steps"], long["steps"]) == (150, 300)
  # the doubled grid drops the rate above the best that was far behind, not the one below
  assert short["grid"] == list(grid) and long["grid"] == [1e-4, 2e-3, 1e-3]
  # the first grid runs in its order; a doubled one nearest the selected rate first
  assert trained == [*grid, 2e-3, 1e-3, 1e-4]
  assert not long["edge"]
  assert short["budget"]["in_run_converged"] and short["budget"]["rule"] == "doubling"
  assert not short["budget"]["converged"] and not short["final"] and long["final"]
  assert abs(short["budget"]["doubling_gain"] - 2e-3 * 75) < 1e-9
  assert long["budget"]["rule"] == "in-run" and long["budget"]["doubling_gain"] is None
  # the table and the printed summary word each check alike, and say the weak one is weak
  assert protocol.verdict(setup, "lora", [short, long], 0) == (
      "not enough: 300 steps gained +15.00 points")
  assert protocol.verdict(setup, "lora", [short, long], 1) == (
      "not doubled; in-run check only: flat over its last third (best at step 150)")
  enough, doubled = protocol.select(setup, None, cfg, "full")
  assert enough["final"] and enough["budget"]["converged"] and not doubled["final"]
  assert enough["budget"]["doubling_gain"] == 0 and doubled["steps"] == 300
  assert len(os.listdir(tmp_path)) == 14  # (4 + 3 rates) x 2 methods
  for name in os.listdir(tmp_path):  # every run says where it ran: hosts differ in speed
    assert json.loads((tmp_path / name).read_text())["provenance"]["cpu_model"]
  for kept in (dict(cfg, doublings=0), dict(cfg, doublings_for=("lora:0",)),
               dict(cfg, doublings=3, doublings_for=("full:2", "lora:0"))):  # all cached
    (only,) = protocol.select(setup, None, kept, "lora")
    assert only["final"] and only["budget"]["rule"] == "in-run" and only["steps"] == 150
  assert len(os.listdir(tmp_path)) == 14
  at_300 = protocol.select(setup, None, dict(cfg, steps=300, doublings=3), "full")
  assert [(s["steps"], s["final"]) for s in at_300] == [(300, True), (600, False)]
  assert len(os.listdir(tmp_path)) == 18  # 5e-2 at 300 steps, then 3 rates at 600
  longer = protocol.select(setup, None, dict(cfg, doublings_for=("lora:2",)), "lora")
  assert [s["steps"] for s in longer] == [150, 300, 600]  # lora still gains at 600
  assert [s["final"] for s in longer] == [False, False, True]
  assert len(os.listdir(tmp_path)) == 21


def test_protocol_extends_a_grid_whose_best_rate_is_at_its_edge(tmp_path, monkeypatch):
  """Validation accuracy peaks at ``peak`` (in log rate). A grid whose best rate is its
  smallest (largest) runs the rate one step beyond, until the best is inside the grid
  or ``extend`` rates were added at that budget; a rate that a doubled grid dropped
  keeps the rates below it from counting as the upper edge."""
  from experiments import protocol
  trained, peak, folder = [], {}, [tmp_path]

  def body(data, cfg, method, seed, lr):
    trained.append((cfg["steps"], lr))
    acc = 0.8 - 0.2 * abs(math.log10(lr / peak[cfg["steps"]]))
    curve = [{"step": t, "val_acc": acc} for t in range(25, cfg["steps"] + 1, 25)]
    return {"val_acc": acc, "test_acc": 0.0, "evals": curve, "losses": [],
            "trainable_params": 1, "total_params": 1}

  def fresh(**peaks):  # a new run folder: the runs are keyed by settings, not by peak
    folder[0] = tmp_path / str(len(os.listdir(tmp_path)))
    folder[0].mkdir()
    peak.clear(), peak.update({int(k[1:]): v for k, v in peaks.items()}), trained.clear()

  monkeypatch.setattr(protocol.Setup, "folder", lambda self, quick: str(folder[0]))
  grid = (1e-3, 2e-3, 5e-3, 1e-2)
  setup = dataclasses.replace(protocol.SETUPS["minilm_fortunes"], body=body,
                              grids={"lora": grid})
  cfg = {"quick": False, "steps": 150, "select_seed": 0, "plateau": 0.01, "doublings": 0,
         "doublings_for": (), "drop": 0.05, "extend": 2}
  fresh(s150=4e-4)  # below the grid: 5e-4 wins, then 2e-4 loses to it
  (one,) = protocol.select(setup, None, cfg, "lora")
  assert trained == [(150, lr) for lr in (*grid, 5e-4, 2e-4)]
  assert one["grid"] == [2e-4, 5e-4, *grid] and one["extended"] == [5e-4, 2e-4]
  assert one["lr"] == 5e-4 and not one["edge"]
  assert protocol.verdict(setup, "lora", [one], 0).endswith(
      "flat over its last third (best at step 25); 5e-4, 2e-4 added beyond the grid's edge")
  (off,) = protocol.select(setup, None, dict(cfg, extend=0), "lora")  # the old protocol
  assert off["grid"] == list(grid) and off["extended"] == [] and off["lr"] == 1e-3
  assert off["edge"] and len(trained) == 6  # from the run files
  fresh(s150=1e-5)  # far below: two rates added, the best still the smallest
  (far,) = protocol.select(setup, None, cfg, "lora")
  assert far["lr"] == 2e-4 and far["edge"] and far["extended"] == [5e-4, 2e-4]
  assert protocol.verdict(setup, "lora", [far], 0).endswith(
      "; 5e-4, 2e-4 added beyond the grid's edge; chosen rate at the grid's edge")
  fresh(s150=3e-2, s300=3e-4)  # above the grid at 150 steps, below it at 300
  short, long = protocol.select(setup, None, dict(cfg, doublings=1, extend=1), "lora")
  assert trained[:5] == [(150, lr) for lr in (*grid, 2e-2)]
  assert short["extended"] == [2e-2] and short["lr"] == 2e-2 and short["edge"]
  assert long["grid"] == [5e-4, *grid, 2e-2] and long["extended"] == [5e-4]
  assert long["lr"] == 5e-4 and long["edge"] and trained[-1] == (300, 5e-4)
  fresh(s150=5e-3, s300=1e-1)  # 1e-2 far behind at 150: 5e-3 is the largest left at 300
  short, long = protocol.select(setup, None, dict(cfg, doublings=1), "lora")
  assert short["extended"] == [] and long["grid"] == [1e-3, 2e-3, 5e-3]
  assert long["lr"] == 5e-3 and long["extended"] == [] and not long["edge"]


def test_protocol_rejects_settings_it_would_not_key_its_runs_by():
  expected = {
      ("--quantize=nf4",): "--quantize=nf4: the protocol sets each method's base itself",
      ("--config=smollm2_mobydick", "--quantize=nf4"): "--quantize=nf4",
      ("--config=smollm2_mobydick", "--methods=lora,ia3"): "unknown ['ia3'] for smollm2_mobydick",
      ("--config=minilm",): "--config=minilm",
      ("--doublings_for=lora:2,bogus:1,full:x",):
          "--doublings_for: 'bogus:1' (unknown method 'bogus'), 'full:x' (N must be an integer",
      ("--doublings_for=lora:2,full:1,lora:0",): "--doublings_for: 'lora' given 2 times",
      ("--methods=lora",): "protocol_fortunes.json holds what this run would overwrite: "
                           "probe (not in --methods), full (not in --methods)",
      ("--config=smollm2_mobydick", "--methods=lora", "--select_only"):
          "full (not in --methods), lora's test_ppl over seeds (--select_only). Run every "
          "method it holds (--methods=lora,full",
      ("--summary=../elsewhere",): "--summary='../elsewhere': give a file name",
      ("--extend=-1", "--seeds=0", "--reference=bogus", "--rank=0"):  # one error for all
          "invalid settings:\n  --extend: must be >= 0, got -1\n  --seeds: must be >= 1, "
          "got 0\n  --reference: 'bogus' is not one of ['probe', 'lora', 'lora_all', 'qlora', "
          "'dora', 'ia3', 'full']\n  --rank: must be > 0, got 0"}
  for args, message in expected.items():
    proc = _run("experiments.protocol", *args, timeout=120)
    assert proc.returncode == 2, (args, proc.stderr)
    assert "Traceback" not in proc.stderr and "loading" not in proc.stdout, args
    assert message in proc.stderr, (args, proc.stderr)


def test_protocol_summary_goes_elsewhere_when_asked(tmp_path, monkeypatch):
  """``--summary=NAME`` writes beside the committed summary; a summary whose methods all
  run again is overwritten."""
  from experiments import protocol, utils
  monkeypatch.setattr(utils, "RESULTS_DIR", str(tmp_path))
  setup, cfg = protocol.SETUPS["smollm2_mobydick"], {
      "summary": "", "quick": False, "methods": ("lora",), "select_only": False}
  assert protocol.summary_path(setup, cfg) == str(tmp_path / "protocol_mobydick.json")
  (tmp_path / "protocol_mobydick.json").write_text(json.dumps(
      {"methods": {"lora": {"test_ppl": {"0": 70.0}}, "full": {}}}))
  with pytest.raises(config.ConfigError, match=r"full \(not in --methods\)\. Run every"):
    protocol.summary_path(setup, cfg)
  assert protocol.summary_path(setup, dict(cfg, methods=("full", "lora"))).endswith(
      "protocol_mobydick.json")
  assert protocol.summary_path(setup, dict(cfg, summary="protocol_mobydick_lora80")) == str(
      tmp_path / "protocol_mobydick_lora80.json")
  (tmp_path / "protocol_mobydick.json").write_text('{"methods": {"lora": ')
  with pytest.raises(config.ConfigError, match=r"protocol_mobydick.json: not a protocol "
                     r"summary \(JSONDecodeError: .*--summary=NAME"):
    protocol.summary_path(setup, dict(cfg, methods=("full", "lora")))


def test_data_parallel_takes_its_settings_like_every_script():
  proc = _run("experiments.data_parallel", "--steps=0", timeout=120)
  assert proc.returncode == 2 and "--steps: must be >= 1" in proc.stderr, proc.stderr
  proc = _run("experiments.data_parallel", "--config=x", timeout=120)
  assert proc.returncode == 2 and "takes no --config" in proc.stderr, proc.stderr


def test_methods_compare_quick(tmp_path):
  proc = _run("experiments.methods_compare", "--methods=lora,bogus", "--rank=0", timeout=120)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
  assert ("invalid settings:\n  --methods: unknown method 'bogus'; valid: ('lora', 'qlora', "
          "'ia3', 'dora')\n  --rank: must be > 0, got 0") in proc.stderr, proc.stderr  # one error
  out = _ok(_run("experiments.methods_compare", "--quick", "--seeds=1", f"--out_dir={tmp_path}"))
  for method in ("lora", "qlora", "ia3", "dora"):
    assert f"\n| {method} " in out, method
  assert "qlora - lora, paired over seeds [0]" in out, out
  with open(tmp_path / "methods_compare.json") as f:
    res = json.load(f)
  rows = res["rows"]
  assert res["smoke_test"]
  assert sorted(r["method"] for r in rows) == ["dora", "ia3", "lora", "qlora"]
  assert all(r["merged_max_abs_logit_diff"] < 1e-4 for r in rows)
  assert all({"date", "load_average_1_5_15"} <= set(r["provenance"]) for r in rows)
  paired = res["paired_vs_lora"]["qlora"]
  assert paired["diffs"] == [rows[[r["method"] for r in rows].index("qlora")]["test_acc"]
                             - rows[[r["method"] for r in rows].index("lora")]["test_acc"]]
  assert len(os.listdir(tmp_path / "methods")) == 4  # one cached run per method


def test_protocol_quick():
  """Issue 15's protocol: a rate per method chosen on validation, seeds at that rate,
  one committed JSON per run (here under runs/quick), curves drawn from them."""
  out = _ok(_run("experiments.protocol", "--quick", "--methods=probe,lora,full"))
  assert "SMOKE TEST" in out and "full - lora, paired" in out and "probe - lora" in out, out
  assert "lora - full, paired" in out and "probe - full, paired" in out  # every method vs full
  with open(os.path.join(REPO, "runs", "quick", "protocol_fortunes.json")) as f:
    res = json.load(f)
  probe = res["methods"]["probe"]["selection"]
  assert probe["budget"]["best_val_step"] > 0  # the probe has a validation curve too
  for method in ("probe", "lora", "full"):
    sel = res["methods"][method]["selection"]
    assert sel["grid"] == [1e-3, 1e-2] and sel["lr"] in sel["grid"]
    assert sel["val_acc"][sel["grid"].index(sel["lr"])] == max(sel["val_acc"])
    assert len(res["methods"][method]["test_acc"]) == 2
  runs = os.listdir(os.path.join(REPO, "runs", "quick", "protocol"))
  assert len(runs) >= 8  # 2 rates x 3 methods, and a second seed each (one may be shared)
  assert os.path.getsize(os.path.join(REPO, "runs", "quick", "protocol_fortunes.png")) > 10_000
  drawn = {f for m in res["methods"].values() for f in m["selection"]["runs"] + m["runs"]}
  assert res["plot"]["curves"] == len(drawn) >= 5
  with open(os.path.join(REPO, "runs", "quick", "protocol_fortunes.md")) as f:
    rows = f.read().splitlines()[2:]  # the RESULTS.md table, drawn from the JSON
  assert [r.split("|")[1].strip() for r in rows] == ["probe", "lora", "full"]  # no doubling
  lora = res["methods"]["lora"]
  cells = [c.strip() for c in rows[1].split("|")[1:-1]]
  chosen = f"**{lora['selection']['lr']:.0e}".replace("e-0", "e-")
  assert cells[3].count("**") == 2 and chosen in cells[3], cells
  assert cells[5] == f"**{100 * lora['mean']:.2f} ± {100 * lora['std']:.2f}**"
  p = lora["paired"]["full"]
  assert cells[8].startswith(f"{100 * p['mean']:+.2f}; ahead {p['ahead']}, behind "
                             f"{p['behind']} of 2"), cells


def test_protocol_quick_on_moby_dick():
  """The same protocol on SmolLM2: perplexity, lower is better, validation rows != test rows."""
  out = _ok(_run("experiments.protocol", "--quick", "--config=smollm2_mobydick"))
  assert "full - lora, paired" in out and "val_ppl by rate" in out, out
  with open(os.path.join(REPO, "runs", "quick", "protocol_mobydick.json")) as f:
    res = json.load(f)
  lora, full = res["methods"]["lora"], res["methods"]["full"]
  sel = lora["selection"]
  assert sel["val_ppl"][sel["grid"].index(sel["lr"])] == min(sel["val_ppl"])  # lower wins
  p = full["paired"]["lora"]
  better = sum(full["test_ppl"][s] < lora["test_ppl"][s] for s in full["test_ppl"])
  assert p["ahead"] == better and p["ahead"] + p["behind"] == 2
  runs = []
  for name in lora["runs"]:
    with open(os.path.join(REPO, "runs", "quick", "protocol_mobydick", name)) as f:
      runs.append(json.load(f))
  assert all(r["val_ppl"] != r["test_ppl"] for r in runs)  # two different sets of rows
  assert all(len(r["evals"]) == 2 for r in runs)  # every step: 2 of 2 (--quick)


def test_mobydick_lm_quick():
  """Also the main job's second config (finetune.run_mobydick), on 2 layers."""
  out = _ok(_run("experiments.mobydick_lm", "--quick", "--fresh", "--progress=false"))
  assert "merge check" in out and "full fine-tuning" in out and "before:" in out
  assert "base SmolLM2-135M" not in out and "truncated to 2 of 30 layers" in out
  with open(os.path.join(REPO, "runs", "quick", "mobydick_lm.json")) as f:
    res = json.load(f)
  assert res["smoke_test"]
  assert res["full"]["trainable_params"] > 100 * res["lora"]["trainable_params"]
