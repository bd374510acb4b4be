"""The story's expected cost, printed at start-up: accelerator-hours of the stages and table
cells still to run, from times measured on this run's own devices.

Training: each remaining stage's own step program (`train_programs.shared_programs` of the stage's
config: the traced and compiled program the stage then runs in this process) is timed over a
few steps after one warm-up (compiling) step, on a freshly initialised state and a fixed
synthetic batch that the stage never sees (its state, data order and keys are its own), and
multiplied by the steps the stage has left. Table: one network call on a sampling batch × NFE ×
batches, and one Inception batch × batches, per remaining cell; Inception over the reference
images when their statistics are missing. Not counted: compiles, checkpoint writes, sample
grids, data loading and the sampler's arithmetic between network calls.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from evaluation import features as features_lib, inception
from modes import checkpoint as ckpt_lib
from modes import data as data_lib
from modes import parallel, table as tables, train_programs
from modes.factories import create_unet


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Measured unit times and the work left; `seconds` is the total wall time."""

  stages: tuple[tuple[str, int, float], ...]  # (stage, steps left, seconds per step)
  cells: int = 0  # table cells left
  sampling_seconds: float = 0.0  # their network calls
  inception_seconds: float = 0.0  # their Inception batches
  reference_images: int = 0  # reference images still to run through Inception
  reference_seconds: float = 0.0

  @property
  def seconds(self) -> float:
    train_seconds = sum(steps * per_step for _, steps, per_step in self.stages)
    return train_seconds + self.sampling_seconds + self.inception_seconds + self.reference_seconds


def seconds_per_call(fn: Callable[[], Any], calls: int) -> float:
  """Mean wall seconds of `fn()` over `calls` calls, after one warm-up (compiling) call."""
  jax.block_until_ready(fn())
  start = time.perf_counter()
  for _ in range(calls):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / calls


def _local_batch(config: ml_collections.ConfigDict, global_size: int) -> dict[str, np.ndarray]:
  """This process's rows of a fixed synthetic uint8 batch of the config's images."""
  rows = global_size // jax.process_count()
  images = np.random.default_rng(0).integers(
      0, 256, (rows, *train_programs.image_shape(config)), np.uint8
  )
  return {"image": images, "label": np.zeros((rows,), np.int32)}


def train_step_seconds(config: ml_collections.ConfigDict, steps: int) -> float:
  """Seconds per step of the train step program of `config` on this process's devices."""
  mesh = parallel.make_mesh()
  parallel.check_batch_divisible(config.train.batch_size, mesh)
  repl = parallel.replicated(mesh)
  keys = lambda: tuple(jax.random.split(jax.random.key(config.seed), 2))  # noqa: E731
  init_key, step_key = jax.jit(keys, out_shardings=(repl, repl))()
  create_state, step_fn = train_programs.shared_programs(config, mesh)
  state = [create_state(init_key)]
  batch = parallel.global_batch_from_local(_local_batch(config, config.train.batch_size), mesh)

  def one_step() -> Any:
    state[0], metrics = step_fn(state[0], batch, step_key, None, None)
    return metrics

  seconds = seconds_per_call(one_step, steps)
  state.clear()  # the donated state's buffers go before the stage allocates its own
  return seconds


def network_call_seconds(config: ml_collections.ConfigDict, calls: int) -> float:
  """Seconds of one UNet call (inference) on a `config.sampling.batch_size` batch."""
  mesh = parallel.make_mesh()
  model = create_unet(config)
  repl, rows = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  init = lambda key: train_programs.init_params(model, config, key)  # noqa: E731
  params = jax.jit(init, out_shardings=repl)(jax.random.key(0))
  size = -(-config.sampling.batch_size // mesh.size) * mesh.size
  local = _local_batch(config, size)
  x = parallel.global_batch_from_local(local["image"].astype(np.float32) / 127.5 - 1, mesh)
  t = parallel.global_batch_from_local(np.full(local["label"].shape, 500, np.int32), mesh)
  y = parallel.global_batch_from_local(local["label"], mesh) if config.data.num_classes else None

  @jax.jit
  def call(params: Any, x: jax.Array, t: jax.Array, y: jax.Array | None) -> jax.Array:
    out = model.apply({"params": params}, x, t, y, train=False).astype(jnp.float32)
    return jax.lax.with_sharding_constraint(out, rows)

  return seconds_per_call(lambda: call(params, x, t, y), calls)


def inception_batch_seconds(config: ml_collections.ConfigDict, calls: int) -> float:
  """Seconds of one `config.evaluation.batch_size` batch of sample-sized images in Inception."""
  e = config.evaluation
  weights = inception.load_inception_weights(e.inception_weights or None)
  images = _local_batch(config, e.batch_size * jax.process_count())["image"]
  return seconds_per_call(
      lambda: features_lib.extract_features(
          images, weights, e.batch_size, e.resize_rule, progress=False
      ),
      calls,
  )


def _steps_left(config: ml_collections.ConfigDict, run_dir: str) -> int:
  done = ckpt_lib.checkpoint_steps(ckpt_lib.checkpoint_dir(run_dir))
  return max(config.train.num_steps - (done[-1] if done else 0), 0)


def _reference_images(config: ml_collections.ConfigDict, workdir: str) -> int:
  """Images Inception still has to see for the reference statistics (0 when they exist or
  come from a features file)."""
  e, d = config.evaluation, config.data
  path = e.reference or os.path.join(workdir, "eval", "reference.npz")
  if os.path.isfile(path) or e.reference_features_file:
    return 0
  return e.max_reference_images or data_lib.DATASETS[d.dataset].train_examples


def estimate(
    stages: dict[str, tuple[ml_collections.ConfigDict, str]],
    table_config: ml_collections.ConfigDict,
    workdir: str,
    steps: int,
) -> Estimate:
  """Measures and sums the cost of `stages` (name → (config, run dir), the stages still to run)
  and of the cells of `table_config` without a stored result; `steps` timed calls each."""
  measured: dict[str, float] = {}  # one measurement per distinct step program
  rows = []
  for name, (cfg, run_dir) in stages.items():
    left = _steps_left(cfg, run_dir)
    if left:
      key = train_programs.step_program_key(cfg)
      if key not in measured:
        measured[key] = train_step_seconds(cfg, steps)
      rows.append((name, left, measured[key]))
  cell_dir = os.path.join(workdir, "table", "cells")
  cells = [
      (method, nfe)
      for label, _, method, nfe in tables.cell_grid(table_config)
      if not os.path.isfile(tables.cell_file(cell_dir, tables.cell_name(label, method, nfe)))
  ]
  reference = _reference_images(table_config, workdir)
  if not cells and not reference:
    return Estimate(tuple(rows))
  e, n = table_config.evaluation, table_config.table.num_samples
  per_inception = inception_batch_seconds(table_config, steps) / e.batch_size
  per_call = network_call_seconds(table_config, steps) if cells else 0.0
  batches = math.ceil(n / table_config.sampling.batch_size)
  return Estimate(
      tuple(rows),
      cells=len(cells),
      sampling_seconds=sum(nfe * batches * per_call for _, nfe in cells),
      inception_seconds=len(cells) * n * per_inception,
      reference_images=reference,
      reference_seconds=reference * per_inception,
  )


def _hours(seconds: float) -> str:
  hours = seconds / 3600
  return f"{hours:,.0f}" if hours >= 100 else f"{hours:.3g}"


def summary(cost: Estimate, num_devices: int, device_kind: str) -> str:
  """One line: "Expected: 1,234 accelerator-hours on 8 x TPU v4 (154 h wall; clean ...)"."""
  parts = [
      f"{name} {steps:,} steps at {per_step:.3g} s/step" for name, steps, per_step in cost.stages
  ]
  if cost.cells:
    parts.append(
        f"table {cost.cells} cells: sampling {_hours(cost.sampling_seconds)} h, "
        f"Inception {_hours(cost.inception_seconds)} h"
    )
  if cost.reference_images:
    parts.append(f"reference {cost.reference_images:,} images {_hours(cost.reference_seconds)} h")
  detail = "; ".join(parts) if parts else "nothing left to run"
  return (
      f"Expected: {_hours(cost.seconds * num_devices)} accelerator-hours on {num_devices} x "
      f"{device_kind} ({_hours(cost.seconds)} h wall; {detail})."
  )


def report(
    stages: dict[str, tuple[ml_collections.ConfigDict, str]],
    table_config: ml_collections.ConfigDict,
    workdir: str,
    steps: int,
) -> str:
  """`estimate` on this process's devices, logged and printed (process 0) as `summary`."""
  logging.info("Measuring step times for the cost estimate (story.estimate = False skips it).")
  cost = estimate(stages, table_config, workdir, steps)
  line = summary(cost, jax.device_count(), jax.devices()[0].device_kind)
  logging.info("%s", line)
  if jax.process_index() == 0:
    print(line, flush=True)
  return line
