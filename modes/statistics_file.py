"""FID reference statistics on disk: the one place that writes them."""

import os

import numpy as np

from evaluation import fid
from evaluation.inception import file_sha256
from evaluation.metrics import Reference


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
