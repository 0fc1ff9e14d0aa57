"""One error type, raised once with every problem found."""

from __future__ import annotations

from collections.abc import Iterable


class LoraError(ValueError):
  """Bad input to a jlora function.

  The message lists every problem found, one per line, each naming the tree
  path, what was found, and how to fix it.
  """

  def __init__(self, problems: Iterable[str], *, header: str | None = None):
    self.problems = tuple(problems)
    lines = [header] if header else []
    lines += [f"  - {p}" for p in self.problems]
    super().__init__("\n".join(lines))


class Problems:
  """Collects problems and raises them together as one `LoraError`."""

  def __init__(self, header: str):
    self.header = header
    self.items: list[str] = []

  def add(self, message: str) -> None:
    """Adds one problem; the same message twice is listed once."""
    if message not in self.items:
      self.items.append(message)

  def __bool__(self) -> bool:
    return bool(self.items)

  def raise_if_any(self) -> None:
    if self.items:
      n = len(self.items)
      header = f"{self.header} ({n} problem{'s' if n > 1 else ''}):"
      raise LoraError(self.items, header=header)
