"""Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs", ICLR 2018).

KID is the unbiased estimate of the squared MMD between two feature sets under the polynomial
kernel k(x, y) = (gamma xᵀy + coef0)^degree, by default (xᵀy / d + 1)³ (§4 of the paper),
averaged over random equal-size subsets of both sets. The numbers are torch-fidelity's
(`torch_fidelity.metric_kid.kid_features_to_metric`, itself from the paper's MMD-GAN code):
the same subsets, drawn from one numpy RandomState(seed), the same estimator and the mean and
population standard deviation over the subsets. `paired_mmd2_difference` compares two sample
sets drawn from the same noise against one reference, with a jackknife standard error.
Everything is float64 on the host.
"""

from typing import Any

import numpy as np

from evaluation.errors import EvaluationError, validate_features

# torch_fidelity/defaults.py (0.4.0): kid_subsets, kid_subset_size, rng_seed, the poly kernel.
DEFAULT_NUM_SUBSETS = 100
DEFAULT_SUBSET_SIZE = 1000
DEFAULT_SEED = 2020

# Kernel-matrix entries held at once (float64: 8 bytes each) per (subsets, m, m) block, and the
# most entries of the whole-set kernel matrices worth computing once and indexing per subset.
_BLOCK_ENTRIES = 2**22
_GRAM_ENTRIES = 2**24


def polynomial_kernel(
    x: np.ndarray, y: np.ndarray, degree: float = 3, gamma: float | None = None, coef0: float = 1.0
) -> np.ndarray:
  """(..., n, m) kernel (gamma xᵀy + coef0)^degree of rows of x (..., n, d) and y (..., m, d).

  gamma None means 1 / d, the paper's (xᵀy / d + 1)³ for the defaults; the order of operations
  is torch-fidelity's `kernel_poly` (product, then scale, shift and power).
  """
  if gamma is None:
    gamma = 1.0 / x.shape[-1]
  return (np.matmul(x, np.swapaxes(y, -1, -2)) * gamma + coef0) ** degree


def unbiased_mmd2(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> np.ndarray:
  """Unbiased MMD² of (..., m, m) kernel blocks of two size-m sets (Gretton et al. 2012, Eq. 3).

  MMD²_u = sum_{i≠j} k(x_i, x_j) / (m(m-1)) + sum_{i≠j} k(y_i, y_j) / (m(m-1))
  - 2 sum_{i,j} k(x_i, y_j) / m²: the within-set sums drop the diagonal, the cross sum keeps it
  (torch-fidelity's and MMD-GAN's `mmd2` with mmd_est="unbiased").
  """
  m = k_xx.shape[-1]
  within = (
      k_xx.sum(axis=(-2, -1))
      - np.trace(k_xx, axis1=-2, axis2=-1)
      + k_yy.sum(axis=(-2, -1))
      - np.trace(k_yy, axis1=-2, axis2=-1)
  )
  return within / (m * (m - 1)) - 2 * k_xy.sum(axis=(-2, -1)) / (m * m)


def subset_indices(
    n_1: int, n_2: int, num_subsets: int, subset_size: int, seed: int = DEFAULT_SEED
) -> tuple[np.ndarray, np.ndarray]:
  """(num_subsets, subset_size) row indices into each set, torch-fidelity's draws in its order.

  One RandomState(seed); subset i takes choice(n_1, size, replace=False) for set 1, then
  choice(n_2, size, replace=False) for set 2, as `kid_features_to_metric` does in its loop.
  """
  rng = np.random.RandomState(seed)
  idx_1 = np.empty((num_subsets, subset_size), np.int64)
  idx_2 = np.empty((num_subsets, subset_size), np.int64)
  for i in range(num_subsets):
    idx_1[i] = rng.choice(n_1, subset_size, replace=False)
    idx_2[i] = rng.choice(n_2, subset_size, replace=False)
  return idx_1, idx_2


def _use_gram(n_1: int, n_2: int, num_subsets: int, subset_size: int) -> bool:
  # Whole-set kernels cost (n_1² + n_2² + n_1 n_2) d multiply-adds once; per-subset kernels cost
  # 3 m² d per subset. Index the whole-set ones when they are cheaper and fit in memory.
  entries = n_1 * n_1 + n_2 * n_2 + n_1 * n_2
  return entries <= _GRAM_ENTRIES and entries <= 3 * num_subsets * subset_size**2


def _subset_mmd2(
    x_1: np.ndarray, x_2: np.ndarray, idx_1: np.ndarray, idx_2: np.ndarray, kernel: Any
) -> np.ndarray:
  """(num_subsets,) unbiased MMD² of every subset pair, in blocks of subsets."""
  num_subsets, m = idx_1.shape
  if _use_gram(x_1.shape[0], x_2.shape[0], num_subsets, m):
    k_11, k_12, k_22 = kernel(x_1, x_1), kernel(x_1, x_2), kernel(x_2, x_2)

    def blocks(a, b):
      return (
          k_11[a[:, :, None], a[:, None, :]],
          k_12[a[:, :, None], b[:, None, :]],
          k_22[b[:, :, None], b[:, None, :]],
      )

  else:

    def blocks(a, b):
      f_1, f_2 = x_1[a], x_2[b]
      return kernel(f_1, f_1), kernel(f_1, f_2), kernel(f_2, f_2)

  step = max(1, _BLOCK_ENTRIES // (m * m))
  return np.concatenate(
      [
          unbiased_mmd2(*blocks(idx_1[s : s + step], idx_2[s : s + step]))
          for s in range(0, num_subsets, step)
      ]
  )


def kernel_inception_distance(
    features_1: Any,
    features_2: Any,
    *,
    num_subsets: int = DEFAULT_NUM_SUBSETS,
    subset_size: int = DEFAULT_SUBSET_SIZE,
    seed: int = DEFAULT_SEED,
    degree: float = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
) -> tuple[float, float]:
  """(mean, std) over random subsets of the unbiased polynomial-kernel MMD² of two feature sets.

  Bińkowski et al. 2018 §4 (KID) as torch-fidelity 0.4.0 computes it: for each of `num_subsets`
  subsets, `subset_size` rows drawn without replacement from each (N, d) set (`subset_indices`),
  MMD²_u (`unbiased_mmd2`) under (gamma xᵀy + coef0)^degree, gamma None = 1 / d; the mean and
  the population (ddof=0) standard deviation of those values. Like torch-fidelity, a
  `subset_size` larger than either set raises (it is not clipped); pass min(1000, N_1, N_2) to
  use smaller sets. torch-fidelity computes in its features' dtype (float32 from its
  Inception); this computes in float64. KID can be slightly negative for matching sets.
  """
  x_1 = validate_features(features_1, what="KID features 1")
  x_2 = validate_features(features_2, what="KID features 2")
  if x_1.shape[1] != x_2.shape[1]:
    raise EvaluationError(
        f"KID needs features of one dimension, got {x_1.shape[1]} and {x_2.shape[1]}."
    )
  n_1, n_2 = x_1.shape[0], x_2.shape[0]
  if min(n_1, n_2) < 2:
    raise EvaluationError(
        f"KID needs at least 2 features per set (the unbiased MMD² divides by m(m - 1)), got "
        f"{n_1} and {n_2}."
    )
  if int(num_subsets) != num_subsets or num_subsets < 1:
    raise EvaluationError(f"KID num_subsets must be a positive integer, got {num_subsets}.")
  if int(subset_size) != subset_size or not 2 <= subset_size <= min(n_1, n_2):
    raise EvaluationError(
        f"KID subset_size must be an integer from 2 to the smaller set's size, got "
        f"{subset_size} for sets of {n_1} and {n_2} (torch-fidelity refuses it too; pass "
        f"subset_size=min(1000, {n_1}, {n_2}))."
    )
  idx_1, idx_2 = subset_indices(n_1, n_2, int(num_subsets), int(subset_size), seed)

  def kernel(x, y):
    return polynomial_kernel(x, y, degree, gamma, coef0)

  mmds = _subset_mmd2(x_1, x_2, idx_1, idx_2, kernel)
  return float(np.mean(mmds)), float(np.std(mmds))


def _off_diagonal_row_sums(k: np.ndarray) -> np.ndarray:
  return k.sum(axis=1) - np.diag(k)


def _mmd2_from_terms(
    within: float, cross: float, reference_within: float, m: int, n: int
) -> float | np.ndarray:
  # MMD²_u of m samples and n reference rows (Gretton et al. 2012, Eq. 3 with m ≠ n).
  return within / (m * (m - 1)) + reference_within / (n * (n - 1)) - 2 * cross / (m * n)


def paired_mmd2_difference(
    features_a: Any,
    features_b: Any,
    reference: Any,
    *,
    degree: float = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
) -> dict[str, float]:
  """MMD²_u(A, R), MMD²_u(B, R), their difference and its paired jackknife standard error.

  Row i of A and row i of B are one pair (samples of two models from the same initial noise).
  Each MMD²_u uses all rows (no subsets) under (gamma xᵀy + coef0)^degree, gamma None = 1 / d,
  i.e. KID of the whole sets. The standard error of the difference is the delete-one-pair
  jackknife (Efron & Stein 1981; consistent for U-statistics, Arvesen 1969) with the reference
  held fixed: se² = (m−1)/m Σ_i (d_(i) − mean d_(·))², d_(i) the difference without pair i.
  It measures how much the difference would move with other initial noise, which is what
  decides whether one model is closer to the reference than the other.
  """
  a = validate_features(features_a, what="paired KID features A")
  b = validate_features(features_b, a.shape[1], what="paired KID features B")
  y = validate_features(reference, a.shape[1], what="paired KID reference features")
  if a.shape != b.shape:
    raise EvaluationError(
        f"paired KID needs as many rows in A as in B (pairs), got {a.shape[0]} and {b.shape[0]}."
    )
  m, n = a.shape[0], y.shape[0]
  if m < 3 or n < 2:
    raise EvaluationError(
        f"paired KID needs at least 3 pairs and 2 reference rows, got {m} and {n}."
    )

  def kernel(x, z):
    return polynomial_kernel(x, z, degree, gamma, coef0)

  reference_within = _off_diagonal_row_sums(kernel(y, y)).sum()
  mmd2, loo = {}, {}
  for name, x in (("a", a), ("b", b)):
    # r_i = Σ_{j≠i} k(x_i, x_j) and c_i = Σ_j k(x_i, y_j).
    within, cross = _off_diagonal_row_sums(kernel(x, x)), kernel(x, y).sum(axis=1)
    mmd2[name] = _mmd2_from_terms(within.sum(), cross.sum(), reference_within, m, n)
    # Without row i: the within sum loses 2 r_i (k is symmetric), the cross sum loses c_i.
    loo[name] = _mmd2_from_terms(
        within.sum() - 2 * within, cross.sum() - cross, reference_within, m - 1, n
    )
  leave_one_out = loo["a"] - loo["b"]
  variance = (m - 1) / m * np.sum((leave_one_out - leave_one_out.mean()) ** 2)
  return {
      "mmd2_a": float(mmd2["a"]),
      "mmd2_b": float(mmd2["b"]),
      "difference": float(mmd2["a"] - mmd2["b"]),
      "standard_error": float(np.sqrt(variance)),
      "pairs": m,
      "reference_rows": n,
  }
