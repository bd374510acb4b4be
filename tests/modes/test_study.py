"""`--mode=study`: the story over seeds with robustness cells, aggregated with a t-interval."""

import glob
import json
import math
import os

import numpy as np
import pytest

from evaluation import convert_inception
from modes import study
from tests import direct_fid, run_utils

T_975 = {1: 12.706204736174699, 2: 4.302652729749464}  # Student-t quantiles (printed tables)


def test_mean_interval_is_the_student_t_interval():
  mean, low, high = study.mean_interval([1.0, 2.0, 6.0])
  sd = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2)
  assert mean == 3.0
  np.testing.assert_allclose(
      [low, high], [3 - T_975[2] * sd / math.sqrt(3), 3 + T_975[2] * sd / math.sqrt(3)]
  )
  assert all(math.isnan(v) for v in study.mean_interval([1.0])[1:])
  assert study.verdict(-2.0, -0.1) == "better" and study.verdict(0.1, 1.0) == "worse"
  assert study.verdict(-0.1, 0.1) == "within noise"


def test_study_runs_the_story_per_seed_and_compares_attacked_cells(tmp_path):
  weights, _ = convert_inception.convert(None, str(tmp_path / "inception.npz"))
  workdir = str(tmp_path / "study")
  run_utils.run_main(
      workdir,
      "--mode=study",
      "--config.study.seeds=(3,5)",
      # The stages' step settings are those of other tests' runs, whose compiled programs the
      # persistent cache can then share: clean = the trained_tiny fixture's, AT =
      # test_train.AT_OVERRIDES', control = test_train.PLAIN's.
      "--config.adversarial.mode=fast",
      "--config.adversarial.num_replays=2",
      "--config.adversarial.init=carry",
      "--config.optim.learning_rate=1e-4",
      "--config.story.clean_warmup_steps=0",
      "--config.story.clean_steps=1",
      "--config.train.num_steps=1",
      "--config.train.async_checkpointing=False",
      "--config.story.methods=('ddim',)",
      "--config.story.nfes=(2,)",
      "--config.story.num_samples=6",
      "--config.sampling.batch_size=6",
      "--config.robustness.nfe=2",
      "--config.robustness.kinds=('adversarial',)",
      "--config.robustness.budgets=(0.05,)",
      "--config.robustness.attack_steps=(0,)",
      "--config.robustness.pgd_steps=1",
      "--config.robustness.num_samples=6",
      f"--config.evaluation.inception_weights={weights}",
      "--config.evaluation.max_reference_images=8",
      "--config.evaluation.batch_size=6",
      "--config.evaluation.fid_method=eigh",
      "--config.evaluation.precision_recall=False",
  )
  with open(os.path.join(workdir, "study", "study.json")) as f:
    rows = {(r["method"], r["nfe"]): r for r in json.load(f)}
  assert set(rows) == {("ddim", 2), ("ddim+adversarial ρ=0.05", 2)}
  for seed in (3, 5):
    seed_dir = os.path.join(workdir, f"seed{seed}")
    with open(os.path.join(seed_dir, "at", "config.json")) as f:
      recorded = json.load(f)
    assert recorded["seed"] == seed and recorded["sampling"]["seed"] == seed
    with open(os.path.join(seed_dir, "story", "comparison.json")) as f:
      (story_cell,) = json.load(f)
    assert rows[("ddim", 2)]["seeds"][str(seed)]["difference"] == story_cell["difference"]
    # The attacked cell: the paired KID difference of the two runs' saved features, recomputed.
    expected = direct_fid.story_kid_difference(seed_dir, "*adversarial0.05*_pool.npz")
    attacked = rows[("ddim+adversarial ρ=0.05", 2)]["seeds"][str(seed)]
    assert attacked["difference"] == pytest.approx(expected["difference"], rel=1e-12)
    assert attacked["standard_error"] == pytest.approx(expected["standard_error"], rel=1e-12)
  # Different seeds: different initial noise (so different samples) in the two stories.
  a, b = (
      sorted(glob.glob(os.path.join(workdir, f"seed{s}", "at", "samples", "ddim_nfe2_*.npz")))
      for s in (3, 5)
  )
  with np.load(a[0]) as x, np.load(b[0]) as y:
    assert not np.array_equal(x["arr_0"], y["arr_0"])
  for row in rows.values():
    d = [row["seeds"][str(s)]["difference"] for s in (3, 5)]
    half = T_975[1] * abs(d[0] - d[1]) / 2  # s.d./sqrt(2) with s.d. = |d0 − d1|/sqrt(2)
    assert row["difference_mean"] == pytest.approx(np.mean(d))
    np.testing.assert_allclose(row["interval_95"], [np.mean(d) - half, np.mean(d) + half])
  with open(os.path.join(workdir, "study", "study.md")) as f:
    text = f.read()
  assert "seed 3 | seed 5" in text and "22.62" in text and "Verdict over 2 cell(s)" in text


def test_a_single_seed_reports_its_own_intervals_and_no_verdict_over_seeds():
  cell = dict(
      method="ddim",
      nfe=5,
      difference=2e-3,
      standard_error=5e-4,
      verdict="worse",
      fid_at=2.0,
      fid_control=1.0,
  )
  (row,) = study.aggregate({0: [cell]})
  assert row["verdict"] == "one seed" and row["worse_seeds"] == 1
  text = study.markdown([row], [0], 500)
  assert "loses in 1" in text and "needs at least two" in text and "nan" not in text
  (row,) = study.aggregate({0: [cell], 1: [dict(cell, difference=2.2e-3)]})
  assert row["verdict"] == "worse" and "loses in 1, and is within noise in 0" in study.closing(
      [row]
  )
