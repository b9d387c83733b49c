"""The README's Python quick start runs as written."""

import pathlib
import re

import pytest


@pytest.mark.slow
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
  quick = next(ns for ns in spaces if "trainer" in ns)      # the Trainer quick start
  assert int(quick["state"].step) == 300
  k = quick["state"].params["Dense_0"]["kernel"]
  assert int((k == 0).sum()) == k.size // 2
  assert any("packed" in ns and "qparams" in ns for ns in spaces)
  auto = next(ns for ns in spaces if "plan" in ns)          # the model run with the plan
  assert auto["y"].shape == (64, 32)
  ref = auto["model"].apply(auto["variables"], auto["x"])
  err = float(abs(auto["y"] - ref).max())
  assert 0 < err <= 0.1 * float(abs(ref).max()), err         # rounded weights, not floats


def test_readme_has_exactly_two_setup_commands():
  text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
  setup = text.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
  commands = re.findall(r"```bash\n(.*?)```", setup, re.S)
  assert len(commands) == 2 and all(c.count("\n") == 1 for c in commands)
  ci = (pathlib.Path(__file__).parent.parent / ".ci" / "run").read_text()
  assert commands[1].strip() in ci     # CI runs exactly the README's test command


@pytest.mark.slow
def test_readme_model_factory_example_runs(tmp_path, monkeypatch, capsys):
  """The `--model package.module:factory` example of the README, as written."""
  from jaxopt_dnn.app import cli
  text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
  section = text.split("**Your model.**", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  (tmp_path / "my_net.py").write_text(code)
  monkeypatch.chdir(tmp_path)
  assert "jaxopt-dnn compress --model my_net:make" in section
  out = tmp_path / "run"
  assert cli.main(["compress", "--model", "my_net:make", "--steps", "4", "--variants",
                   "baseline,int8_ptq", "--out", str(out)]) == 0
  assert "int8_ptq" in capsys.readouterr().out and (out / "results.json").exists()
