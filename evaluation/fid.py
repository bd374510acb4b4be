"""FID statistics and scores: streaming moments, Fréchet distance, IS, precision/recall, file IO.

Everything here is a pure function of feature arrays or statistics (float64 on the host, as
DESIGN.md asks for FID statistics); precision/recall runs its pairwise distances through jit.
"""

import dataclasses
import datetime
import functools
import json
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

from evaluation.errors import EvaluationError


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


def _check_features(features: Any, dim: int | None = None, what: str = "features") -> np.ndarray:
  x = np.asarray(features)
  if x.ndim != 2:
    raise EvaluationError(f"{what} must be a 2-D array (rows, dims), got shape {x.shape}.")
  if dim is not None and x.shape[1] != dim:
    raise EvaluationError(f"{what} have {x.shape[1]} dimensions but the statistics have {dim}.")
  x = x.astype(np.float64)
  if not np.isfinite(x).all():
    raise EvaluationError(f"{what} contain NaN or infinite values "
                          f"({int((~np.isfinite(x)).sum())} of {x.size}).")
  return x


def merge_moments(a: Moments, b: Moments) -> Moments:
  """Moments of the union of two row sets (Chan et al. 1979, pairwise update)."""
  if a.mean.shape != b.mean.shape:
    raise EvaluationError(f"cannot merge moments of {a.mean.shape[0]} and {b.mean.shape[0]} "
                          f"dimensions.")
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
  x = _check_features(features, state.mean.shape[0])
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
    raise EvaluationError(f"FID statistics need at least 2 images (a covariance needs two), "
                          f"got {state.count}.")
  return FIDStatistics(state.mean.copy(), state.m2 / (state.count - 1), state.count,
                       dict(provenance or {}))


def compute_statistics(features: Any, batch_size: int | None = None,
                       provenance: dict | None = None) -> FIDStatistics:
  """Statistics of all rows of `features`, streamed in batches of `batch_size` rows."""
  x = np.asarray(features)
  if x.ndim != 2:
    raise EvaluationError(f"features must be a 2-D array (rows, dims), got shape {x.shape}.")
  state = init_moments(x.shape[1])
  step = batch_size or max(x.shape[0], 1)
  for start in range(0, x.shape[0], step):
    state = update_moments(state, x[start:start + step])
  return statistics_from_moments(state, provenance)


def _check_statistics(mu: Any, sigma: Any, which: str) -> tuple[np.ndarray, np.ndarray]:
  mu = np.atleast_1d(np.asarray(mu, np.float64))
  sigma = np.atleast_2d(np.asarray(sigma, np.float64))
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise EvaluationError(f"statistics {which} must be mu (d,) and sigma (d, d), got mu "
                          f"{mu.shape} and sigma {sigma.shape}.")
  if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
    raise EvaluationError(f"statistics {which} contain NaN or infinite values.")
  return mu, sigma


FRECHET_METHODS = ("sqrtm", "eigh")


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6,
                     method: str = "sqrtm") -> float:
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) of two Gaussians given by their moments.

  method "sqrtm" (default) computes it exactly as pytorch-fid's `calculate_frechet_distance`
  (= ADM's `FIDStatistics.frechet_distance`, both from TTUR): scipy.linalg.sqrtm of S1 S2; if
  that is not finite, retry with eps * I added to both covariances; a complex result is accepted
  (real part kept) only while its diagonal's imaginary parts are within 1e-3 of zero, else raise
  with the largest |imag|. method "eigh" computes the same trace as the sum of the square roots
  of the eigenvalues of the symmetric S1^(1/2) S2 S1^(1/2) (similar to S1 S2): two symmetric
  eigendecompositions, several times faster than the complex Schur form behind sqrtm and free of
  imaginary round-off; it differs from "sqrtm" only by rounding.
  """
  if method not in FRECHET_METHODS:
    raise EvaluationError(f"Fréchet distance method {method!r} is not allowed; use one of "
                          f"{list(FRECHET_METHODS)}.")
  mu1, sigma1 = _check_statistics(mu1, sigma1, "1")
  mu2, sigma2 = _check_statistics(mu2, sigma2, "2")
  if mu1.shape != mu2.shape:
    raise EvaluationError(f"statistics have different dimensions: {mu1.shape[0]} and "
                          f"{mu2.shape[0]} (pool features have 2048, spatial 2023).")
  diff = mu1 - mu2
  if method == "eigh":
    tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
  else:
    tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
  covmean = _sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    warnings.warn(f"FID: singular covariance product; adding {eps} to the diagonals "
                  f"(pytorch-fid's fallback).")
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise EvaluationError(f"the matrix square root in the Fréchet distance has an imaginary "
                            f"component of {np.max(np.abs(covmean.imag)):.3g} (pytorch-fid's "
                            f"limit is 1e-3 on the diagonal); the covariances are too singular.")
    covmean = covmean.real
  return float(np.trace(covmean))


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  # S1 = V W V^T restricted to its numerical range (eigenvalues above d * eps * max, the
  # np.linalg.matrix_rank rule): with R = V_r W_r^(1/2), S1^(1/2) S2 S1^(1/2) has the nonzero
  # eigenvalues of the r x r matrix R^T S2 R. Dropping round-off eigenvalues removes their
  # spurious sqrt(1e-16)-sized contributions, and for r << d (few images) the second
  # eigendecomposition is tiny.
  w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
  if w.size == 0 or w[-1] <= 0:
    return 0.0
  keep = w > w[-1] * w.size * np.finfo(np.float64).eps
  root = v[:, keep] * np.sqrt(w[keep])
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


def fid_from_statistics(a: FIDStatistics, b: FIDStatistics, eps: float = 1e-6,
                        method: str = "sqrtm") -> float:
  """Fréchet distance of two statistics objects (FID on pool, sFID on spatial features)."""
  return frechet_distance(a.mu, a.sigma, b.mu, b.sigma, eps=eps, method=method)


# ---------------------------------------------------------------------------------------------
# Inception Score.
# ---------------------------------------------------------------------------------------------


def inception_score(logits: Any, splits: int = 10) -> tuple[float, float]:
  """(mean, std) over `splits` equal splits of exp(E_x KL(p(y|x) || p(y))), from 1008-way logits.

  improved-gan inception_score/model.py: softmax of the unbiased logits, split i is rows
  [i N // splits, (i + 1) N // splits), score exp(mean_x sum_y p (log p - log mean_x p)). ADM
  uses splits of 5000 rows, the same for 50K samples. Log-softmax in float64 here avoids log(0).
  """
  x = _check_features(logits, what="logits")
  n = x.shape[0]
  if n < splits or splits < 1:
    raise EvaluationError(f"the Inception Score with {splits} splits needs at least {splits} "
                          f"images, got {n}.")
  log_p = x - _logsumexp(x, axis=1)
  scores = []
  for i in range(splits):
    part = log_p[i * n // splits:(i + 1) * n // splits]
    # log p(y) = log mean_x p(y|x), kept finite for classes no image predicts (0 * -inf = nan).
    log_py = _logsumexp(part, axis=0) - np.log(part.shape[0])
    scores.append(np.exp(np.mean(np.sum(np.exp(part) * (part - log_py), axis=1))))
  return float(np.mean(scores)), float(np.std(scores))


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
  top = x.max(axis=axis, keepdims=True)
  return top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))


# ---------------------------------------------------------------------------------------------
# Precision and recall (Kynkäänniemi et al. 2019) as ADM's evaluator computes them.
# ---------------------------------------------------------------------------------------------


@jax.jit
def _squared_distances(u: jax.Array, v: jax.Array) -> jax.Array:
  # ADM `_batch_pairwise_distances`: max(|u|^2 - 2 u.v + |v|^2, 0). ADM first tries float16 and
  # falls back to float32 when that overflows; float32 throughout here (HIGHEST: no TF32/bf16).
  hp = jax.lax.Precision.HIGHEST
  nu = jnp.sum(jnp.square(u), axis=1)[:, None]
  nv = jnp.sum(jnp.square(v), axis=1)[None, :]
  return jnp.maximum(nu - 2 * jnp.dot(u, v.T, precision=hp) + nv, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _smallest(u: jax.Array, v: jax.Array, k: int) -> jax.Array:
  d = _squared_distances(u, v)
  return -jax.lax.top_k(-d, min(k, d.shape[1]))[0]


@jax.jit
def _less_thans(u, radii_u, v, radii_v):
  d = _squared_distances(u, v)
  # ADM DistanceBlock.less_thans: u_i is inside some v-sphere, v_j inside some u-sphere.
  return jnp.any(d <= radii_v[None, :], axis=1), jnp.any(d <= radii_u[:, None], axis=0)


@dataclasses.dataclass(frozen=True)
class ManifoldEstimator:
  """k-NN hypersphere manifolds of feature sets (ADM evaluations/evaluator.py, k = 3).

  Radii are squared distances to the k-th nearest neighbour, the point itself being the 0-th;
  distances are computed in row x column blocks so memory stays bounded.
  """
  k: int = 3
  row_batch_size: int = 10000
  col_batch_size: int = 10000

  def manifold_radii(self, features: Any) -> np.ndarray:
    """(N,) squared k-NN radius of every row of `features`."""
    x = _check_features(features).astype(np.float32)
    if x.shape[0] <= self.k:
      raise EvaluationError(f"precision/recall with k={self.k} needs more than {self.k} images "
                            f"per set, got {x.shape[0]}.")
    radii = []
    for r in range(0, x.shape[0], self.row_batch_size):
      rows = jnp.asarray(x[r:r + self.row_batch_size])
      # k + 1 smallest per column block, then the k + 1 smallest of those candidates.
      cands = [_smallest(rows, jnp.asarray(x[c:c + self.col_batch_size]), self.k + 1)
               for c in range(0, x.shape[0], self.col_batch_size)]
      merged = np.sort(np.concatenate([np.asarray(c) for c in cands], axis=1), axis=1)
      radii.append(merged[:, self.k])
    return np.concatenate(radii)

  def evaluate_pr(self, features_1: Any, radii_1: np.ndarray, features_2: Any,
                  radii_2: np.ndarray) -> tuple[float, float]:
    """(precision, recall): share of set 2 inside set 1's manifold, and of set 1 in set 2's."""
    x1 = _check_features(features_1).astype(np.float32)
    x2 = _check_features(features_2, x1.shape[1]).astype(np.float32)
    in_1 = np.zeros(x1.shape[0], bool)
    in_2 = np.zeros(x2.shape[0], bool)
    for a in range(0, x1.shape[0], self.row_batch_size):
      for b in range(0, x2.shape[0], self.col_batch_size):
        a_in, b_in = _less_thans(jnp.asarray(x1[a:a + self.row_batch_size]),
                                 jnp.asarray(radii_1[a:a + self.row_batch_size], jnp.float32),
                                 jnp.asarray(x2[b:b + self.col_batch_size]),
                                 jnp.asarray(radii_2[b:b + self.col_batch_size], jnp.float32))
        in_1[a:a + self.row_batch_size] |= np.asarray(a_in)
        in_2[b:b + self.col_batch_size] |= np.asarray(b_in)
    return float(in_2.mean()), float(in_1.mean())


def precision_recall(reference_features: Any, sample_features: Any, k: int = 3,
                     batch_size: int = 10000) -> tuple[float, float]:
  """ADM's (precision, recall) of samples against a reference set of pool features."""
  est = ManifoldEstimator(k=k, row_batch_size=batch_size, col_batch_size=batch_size)
  ref = _check_features(reference_features, what="reference features")
  sam = _check_features(sample_features, ref.shape[1], what="sample features")
  return est.evaluate_pr(ref, est.manifold_radii(ref), sam, est.manifold_radii(sam))


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


def save_statistics(path: str, pool: FIDStatistics, spatial: FIDStatistics | None = None,
                    provenance: dict | None = None) -> str:
  """Writes `mu`, `sigma` (pytorch-fid's names), `mu_s`, `sigma_s` (ADM's) and JSON provenance.

  pytorch-fid and ADM's evaluator both read such a file (they ignore keys they do not know).
  Returns the file's sha256.
  """
  from evaluation.inception import file_sha256  # Light import; no jax work.

  record = dict(pool.provenance)
  record.update(provenance or {})
  record.setdefault("count", pool.count)
  record.setdefault("created_utc", datetime.datetime.now(datetime.timezone.utc).isoformat())
  arrays = {"mu": pool.mu, "sigma": pool.sigma,
            "provenance": np.asarray(json.dumps(record, sort_keys=True, default=str))}
  if spatial is not None:
    arrays.update(mu_s=spatial.mu, sigma_s=spatial.sigma)
  os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
  with open(path, "wb") as f:  # A file object keeps np.savez from appending ".npz".
    np.savez(f, **arrays)
  return file_sha256(path)


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
          raise EvaluationError(f"{path} holds images (arr_0), not statistics; compute them with "
                                f"evaluation.metrics.load_reference.")
        raise EvaluationError(f"{path} is not a statistics file: it has no `mu` and `sigma`.")
      provenance = json.loads(str(data["provenance"])) if "provenance" in keys else {}
      count = provenance.get("count")
      pool = FIDStatistics(*_check_statistics(data["mu"], data["sigma"], f"in {path}"),
                           count, provenance)
      spatial = None
      if {"mu_s", "sigma_s"} <= keys:
        spatial = FIDStatistics(*_check_statistics(data["mu_s"], data["sigma_s"],
                                                   f"(spatial) in {path}"), count, provenance)
  except EvaluationError:
    raise
  except Exception as e:
    raise EvaluationError(f"statistics file {path} could not be read ({e}).") from None
  return ReferenceStatistics(pool, spatial, path, file_sha256(path), provenance)
