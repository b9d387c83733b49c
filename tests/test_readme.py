"""The README's Python quick start runs as written."""

import pathlib
import re


def test_readme_quickstart_runs():
  text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
  section = text.split("## Quick start (Python)", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  namespace: dict = {}
  exec(compile(code, "README.md quick start", "exec"), namespace)
  assert "packed" in namespace


def test_readme_has_exactly_two_setup_commands():
  text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
  setup = text.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
  commands = re.findall(r"```bash\n(.*?)```", setup, re.S)
  assert len(commands) == 2 and all(c.count("\n") == 1 for c in commands)
  ci = (pathlib.Path(__file__).parent.parent / ".ci" / "run").read_text()
  assert commands[1].strip() in ci     # CI runs exactly the README's test command
