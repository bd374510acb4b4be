"""`--mode=fid_stats` and `--mode=eval` end to end on digits (tiny image counts: Inception costs
~0.2 s per image on two CPU cores)."""

import json
import os

import numpy as np
import pytest

from modes import data as data_lib
from modes import evaluate, statistics_file
from modes.errors import UserFacingError
from evaluation import convert_inception, fid, inception, metrics
from evaluation.errors import EvaluationError
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


def test_bad_sample_files_are_one_sentence_before_inception(tmp_path):
  garbage = tmp_path / "garbage.npz"
  garbage.write_text("not an npz\n")
  reference = tmp_path / "reference.npz"  # only checked to exist: the samples fail first
  reference.write_text("")
  result = run_utils.run_main(
      str(tmp_path / "run"),
      "--mode=eval",
      f"--config.evaluation.samples={garbage}",
      f"--config.evaluation.reference={reference}",
      check=False,
  )
  run_utils.assert_one_sentence_error(result, str(garbage), "not a readable numpy .npz")
  assert "allow_pickle" not in result.stderr
  one = tmp_path / "one.npz"
  np.savez(one, arr_0=data_lib.load_dataset("digits").images[:1])
  with pytest.raises(UserFacingError, match="holds 1 image.*at least 2"):
    evaluate.load_samples(str(one))
  other = tmp_path / "other.npz"
  np.savez(other, images=np.zeros((4, 16, 16, 1), np.uint8))
  with pytest.raises(UserFacingError, match="holds no array arr_0"):
    evaluate.load_samples(str(other))


def test_reference_of_other_features_and_wrong_weights_are_one_sentence(tmp_path, weights):
  loaded = inception.load_inception_weights(weights)
  assert loaded.sha256 == inception.FID_HELPER_SHA256  # what convert_inception writes
  rng = np.random.default_rng(0)
  small = fid.FIDStatistics(rng.standard_normal(64), np.eye(64), 10)  # pytorch-fid's 64-d block
  path = str(tmp_path / "stats64.npz")
  statistics_file.save_statistics(path, small)
  images = data_lib.load_dataset("digits").images[:2]
  with pytest.raises(EvaluationError, match="hold 64-d features but FID uses Inception's 2048-d"):
    metrics.evaluate(images, path, loaded, progress=False)
  garbage = tmp_path / "garbage.npz"
  garbage.write_text("x")
  with pytest.raises(EvaluationError, match="is not a readable numpy .npz"):
    metrics.evaluate(images, str(garbage), loaded, progress=False)
  # The right arrays with one value changed: the hash tells these weights are not the FID's.
  with np.load(weights) as data:
    flat = {k: data[k] for k in data.files}
  flat["Conv2d_1a_3x3/bn_beta"] = flat["Conv2d_1a_3x3/bn_beta"] + 1e-3
  tampered = str(tmp_path / "tampered.npz")
  convert_inception.write_npz_deterministic(tampered, flat)
  with pytest.raises(EvaluationError) as info:
    inception.load_inception_weights(tampered)
  assert "sha256" in str(info.value) and "convert_inception" in str(info.value)
  assert str(info.value).count("\n") == 0


def _fid_stats_config(weights: str, count: int, **evaluation):
  from tests.configs import tiny_digits

  config = tiny_digits.get_config()
  config.evaluation.inception_weights = weights
  config.evaluation.max_reference_images = count
  config.evaluation.batch_size = 6
  for key, value in evaluation.items():
    config.evaluation[key] = value
  return config


def test_reference_features_file_stands_in_for_inception_only_for_the_same_images(
    tmp_path, weights, monkeypatch
):
  exported = str(tmp_path / "features.npz")
  from_images = evaluate.run_fid_stats(
      _fid_stats_config(weights, 12, export_reference_features=exported), str(tmp_path / "a")
  )
  source = fid.load_statistics(from_images)
  features, provenance = statistics_file.load_reference_features(exported)
  np.testing.assert_array_equal(features, source.pool_features)
  images = data_lib.load_dataset("digits").images[:12]
  assert provenance["images_sha256"] == statistics_file.images_sha256(images)
  assert provenance["count"] == 12 and provenance["weights_sha256"] == inception.FID_HELPER_SHA256

  # From the file: the same FID statistics bit for bit, and Inception never runs.
  real_image_statistics = metrics.image_statistics
  monkeypatch.setattr(metrics, "image_statistics", lambda *a, **k: pytest.fail("ran Inception"))
  sha = inception.file_sha256(exported)
  shipped = fid.load_statistics(
      evaluate.run_fid_stats(
          _fid_stats_config(
              weights, 12, reference_features_file=exported, reference_features_sha256=sha
          ),
          str(tmp_path / "b"),
      )
  )
  np.testing.assert_array_equal(shipped.pool.mu, source.pool.mu)
  np.testing.assert_array_equal(shipped.pool.sigma, source.pool.sigma)
  np.testing.assert_array_equal(shipped.pool_features, source.pool_features)
  assert (
      shipped.spatial is None and shipped.provenance["images_sha256"] == provenance["images_sha256"]
  )

  # Other images (the first 10, or 12 with one pixel changed): Inception runs over the images.
  monkeypatch.setattr(metrics, "image_statistics", real_image_statistics)
  fewer = fid.load_statistics(
      evaluate.run_fid_stats(
          _fid_stats_config(weights, 10, reference_features_file=exported), str(tmp_path / "c")
      )
  )
  assert fewer.pool.count == 10 and fewer.spatial is not None
  changed = images.copy()
  changed[0, 0, 0, 0] ^= 1
  expected = dict(provenance, images_sha256=statistics_file.images_sha256(changed))
  assert statistics_file.features_file_mismatch(provenance, expected) == ["images_sha256"]
  assert statistics_file.features_file_mismatch(provenance, dict(provenance)) == []

  # A damaged or foreign file is one sentence, never a silent fallback.
  with pytest.raises(UserFacingError, match="has sha256 .* where .* is expected"):
    statistics_file.load_reference_features(exported, "0" * 64)
  garbage = tmp_path / "garbage.npz"
  garbage.write_text("x")
  with pytest.raises(UserFacingError, match="is not one that --mode=fid_stats wrote"):
    statistics_file.load_reference_features(str(garbage))
  short = str(tmp_path / "short.npz")
  statistics_file.save_reference_features(short, features[:5], provenance)
  with pytest.raises(UserFacingError, match=r"shape \(5, 2048\) where 12 finite rows"):
    statistics_file.load_reference_features(short)
  with pytest.raises(UserFacingError, match="does not exist"):
    statistics_file.load_reference_features(str(tmp_path / "missing.npz"))


def test_shipped_digits_reference_features_are_what_inception_gives(weights):
  """The main job's shipped reference (assets/) describes the embedded digits through this
  pipeline: its provenance matches, and its rows equal features recomputed from the images."""
  from configs import digits_at

  config = digits_at.get_config()
  e = config.evaluation
  features, provenance = statistics_file.load_reference_features(
      e.reference_features_file, e.reference_features_sha256
  )
  images = data_lib.load_dataset("digits").images
  loaded = inception.load_inception_weights(weights)
  expected = dict(
      metrics.pipeline_provenance(loaded, e.resize_rule),
      dataset="digits",
      split="train",
      count=int(images.shape[0]),
      images_sha256=statistics_file.images_sha256(images),
  )
  assert statistics_file.features_file_mismatch(provenance, expected) == []
  rows = np.random.default_rng(0).choice(images.shape[0], 6, replace=False)
  feats, _, _ = metrics.image_statistics(images[rows], loaded, e.resize_rule, 6, progress=False)
  np.testing.assert_allclose(features[rows], feats["pool"], rtol=1e-4, atol=1e-5)


def test_samples_of_another_size_or_too_few_for_precision_recall_are_one_sentence(weights):
  loaded = inception.load_inception_weights(weights)
  images = data_lib.load_dataset("digits").images
  feats, pool, spatial = metrics.image_statistics(images[:6], loaded, batch_size=6, progress=False)
  assert pool.provenance["image_shape"] == [16, 16, 1]
  reference = metrics.Reference(pool, spatial, feats["pool"], dict(pool.provenance))
  rgb32 = np.repeat(np.pad(images[6:10], ((0, 0), (8, 8), (8, 8), (0, 0))), 3, axis=-1)
  with pytest.raises(EvaluationError, match="are 32×32×3 images but .* from 16×16×1 images"):
    metrics.evaluate(rgb32, reference, loaded, progress=False)
  # (fid_method="eigh": the same FID as the default 2048-d sqrtm, which takes 15-30 s a call
  # and is tested in test_fid.py.)
  with pytest.raises(EvaluationError, match="needs more than 3 images per set, got 3; score more"):
    metrics.evaluate(
        images[6:9], reference, loaded, batch_size=6, progress=False, fid_method="eigh"
    )
  # Fewer samples than reference images, of the reference's size: scored, KID on min(N) subsets.
  result = metrics.evaluate(
      images[6:10], reference, loaded, batch_size=6, progress=False, fid_method="eigh"
  )
  assert np.isfinite(result["fid"]) and result["provenance"]["kid_subset_size"] == 4
