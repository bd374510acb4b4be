"""The story's pieces for the paper's scale: the ADM-IP stage, the published numbers beside the
control, and the start-up cost line (fast: no training; the end-to-end run is
tests/modes/test_paper_story.py)."""

import os

import pytest

from configs import digits_at, paper_cifar10, paper_imagenet64
from modes import story, story_estimate, table as tables
from modes.config_validation import validate_config
from modes.errors import ConfigError


def test_paper_cifar10_stages_are_the_papers_runs(tmp_path):
  config = paper_cifar10.get_config()
  validate_config(config, "story")
  configs = story.stage_configs(config, str(tmp_path))
  assert story.stages(config) == ("clean", "at", "control", "ip")
  clean, at, control, ip = (configs[n] for n in story.stages(config))
  assert (clean.train.num_steps, clean.adversarial.mode, clean.train.batch_size) == (
      250_000,
      "none",
      128,
  )
  assert clean.optim.learning_rate == at.optim.learning_rate == 1e-4  # PAPER.md §6
  assert (at.train.num_steps, at.adversarial.mode, at.adversarial.num_replays) == (
      200_000,
      "fast",
      3,
  )
  # The control and ADM-IP make as many optimizer updates as AT: 3 per AT minibatch.
  assert control.train.num_steps == ip.train.num_steps == 600_000
  assert ip.adversarial.mode == control.adversarial.mode == "none"
  assert ip.diffusion.input_perturbation == 0.15 and control.diffusion.input_perturbation == 0
  assert at.train.init_from == control.train.init_from == ip.train.init_from
  assert at.train.init_from == os.path.join(str(tmp_path), "clean")
  table = story.table_config(config, {n: f"runs/{n}" for n in story.stages(config)})
  assert tables.parse_runs(table.table.runs) == [
      ("ADM-AT", "runs/at"),
      ("ADM (clean control)", "runs/control"),
      ("ADM-IP", "runs/ip"),
  ]
  assert len(tables.cell_grid(table)) == 3 * 4 * 5 and table.table.num_samples == 50_000


def test_paper_imagenet64_is_the_class_conditional_sibling(tmp_path):
  config = paper_imagenet64.get_config()
  validate_config(config, "story")
  configs = story.stage_configs(config, str(tmp_path))
  assert configs["clean"].train.num_steps == 540_000 and config.data.num_classes == 1000
  assert configs["ip"].diffusion.input_perturbation == 0.1  # PAPER.md §5: 0.1 beyond CIFAR-10
  assert tables.published_fid("imagenet64", "ADM-AT", "ddim", 10) is None  # none published


def test_the_default_story_has_no_baseline_stage(tmp_path):
  config = digits_at.get_config()
  assert story.stages(config) == story.STAGES and "ip" not in story.stage_configs(config, "w")
  assert config.story.estimate is False  # its printed output stays as the README shows it
  assert list(story.tabulated(config).values()) == ["ADM-AT", "ADM (clean control)"]


@pytest.mark.parametrize(
    "key, value",
    [
        ("baselines", ("pgd",)),
        ("baselines", ("ip", "ip")),
        ("ip_gamma", 0.0),
        ("estimate_steps", 0),
    ],
)
def test_bad_story_values_are_one_sentence(key, value):
  config = paper_cifar10.get_config()
  config.story[key] = value
  with pytest.raises(ConfigError, match=f"config.story.{key} = "):
    validate_config(config, "story")


def test_published_numbers_of_the_paper_stand_beside_the_control(tmp_path):
  aliases = tables.parse_published_labels(story.PUBLISHED_LABELS)
  assert tables.published_fid("cifar10", aliases["ADM (clean control)"], "ddim", 10) == 22.62
  results = [
      {"label": "ADM (clean control)", "method": "ddim", "nfe": 10, "num_samples": 8, "fid": 30.0}
      | {"published_fid": 22.62, "published_label": "ADM"},
      {"label": "ADM-IP", "method": "ddim", "nfe": 10, "num_samples": 8, "fid": 31.0}
      | {"published_fid": None},
  ]
  tables.write_outputs(results, str(tmp_path))
  markdown = (tmp_path / "table.md").read_text()
  assert "| ADM (clean control) | ddim | 30.00 (22.62) |" in markdown
  assert "| ADM-IP | ddim | 31.00 |" in markdown
  assert "The published numbers beside ADM (clean control) are the paper's ADM numbers." in markdown
  with pytest.raises(ConfigError, match="config.table.published_labels"):
    tables.parse_published_labels("ADM (clean control)")


def test_cost_line_sums_steps_cells_and_devices():
  cost = story_estimate.Estimate(
      (("clean", 250_000, 0.5), ("at", 200_000, 1.5)),
      cells=60,
      sampling_seconds=7200.0,
      inception_seconds=3600.0,
      reference_images=50_000,
      reference_seconds=360.0,
  )
  assert cost.seconds == 250_000 * 0.5 + 200_000 * 1.5 + 7200 + 3600 + 360
  line = story_estimate.summary(cost, 8, "TPU v4")
  hours = cost.seconds / 3600
  assert line.startswith(f"Expected: {8 * hours:,.0f} accelerator-hours on 8 x TPU v4 (")
  assert f"({hours:,.0f} h wall; clean 250,000 steps at 0.5 s/step; at 200,000" in line
  assert "table 60 cells: sampling 2 h, Inception 1 h; reference 50,000 images 0.1 h)." in line
  nothing = story_estimate.summary(story_estimate.Estimate(()), 1, "cpu")
  assert nothing == "Expected: 0 accelerator-hours on 1 x cpu (0 h wall; nothing left to run)."


def test_nothing_left_measures_nothing(tmp_path, monkeypatch):
  config = digits_at.get_config()
  config.evaluation.reference = str(tmp_path / "reference.npz")
  (tmp_path / "reference.npz").write_bytes(b"")
  table = story.table_config(config, {"at": "runs/at", "control": "runs/control"})
  cell_dir = tmp_path / "table" / "cells"
  cell_dir.mkdir(parents=True)
  for label, _, method, nfe in tables.cell_grid(table):
    open(tables.cell_file(str(cell_dir), tables.cell_name(label, method, nfe)), "w").close()
  monkeypatch.setattr(story_estimate, "train_step_seconds", None)  # would fail if called
  cost = story_estimate.estimate({}, table, str(tmp_path), 3)
  assert cost.seconds == 0 and cost.cells == 0 and not cost.stages


def test_seconds_per_call_excludes_the_warm_up_call(monkeypatch):
  clock = [0.0]
  monkeypatch.setattr(story_estimate.time, "perf_counter", lambda: clock[0])

  def fn():
    clock[0] += 100.0 if clock[0] == 0 else 2.0  # the first (compiling) call is slow
    return None

  assert story_estimate.seconds_per_call(fn, 4) == 2.0
