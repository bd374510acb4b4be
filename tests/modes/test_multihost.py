"""Two processes joined by `jax.distributed` (CPU collectives on localhost) compute what one
process with the same four devices computes: training steps and a generated sample set."""

import os
import socket
import subprocess

import numpy as np

from tests import run_utils

# The paper's learning rate: Adam amplifies all-reduce rounding in proportion to it (see
# test_train.test_one_and_eight_devices_give_the_same_parameters).
TRAIN = (
    "--config.train.num_steps=3",
    "--config.optim.learning_rate=1e-4",
    "--config.train.async_checkpointing=False",
)
SAMPLE = (
    "--mode=sample",
    "--config.sampling.method=ddim",
    "--config.sampling.nfe=2",
    "--config.sampling.num_samples=64",
    "--config.sampling.batch_size=32",
)
TAG = "ddim_nfe2_step3_ema_seed0"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_two_processes(workdir: str, *overrides: str) -> None:
  """main.py as processes 0 and 1 of a 2-process job, 2 CPU devices each."""
  address = f"localhost:{_free_port()}"
  procs = [
      subprocess.Popen(
          run_utils.main_command(
              workdir,
              *overrides,
              f"--coordinator_address={address}",
              "--num_processes=2",
              f"--process_id={i}",
          ),
          cwd=run_utils.REPO,
          env=run_utils.subprocess_env(2),
          stdout=subprocess.DEVNULL,
          stderr=subprocess.PIPE,
          text=True,
      )
      for i in range(2)
  ]
  errors = [p.communicate(timeout=900)[1] for p in procs]
  for i, (p, err) in enumerate(zip(procs, errors)):
    assert p.returncode == 0, f"process {i} failed ({p.returncode}):\n{err[-4000:]}"


def _samples(workdir: str) -> np.ndarray:
  with np.load(os.path.join(workdir, "samples", f"{TAG}.npz")) as f:
    return f["arr_0"]


def test_two_processes_equal_one_process_with_the_same_devices(tmp_path):
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  run_utils.run_main(single, *TRAIN, num_devices=4)
  run_utils.run_main(single, *SAMPLE, num_devices=4)
  _run_two_processes(multi, *TRAIN)
  _run_two_processes(multi, *SAMPLE)

  one, two = run_utils.read_checkpoint(single, 3), run_utils.read_checkpoint(multi, 3)
  # Same mesh size and program; only the all-reduce transport differs (in-process vs gloo).
  assert run_utils.max_abs_diff(one["model"], two["model"]) <= 1e-5
  assert int(two["train"]["step"]) == 3 and int(two["train"]["num_updates"]) == 3
  a, b = _samples(single), _samples(multi)
  assert a.shape == b.shape == (64, 16, 16, 1)
  # uint8 samples: at most a rounding flip where float values straddle a level.
  assert np.max(np.abs(a.astype(int) - b.astype(int))) <= 1
  assert np.mean(a != b) < 0.01
  # Only process 0 writes logs: one TensorBoard event file.
  assert len([f for f in os.listdir(multi) if f.startswith("events.out.tfevents")]) == 1
