"""NF4 against bitsandbytes (CPU), bit for bit: an optional oracle.

bitsandbytes needs torch, which never enters the main venv, so this file is
collected only when ``JLORA_BNB_PYTHON`` names a python that has both (see
tests/conftest.py)::

  python3 -m venv /tmp/bnb && /tmp/bnb/bin/pip install torch==2.13.0 bitsandbytes==0.50.2
  JLORA_BNB_PYTHON=/tmp/bnb/bin/python .venv/bin/python -m pytest -q tests/test_quant_bnb.py
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

import jlora
from test_quant import bits_equal, ref_unpack

BNB_SCRIPT = """
import json, sys, numpy as np, torch, bitsandbytes.functional as F
w = torch.tensor(np.load(sys.argv[1]))
q, s = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
packed = q.numpy().reshape(-1)
codes = np.stack([packed >> 4, packed & 15], axis=-1).reshape(-1)  # first value high
dq, s2 = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
json.dump({"codes": codes.tolist(), "absmax": s.absmax.numpy().tolist(),
           "values": F.dequantize_4bit(q, s).numpy().reshape(-1).tolist(),
           "double_quant": F.dequantize_4bit(dq, s2).numpy().reshape(-1).tolist()},
          open(sys.argv[2], "w"))
"""


def test_nf4_matches_bitsandbytes(tmp_path):
  import json, os, subprocess
  w = np.random.default_rng(7).normal(size=(96, 320)).astype(np.float32)
  w[3, :64] = 0.0
  np.save(tmp_path / "w.npy", w)
  subprocess.run([os.environ["JLORA_BNB_PYTHON"], "-c", BNB_SCRIPT, str(tmp_path / "w.npy"),
                  str(tmp_path / "out.json")], check=True, capture_output=True, timeout=300)
  bnb = json.loads((tmp_path / "out.json").read_text())
  # bitsandbytes blocks the row-major torch tensor: our axis=-1 on the same array.
  q = jlora.quantize({"w": jnp.asarray(w)}, "nf4", axis=-1, targets=re.compile("w"))["w"]
  assert np.array_equal(ref_unpack(q.arrays["codes"]).reshape(-1), bnb["codes"])
  assert bits_equal(np.asarray(q.arrays["scale"]).reshape(-1), np.float32(bnb["absmax"]))
  assert bits_equal(np.asarray(q.dequantize()).reshape(-1), np.float32(bnb["values"]))
  # Double quant: bitsandbytes' second level is its dynamic 8-bit map, ours linear int8.
  dq = jlora.quantize({"w": jnp.asarray(w)}, "nf4", axis=-1, targets=re.compile("w"),
                      double_quant=True)["w"]
  ours, theirs = np.asarray(dq.dequantize()).reshape(-1), np.float32(bnb["double_quant"])
  exact = np.asarray(q.dequantize()).reshape(-1)
  assert np.abs(ours - exact).max() <= 0.01 * np.abs(w).max()
  assert np.abs(ours - theirs).max() <= 0.01 * np.abs(w).max()
