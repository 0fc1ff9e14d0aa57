"""Checkpoints with orbax: adapters alone, and full training state.

Two formats, both written with ``orbax.checkpoint`` (atomically: orbax writes
into a temporary directory and renames it when complete), both holding a JSON
record beside the arrays:

* `save_adapters` / `load_adapters`: only the adapter arrays (and leaves
  trained in full), never the frozen base weights. The record holds each
  adapter's method and its fields (rank, alpha, layout) per adapted path, and
  a fingerprint of the base tree (every path, shape and dtype), so loading
  onto another base model fails with the mismatched paths.
* `Checkpoints`: the full `TrainState` (adapters, optimizer state, step, PRNG
  key) every ``every`` steps, keeping the last ``keep``, plus a JSON-able
  data position. Restoring takes a target state (e.g. from
  ``trainer.init``), so a run can resume on another device count or mesh.

Both record a SHA-256 of every array and of the record itself, and check them
when loading: a truncated, corrupted or mismatched checkpoint raises
`LoraError` naming the checkpoint and the fix; nothing is loaded partially.

A failed or killed save never loses what was there: `save_adapters` writes
beside its target and swaps the complete directory in (`atomic`), and a
`Checkpoints` save that fails (a full disk) raises `LoraError` naming the
directory, with the earlier steps intact.

Modules: `files` (what both formats share), `atomic` (write beside, then
swap), `adapters` (`save_adapters`, `load_adapters`), `state` (`Checkpoints`).
"""

from jlora._checkpoint.adapters import load_adapters as load_adapters
from jlora._checkpoint.adapters import save_adapters as save_adapters
from jlora._checkpoint.state import Checkpoints as Checkpoints
