"""FID statistics: streaming moments, Fréchet distance, statistics files.

Everything here is a pure function of feature arrays or statistics (float64 on the host, as
DESIGN.md asks for FID statistics). The Inception Score is in `inception_score`, precision and
recall in `precision_recall`.
"""

import dataclasses
import datetime
import json
import os
import warnings
from typing import Any

import numpy as np
from scipy import linalg

from evaluation.errors import EvaluationError, validate_features

# ---------------------------------------------------------------------------------------------
# Streaming mean and covariance.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Moments:
  """Running moments of feature rows: count, mean (d,) and m2 (d, d) = sum of centred outers.

  Equivalent to (count, sum, sum of outer products) but merged with Chan, Golub & LeVeque's
  pairwise update, so no large uncentred sums cancel: each batch is centred on its own mean in
  float64 before it is merged. The result does not depend on how the rows were batched beyond
  float64 rounding.
  """

  count: int
  mean: np.ndarray
  m2: np.ndarray


def init_moments(dim: int) -> Moments:
  """Moments of zero rows of `dim` features."""
  return Moments(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))


def merge_moments(a: Moments, b: Moments) -> Moments:
  """Moments of the union of two row sets (Chan et al. 1979, pairwise update)."""
  if a.mean.shape != b.mean.shape:
    raise EvaluationError(
        f"cannot merge moments of {a.mean.shape[0]} and {b.mean.shape[0]} " f"dimensions."
    )
  if b.count == 0:
    return a
  if a.count == 0:
    return b
  n = a.count + b.count
  delta = b.mean - a.mean
  mean = a.mean + delta * (b.count / n)
  m2 = a.m2 + b.m2 + np.outer(delta, delta) * (a.count * b.count / n)
  return Moments(n, mean, m2)


def update_moments(state: Moments, features: Any) -> Moments:
  """`state` with the rows of `features` (rows, dims) added."""
  x = validate_features(features, state.mean.shape[0])
  if x.shape[0] == 0:
    return state
  mean = x.mean(axis=0)
  centred = x - mean
  return merge_moments(state, Moments(x.shape[0], mean, centred.T @ centred))


# ---------------------------------------------------------------------------------------------
# Statistics.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class FIDStatistics:
  """Mean and covariance of a feature set (pytorch-fid's `mu`, `sigma`), with provenance."""

  mu: np.ndarray
  sigma: np.ndarray
  count: int | None = None
  provenance: dict = dataclasses.field(default_factory=dict)


def statistics_from_moments(state: Moments, provenance: dict | None = None) -> FIDStatistics:
  """mu and the unbiased covariance (np.cov's ddof=1, as pytorch-fid and ADM use)."""
  if state.count < 2:
    raise EvaluationError(
        f"FID statistics need at least 2 images (a covariance needs two), " f"got {state.count}."
    )
  return FIDStatistics(
      state.mean.copy(), state.m2 / (state.count - 1), state.count, dict(provenance or {})
  )


def compute_statistics(
    features: Any, batch_size: int | None = None, provenance: dict | None = None
) -> FIDStatistics:
  """Statistics of all rows of `features`, streamed in batches of `batch_size` rows."""
  x = np.asarray(features)
  if x.ndim != 2:
    raise EvaluationError(f"features must be a 2-D array (rows, dims), got shape {x.shape}.")
  state = init_moments(x.shape[1])
  step = batch_size or max(x.shape[0], 1)
  for start in range(0, x.shape[0], step):
    state = update_moments(state, x[start : start + step])
  return statistics_from_moments(state, provenance)


def _check_statistics(mu: Any, sigma: Any, which: str) -> tuple[np.ndarray, np.ndarray]:
  mu = np.atleast_1d(np.asarray(mu, np.float64))
  sigma = np.atleast_2d(np.asarray(sigma, np.float64))
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise EvaluationError(
        f"statistics {which} must be mu (d,) and sigma (d, d), got mu "
        f"{mu.shape} and sigma {sigma.shape}."
    )
  if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
    raise EvaluationError(f"statistics {which} contain NaN or infinite values.")
  return mu, sigma


FRECHET_METHODS = ("sqrtm", "eigh")


def frechet_distance(
    mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6, method: str = "sqrtm"
) -> float:
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) of two Gaussians given by their moments.

  method "sqrtm" (default) computes it exactly as pytorch-fid's `calculate_frechet_distance`
  (= ADM's `FIDStatistics.frechet_distance`, both from TTUR): scipy.linalg.sqrtm of S1 S2; if
  that is not finite, retry with eps * I added to both covariances; a complex result is accepted
  (real part kept) only while its diagonal's imaginary parts are within 1e-3 of zero, else raise
  with the largest |imag|. method "eigh" computes the same trace as the sum of the square roots
  of the eigenvalues of the symmetric S1^(1/2) S2 S1^(1/2) (similar to S1 S2), through a
  pivoted Cholesky factor of S1 and one symmetric eigendecomposition of rank(S1) x rank(S1):
  several times faster than the complex Schur form behind sqrtm (for a few images' rank-deficient
  covariance, hundreds of times) and free of imaginary round-off; it differs from "sqrtm" only by
  rounding.
  """
  if method not in FRECHET_METHODS:
    raise EvaluationError(
        f"Fréchet distance method {method!r} is not allowed; use one of "
        f"{list(FRECHET_METHODS)}."
    )
  mu1, sigma1 = _check_statistics(mu1, sigma1, "1")
  mu2, sigma2 = _check_statistics(mu2, sigma2, "2")
  if mu1.shape != mu2.shape:
    raise EvaluationError(
        f"statistics have different dimensions: {mu1.shape[0]} and "
        f"{mu2.shape[0]} (pool features have 2048, spatial 2023)."
    )
  diff = mu1 - mu2
  if method == "eigh":
    tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
  else:
    tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
  covmean = _sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    warnings.warn(
        f"FID: singular covariance product; adding {eps} to the diagonals "
        f"(pytorch-fid's fallback)."
    )
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise EvaluationError(
          f"the matrix square root in the Fréchet distance has an imaginary "
          f"component of {np.max(np.abs(covmean.imag)):.3g} (pytorch-fid's "
          f"limit is 1e-3 on the diagonal); the covariances are too singular."
      )
    covmean = covmean.real
  return float(np.trace(covmean))


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  # S1 = R R^T with R = P L from a pivoted Cholesky factorisation (LAPACK dpstrf) that stops at
  # S1's numerical rank r (its default tolerance: pivots above d * eps * max diag). Then
  # S1^(1/2) S2 S1^(1/2) (similar to S1 S2) has the nonzero eigenvalues of the r x r matrix
  # R^T S2 R. Stopping at the rank drops the round-off directions, whose sqrt(1e-16)-sized
  # contributions would add up over the null space, and for r << d (few images) both steps
  # are tiny next to an eigendecomposition of S1.
  d = sigma1.shape[0]
  factor, pivots, rank, info = linalg.lapack.dpstrf((sigma1 + sigma1.T) / 2, lower=1)
  if info < 0:
    raise EvaluationError(f"LAPACK dpstrf rejected argument {-info} of the covariance.")
  if rank == 0:
    return 0.0
  root = np.empty((d, rank))
  root[pivots - 1] = np.tril(factor[:, :rank])  # rows of L back in S1's order: R = P L
  inner = root.T @ sigma2 @ root
  ev = np.linalg.eigvalsh((inner + inner.T) / 2)
  return float(np.sum(np.sqrt(np.clip(ev, 0, None))))


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
  # scipy >= 1.16 deprecates sqrtm's `disp`; its default result is pytorch-fid's disp=False one.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    warnings.simplefilter("ignore", linalg.LinAlgWarning)
    with np.errstate(all="ignore"):
      return linalg.sqrtm(matrix)


def fid_from_statistics(
    a: FIDStatistics, b: FIDStatistics, eps: float = 1e-6, method: str = "sqrtm"
) -> float:
  """Fréchet distance of two statistics objects (FID on pool, sFID on spatial features)."""
  return frechet_distance(a.mu, a.sigma, b.mu, b.sigma, eps=eps, method=method)


# ---------------------------------------------------------------------------------------------
# Statistics files.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class ReferenceStatistics:
  """What a statistics file holds: pool (FID) and optional spatial (sFID) statistics."""

  pool: FIDStatistics
  spatial: FIDStatistics | None
  path: str
  sha256: str
  provenance: dict
  pool_features: np.ndarray | None = None  # (count, 2048) when the file keeps them (KID, P/R)


def statistics_arrays(
    pool: FIDStatistics,
    spatial: FIDStatistics | None = None,
    provenance: dict | None = None,
    pool_features: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
  """The arrays of a statistics file: `mu`, `sigma` (pytorch-fid's names), `mu_s`, `sigma_s`
  (ADM's), the JSON provenance and optionally the reference's `pool_features` (float32, what
  KID and precision/recall need). pytorch-fid and ADM's evaluator both read such a file (they
  ignore keys they do not know); `modes.statistics_file.save_statistics` writes it."""
  record = dict(pool.provenance)
  record.update(provenance or {})
  record.setdefault("count", pool.count)
  record.setdefault("created_utc", datetime.datetime.now(datetime.timezone.utc).isoformat())
  arrays = {
      "mu": pool.mu,
      "sigma": pool.sigma,
      "provenance": np.asarray(json.dumps(record, sort_keys=True, default=str)),
  }
  if spatial is not None:
    arrays.update(mu_s=spatial.mu, sigma_s=spatial.sigma)
  if pool_features is not None:
    if pool_features.shape != (pool.count, pool.mu.shape[0]):
      raise EvaluationError(
          f"pool features of shape {pool_features.shape} do not belong to statistics of "
          f"{pool.count} features of dimension {pool.mu.shape[0]}."
      )
    arrays["pool_features"] = np.asarray(pool_features, np.float32)
  return arrays


def load_statistics(path: str) -> ReferenceStatistics:
  """Reads our files, pytorch-fid's stats (`mu`, `sigma`) or ADM's precomputed `mu_s`/`sigma_s`."""
  from evaluation.inception import file_sha256

  if not os.path.isfile(path):
    raise EvaluationError(f"statistics file {path} does not exist.")
  try:
    with np.load(path, allow_pickle=False) as data:
      keys = set(data.files)
      if not {"mu", "sigma"} <= keys:
        if "arr_0" in keys:
          raise EvaluationError(
              f"{path} holds images (arr_0), not statistics; compute them with "
              f"evaluation.metrics.load_reference."
          )
        raise EvaluationError(f"{path} is not a statistics file: it has no `mu` and `sigma`.")
      provenance = json.loads(str(data["provenance"])) if "provenance" in keys else {}
      count = provenance.get("count")
      pool = FIDStatistics(
          *_check_statistics(data["mu"], data["sigma"], f"in {path}"), count, provenance
      )
      spatial = None
      if {"mu_s", "sigma_s"} <= keys:
        spatial = FIDStatistics(
            *_check_statistics(data["mu_s"], data["sigma_s"], f"(spatial) in {path}"),
            count,
            provenance,
        )
      features = None
      if "pool_features" in keys:
        features = validate_features(
            data["pool_features"], pool.mu.shape[0], what=f"the pool features in {path}"
        )
  except EvaluationError:
    raise
  except Exception as e:
    raise EvaluationError(f"statistics file {path} could not be read ({e}).") from None
  return ReferenceStatistics(pool, spatial, path, file_sha256(path), provenance, features)
