"""Adapter files and training checkpoints: exact round trips, exact resume
after SIGKILL, and loud failure on truncated, corrupted or mismatched files."""

from __future__ import annotations

import gc
import json
import os
import random
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import train_case as tc
from test_train_scale import CHILD, ROOT, TIMEOUT, child_env


def _files(path) -> dict[str, int]:
  out = {}
  for root, _, names in os.walk(path):
    for n in names:
      p = os.path.join(root, n)
      out[os.path.relpath(p, path)] = os.path.getsize(p)
  return out


def _data_files(path) -> list[str]:
  """The array data files (OCDBT chunks) of an orbax checkpoint, as full paths.

  Damage goes to all of them: which chunk holds which array is orbax's
  business, and some are not read back at all."""
  data = [os.path.join(path, p) for p in _files(path)
          if "/d/" in p and p.startswith("arrays")]
  assert data, _files(path)
  return data


# -- adapters --------------------------------------------------------------------

@pytest.fixture(scope="module")
def big():
  """A base whose frozen weights dwarf its adapters, with a fully-trained head."""
  base = {"params": {"body": {"kernel": jax.random.normal(jax.random.key(0), (256, 256)),
                              "bias": jnp.zeros(256)},
                     "head": {"kernel": jnp.ones((256, 4)), "bias": jnp.zeros(4)}}}
  params = jlora.lorify(base, 4, key=jax.random.key(1), alpha=16, targets=("body",),
                        trainable=("head",))
  params["params"]["body"]["lora_b"] = jnp.full((4, 256), 0.5)
  return base, params


def test_adapters_round_trip_exactly_without_frozen_weights(tmp_path, big):
  base, params = big
  path = tmp_path / "adapters"
  jlora.save_adapters(params, path)
  loaded = jlora.load_adapters(base, path)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  assert loaded["params"]["body"]["lora"] == params["params"]["body"]["lora"]
  assert loaded["params"]["body"]["lora"].alpha == 16
  assert jlora.trainable_mask(loaded) == jlora.trainable_mask(params)
  # Only the adapters and the fully-trained head are on disk.
  record = json.loads((path / "jlora" / "metadata").read_text())
  assert [jlora._tree.path_str(a["path"]) for a in record["arrays"]] == [
      "params/body/lora_a", "params/body/lora_b", "params/head/bias", "params/head/kernel"]
  assert record["methods"][0]["fields"]["rank"] == 4
  assert {jlora._tree.path_str(p) for p, _, _ in record["base"]} == {
      "params/body/kernel", "params/body/bias", "params/head/kernel", "params/head/bias"}
  stored = sum(_files(path).values())
  frozen = params["params"]["body"]["kernel"].nbytes
  adapters = sum(x.nbytes for x in jax.tree.leaves(jlora.partition(params)[0]))
  assert stored < adapters + 20_000 < frozen  # 4 arrays + small metadata files


def test_loading_onto_another_base_names_the_paths(tmp_path, big):
  base, params = big
  jlora.save_adapters(params, tmp_path / "a")
  other = jax.tree.map(lambda x: x, base)
  other["params"]["body"] = {"kernel": jnp.ones((128, 256)), "bias": jnp.zeros(256)}
  other["params"]["extra"] = {"kernel": jnp.ones((2, 2))}
  other["params"]["head"]["kernel"] = other["params"]["head"]["kernel"].astype(jnp.bfloat16)
  with pytest.raises(jlora.LoraError) as e:
    jlora.load_adapters(other, tmp_path / "a")
  text = str(e.value)
  assert "different base tree" in text
  assert "params/body/kernel: saved base has shape (256, 256) float32, given base has " \
         "(128, 256) float32" in text
  assert "params/head/kernel" in text and "bfloat16" in text
  assert "params/extra/kernel: in the given base but not in the saved base" in text
  with pytest.raises(jlora.LoraError, match="without adapters"):
    jlora.load_adapters(params, tmp_path / "a")


def test_save_refuses_to_overwrite(tmp_path, big):
  _, params = big
  jlora.save_adapters(params, tmp_path / "a")
  with pytest.raises(jlora.LoraError, match="force=True"):
    jlora.save_adapters(params, tmp_path / "a")
  jlora.save_adapters(params, tmp_path / "a", force=True)
  with pytest.raises(jlora.LoraError, match="lorify"):
    jlora.save_adapters(big[0], tmp_path / "b")


def _corrupt(path: str) -> None:
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    for i in range(len(data) // 2, len(data), 7):
      data[i] ^= 0xFF
    f.seek(0)
    f.write(data)


# When one array fails to read, orbax abandons the reads of the others as
# coroutines that raise when they are collected: that noise is orbax's, and
# each test below collects it (gc.collect) before it ends.
orbax_noise = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@orbax_noise
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "record", "missing"])
def test_damaged_adapter_files_fail_loudly(tmp_path, big, damage):
  base, params = big
  path = tmp_path / "a"
  jlora.save_adapters(params, path)
  if damage == "flip":
    for p in _data_files(path):
      _corrupt(p)
  elif damage == "truncate":
    for p in _data_files(path):
      os.truncate(p, os.path.getsize(p) // 2)
  elif damage == "delete":
    for p in _data_files(path):
      os.remove(p)
  elif damage == "record":
    meta = path / "jlora" / "metadata"
    meta.write_text(meta.read_text().replace('"rank": 4', '"rank": 2'))
  else:
    path = tmp_path / "nothing-here"
  with pytest.raises(jlora.LoraError) as e:
    jlora.load_adapters(base, path)
  gc.collect()
  text = str(e.value)
  assert str(path) in text
  assert "save the adapters again" in text or "not a complete" in text


@orbax_noise
def test_no_damaged_file_loads_wrong_values(tmp_path, big):
  """Truncating or corrupting any one file of the checkpoint either raises
  LoraError or (for files orbax does not read back) loads the exact values."""
  base, params = big
  jlora.save_adapters(params, tmp_path / "good")
  outcomes = {}
  for rel in sorted(_files(tmp_path / "good")):
    for mode in ("truncate", "flip"):
      bad = tmp_path / "bad"
      shutil.rmtree(bad, ignore_errors=True)
      shutil.copytree(tmp_path / "good", bad)
      if mode == "truncate":
        os.truncate(bad / rel, os.path.getsize(bad / rel) // 2)
      else:
        _corrupt(bad / rel)
      try:
        loaded = jlora.load_adapters(base, bad)
      except jlora.LoraError:
        outcomes[rel, mode] = "error"
        continue
      for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b, err_msg=f"{rel} {mode}")
      outcomes[rel, mode] = "exact"
  gc.collect()
  assert outcomes["jlora/metadata", "flip"] == "error"
  assert outcomes["arrays/manifest.ocdbt", "truncate"] == "error"
  assert list(outcomes.values()).count("error") >= 6, outcomes


# -- training state ----------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """Checkpoints at steps 2 and 4 of a small run."""
  directory = str(tmp_path_factory.mktemp("ckpt"))
  params = tc.lorified()
  trainer = jlora.train_step(tc.loss_fn, tc.optimizer(), params)
  state, frozen = trainer.init(params, key=jax.random.key(5))
  with jlora.Checkpoints(directory, every=2, keep=2) as ckpts:
    for i in range(4):
      state, _ = trainer.step(state, frozen, tc.batch(i))
      ckpts.save(state, data={"next_batch": i + 1})
  return directory, params, trainer, tc.flat(state)


def test_state_round_trip_is_exact(trained):
  directory, params, trainer, final = trained
  like, _ = trainer.init(params, key=jax.random.key(0))
  with jlora.Checkpoints(directory) as ckpts:
    assert ckpts.all_steps() == [2, 4]
    state, data = ckpts.restore(like)
  assert data == {"next_batch": 4}
  got = tc.flat(state)
  assert sorted(got) == sorted(final)
  for k in final:
    np.testing.assert_array_equal(got[k], final[k], err_msg=k)
  assert jnp.issubdtype(state.key.dtype, jax.dtypes.prng_key)


def test_state_holds_no_frozen_weights(trained):
  directory, params, _, _ = trained
  frozen = sum(x.nbytes for x in jax.tree.leaves(jlora.partition(params)[1]))
  with open(os.path.join(directory, "4", "jlora", "metadata")) as f:
    record = json.load(f)
  paths = [e["path"] for e in record["leaves"]]
  assert not any("kernel" in p or "embedding" in p or "bias" in p for p in paths
                 if ".adapters" in p), paths
  stored = sum(_files(os.path.join(directory, "4")).values())
  assert stored < frozen


def test_restore_onto_another_model_names_the_leaves(trained):
  directory, _, _, _ = trained
  params = tc.lorified(rank=2)
  trainer = jlora.train_step(tc.loss_fn, tc.optimizer(), params)
  like, _ = trainer.init(params, key=jax.random.key(0))
  with jlora.Checkpoints(directory) as ckpts:
    with pytest.raises(jlora.LoraError) as e:
      ckpts.restore(like)
  text = str(e.value)
  assert "written for another state" in text
  assert ".adapters['params']['up']['lora_a']: checkpoint has shape (32, 4)" in text


def test_restore_without_key_is_a_mismatch(trained):
  directory, params, trainer, _ = trained
  like, _ = trainer.init(params)  # no key: one leaf fewer
  with jlora.Checkpoints(directory) as ckpts, pytest.raises(jlora.LoraError, match=r"\.key"):
    ckpts.restore(like)
  # The message names the cause (the key), not "another model".
  with jlora.Checkpoints(directory) as ckpts, pytest.raises(
      jlora.LoraError, match="differ only in the PRNG key, which only the checkpoint holds"):
    ckpts.restore(like)


@orbax_noise
@pytest.mark.parametrize("damage", ["flip", "truncate", "record"])
def test_damaged_state_fails_loudly_and_names_the_previous_step(tmp_path, trained, damage):
  directory, params, trainer, _ = trained
  copy = tmp_path / "ckpt"
  shutil.copytree(directory, copy)
  step_dir = os.path.join(copy, "4")
  if damage == "flip":
    for p in _data_files(step_dir):
      _corrupt(p)
  elif damage == "truncate":
    for p in _data_files(step_dir):
      os.truncate(p, os.path.getsize(p) // 3)
  else:
    meta = os.path.join(step_dir, "jlora", "metadata")
    with open(meta) as f:
      text = f.read()
    with open(meta, "w") as f:
      f.write(text.replace('"next_batch": 4', '"next_batch": 40'))
  like, _ = trainer.init(params, key=jax.random.key(0))
  with jlora.Checkpoints(copy) as ckpts:
    with pytest.raises(jlora.LoraError) as e:
      ckpts.restore(like)
    gc.collect()
    assert step_dir in str(e.value)
    assert "pass step=2" in str(e.value)
    state, data = ckpts.restore(like, step=2)  # the earlier one is intact
  assert int(state.step) == 2 and data == {"next_batch": 2}


def test_bad_checkpoint_options(tmp_path):
  with pytest.raises(jlora.LoraError, match="2 problems"):
    jlora.Checkpoints(tmp_path, every=0, keep=-1)
  with jlora.Checkpoints(tmp_path / "empty") as ckpts:
    assert ckpts.latest_step() is None
    with pytest.raises(jlora.LoraError, match="nothing to restore"):
      ckpts.restore(None)


# -- SIGKILL and resume --------------------------------------------------------------

STEPS, EVERY = 10, 3


def _train(out, *, kill_after: int | None = None, crash_at: int | None = None) -> list[str]:
  """Runs the training child; with ``kill_after``, SIGKILLs it once it has
  printed ``step kill_after``. Returns its output lines."""
  args = [sys.executable, CHILD, "train", "--out", str(out), "--steps", str(STEPS),
          "--every", str(EVERY)]
  if crash_at is not None:
    args += ["--crash-at", str(crash_at)]
  lines = []
  with subprocess.Popen(args, env=child_env(1), cwd=ROOT, stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL, text=True) as proc:
    try:
      for line in proc.stdout:
        lines.append(line.strip())
        if kill_after is not None and line.strip() == f"step {kill_after}":
          proc.send_signal(signal.SIGKILL)
          break
      proc.wait(timeout=TIMEOUT)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  expected = -signal.SIGKILL if (kill_after or crash_at) else 0
  assert proc.returncode == expected, lines
  return lines


def _final(out) -> dict:
  with np.load(os.path.join(out, "final.npz")) as f:
    return dict(f)


def test_sigkill_and_crash_mid_save_then_resume_is_bit_identical(tmp_path):
  """Uninterrupted run vs. one SIGKILLed at a random step, resumed, killed again
  while orbax commits the save of step 9, and resumed to the end."""
  _train(tmp_path / "ref")
  reference = _final(tmp_path / "ref")
  kill_after = random.Random(os.environ.get("JLORA_KILL_SEED", "0")).randint(1, 7)
  run = tmp_path / "run"
  _train(run, kill_after=kill_after)
  # Orbax always saves a run's first step, and save(9) first waits for the
  # save of step 6 to finish: so checkpoint 6 is complete when 9's crashes.
  lines = _train(run, crash_at=9)
  assert "crashing in save 9" in lines
  ckdir = run / "ckpt"
  assert any(n.startswith("9.") and "tmp" in n for n in os.listdir(ckdir)), os.listdir(ckdir)
  with jlora.Checkpoints(ckdir) as ckpts:
    assert ckpts.latest_step() == 6
  lines = _train(run)
  assert "resumed 6" in lines
  got = _final(run)
  assert sorted(got) == sorted(reference)
  for k in reference:
    assert got[k].tobytes() == reference[k].tobytes(), (k, kill_after)


# -- failed and killed saves of adapters ----------------------------------------------

def _lora_b(path) -> np.ndarray:
  base = {"params": {"dense": {"kernel": jnp.ones((64, 64)), "bias": jnp.zeros(64)}}}
  return np.asarray(jlora.load_adapters(base, path)["params"]["dense"]["lora_b"])


def _save_child(out, *, hang: str | None = None, kill_after: float | None = None):
  """Runs the saving child and SIGKILLs it when it prints ``hanging`` (or
  ``kill_after`` seconds after its first save). Returns its output lines."""
  args = [sys.executable, CHILD, "save", "--out", str(out)]
  if hang:
    args += ["--hang", hang]
  lines = []
  with subprocess.Popen(args, env=child_env(1), cwd=ROOT, stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL, text=True) as proc:
    try:
      for line in proc.stdout:
        lines.append(line.strip())
        if line.strip() == "hanging":
          break
        if kill_after is not None and line.strip() == "saved 0":
          import time
          time.sleep(kill_after)
          break
      proc.send_signal(signal.SIGKILL)
      proc.wait(timeout=TIMEOUT)
      lines += [line.strip() for line in proc.stdout]  # printed before the kill
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  assert proc.returncode == -signal.SIGKILL, lines
  return lines


@pytest.mark.parametrize("hang", ["write", "swap"])
def test_sigkill_mid_save_keeps_the_previous_adapters(tmp_path, hang):
  """Killed while the new files are half written, the previous adapters load
  bit-identically; killed between the two renames of the fallback swap, the
  loader names where the complete previous adapters are."""
  lines = _save_child(tmp_path, hang=hang)
  assert lines[:2] == ["saved 0", "hanging"], lines
  previous = np.load(tmp_path / "v0.npy")
  if hang == "write":
    assert _lora_b(tmp_path / "adapters").tobytes() == previous.tobytes()
    assert any(".jlora-tmp-" in n for n in os.listdir(tmp_path))  # what the kill left
    base = {"params": {"dense": {"kernel": jnp.ones((64, 64)), "bias": jnp.zeros(64)}}}
    jlora.save_adapters(jlora.lorify(base, 4, key=jax.random.key(0)),
                        tmp_path / "adapters", force=True)
    assert sorted(os.listdir(tmp_path)) == ["adapters", "v0.npy"]  # cleaned up
    return
  assert not os.path.exists(tmp_path / "adapters")
  with pytest.raises(jlora.LoraError, match="interrupted") as e:
    _lora_b(tmp_path / "adapters")
  left = {p.rstrip(":") for p in str(e.value).split() if p.endswith(os.sep + "old:")}
  assert len(left) == 1 and "the adapters it was replacing" in str(e.value), str(e.value)
  left = left.pop()
  assert _lora_b(left).tobytes() == previous.tobytes()


def test_sigkill_at_a_random_moment_leaves_complete_adapters(tmp_path):
  """Saves replace each other until SIGKILL: what is there is one complete
  save, bit for bit (the last one announced, or the one after it)."""
  delay = random.Random(os.environ.get("JLORA_KILL_SEED", "0")).uniform(0.05, 1.0)
  lines = _save_child(tmp_path, kill_after=delay)
  last = max(int(l.split()[1]) for l in lines if l.startswith("saved"))
  got = _lora_b(tmp_path / "adapters")
  assert got.tobytes() in {np.full((4, 64), float(i + 1), np.float32).tobytes()
                           for i in (last, last + 1)}, (last, got[0, 0])


class _Full(Exception):
  pass


@pytest.mark.parametrize("where", ["writer", "finalize", "swap"])
def test_failing_save_keeps_the_previous_adapters(tmp_path, big, monkeypatch, where):
  """A disk that fills up while orbax commits the new files, or a rename
  that fails in the swap: a LoraError naming the directory, and the previous
  adapters load bit-identically."""
  import errno
  from orbax.checkpoint._src.path import atomicity
  from jlora._checkpoint import atomic
  base, params = big
  path = tmp_path / "a"
  jlora.save_adapters(params, path)
  before = jlora.load_adapters(base, path)
  changed = jax.tree.map(lambda x: x, params)
  changed["params"]["body"]["lora_b"] = jnp.full((4, 256), 2.0)
  if where == "writer":  # the arrays written, then the disk fills up
    from jlora._checkpoint import adapters
    real = adapters.write

    def write(directory, items, record):
      real(directory, items, record)
      os.remove(os.path.join(directory, "jlora", "metadata"))
      raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(adapters, "write", write)
  elif where == "finalize":
    async def full(self, *a, **k):
      raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", full)
  else:
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real = os.rename

    def rename(src, dst):
      if not dst.endswith(os.sep + "old"):
        raise OSError(errno.ENOSPC, "No space left on device")
      real(src, dst)
    monkeypatch.setattr(atomic.os, "rename", rename)
  with pytest.raises(jlora.LoraError, match="No space left") as e:
    jlora.save_adapters(changed, path, force=True)
  assert str(path) in str(e.value) and "intact" in str(e.value)
  monkeypatch.undo()
  after = jlora.load_adapters(base, path)
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  assert os.listdir(tmp_path) == ["a"]  # no temporary directory left behind
  jlora.save_adapters(changed, path, force=True)  # and the next save works
  np.testing.assert_array_equal(
      jlora.load_adapters(base, path)["params"]["body"]["lora_b"], 2.0)


def test_force_replaces_only_adapters(tmp_path, big):
  _, params = big
  (tmp_path / "file").write_text("keep me")
  (tmp_path / "dir").mkdir()
  (tmp_path / "dir" / "notes.txt").write_text("keep me")
  for name, what in (("file", "is a file"), ("dir", "notes.txt")):
    with pytest.raises(jlora.LoraError, match="replaces only a jlora adapter") as e:
      jlora.save_adapters(params, tmp_path / name, force=True)
    assert what in str(e.value) and str(tmp_path / name) in str(e.value)
  assert (tmp_path / "file").read_text() == "keep me"
  assert (tmp_path / "dir" / "notes.txt").read_text() == "keep me"
  (tmp_path / "empty").mkdir()
  jlora.save_adapters(params, tmp_path / "empty", force=True)  # nothing to lose


@pytest.fixture(scope="module")
def one_step():
  """A state after one step of a small run."""
  params = tc.lorified()
  trainer = jlora.train_step(tc.loss_fn, tc.optimizer(), params, donate=False)
  state, frozen = trainer.init(params, key=jax.random.key(5))
  state, _ = trainer.step(state, frozen, tc.batch(0))
  return trainer, state


def test_restore_checks_the_recorded_step(tmp_path, one_step):
  _, state = one_step
  with jlora.Checkpoints(tmp_path, every=1) as ckpts:
    ckpts.save(state, force=True)
  step = int(state.step)
  os.rename(tmp_path / str(step), tmp_path / str(step + 5))
  with jlora.Checkpoints(tmp_path) as ckpts:
    with pytest.raises(jlora.LoraError, match="renamed or copied") as e:
      ckpts.restore(state)
  assert f"records step {step}, its directory says {step + 5}" in str(e.value)


def test_disk_full_during_a_training_save(tmp_path, one_step, monkeypatch):
  """Orbax writes asynchronously: the failure surfaces at the next wait or
  save, as a LoraError naming the directory; the previous step restores."""
  import errno
  from orbax.checkpoint._src.path import atomicity
  _, state = one_step
  ckpts = jlora.Checkpoints(tmp_path, every=1)
  ckpts.save(state, force=True)
  ckpts.wait()
  later = state._replace(step=state.step + 1)

  async def full(self, *a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", full)
  with pytest.raises(jlora.LoraError, match="No space left") as e:
    ckpts.save(later)
    ckpts.wait()
  assert str(tmp_path) in str(e.value) and f"steps [{int(state.step)}]" in str(e.value)
  monkeypatch.undo()
  ckpts.close()
  with jlora.Checkpoints(tmp_path) as again:
    assert again.all_steps() == [int(state.step)]
    restored, _ = again.restore(state)
  got, want = tc.flat(restored), tc.flat(state)
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].tobytes() == want[k].tobytes(), k


def test_restore_across_forms_names_the_device_axis(tmp_path, one_step):
  trainer, state = one_step
  params = tc.lorified()
  pmapped = jlora.train_step(tc.loss_fn, tc.optimizer(), params, pmap=True)
  stacked, _ = pmapped.init(params, key=jax.random.key(5))
  with jlora.Checkpoints(tmp_path, every=1) as ckpts:
    ckpts.save(stacked, force=True)
    ckpts.wait()
    with pytest.raises(jlora.LoraError, match="leading axis on every array: one comes "
                       "from the pmap form"):
      ckpts.restore(state)
