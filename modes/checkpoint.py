"""Orbax checkpoints of the train state: every N steps, keep the last K plus milestones.

A checkpoint holds two items so that other runs can read the weights alone:
  model: {"params", "ema_params"}          (read by `init_from`, sampling and evaluation)
  train: everything else of the train state (optimizer, counters, sampler history, ...)

Orbax writes each step into a temporary directory and renames it when complete, so a killed
save leaves no step behind. A step whose files were damaged afterwards (truncated copy, full
disk on a network file system, bit rot) fails to restore; resuming then falls back to the
newest readable step and moves the damaged one aside as `damaged_<step>`.
"""

import os
import sys
import time
import traceback
from typing import Any, Callable

import jax
from absl import logging
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as ocp_keep

from modes.errors import CheckpointError

MODEL_ITEM = "model"
TRAIN_ITEM = "train"


def _split_state(state: Any) -> tuple[dict, dict]:
  fields = dict(state.__dict__) if hasattr(state, "__dict__") else dict(state)
  model = {"params": fields.pop("params"), "ema_params": fields.pop("ema_params")}
  return model, fields


def _abstract(tree: Any) -> Any:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
  """Saves and restores train states under `directory` (one sub-directory per step)."""

  def __init__(
      self,
      directory: str,
      *,
      save_every: int,
      keep: int,
      keep_every: int = 0,
      async_save: bool = True,
      read_only: bool = False,
  ):
    policies = [ocp_keep.LatestN(keep)]
    if keep_every:
      policies.append(ocp_keep.EveryNSteps(keep_every))
    self.save_every = save_every
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp_keep.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        create=not read_only,
        read_only=read_only,
    )
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=(MODEL_ITEM, TRAIN_ITEM)
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Saves when `step` is a multiple of `save_every` (or `force`); returns whether it saved."""
    if not force and step % self.save_every:
      return False
    model, train = _split_state(state)
    return self._manager.save(
        step,
        args=ocp.args.Composite(
            **{MODEL_ITEM: ocp.args.StandardSave(model), TRAIN_ITEM: ocp.args.StandardSave(train)}
        ),
        force=True,
    )

  def restore(self, step: int, target_state: Any) -> Any:
    """Restores the full state of `step` with the shapes, dtypes and shardings of `target_state`."""
    model, train = _split_state(target_state)
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            **{
                MODEL_ITEM: ocp.args.StandardRestore(_abstract(model)),
                TRAIN_ITEM: ocp.args.StandardRestore(_abstract(train)),
            }
        ),
    )
    return target_state.replace(**restored[MODEL_ITEM], **restored[TRAIN_ITEM])

  def restore_latest_good(self, target_state: Any) -> tuple[Any, int] | None:
    """The newest readable checkpoint restored like `target_state`, and its step; None when
    there is none. Newer damaged steps are moved aside with a warning; if every step is
    damaged, a CheckpointError says so and nothing is moved."""
    found = _newest_readable(
        self.all_steps(), lambda step: self.restore(step, target_state), self.directory
    )
    if found is None:
      return None
    state, step, damaged = found
    if damaged:
      self._set_aside(damaged)
    return state, step

  def _set_aside(self, steps: list[int]) -> None:
    if jax.process_index() == 0:
      stamp = time.strftime("%Y%m%d-%H%M%S")
      for step in steps:
        os.replace(
            os.path.join(self.directory, str(step)),
            os.path.join(self.directory, f"damaged_{step}_{stamp}"),
        )
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("checkpoint: damaged steps set aside")
    self._manager.reload()

  def restore_model(self, step: int, target_model: dict) -> dict:
    """Restores only {"params", "ema_params"} of `step`, shaped like `target_model`."""
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(**{MODEL_ITEM: ocp.args.StandardRestore(_abstract(target_model))}),
    )
    return restored[MODEL_ITEM]

  def wait(self) -> None:
    """Blocks until background saves have finished."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _newest_readable(
    steps: list[int], restore: Callable[[int], Any], directory: str
) -> tuple[Any, int, list[int]] | None:
  """(restored, step, newer damaged steps) of the newest step `restore` can read."""
  damaged = []
  _silence_failed_read_leftovers()
  for step in sorted(steps, reverse=True):
    try:
      restored = restore(step)
    # Orbax and TensorStore raise anything from JSONDecodeError to a bare Exception for
    # damaged files; a shape mismatch with the config is a different error, raised below.
    except Exception as exc:  # noqa: BLE001
      if _is_config_mismatch(exc):
        raise
      logging.warning(
          "Checkpoint step %d in %s cannot be read (%s).",
          step,
          directory,
          str(exc).splitlines()[0][:200],
      )
      damaged.append(step)
      continue
    if damaged:
      logging.warning(
          "Falling back to checkpoint step %d in %s: newer step(s) %s are damaged "
          "and will not be used.",
          step,
          directory,
          damaged,
      )
    return restored, step, damaged
  if damaged:
    raise CheckpointError(
        f"checkpoint step(s) {damaged} in {directory} cannot be read (damaged "
        "files) and no older readable step exists; restore them from a backup "
        "or move them away to start over."
    )
  return None


def _silence_failed_read_leftovers() -> None:
  """A failed restore leaves TensorStore reads in flight. They later complete into orbax's
  closed asyncio loop ("RuntimeError: Event loop is closed" through `sys.unraisablehook`) and
  their tasks, futures and coroutines are reported at exit ("... exception was never
  retrieved" on the `asyncio` logger, "Exception ignored in <coroutine>"), each with a long
  traceback, after the one warning we print. Drop those reports (closed-loop errors, and
  errors whose traceback lies in orbax's array reading); everything else goes through."""
  import logging as std_logging

  previous = sys.unraisablehook
  if getattr(previous, "drops_failed_read_leftovers", False):
    return

  def from_orbax_read(tb) -> bool:
    return any(
        "orbax/checkpoint/_src/serialization" in frame.filename
        for frame in traceback.extract_tb(tb)
    )

  def hook(unraisable):
    closed_loop = (
        isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"
    )
    if not (closed_loop or from_orbax_read(unraisable.exc_traceback)):
      previous(unraisable)

  def keep_record(record) -> bool:
    return not (
        "exception was never retrieved" in record.getMessage()
        and record.exc_info
        and from_orbax_read(record.exc_info[2])
    )

  hook.drops_failed_read_leftovers = True
  sys.unraisablehook = hook
  std_logging.getLogger("asyncio").addFilter(keep_record)


def _is_config_mismatch(exc: Exception) -> bool:
  """Whether a restore failed because the target's shapes or tree differ from the files'."""
  text = str(exc)
  return isinstance(exc, (KeyError, TypeError)) or any(
      marker in text
      for marker in ("is not compatible with the stored shape", "tree structures do not match")
  )


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def checkpoint_steps(directory: str) -> list[int]:
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def require_checkpoint(
    workdir: str,
    step: int,
    train_command: str = "",
    *,
    how: str = "",
    purpose: str = "initialise from",
    step_key: str = "config.train.init_from_step",
) -> int:
  """The step of `workdir`'s checkpoint to use (`step` = -1: latest), or a one-sentence
  CheckpointError saying what to do: `how`, or else training that run with `train_command`."""
  directory = checkpoint_dir(workdir)
  how = how or (
      f"train that run first with `{train_command}`"
      if train_command
      else "train that run first or fix the path"
  )
  steps = checkpoint_steps(directory)
  if not steps:
    raise CheckpointError(f"no checkpoint found in {directory} to {purpose}; {how}.")
  if step == -1:
    return steps[-1]
  if step not in steps:
    raise CheckpointError(
        f"checkpoint step {step} is not in {directory} (available: {steps}); "
        f"{how} to step {step} or set {step_key}."
    )
  return step


def load_model_weights(
    workdir: str, step: int, target_model: dict, train_command: str = ""
) -> tuple[dict, int]:
  """Params and EMA params of another run's checkpoint (`step` = -1: the newest readable one)
  and its step."""
  latest = step == -1
  step = require_checkpoint(workdir, step, train_command)
  directory = checkpoint_dir(workdir)
  ckpt = Checkpointer(directory, save_every=1, keep=1, async_save=False, read_only=True)
  steps = [s for s in ckpt.all_steps() if s <= step] if latest else [step]
  try:
    found = _newest_readable(steps, lambda s: ckpt.restore_model(s, target_model), directory)
  except Exception as exc:  # noqa: BLE001
    if not _is_config_mismatch(exc):
      raise
    raise CheckpointError(
        f"the checkpoint at step {step} in {directory} does not fit this config's model "
        f"({str(exc).splitlines()[0][:200]}); use the config it was trained with"
    ) from exc
  finally:
    ckpt.close()
  if found is None:  # the step vanished between listing and reading
    raise CheckpointError(f"checkpoint step {step} disappeared from {directory} while reading.")
  return found[0], found[1]
