"""The README's Python quick start runs as written."""

import pathlib
import re


def test_readme_python_examples_run():
  """Every ```python block of the README runs as written, in order, in fresh namespaces."""
  text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert len(blocks) >= 2
  spaces = []
  for i, code in enumerate(blocks):
    namespace: dict = {}
    exec(compile(code, f"README.md python block {i}", "exec"), namespace)
    spaces.append(namespace)
  trained = spaces[0]["state"]
  assert int(trained.step) == 300
  k = spaces[0]["state"].params["Dense_0"]["kernel"]
  assert int((k == 0).sum()) == k.size // 2
  assert "packed" in spaces[1] and "qparams" in spaces[1]


def test_readme_has_exactly_two_setup_commands():
  text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
  setup = text.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
  commands = re.findall(r"```bash\n(.*?)```", setup, re.S)
  assert len(commands) == 2 and all(c.count("\n") == 1 for c in commands)
  ci = (pathlib.Path(__file__).parent.parent / ".ci" / "run").read_text()
  assert commands[1].strip() in ci     # CI runs exactly the README's test command
