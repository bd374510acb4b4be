"""The frozen teacher of consistency distillation: its checkpoint, EMA choice and network check."""

import json
import os
from typing import Any

import ml_collections

from modes import checkpoint as ckpt_lib
from modes import run_config
from modes.errors import CheckpointError, ConfigError


def teacher_ema_count(teacher_workdir: str, default: int) -> int:
  """How many EMA averages the teacher run keeps (from its config.json; else `default`)."""
  path = os.path.join(teacher_workdir, "config.json")
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return len(json.load(f)["train"]["ema_rates"])


def check_teacher_model(config: ml_collections.ConfigDict) -> None:
  """One sentence when the teacher run's network settings differ from this config's."""
  saved = run_config.read_config(config.consistency.teacher)
  if saved is None:
    return
  differ = [
      k.split(".", 1)[1]
      for k in run_config.shape_keys_that_differ(config, saved)
      if k.startswith("model.")
  ]
  if differ:
    raise ConfigError(
        f"config.model differs from the teacher run {config.consistency.teacher} "
        f"in {differ}; a consistency student starts from its teacher and must use "
        "the same network settings."
    )


def load_teacher(config: ml_collections.ConfigDict, params_like: Any) -> tuple[Any, int]:
  """The frozen teacher weights (EMA `teacher_ema_index` or raw) and the teacher's step."""
  cm = config.consistency
  count = teacher_ema_count(cm.teacher, len(config.train.ema_rates))
  target = {"params": params_like, "ema_params": tuple(params_like for _ in range(count))}
  model, step = ckpt_lib.load_model_weights(cm.teacher, cm.teacher_step, target, cm.teacher_command)
  if not cm.teacher_use_ema:
    return model["params"], step
  if cm.teacher_ema_index >= count:
    raise CheckpointError(
        f"config.consistency.teacher_ema_index = {cm.teacher_ema_index} but "
        f"the teacher run keeps {count} EMA average(s); use an index below "
        f"{count}."
    )
  return model["ema_params"][cm.teacher_ema_index], step
