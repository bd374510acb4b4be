"""`--mode=fid_stats` and `--mode=eval` end to end on digits (tiny image counts: Inception costs
~0.2 s per image on two CPU cores)."""

import json
import os

import numpy as np
import pytest

from modes import data as data_lib
from evaluation import convert_inception, fid
from tests import run_utils


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  out, _ = convert_inception.convert(None, str(tmp_path_factory.mktemp("w") / "inception.npz"))
  return out


def test_fid_stats_then_eval_write_scores_with_provenance(tmp_path, weights):
  workdir = str(tmp_path / "run")
  common = (
      f"--config.evaluation.inception_weights={weights}",
      "--config.evaluation.max_reference_images=12",
      "--config.evaluation.batch_size=6",
      "--config.evaluation.fid_method=eigh",
  )
  run_utils.run_main(workdir, "--mode=fid_stats", *common)
  reference = os.path.join(workdir, "eval", "reference_digits_train.npz")
  stats = fid.load_statistics(reference)
  assert stats.provenance["dataset"] == "digits" and stats.provenance["count"] == 12
  assert stats.pool.mu.shape == (2048,)

  # The first 12 training images scored against statistics of those same images: FID ≈ 0;
  # the next 12 images score higher.
  images = data_lib.load_dataset("digits").images
  same, other = tmp_path / "same.npz", tmp_path / "other.npz"
  np.savez(same, arr_0=images[:12])
  np.savez(other, arr_0=images[12:24])
  run_utils.run_main(workdir, "--mode=eval", f"--config.evaluation.samples={same}", *common)
  run_utils.run_main(workdir, "--mode=eval", f"--config.evaluation.samples={other}", *common)
  with open(os.path.join(workdir, "eval", "same.json")) as f:
    same_result = json.load(f)
  with open(os.path.join(workdir, "eval", "other.json")) as f:
    other_result = json.load(f)
  assert abs(same_result["fid"]) < 1e-2
  assert other_result["fid"] > 1.0
  record = other_result["provenance"]
  assert record["num_samples"] == 12 and record["reference_count"] == 12
  assert record["resize_rule"] == "tf1_bilinear" and len(record["weights_sha256"]) == 64
  assert record["reference_sha256"] and record["samples_file"].endswith("other.npz")


def test_eval_without_reference_is_one_sentence(tmp_path, weights):
  result = run_utils.run_main(
      str(tmp_path / "run"),
      "--mode=eval",
      f"--config.evaluation.inception_weights={weights}",
      check=False,
  )
  assert result.returncode == 1 and "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("Error: ") and "--mode=fid_stats" in last
