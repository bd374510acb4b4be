"""The FID and sFID of finished `--mode=table` / `--mode=robustness` cells recomputed directly
from the files the cells name, for the tests of those modes and of `--mode=story`.

Direct = only the feature function is shared with the pipeline under test: the cell's sample
.npz is read here, its Inception features come from `evaluation.features.extract_features` (the
function `evaluation.metrics` calls) with the cell's weights, resize rule and batch size on one
device (as the `main.py` subprocesses of the tests run), and the mean, the covariance and the
Fréchet distance (scipy.linalg.sqrtm) are written out below against `mu`/`sigma` (`mu_s`/
`sigma_s` for sFID) read with numpy from the statistics file the cell used.

Tolerance: relative 1e-5, and the CSV's 4-decimal rounding (half a unit, 5e-5) on top for the
CSV's numbers. What legitimately differs: the features are recomputed in this process with the
same program and shapes (measured: bit-equal); the cell's statistics are streamed (Chan et al.
merges) and its Fréchet distance is `fid_method="eigh"` on the numerical range, both float64
rounding (measured: ≤ 2e-10 relative against this module). 1e-5 keeps a 10⁴ margin over that,
and also covers float32-level feature rounding should the feature program ever differ (test_fid:
≤ 1e-5 between device counts). It is tighter than the ~1e-3 one might pick because cells differ
little here: the story's ADM-AT and control cells are 1e-4 apart and the robustness test's
random and adversarial cells 3e-4, so 1e-3 would not tell one cell's number from another's.
(A full 2048-d sqrtm of the same cell, for comparison, lands 7e-8 from both.)

KID: the statistics files of `--mode=fid_stats` keep the reference's pool features, so the
cells report KID; it is recomputed with `evaluation.kid.kernel_inception_distance` (itself pinned
to torch-fidelity in test_kid.py) on the directly computed features and the file's features.
"""

import csv
import glob
import json
import os

import jax
import numpy as np
from jax.sharding import Mesh
from scipy import linalg

from evaluation import features as features_lib
from evaluation import fid, inception, kid

RTOL = 1e-5
CSV_ROUNDING = 5e-5  # the CSV writes 4 decimals


def frechet_distance(feats: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
  """||mu - mu_ref||² + Tr(S + S_ref - 2 (S S_ref)^(1/2)) of feature rows against statistics.

  S = np.cov (ddof 1). A 2048-d sqrtm takes up to a minute on 2 CPU cores, so the trace of
  (S S_ref)^(1/2) is taken through the n×n matrix A S_ref Aᵀ, A = centred rows / sqrt(n - 1):
  S S_ref = Aᵀ (A S_ref) has the nonzero eigenvalues of (A S_ref) Aᵀ (XY and YX share them),
  and the trace of the principal square root is the sum of their square roots, for any S_ref.
  """
  x = np.asarray(feats, np.float64)
  mu = x.mean(axis=0)
  sigma = np.cov(x, rowvar=False)
  a = (x - mu) / np.sqrt(x.shape[0] - 1)
  covmean = linalg.sqrtm(a @ sigma_ref @ a.T)
  if np.iscomplexobj(covmean):
    assert np.abs(covmean.imag).max() <= 1e-3 * np.abs(covmean.real).max()
    covmean = covmean.real
  diff = mu - mu_ref
  return float(diff @ diff + np.trace(sigma) + np.trace(sigma_ref) - 2 * np.trace(covmean))


def direct_scores(
    samples_file: str, reference_file: str, weights: str, resize_rule: str, batch_size: int
) -> dict[str, float]:
  """{"fid", "sfid", "kid" (when the file keeps pool features)} of the uint8 images `arr_0` of `samples_file` against `reference_file`."""
  with np.load(samples_file) as data:
    images = data["arr_0"]
  one_device = Mesh(np.asarray(jax.devices()[:1]), (features_lib.DATA_AXIS,))
  feats = features_lib.extract_features(
      images, weights, batch_size, resize_rule, logits=False, mesh=one_device, progress=False
  )
  with np.load(reference_file) as ref:
    scores = {
        "fid": frechet_distance(feats["pool"], ref["mu"], ref["sigma"]),
        "sfid": frechet_distance(feats["spatial"], ref["mu_s"], ref["sigma_s"]),
    }
    if "pool_features" in ref.files:
      size = min(kid.DEFAULT_SUBSET_SIZE, len(feats["pool"]), len(ref["pool_features"]))
      scores["kid"] = kid.kernel_inception_distance(
          feats["pool"], ref["pool_features"], subset_size=size
      )[0]
  return scores


def read_csv(path: str) -> list[dict]:
  with open(path) as f:
    return list(csv.DictReader(f))


def assert_cells_match_direct(
    csv_path: str,
    cell_dir: str,
    key_columns: dict[str, str],
    *,
    weights: str,
    reference_file: str,
    batch_size: int,
) -> list[dict]:
  """Every row of `csv_path` has one cell JSON in `cell_dir` (matched on `key_columns`: CSV
  column → cell key) whose FID and sFID, in the CSV and in the JSON, equal the direct scores of
  the cell's sample file against `reference_file`; returns the cells, in CSV order."""
  cells = []
  for name in sorted(os.listdir(cell_dir)):
    with open(os.path.join(cell_dir, name)) as f:
      cells.append(json.load(f))
  rows = read_csv(csv_path)
  assert len(rows) == len(cells)
  sha = inception.file_sha256(weights)
  matched = []
  for row in rows:
    (cell,) = [c for c in cells if all(str(c[key]) == row[col] for col, key in key_columns.items())]
    record = cell["provenance"]
    # The cell was scored against this reference file, unchanged since, with these weights.
    assert record["reference_file"] == os.path.abspath(reference_file)
    assert record["reference_sha256"] == inception.file_sha256(reference_file)
    assert record["weights_sha256"] == sha
    assert record["num_samples"] == cell["num_samples"] == int(row["num_samples"])
    direct = direct_scores(
        record["samples_file"], reference_file, weights, record["resize_rule"], batch_size
    )
    print(f"{row}: direct {direct}")
    assert "kid" in direct  # fid_stats keeps the reference features
    for metric, value in direct.items():
      if metric == "kid":  # near 0 and of either sign: an absolute tolerance on top
        assert abs(cell[metric] - value) <= RTOL * abs(value) + 1e-9, (cell[metric], value)
        assert abs(float(row[metric]) - value) <= 5e-7, (row[metric], value)  # 6 decimals
        continue
      assert value > 1.0
      assert abs(float(row[metric]) - value) <= RTOL * value + CSV_ROUNDING, (
          metric,
          row[metric],
          value,
      )
      assert abs(cell[metric] - value) <= RTOL * value, (metric, cell[metric], value)
    matched.append(cell)
  return matched


def story_kid_difference(story_dir: str, pool_pattern: str) -> dict:
  """The paired KID difference (`kid.paired_mmd2_difference`) of a story's AT and control
  samples, from the pool features each stage saved (`<stage>/eval/<pool_pattern>`) and the pool
  features of the story's reference statistics (`eval/reference.npz`)."""
  reference = fid.load_statistics(os.path.join(story_dir, "eval", "reference.npz"))
  features = []
  for stage in ("at", "control"):
    (path,) = glob.glob(os.path.join(story_dir, stage, "eval", pool_pattern))
    with np.load(path) as data:
      features.append(data["pool_features"])
  return kid.paired_mmd2_difference(*features, reference.pool_features)
