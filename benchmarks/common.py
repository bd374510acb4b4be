"""Shared helpers of the benchmarks: machine description and JSON output."""

import datetime
import json
import os
import platform
import time
from typing import Callable

import jax
import ml_collections
import numpy as np


def machine_info() -> dict:
  devices = jax.devices()
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "devices": [d.device_kind for d in devices],
  }


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 2) -> list[float]:
  """Seconds per call of `fn` (which must block until its result is ready)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def write_json(path: str | None, payload: dict) -> None:
  text = json.dumps(payload, indent=2)
  print(text)
  if path:
    with open(path, "w") as f:
      f.write(text + "\n")


def compiled_cifar10_step(config: ml_collections.ConfigDict) -> Callable[[], None]:
  """A closure running one jit-compiled train step of `config` on a fixed random batch."""
  from modes import parallel, train
  from modes.factories import create_unet

  batch_size = config.train.batch_size
  mesh = parallel.make_mesh()
  model = create_unet(config)
  diffusion = train.create_diffusion(config)
  tx = train.create_optimizer(config.optim)
  state = train.create_train_state(model, tx, config, jax.random.key(0), mesh)
  step_fn = train.compile_train_step(model, diffusion, tx, config, mesh, state)
  rng = np.random.default_rng(0)
  size, channels = config.data.image_size, config.data.channels
  batch = parallel.global_batch_from_local(
      {
          "image": rng.integers(0, 256, (batch_size, size, size, channels), dtype=np.uint8),
          "label": np.zeros((batch_size,), np.int32),
      },
      mesh,
  )
  key = jax.device_put(jax.random.key(1), parallel.replicated(mesh))
  # Consistency distillation: the (random) teacher is a copy, so it survives the donation.
  teacher = (
      jax.tree.map(lambda p: p.copy(), state.params)
      if config.consistency.mode == "distill"
      else None
  )
  holder = {"state": state}

  def one_step() -> None:
    holder["state"], metrics = step_fn(holder["state"], batch, key, teacher, None)
    jax.block_until_ready(metrics)

  return one_step
