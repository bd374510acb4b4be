"""Orbax checkpoints of the train state: every N steps, keep the last K plus milestones.

A checkpoint holds two items so that other runs can read the weights alone:
  model: {"params", "ema_params"}          (read by `init_from`, sampling and evaluation)
  train: everything else of the train state (optimizer, counters, sampler history, ...)
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as ocp_keep

from adv_diffusion.errors import CheckpointError

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

  def __init__(self, directory: str, *, save_every: int, keep: int, keep_every: int = 0,
               async_save: bool = True, read_only: bool = False):
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
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(MODEL_ITEM, TRAIN_ITEM))

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
        args=ocp.args.Composite(**{MODEL_ITEM: ocp.args.StandardSave(model),
                                   TRAIN_ITEM: ocp.args.StandardSave(train)}),
        force=True)

  def restore(self, step: int, target_state: Any) -> Any:
    """Restores the full state of `step` with the shapes, dtypes and shardings of `target_state`."""
    model, train = _split_state(target_state)
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(**{MODEL_ITEM: ocp.args.StandardRestore(_abstract(model)),
                                   TRAIN_ITEM: ocp.args.StandardRestore(_abstract(train))}))
    return target_state.replace(**restored[MODEL_ITEM], **restored[TRAIN_ITEM])

  def restore_model(self, step: int, target_model: dict) -> dict:
    """Restores only {"params", "ema_params"} of `step`, shaped like `target_model`."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(
            **{MODEL_ITEM: ocp.args.StandardRestore(_abstract(target_model))}))
    return restored[MODEL_ITEM]

  def wait(self) -> None:
    """Blocks until background saves have finished."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def checkpoint_steps(directory: str) -> list[int]:
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def require_checkpoint(workdir: str, step: int, train_command: str = "", *, how: str = "",
                       purpose: str = "initialise from",
                       step_key: str = "config.train.init_from_step") -> int:
  """The step of `workdir`'s checkpoint to use (`step` = -1: latest), or a one-sentence
  CheckpointError saying what to do: `how`, or else training that run with `train_command`."""
  directory = checkpoint_dir(workdir)
  how = how or (f"train that run first with `{train_command}`" if train_command
                else "train that run first or fix the path")
  steps = checkpoint_steps(directory)
  if not steps:
    raise CheckpointError(f"no checkpoint found in {directory} to {purpose}; {how}.")
  if step == -1:
    return steps[-1]
  if step not in steps:
    raise CheckpointError(f"checkpoint step {step} is not in {directory} (available: {steps}); "
                          f"{how} to step {step} or set {step_key}.")
  return step


def load_model_weights(workdir: str, step: int, target_model: dict,
                       train_command: str = "") -> tuple[dict, int]:
  """Params and EMA params of another run's checkpoint (`step` = -1: latest) and its step."""
  step = require_checkpoint(workdir, step, train_command)
  directory = checkpoint_dir(workdir)
  ckpt = Checkpointer(directory, save_every=1, keep=1, async_save=False, read_only=True)
  try:
    try:
      model = ckpt.restore_model(step, target_model)
    except (ValueError, KeyError, TypeError) as exc:
      raise CheckpointError(
          f"the checkpoint at step {step} in {directory} does not fit this config's model "
          f"({str(exc).splitlines()[0][:200]}); use the config it was trained with") from exc
    return model, step
  finally:
    ckpt.close()
