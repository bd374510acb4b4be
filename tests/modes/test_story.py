"""`--mode=story`'s one-sentence refusals. The story itself runs end to end in
test_paper_story.py (CIFAR-10's story with ADM-IP: every stage's updates, each cell's FID and the
verdict's KID difference recomputed, preemption, a rerun that redoes nothing) and per seed on
digits in test_study.py."""

import os

from tests import run_utils


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
