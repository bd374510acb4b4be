"""FID reference statistics and reference features files on disk: the one place that writes
them."""

import hashlib
import json
import os

import numpy as np

from evaluation import fid
from evaluation.inception import file_sha256
from evaluation.metrics import Reference
from modes.errors import UserFacingError, check_shipped_file


def save_statistics(
    path: str,
    pool: fid.FIDStatistics,
    spatial: fid.FIDStatistics | None = None,
    provenance: dict | None = None,
    pool_features: np.ndarray | None = None,
) -> str:
  """Writes `fid.statistics_arrays` as an npz file at `path`; returns the file's sha256."""
  arrays = fid.statistics_arrays(pool, spatial, provenance, pool_features)
  os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
  with open(path, "wb") as f:  # A file object keeps np.savez from appending ".npz".
    np.savez(f, **arrays)
  return file_sha256(path)


def save_reference(path: str, reference: Reference) -> str:
  """Writes a reference's statistics, provenance and pool features (if it has them); returns the
  file's sha256."""
  return save_statistics(
      path, reference.pool, reference.spatial, reference.provenance, reference.pool_features
  )


# What a reference features file must share with the pipeline and the dataset to stand in for
# running Inception over the dataset's images.
FEATURES_FILE_MATCH = (
    "dataset",
    "split",
    "count",
    "images_sha256",
    "weights_sha256",
    "resize_rule",
)


def images_sha256(images: np.ndarray) -> str:
  """sha256 of an image array's dtype, shape and bytes: which images a reference describes."""
  digest = hashlib.sha256(f"{images.dtype.str}{images.shape}".encode())
  digest.update(np.ascontiguousarray(images).tobytes())
  return digest.hexdigest()


def save_reference_features(path: str, pool_features: np.ndarray, provenance: dict) -> str:
  """Writes a reference's (N, 2048) pool features and their provenance (at least the
  FEATURES_FILE_MATCH fields) to `path`; returns the file's sha256."""
  missing = [k for k in FEATURES_FILE_MATCH if k not in provenance]
  if missing:
    raise ValueError(f"a reference features file needs provenance fields {missing}")
  os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    np.savez(
        f,
        pool_features=np.asarray(pool_features, np.float32),
        provenance=np.asarray(json.dumps(provenance, sort_keys=True, default=str)),
    )
  os.replace(tmp, path)
  return file_sha256(path)


def load_reference_features(path: str, sha256: str = "") -> tuple[np.ndarray, dict]:
  """(pool features, provenance) of a file `save_reference_features` wrote, after checking its
  sha256 (when given); a missing, damaged or foreign file is one UserFacingError sentence."""
  how = (
      "restore it (git checkout) or set config.evaluation.reference_features_file='' to compute "
      "the reference from the images"
  )
  check_shipped_file(path, sha256, "reference features file", how, how)
  try:
    with np.load(path, allow_pickle=False) as data:
      features = data["pool_features"]
      provenance = json.loads(str(data["provenance"]))
  except Exception as exc:  # noqa: BLE001 - not an npz, a truncated zip, missing arrays
    raise UserFacingError(
        f"the reference features file {path} is not one that --mode=fid_stats wrote "
        f"({type(exc).__name__}); {how}."
    ) from exc
  count = provenance.get("count")
  if features.ndim != 2 or features.shape[0] != count or not np.isfinite(features).all():
    raise UserFacingError(
        f"the reference features file {path} holds features of shape {features.shape} where "
        f"{count} finite rows are recorded; {how}."
    )
  return features, provenance


def features_file_mismatch(provenance: dict, expected: dict) -> list[str]:
  """The FEATURES_FILE_MATCH fields in which a features file's provenance differs from
  `expected` (empty: the file describes these images through this pipeline)."""
  return [k for k in FEATURES_FILE_MATCH if provenance.get(k) != expected.get(k)]
