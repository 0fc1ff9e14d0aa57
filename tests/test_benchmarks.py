"""Smoke tests of the benchmark scripts (``--quick``): they run and write what
BENCHMARKS.md reads. Their numbers mean nothing here; the figures come from
full runs on an idle machine."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_decode_benchmark_quick(tmp_path):
  path = tmp_path / "decode.json"
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.decode", "--quick", "--ks", "16", "--paths",
       "gather,grouped", f"--json={path}"], cwd=REPO, capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(path.read_text())
  assert out["cpu_model"] and out["versions"]["jax"] and out["load_average_1_5_15"]
  assert out["command"].endswith("--paths gather,grouped --json=" + str(path))
  (k16,) = out["results"]
  assert k16["K"] == 16 and set(k16["median_ms"]) == {"merged", "unmerged", "gather", "grouped",
                                                       "grouped_capacity"}
  assert k16["capacity"] == 1  # 16 sequences on 16 adapters
  assert k16["max_abs_logit_between_paths"] < 1e-3  # the paths agree
  ratios = k16["over_merged_tokens_per_s"]
  assert k16["auto"] == "grouped" and ratios["auto"] == ratios["grouped"]
  # The grouped path reads the bank in place: no per-example copies of the adapters.
  temps = {k: v["temp_bytes"] for k, v in k16["compiled"].items()}
  assert temps["grouped"] < temps["gather"]
  bad = subprocess.run([sys.executable, "-m", "benchmarks.decode", "--paths", "ragged"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and "--paths: unknown ['ragged']" in bad.stderr


def test_explicit_loss_equals_the_standard_one_in_value_and_gradient():
  """``--loss explicit`` profiles the same cross-entropy: value and gradient match."""
  import jax
  import jax.numpy as jnp

  from benchmarks import model
  logits = 3.0 * jax.random.normal(jax.random.key(0), (2, 5, 7))
  tokens = jax.random.randint(jax.random.key(1), (2, 5), 0, 7)
  want, want_grad = jax.value_and_grad(model.next_token_loss)(logits, tokens)
  got, grad = jax.value_and_grad(model.next_token_loss_explicit)(logits, tokens)
  assert jnp.allclose(got, want, rtol=1e-6) and jnp.allclose(grad, want_grad, atol=1e-7)
  assert not jnp.any(grad[:, -1])  # the last position predicts nothing


def test_profile_step_peak_quick_with_either_loss(tmp_path):
  for loss in ("standard", "explicit"):
    path = tmp_path / f"peak_{loss}.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.profile_step", "--quick", "--peak", "--loss", loss,
         f"--json={path}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(path.read_text())
    assert out["loss"] == loss and set(out["steps"]) == {"full", "jlora"}
    assert all(s["temp"] > 0 and s["by_shape"] for s in out["steps"].values())


def test_profile_step_times_forwards_and_groups_dots_by_shape():
  """A forward profiles like a step; ``--by_shape`` lists the rank-8 up-projections
  (contracted size 8) apart from the dense dots, and an unknown name is one error."""
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.profile_step", "--quick", "--steps", "base,unmerged",
       "--by_shape", "--traced", "1"], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  base, unmerged = proc.stdout.split("### unmerged:")
  assert "| dot rank-r | 0 |" in base and "| dot rank-r | 128 x 64, 8 |" in unmerged
  assert "| dot dense | 128 x 64, 64 |" in base
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.profile_step", "--quick", "--steps", "base,unmerge"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2 and "--steps: unknown ['unmerge']; choose from full, " in (
      proc.stderr)


def test_reference_benchmark_measures_the_donated_steps_memory(tmp_path):
  """The train steps' memory as a training loop compiles them (state donated), beside the
  undonated one: a donated step writes its new state into its inputs' buffers."""
  path = tmp_path / "reference.json"
  proc = subprocess.run([sys.executable, "-m", "benchmarks.reference", "--quick", "--no-time",
                         f"--json={path}"], cwd=REPO, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(path.read_text())
  for name in ("full", "jlora"):
    donated, plain = out["donated"][name], out["stats"][name]
    assert donated["donated"] == [0, 1] and plain["donated"] == []
    assert plain["alias"] == 0  # all but the loss and a few bytes of output go in place:
    assert 0.99 * donated["output"] < donated["alias"] <= donated["output"]
    assert donated["footprint"] == (donated["argument"] + donated["output"] + donated["temp"]
                                    - donated["alias"])
    assert donated["flops"] == plain["flops"]
  measures = {c["measure"].split(",")[0] + ("/donated" if "donated (" in c["measure"] else "")
              for c in out["checks"]}
  assert "train-step temporaries jlora / full/donated" in measures
  assert "train-step footprint jlora / full" in measures


def test_xla_flags_runs_each_set_in_its_own_process(tmp_path):
  """Each flag set reaches its own `benchmarks.reference` process (its provenance records
  the flags), and the sets are compared with the default one's medians."""
  path = tmp_path / "flags.json"
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.xla_flags", "--quick", "--passes=1",
       "--sets=default,eigen_one_thread", f"--json={path}"], cwd=REPO, capture_output=True,
      text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(path.read_text())
  assert out["command"].endswith(f"--sets=default,eigen_one_thread --json={path}")
  assert set(out["sets"]) == {"default", "eigen_one_thread"}
  one = out["sets"]["eigen_one_thread"]
  assert one["flags"] == "--xla_cpu_multi_thread_eigen=false"
  assert one["recorded_xla_flags"][0].endswith("--xla_cpu_multi_thread_eigen=false")
  assert not out["sets"]["default"]["recorded_xla_flags"][0].endswith("eigen=false")
  assert out["sets"]["default"]["median_over_default"] == {
      n: 1.0 for n in ("full", "jlora", "base", "unmerged")}
  for n, flops in out["sets"]["default"]["flops"].items():  # the same arithmetic, up to
    assert abs(one["flops"][n] / flops - 1) < 0.01  # the compiler's choice of fusions
  bad = subprocess.run([sys.executable, "-m", "benchmarks.xla_flags", "--sets=fast_math"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and "--sets: unknown ['fast_math']" in bad.stderr
  both = subprocess.run([sys.executable, "-m", "benchmarks.xla_flags", "--sets=xnn_dot",
                         "--passes=0"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert both.returncode == 2 and "unknown" not in both.stderr
  assert "--sets: add default" in both.stderr and "--passes: at least 1 (got 0)" in both.stderr
