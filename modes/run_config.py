"""A run's `config.json`: written by every training run, compared with the config that resumes it."""

import json
import os

import ml_collections

from modes.errors import ConfigError

# Settings that change no parameter shape: a run may resume or distil with other values.
SHAPE_FREE_MODEL_KEYS = ("dropout", "compute_dtype", "remat")
# The data settings that fix the shapes of the network's input and of its class embedding.
SHAPE_DATA_KEYS = ("image_size", "channels", "num_classes")


def config_path(workdir: str) -> str:
  """Where a training run keeps its resolved configuration."""
  return os.path.join(workdir, "config.json")


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the resolved `config` as `workdir/config.json`."""
  with open(config_path(workdir), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def read_config(workdir: str) -> dict | None:
  """The `config.json` of `workdir` as a dict, or None when it is missing or unreadable."""
  try:
    with open(config_path(workdir)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def shape_keys_that_differ(config: ml_collections.ConfigDict, saved: dict) -> list[str]:
  """The dotted config.model / config.data keys whose values in `saved` change shapes."""
  ours = json.loads(config.to_json_best_effort())
  differ = []
  for section, keys in (("model", None), ("data", SHAPE_DATA_KEYS)):
    theirs = saved.get(section) or {}
    for key in sorted(ours[section]):
      if keys is None and key in SHAPE_FREE_MODEL_KEYS or keys is not None and key not in keys:
        continue
      if key in theirs and theirs[key] != ours[section][key]:
        differ.append(f"{section}.{key}")
  return differ


def check_resume_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """One sentence when `workdir` was trained with other network or data shapes than `config`."""
  saved = read_config(workdir)
  if saved is None:
    return
  differ = shape_keys_that_differ(config, saved)
  if differ:
    shown = ", ".join(
        f"{k} = {_get(saved, k)!r} there, {_get(json.loads(config.to_json_best_effort()), k)!r} here"
        for k in differ
    )
    raise ConfigError(
        f"the checkpoints in {workdir} were written with other settings ({shown}); resume "
        "with the config they were written with (its config.json) or use a new --workdir."
    )


def _get(tree: dict, key: str):
  section, name = key.split(".")
  return tree[section][name]
