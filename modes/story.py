"""--mode=story: the whole story in one command: does AT help this model?

Stages, each a resumable run in its own sub-directory of the workdir:
  1. `clean/`   clean ADM training (`story.clean_steps` at `story.clean_learning_rate`);
  2. `at/`      AT fine-tuning from the clean run's last checkpoint, as the paper does (PAPER.md
                §4): the config itself, `train.num_steps` minibatches;
  3. `control/` the equal-budget clean continuation from the same checkpoint: the same
                optimizer, schedule and EMA, adversarial training off, and as many optimizer
                updates as AT makes (K per minibatch for "fast" AT, 1 for "pgd");
  +  `ip/`      with story.baselines = ("ip",): ADM-IP (PAPER.md §5) from the same checkpoint,
                the control with input perturbation γ = story.ip_gamma, as many updates;
  4. `table/`   samples of the AT, control (and baseline) runs for `story.methods` ×
                `story.nfes`, FID and KID against the reference statistics (the paper's
                published FIDs beside them, its ADM's beside the control), markdown + CSV +
                FID-vs-NFE plot, through `--mode=table` (resumable cell by cell);
  5. `story/`   the verdict (`story_report`): AT − control KID per cell with its paired
                standard error, side-by-side sample grids from the same noise, one sentence.
With `story.clean_weights` (a weights .npz, e.g. the one configs/digits_at.py ships) stage 1
is skipped and AT and control start from those weights. A killed story resumes at the stage
(and step, or cell) where it stopped. At start-up the story prints the accelerator-hours the
remaining stages and cells are expected to take (`story_estimate`, story.estimate).
"""

from __future__ import annotations

import json
import os

import ml_collections
from absl import logging

from modes import story_estimate, story_report, table as tables, train
from modes.config_validation import validate_config
from evaluation import inception

STAGES = ("clean", "at", "control")
TABULATED = {"at": "ADM-AT", "control": "ADM (clean control)"}  # stage → table label
BASELINE_LABELS = {"ip": "ADM-IP"}  # story.baselines stage → table label
# The paper's clean baseline is "ADM": its published numbers stand beside the control, and the
# table says so (table.published_labels).
PUBLISHED_LABELS = "ADM (clean control)=ADM"


def stages(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The training stages of this story, in order: STAGES, then story.baselines."""
  return STAGES + tuple(config.story.baselines)


def tabulated(config: ml_collections.ConfigDict) -> dict[str, str]:
  """Stage → table label of every tabulated stage, in table order."""
  return {**TABULATED, **{name: BASELINE_LABELS[name] for name in config.story.baselines}}


def updates_per_step(config: ml_collections.ConfigDict) -> int:
  """Optimizer updates per minibatch: K for the authors' fast AT, else 1."""
  return config.adversarial.num_replays if config.adversarial.mode == "fast" else 1


def _copy(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.mode = "train"
  return cfg


def stage_configs(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[str, ml_collections.ConfigDict]:
  """The run config of every stage; the AT config is `config` itself."""
  story = config.story
  clean_dir = story.clean_workdir or os.path.join(workdir, "clean")
  clean = _copy(config)
  clean.adversarial.mode = "none"
  clean.optim.learning_rate = story.clean_learning_rate
  clean.optim.warmup_steps = story.clean_warmup_steps
  clean.train.num_steps = story.clean_steps
  clean.train.batch_size = story.clean_batch_size or config.train.batch_size
  clean.train.init_from = ""
  clean.train.checkpoint_every = min(clean.train.checkpoint_every, story.clean_steps)
  clean.train.sample_every = story.clean_steps if config.train.sample_every else 0

  at = _copy(config)
  if story.clean_weights:
    at.train.init_from, at.train.init_from_sha256 = story.clean_weights, story.clean_weights_sha256
    # The weights-file errors already say "restore it (git checkout PATH) or <this>".
    at.train.init_from_command = (
        "train the clean stage in the story with --config.story.clean_weights=''"
    )
  else:
    at.train.init_from, at.train.init_from_step = clean_dir, -1
    at.train.init_from_command = "the story's clean stage (run the same command again)"

  k = updates_per_step(config)
  control = _copy(at)
  control.adversarial.mode = "none"
  control.train.num_steps = at.train.num_steps * k
  control.train.checkpoint_every = at.train.checkpoint_every * k
  control.train.sample_every = control.train.num_steps if config.train.sample_every else 0
  control.train.log_every = at.train.log_every * k
  configs = {"clean": clean, "at": at, "control": control}
  if "ip" in story.baselines:  # ADM-IP (PAPER.md §5): x_t from ε + γ·ξ, target ε
    configs["ip"] = ip = _copy(control)
    ip.diffusion.input_perturbation = story.ip_gamma
  return configs


def _finished(run_dir: str, num_steps: int) -> bool:
  path = os.path.join(run_dir, "train_done.json")
  if not os.path.isfile(path):
    return False
  with open(path) as f:
    return json.load(f).get("step", -1) >= num_steps


def table_config(
    config: ml_collections.ConfigDict, run_dirs: dict[str, str]
) -> ml_collections.ConfigDict:
  cfg = _copy(config)
  cfg.evaluation.save_sample_features = True  # the paired comparison reads them
  story = config.story
  cfg.table.runs = ",".join(
      f"{label}={run_dirs[name]}" for name, label in tabulated(config).items()
  )
  cfg.table.published_labels = PUBLISHED_LABELS
  cfg.table.methods, cfg.table.nfes = tuple(story.methods), tuple(story.nfes)
  cfg.table.num_samples = story.num_samples
  return cfg


def run(config: ml_collections.ConfigDict, workdir: str) -> str | None:
  """Runs the missing stages; returns the table's markdown path (None if preempted)."""
  validate_config(config, "story")
  # The last stage needs the FID network: say so now, not after the training stages.
  inception.load_inception_weights(config.evaluation.inception_weights or None)
  configs = stage_configs(config, workdir)
  names = stages(config)
  run_dirs = {name: os.path.join(workdir, name) for name in names}
  if config.story.clean_workdir:
    run_dirs["clean"] = config.story.clean_workdir
  todo = {
      name: (configs[name], run_dirs[name])
      for name in names
      if not (name == "clean" and config.story.clean_weights)
      and not _finished(run_dirs[name], configs[name].train.num_steps)
  }
  table_cfg = table_config(config, run_dirs)
  if config.story.estimate:
    story_estimate.report(todo, table_cfg, workdir, config.story.estimate_steps)
  total = len(names) + 2
  for number, name in enumerate(names, start=1):
    cfg, run_dir = configs[name], run_dirs[name]
    if name == "clean" and config.story.clean_weights:
      logging.info("Story stage 1/%d (clean): the weights %s.", total, config.story.clean_weights)
      continue
    if name not in todo:
      logging.info("Story stage %d/%d (%s): done before, in %s.", number, total, name, run_dir)
      continue
    logging.info(
        "Story stage %d/%d (%s): %d steps in %s.",
        number,
        total,
        name,
        cfg.train.num_steps,
        run_dir,
    )
    train.train(cfg, run_dir)
    if not _finished(run_dir, cfg.train.num_steps):  # preempted: the stage saved and returned
      return None
  logging.info(
      "Story stage %d/%d: samples, FID and KID (%s × NFE %s, %d samples per cell).",
      total - 1,
      total,
      "/".join(config.story.methods),
      "/".join(map(str, config.story.nfes)),
      config.story.num_samples,
  )
  results, reference = tables.tabulate(table_cfg, workdir)
  path = os.path.join(workdir, "table", "table.md")
  logging.info("Story stage %d/%d: AT − control, paired, with its uncertainty.", total, total)
  verdict = story_report.write_report(
      results, TABULATED["at"], TABULATED["control"], reference, os.path.join(workdir, "story")
  )
  with open(path) as f:
    print(f.read())
  print(verdict)
  return path
