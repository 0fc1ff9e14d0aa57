"""The train step on 8 simulated devices and across 2 processes.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` only takes effect
before JAX starts, so these checks run ``tests/train_child.py`` in fresh
subprocesses and compare what they write.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import jlora
import train_case as tc

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CHILD = os.path.join(HERE, "train_child.py")
TIMEOUT = 420
# Children that run the same programs (the kill-and-resume runs) share XLA's
# persistent compilation cache: a cached executable is the one a fresh
# compile would produce, only sooner.
_CACHE = tempfile.mkdtemp(prefix="jlora-test-xla-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


def child_env(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={devices}").strip()
  env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")])
  env.setdefault("JAX_PLATFORMS", "cpu")
  env.update(JAX_COMPILATION_CACHE_DIR=_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def run_child(*args: str, devices: int = 8) -> None:
  proc = subprocess.run([sys.executable, CHILD, *args], env=child_env(devices), cwd=ROOT,
                        capture_output=True, text=True, timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def reference(steps: int = 3):
  """Single-device ``jit`` steps in this process: (adapters by path, losses)."""
  params = tc.lorified()
  trainer = jlora.train_step(tc.loss_fn, tc.optimizer(), params)
  state, frozen = trainer.init(params)
  losses = []
  for i in range(steps):
    state, metrics = trainer.step(state, frozen, tc.batch(i))
    losses.append(float(metrics["loss"]))
  return tc.flat(state.adapters), losses


def assert_same(adapters: dict, ref: dict) -> None:
  assert sorted(adapters) == sorted(ref)
  for k in ref:
    np.testing.assert_allclose(adapters[k], ref[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_pmap_and_mesh_forms_match_one_device(tmp_path):
  run_child("equivalence", "--out", str(tmp_path))
  results = json.loads((tmp_path / "results.json").read_text())
  ref_adapters, ref_losses = reference()
  for form in ("jit", "pmap", "mesh", "fsdp", "fsdp_acc2"):
    np.testing.assert_allclose(results[form]["losses"], ref_losses, rtol=1e-5, err_msg=form)
    assert results[form]["dtypes"] == ["float32"]
    with np.load(tmp_path / f"{form}.npz") as f:
      assert_same(dict(f), ref_adapters)
  # FSDP: each device holds and receives 1/8 of the frozen weights.
  mem = results["memory"]
  ratio = mem["fsdp"]["frozen_argument_bytes"] / mem["replicated"]["frozen_argument_bytes"]
  assert mem["replicated"]["frozen_argument_bytes"] == mem["replicated"]["frozen_total_bytes"]
  assert ratio == pytest.approx(1 / 8, rel=0.05), mem
  assert mem["fsdp"]["frozen_held_bytes"] * 8 == pytest.approx(
      mem["fsdp"]["frozen_total_bytes"], rel=0.05)


def test_qlora_on_an_fsdp_mesh_matches_one_device(tmp_path):
  """An NF4 base on 8 devices: each holds about 1/8 of the packed base, the
  step matches one device's, and the codes come back bit-identical."""
  run_child("quantized", "--out", str(tmp_path))
  results = json.loads((tmp_path / "results.json").read_text())
  jit, fsdp = results["jit"], results["fsdp"]
  np.testing.assert_allclose(fsdp["losses"], jit["losses"], rtol=1e-5)
  with np.load(tmp_path / "jit.npz") as a, np.load(tmp_path / "fsdp.npz") as b:
    assert_same(dict(b), dict(a))
  assert fsdp["codes_unchanged"] and jit["codes_unchanged"]
  assert fsdp["quantized"] == jit["quantized"] == 3  # embed, up, down stay Quantized
  assert jit["sharded_leaves"] == 0 and fsdp["sharded_leaves"] >= 3
  assert fsdp["frozen_total_bytes"] == jit["frozen_total_bytes"]
  assert fsdp["frozen_held_bytes"] < 0.3 * jit["frozen_held_bytes"], results


def test_checkpoint_restores_onto_other_meshes(tmp_path):
  run_child("reshard", "--out", str(tmp_path))
  results = json.loads((tmp_path / "results.json").read_text())
  for target, devices in (("mesh4", 4), ("jit1", 1)):
    got = results[target]
    assert got["devices"] == devices
    assert got["data"] == {"next": 2}
    assert got["equal"] == results["keys"]  # every leaf bit-identical
    assert got["loss"] == pytest.approx(results["loss8"], rel=1e-5)
    assert got["max_adapter_diff"] < 1e-6


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  port = str(_free_port())
  procs = [subprocess.Popen(
      [sys.executable, CHILD, "multiprocess", "--out", str(tmp_path), "--pid", str(i),
       "--nproc", "2", "--port", port], env=child_env(2), cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=TIMEOUT)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-4000:]
  ref_adapters, ref_losses = reference()
  # B starts at zero: nonzero B means the compared steps did train.
  assert all(np.abs(v).max() > 1e-4 for k, v in ref_adapters.items() if "lora_b" in k)
  for i in range(2):
    info = json.loads((tmp_path / f"process{i}.json").read_text())
    assert (info["devices"], info["local_devices"]) == (4, 2)
    np.testing.assert_allclose(info["losses"], ref_losses, rtol=1e-5)
    with np.load(tmp_path / f"process{i}.npz") as f:
      assert_same(dict(f), ref_adapters)


def test_bad_calls_of_the_mesh_and_pmap_forms(tmp_path):
  """On 2 devices: batches the device count does not divide, a batch not
  placed for pmap, and a frozen half from another FSDP mesh are one
  LoraError each, naming the leaf and the fix; no JAX sharding error."""
  run_child("errors", "--out", str(tmp_path), devices=2)
  results = json.loads((tmp_path / "errors.json").read_text())
  assert {r["type"] for r in results.values()} == {"LoraError"}, results
  assert "multiple of 2" in results["mesh_shard_odd"]["message"]
  assert "batch['tokens']: shape (3, " in results["mesh_step_odd"]["message"]
  assert "multiple of 2" in results["mesh_step_odd"]["message"]
  assert "multiple of 2" in results["pmap_shard_odd"]["message"]
  assert "expected a leading axis of 2" in results["pmap_step_unsharded"]["message"]
  assert "trainer.shard_batch" in results["pmap_step_unsharded"]["message"]
  other = results["fsdp_other_mesh"]["message"]
  assert "placed for another mesh" in other and "{'data': 2}" in other
