"""Helpers for tests that run `main.py` in a subprocess and read the checkpoints it leaves."""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from modes import xla_cpu_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "tests", "configs", "tiny_digits.py")


def main_command(workdir: str, *overrides: str, config: str = TINY_CONFIG) -> list[str]:
  return [
      sys.executable,
      os.path.join(REPO, "main.py"),
      f"--config={config}",
      f"--workdir={workdir}",
      *overrides,
  ]


def subprocess_env(num_devices: int = 1) -> dict[str, str]:
  """The environment of a CPU subprocess with `num_devices` devices and the project's XLA:CPU
  flags (a `python -c` script does not pass through modes/cli.py, which applies them)."""
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  xla_cpu_flags.apply(env)
  env["PYTHONPATH"] = REPO
  return env


def run_main(
    workdir: str,
    *overrides: str,
    num_devices: int = 1,
    config: str = TINY_CONFIG,
    check: bool = True,
) -> subprocess.CompletedProcess:
  return run_python(main_command(workdir, *overrides, config=config), num_devices, check)


def run_python(
    command: list[str], num_devices: int = 1, check: bool = True, timeout: int = 900
) -> subprocess.CompletedProcess:
  """Runs `command` (a Python command line) from the repository on CPU with `num_devices`
  devices; with `check`, a non-zero exit fails the test with the end of its stderr."""
  result = subprocess.run(
      command,
      cwd=REPO,
      env=subprocess_env(num_devices),
      capture_output=True,
      text=True,
      timeout=timeout,
  )
  if check and result.returncode != 0:
    raise AssertionError(f"{command[1:3]} failed ({result.returncode}):\n{result.stderr[-4000:]}")
  return result


def copy_as_stopped_at(source: str, destination: str, step: int) -> None:
  """A copy of the run in `source` as it was when checkpoint `step` had just been written: later
  checkpoints and the completion marker are removed (the run then resumes from `step`)."""
  shutil.copytree(source, destination)
  directory = os.path.join(destination, "checkpoints")
  later = [d for d in os.listdir(directory) if d.isdigit() and int(d) > step]
  assert str(step) in os.listdir(directory) and later, os.listdir(directory)
  for name in later:
    shutil.rmtree(os.path.join(directory, name))
  os.remove(os.path.join(destination, "train_done.json"))


def read_checkpoint(workdir: str, step: int | None = None) -> dict:
  """{"model": {...}, "train": {...}} of a run's checkpoint as numpy trees (latest by default)."""
  directory = os.path.join(workdir, "checkpoints")
  if step is None:
    step = max(int(d) for d in os.listdir(directory) if d.isdigit())
  checkpointer = ocp.PyTreeCheckpointer()
  out = {}
  for item in ("model", "train"):
    path = os.path.join(directory, str(step), item)
    # Restore as host numpy arrays, whatever device topology wrote the checkpoint.
    tree = checkpointer.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    out[item] = checkpointer.restore(path, restore_args=args)
  checkpointer.close()
  return out


def max_abs_diff(tree_a, tree_b) -> float:
  diffs = jax.tree.map(
      lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))),
      tree_a,
      tree_b,
  )
  return max(jax.tree.leaves(diffs))


def assert_one_sentence_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
  """main.py exited 1 with a last stderr line "Error: ..." holding `fragments`, no traceback."""
  assert result.returncode == 1, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("Error: ")
  for fragment in fragments:
    assert fragment in last, last
