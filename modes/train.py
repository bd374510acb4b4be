"""--mode=train: the training loop (restore, finite checks, sample grid, checkpoints, logging).

The step itself is `adv_diffusion.train_step.train_step`; its program and the state's, compiled
over the device mesh, come from `modes.train_programs`.
"""

import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from adv_diffusion.train_step import TrainState
from evaluation import lpips as lpips_lib
from evaluation.inception import file_sha256
from modes import checkpoint as ckpt_lib
from modes import data as data_lib
from modes import images as image_lib
from modes import nonfinite, parallel
from modes import run_config, weights_file
from modes.sample_grid import make_grid_sampler
from modes import teacher as teacher_lib
from modes.config_validation import validate_config
from modes.factories import create_unet
from modes.metric_writer import MetricWriter, ProgressReport
from modes.preemption import PreemptionWatcher
from modes.train_programs import shared_programs
from modes.workdir import check_free_space, check_workdir_writable

ON_NONFINITE = nonfinite.ON_NONFINITE  # train.on_nonfinite (validated in config_validation)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def _host_scalars(metrics: dict[str, jax.Array]) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def restore_or_init(
    config: ml_collections.ConfigDict,
    state: TrainState,
    checkpointer: ckpt_lib.Checkpointer,
    teacher_params: Any = None,
) -> TrainState:
  """Resumes from this workdir's newest readable checkpoint, else `init_from`, else starts a
  consistency student from its teacher, else keeps `state`.

  `init_from` copies params and EMA params of another run and keeps this run's fresh
  optimizer state, sampler history and step 0: the new run counts its own iterations. A
  consistency model's target network starts equal to the starting params.
  """
  try:
    resumed = checkpointer.restore_latest_good(state)
  except ValueError as exc:  # shapes or tree of the files differ from this config's state
    raise ckpt_lib.CheckpointError(
        f"the checkpoints in {checkpointer.directory} do not fit this config "
        f"({str(exc).splitlines()[0][:200]}); resume with the config they were written with or "
        "use a new --workdir"
    ) from exc
  if resumed is not None:
    logging.info("Resuming from %s at step %d.", checkpointer.directory, resumed[1])
    return resumed[0]
  t = config.train
  if t.init_from and weights_file.is_weights_file(t.init_from):
    loaded = weights_file.load_weights(
        t.init_from, state.params, t.init_from_sha256, how=t.init_from_command
    )
    logging.info(
        "Initialised params and EMA from the weights file %s (fresh optimizer).", t.init_from
    )
    state = state.replace(
        params=weights_file.placed_like(loaded, state.params),
        ema_params=tuple(weights_file.placed_like(loaded, e) for e in state.ema_params),
    )
  elif t.init_from:
    target = {"params": state.params, "ema_params": state.ema_params}
    model, step = ckpt_lib.load_model_weights(
        config.train.init_from, config.train.init_from_step, target, config.train.init_from_command
    )
    logging.info(
        "Initialised params and EMA from %s step %d (fresh optimizer).",
        config.train.init_from,
        step,
    )
    state = state.replace(params=model["params"], ema_params=model["ema_params"])
  elif teacher_params is not None:
    logging.info("Student initialised from the teacher (params, EMA and target network).")
    state = state.replace(
        params=_copy(teacher_params),
        ema_params=tuple(_copy(teacher_params) for _ in state.ema_params),
    )
  if state.target_params is not None:
    state = state.replace(target_params=_copy(state.params))
  return state


def _copy(tree: Any) -> Any:
  """New buffers with the same values: the donated state must not share any buffer."""
  return jax.tree.map(jnp.copy, tree)


def _state_bytes(state: TrainState) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains to `config.train.num_steps`, resuming from `workdir` when it holds checkpoints.

  SIGTERM saves a checkpoint after the current step and returns (see `preemption`).
  """
  validate_config(config, "train")
  mesh = parallel.make_mesh()
  parallel.check_batch_divisible(config.train.batch_size, mesh)
  is_main = jax.process_index() == 0
  check_workdir_writable(workdir)
  t = config.train
  resuming = bool(ckpt_lib.checkpoint_steps(ckpt_lib.checkpoint_dir(workdir)))
  if resuming:  # before config.json is overwritten and before orbax reads any shape
    run_config.check_resume_config(config, workdir)
  if is_main:
    run_config.write_config(config, workdir)

  if t.init_from and not resuming:
    # Fail before loading data or compiling when the run to start from is missing.
    if weights_file.is_weights_file(t.init_from):
      weights_file.check_file(t.init_from, t.init_from_sha256, t.init_from_command)
    else:
      ckpt_lib.require_checkpoint(t.init_from, t.init_from_step, t.init_from_command)
  cm = config.consistency
  if cm.mode == "distill":
    ckpt_lib.require_checkpoint(
        cm.teacher,
        cm.teacher_step,
        cm.teacher_command,
        purpose="distil from",
        step_key="config.consistency.teacher_step",
    )
    teacher_lib.check_teacher_model(config)
  dataset = data_lib.load_dataset(config.data.dataset, config.data.split, config.data.data_dir)
  model = create_unet(config)
  repl = parallel.replicated(mesh)
  # Made by a jit program so that every process holds the same global (replicated) keys; the
  # third key of the split seeds the sample grid.
  root_keys = lambda: tuple(jax.random.split(jax.random.key(config.seed), 3)[:2])  # noqa: E731
  init_key, step_key = jax.jit(root_keys, out_shardings=(repl, repl))()
  create_state, step_fn = shared_programs(config, mesh)
  state = create_state(init_key)
  logging.info(
      "UNet parameters: %d", sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  )
  check_free_space(workdir, _state_bytes(state))

  checkpointer = ckpt_lib.Checkpointer(
      ckpt_lib.checkpoint_dir(workdir),
      save_every=t.checkpoint_every,
      keep=t.keep_checkpoints,
      keep_every=t.keep_every,
      async_save=t.async_checkpointing,
  )
  teacher_params = None
  if cm.mode == "distill":
    teacher_params, teacher_step = teacher_lib.load_teacher(config, state.params)
    logging.info(
        "Teacher: %s step %d (%s weights).",
        cm.teacher,
        teacher_step,
        "EMA" if cm.teacher_use_ema else "raw",
    )
  lpips_params = None
  if cm.mode != "none" and cm.distance == "lpips":
    lpips_path = lpips_lib.resolve_weights_path(cm.lpips_weights)
    lpips_params = jax.device_put(lpips_lib.load_lpips_params(lpips_path), repl)
    logging.info("LPIPS-VGG weights: %s (sha256 %s).", lpips_path, file_sha256(lpips_path))
  state = restore_or_init(config, state, checkpointer, teacher_params)
  start_step = int(state.step)
  skips = nonfinite.SkipCounter(seen=int(state.skipped_updates))
  check = functools.partial(nonfinite.check_finite, config=config, counter=skips)

  writer = MetricWriter(workdir if is_main else None)
  report = ProgressReport(t.num_steps, writer)
  grid_sampler = make_grid_sampler(model, config, mesh) if t.sample_every else None
  batches = data_lib.batch_iterator(
      dataset, t.batch_size, start_step, config.seed, jax.process_index(), jax.process_count()
  )
  preemption = PreemptionWatcher(t.preemption_grace_seconds)

  window_start, window_steps = None, 0
  previous = None  # (step, metrics) of the step before: read while the next one runs
  step = start_step
  try:
    for step in range(start_step + 1, t.num_steps + 1):
      batch = parallel.global_batch_from_local(next(batches), mesh)
      state, metrics = step_fn(state, batch, step_key, teacher_params, lpips_params)
      if previous is not None:
        check(*previous, saving=False, last_checkpoint=checkpointer.latest_step)
      previous = (step, metrics)
      report(step, time.time())
      if window_start is None:  # the first step compiles; time the steady state only
        jax.block_until_ready(metrics)
        window_start, window_steps = time.perf_counter(), 0
      else:
        window_steps += 1
      if step % t.log_every == 0 or step == t.num_steps:
        scalars = _host_scalars(metrics)
        elapsed = time.perf_counter() - window_start
        if window_steps:
          scalars["steps_per_sec"] = window_steps / elapsed
          scalars["images_per_sec"] = window_steps * t.batch_size / elapsed
        writer.write_scalars(step, scalars)
        window_start, window_steps = time.perf_counter(), 0
      preempted = preemption.should_stop(step)
      if preempted or step % t.checkpoint_every == 0 or step == t.num_steps:
        check(step, metrics, saving=True, last_checkpoint=checkpointer.latest_step)
        checkpointer.save(step, state, force=True)
      if preempted:
        checkpointer.wait()
        logging.warning(
            "Preempted: saved the checkpoint of step %d in %s; run the same command "
            "again to resume.",
            step,
            checkpointer.directory,
        )
        break
      if grid_sampler is not None and (step % t.sample_every == 0 or step == t.num_steps):
        grid = image_lib.make_grid(grid_sampler(state.ema_params[0]))
        if is_main:
          image_lib.save_png(
              os.path.join(workdir, "samples", f"grid_{step:08d}.png"), grid, upscale=2
          )
          writer.write_images(step, {"samples": grid[None]})
        window_start = None  # do not count sampling time in steps/s
    else:
      if previous is not None:
        check(*previous, saving=False, last_checkpoint=checkpointer.latest_step)
      if is_main:
        with open(os.path.join(workdir, "train_done.json"), "w") as f:
          json.dump({"step": int(state.step), "skipped_updates": int(state.skipped_updates)}, f)
    checkpointer.wait()
  finally:
    preemption.close()
    checkpointer.close()
    writer.close()
  return state


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """--mode=train: `train`; returns the checkpoint directory."""
  train(config, workdir)
  return ckpt_lib.checkpoint_dir(workdir)
