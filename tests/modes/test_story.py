"""The whole story in one command (`--mode=story`): clean run → AT fine-tune and an
equal-budget clean control from the same checkpoint → FID table; a rerun redoes nothing."""

import csv
import glob
import json
import os

import numpy as np

from evaluation import convert_inception, fid, kid
from tests import direct_fid, run_utils


def test_story_runs_every_stage_with_equal_updates_and_resumes(tmp_path):
  weights, _ = convert_inception.convert(None, str(tmp_path / "inception.npz"))
  workdir = str(tmp_path / "story")
  args = (
      "--mode=story",
      "--config.adversarial.mode=fast",
      "--config.adversarial.num_replays=2",
      "--config.story.clean_steps=2",
      "--config.train.num_steps=2",
      "--config.train.async_checkpointing=False",
      "--config.story.methods=('ddim',)",
      "--config.story.nfes=(2,)",
      "--config.story.num_samples=8",
      "--config.sampling.batch_size=8",
      f"--config.evaluation.inception_weights={weights}",
      "--config.evaluation.max_reference_images=8",
      "--config.evaluation.batch_size=8",
      "--config.evaluation.fid_method=eigh",
      "--config.evaluation.precision_recall=False",
      # The start-up cost estimate is tested in test_paper_story.py; off here, it keeps this
      # test's runtime as it was (a 900 s subprocess limit on a loaded 2-core machine).
      "--config.story.estimate=False",
  )
  first = run_utils.run_main(workdir, *args)

  clean, at, control = (
      run_utils.read_checkpoint(os.path.join(workdir, name)) for name in ("clean", "at", "control")
  )
  assert int(clean["train"]["step"]) == 2
  # Fast AT makes K = 2 updates per minibatch: the control gets 2 × 2 minibatches, 1 update each.
  assert int(at["train"]["step"]) == 2 and int(control["train"]["step"]) == 4
  assert int(at["train"]["num_updates"]) == int(control["train"]["num_updates"]) == 4
  clean_dir = os.path.join(workdir, "clean")
  assert first.stderr.count(f"Initialised params and EMA from {clean_dir} step 2") == 2
  assert run_utils.max_abs_diff(at["model"]["params"], control["model"]["params"]) > 0

  with open(os.path.join(workdir, "table", "table.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [(r["run"], r["method"], r["nfe"]) for r in rows] == [
      ("ADM-AT", "ddim", "2"),
      ("ADM (clean control)", "ddim", "2"),
  ]
  assert all(float(r["fid"]) > 0 and r["num_samples"] == "8" for r in rows)
  assert "| ADM-AT | ddim |" in first.stdout  # the table is printed at the end
  # Each cell's FID and sFID equal those of its stage's samples computed directly against the
  # story's reference statistics (tests/direct_fid.py).
  scored = direct_fid.assert_cells_match_direct(
      os.path.join(workdir, "table", "table.csv"),
      os.path.join(workdir, "table", "cells"),
      {"run": "label", "method": "method", "nfe": "nfe"},
      weights=weights,
      reference_file=os.path.join(workdir, "eval", "reference.npz"),
      batch_size=8,
  )
  for cell, stage in zip(scored, ("at", "control")):
    samples = os.path.join(workdir, stage, "samples")
    assert os.path.dirname(cell["provenance"]["samples_file"]) == samples

  # The verdict: the paired KID difference of the two cells' saved features, recomputed here.
  with open(os.path.join(workdir, "story", "comparison.json")) as f:
    (comparison,) = json.load(f)
  reference = fid.load_statistics(os.path.join(workdir, "eval", "reference.npz"))
  assert reference.pool_features.shape == (8, 2048)
  features = []
  for row in ("at", "control"):
    sample_file = glob.glob(os.path.join(workdir, row, "samples", "ddim*_nfe2_*.npz"))
    (path,) = [p for p in sample_file if not p.endswith("_pool.npz")]
    with np.load(
        os.path.join(workdir, row, "eval", os.path.basename(path)[:-4] + "_pool.npz")
    ) as d:
      features.append(d["pool_features"])
  direct = kid.paired_mmd2_difference(*features, reference.pool_features)
  assert comparison["difference"] == direct["difference"] != 0
  assert comparison["standard_error"] == direct["standard_error"] > 0
  assert comparison["pairs"] == 8 and comparison["reference_rows"] == 8
  assert "Verdict over 1 cell(s)" in first.stdout
  assert os.path.isfile(os.path.join(workdir, "story", "at_vs_control_ddim_nfe2.png"))

  again = run_utils.run_main(workdir, *args)
  assert again.stderr.count("done before") == 5  # three stages, two cells
  assert "Initialised" not in again.stderr


def test_story_needs_adversarial_training(tmp_path):
  result = run_utils.run_main(str(tmp_path / "s"), "--mode=story", check=False)
  run_utils.assert_one_sentence_error(result, "config.adversarial.mode", "--mode=story")


def test_story_without_fid_weights_stops_before_training(tmp_path):
  workdir = str(tmp_path / "s")
  result = run_utils.run_main(
      workdir,
      "--mode=story",
      "--config.adversarial.mode=fast",
      f"--config.evaluation.inception_weights={tmp_path}/none.npz",
      check=False,
  )
  run_utils.assert_one_sentence_error(result, "FID Inception weights not found")
  assert not os.path.exists(os.path.join(workdir, "clean"))
