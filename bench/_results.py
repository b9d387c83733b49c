"""The one writer of ``bench/RESULTS.md`` sections: each bench script owns the block
between its ``<!-- NAME:start -->`` / ``<!-- NAME:end -->`` markers."""

from __future__ import annotations

import os

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def write_section(block: str, start: str, end: str, path: str = PATH) -> None:
  """Replaces the block from ``start`` to ``end`` in ``path`` by ``block`` (which holds
  both markers), or appends it when the file has no such block yet."""
  old = open(path).read() if os.path.exists(path) else ""
  if start in old and end in old:
    new = old[:old.index(start)] + block + old[old.index(end) + len(end):]
  else:
    new = old.rstrip("\n") + "\n\n" + block + "\n"
  with open(path, "w") as fh:
    fh.write(new)
  print(f"updated {path}")
