"""Consistency-distillation runs end to end (`main.py` subprocesses): a missing teacher is one
sentence; CD-AT runs equal on one and eight devices, resume exactly and sample."""

import numpy as np

from tests import run_utils

CD_AT = (
    "--config.consistency.mode=distill",
    "--config.consistency.num_scales=10",
    "--config.adversarial.mode=fast",
    "--config.adversarial.num_replays=2",
    "--config.optim.learning_rate=1e-4",
    "--config.train.async_checkpointing=False",
)


def test_missing_teacher_is_one_sentence(tmp_path):
  result = run_utils.run_main(
      str(tmp_path / "cd"),
      *CD_AT,
      f"--config.consistency.teacher={tmp_path / 'no_teacher'}",
      "--config.consistency.teacher_command=python main.py --x",
      check=False,
  )
  run_utils.assert_one_sentence_error(
      result, "no checkpoint found", "to distil from", "`python main.py --x`"
  )


def test_cd_at_runs_equal_on_one_and_eight_devices_resume_exactly_and_sample(
    tmp_path, trained_tiny
):
  teacher = trained_tiny
  cd = (*CD_AT, f"--config.consistency.teacher={teacher}")
  run_utils.run_main(
      str(tmp_path / "one"), *cd, "--config.train.num_steps=4", "--config.train.checkpoint_every=2"
  )
  run_utils.run_main(str(tmp_path / "eight"), *cd, "--config.train.num_steps=4", num_devices=8)
  # As if stopped after checkpoint 2; resumed to 4 in a new process with θ⁻ from the checkpoint.
  run_utils.copy_as_stopped_at(str(tmp_path / "one"), str(tmp_path / "resumed"), 2)
  run_utils.run_main(
      str(tmp_path / "resumed"),
      *cd,
      "--config.train.num_steps=4",
      "--config.train.checkpoint_every=2",
  )
  one = run_utils.read_checkpoint(str(tmp_path / "one"), 4)
  eight = run_utils.read_checkpoint(str(tmp_path / "eight"), 4)
  resumed = run_utils.read_checkpoint(str(tmp_path / "resumed"), 4)
  assert int(one["train"]["num_updates"]) == 8  # 2 replays per minibatch
  target = one["train"]["target_params"]
  assert 0 < run_utils.max_abs_diff(target, one["model"]["params"])  # θ⁻ lags θ
  # 8-way all-reduce rounding, amplified by Adam (noise-level gradients become ±lr steps) and
  # by the per-example normalised δ ascent: measured 4.7e-5 against a total move of 6.5e-4
  # from the teacher. A wrong split of the batch, t or δ would differ by the move itself.
  moved = run_utils.max_abs_diff(
      one["model"]["params"], run_utils.read_checkpoint(teacher)["model"]["ema_params"][0]
  )
  assert run_utils.max_abs_diff(one["model"], eight["model"]) <= min(1e-4, 0.15 * moved)
  assert run_utils.max_abs_diff(target, eight["train"]["target_params"]) <= 0.05 * moved
  assert run_utils.max_abs_diff(one["model"], resumed["model"]) == 0.0
  assert run_utils.max_abs_diff(one["train"], resumed["train"]) == 0.0

  run_utils.run_main(
      str(tmp_path / "one"),
      "--mode=sample",
      "--config.sampling.method=consistency",
      "--config.sampling.nfe=2",
      "--config.sampling.num_samples=8",
      "--config.sampling.batch_size=8",
      *cd,
  )
  with np.load(tmp_path / "one" / "samples" / "consistency_nfe2_step4_ema_seed0.npz") as f:
    images = f["arr_0"]
  assert images.shape == (8, 16, 16, 1) and images.dtype == np.uint8 and images.std() > 0
