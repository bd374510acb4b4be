"""Two processes joined by `jax.distributed` (CPU collectives on localhost) compute what one
process with the same four devices computes: training steps and a generated sample set; and the
FID features that `evaluation.features` gathers from both processes' shards are those one process
computes."""

import os
import socket
import subprocess
import sys
import textwrap
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh

from evaluation import convert_inception, features
from modes import data as data_lib
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


def _launch_two(command: Callable[[str, int], list[str]], num_devices: int = 2) -> None:
  """`command(coordinator address, process id)` as processes 0 and 1 of a 2-process job,
  `num_devices` CPU devices each; both must exit 0."""
  address = f"localhost:{_free_port()}"
  procs = [
      subprocess.Popen(
          command(address, i),
          cwd=run_utils.REPO,
          env=run_utils.subprocess_env(num_devices),
          stdout=subprocess.DEVNULL,
          stderr=subprocess.PIPE,
          text=True,
      )
      for i in range(2)
  ]
  errors = [p.communicate(timeout=900)[1] for p in procs]
  for i, (p, err) in enumerate(zip(procs, errors)):
    assert p.returncode == 0, f"process {i} failed ({p.returncode}):\n{err[-4000:]}"


def _run_two_processes(workdir: str, *overrides: str) -> None:
  """main.py as processes 0 and 1 of a 2-process job, 2 CPU devices each."""
  _launch_two(
      lambda address, i: run_utils.main_command(
          workdir,
          *overrides,
          f"--coordinator_address={address}",
          "--num_processes=2",
          f"--process_id={i}",
      )
  )


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


# Each process joins the job, computes the features of its own rows of every batch (the sharded
# program `--mode=fid_stats` / `--mode=eval` run, through evaluation.metrics) and saves what the
# gather hands it: every row. No compilation cache, as modes/cli.py for multi-process runs.
_FEATURES_SCRIPT = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from modes import distributed
    address, index, images, weights, out = sys.argv[1:]
    distributed.initialize(address, 2, int(index))
    jax.config.update("jax_enable_compilation_cache", False)
    from evaluation import features
    assert jax.process_count() == 2 and jax.device_count() == 2, jax.devices()
    f = features.extract_features(
        np.load(images), weights, batch_size=2, logits=False, progress=False
    )
    np.savez(out, **f)
    distributed.shutdown()
""")


def test_two_processes_gather_the_features_one_process_computes(tmp_path):
  weights, _ = convert_inception.convert(None, str(tmp_path / "inception.npz"))
  # 5 images in global batches of 2 (one row per process), the last one padded: the gather
  # must return every row once, in order, and drop the padding.
  images = data_lib.load_dataset("digits").images[:5]
  np.save(tmp_path / "images.npy", images)
  _launch_two(
      lambda address, i: [
          sys.executable,
          "-c",
          _FEATURES_SCRIPT,
          address,
          str(i),
          str(tmp_path / "images.npy"),
          weights,
          str(tmp_path / f"process{i}.npz"),
      ],
      num_devices=1,
  )
  # One process, one device, batches of 1: the per-device program of the 2-process job.
  one_device = Mesh(np.asarray(jax.devices()[:1]), (features.DATA_AXIS,))
  single = features.extract_features(
      images, weights, batch_size=1, logits=False, mesh=one_device, progress=False
  )
  assert single["pool"].shape == (5, 2048) and len(np.unique(single["pool"], axis=0)) == 5
  for i in range(2):
    with np.load(tmp_path / f"process{i}.npz") as gathered:
      assert sorted(gathered.files) == ["pool", "spatial"]
      for key in ("pool", "spatial"):
        assert gathered[key].shape == single[key].shape
        err = np.abs(gathered[key] - single[key]).max() / np.abs(single[key]).max()
        print(f"process {i} {key}: max rel diff {err:.1e} to one process")
        assert err <= 1e-6
