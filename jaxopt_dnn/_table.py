"""Plain-text tables for reports, rendered by ``rich`` (one renderer for every report)."""

from __future__ import annotations

import io
from collections.abc import Sequence


def render(header: Sequence[str], rows: Sequence[Sequence[object]], *,
           right: Sequence[int] = (), footer_rows: int = 0, title: str | None = None) -> str:
  """A borderless fixed-width table as a string (no colour, never wrapped).

  Args:
    header: column names.
    rows: cells (converted with ``str``).
    right: indices of right-aligned (numeric) columns.
    footer_rows: the last ``footer_rows`` rows are totals, set off by a rule.
    title: an optional line above the table.
  """
  from rich import box
  from rich.console import Console
  from rich.markup import escape
  from rich.table import Table

  table = Table(*(escape(str(h)) for h in header), box=box.SIMPLE_HEAD, show_edge=False,
                pad_edge=False, header_style="", highlight=False)
  for i, col in enumerate(table.columns):
    col.justify = "right" if i in right else "left"
    col.no_wrap = True
  rows = [[str(c) for c in r] for r in rows]
  for j, r in enumerate(rows):
    table.add_row(*(escape(c) for c in r), end_section=footer_rows > 0 and j == len(rows) - footer_rows - 1)
  width = sum(max([len(h)] + [len(r[i]) for r in rows]) + 3 for i, h in enumerate(header))
  console = Console(file=io.StringIO(), width=max(width + 4, 40), color_system=None,
                    force_terminal=False, legacy_windows=False)
  console.print(table)
  lines = console.file.getvalue().rstrip("\n").split("\n")
  return "\n".join(([title] if title else []) + [line.rstrip() for line in lines])
