"""Precision and recall (Kynkäänniemi et al. 2019) as ADM's evaluator computes them.

k-NN hypersphere manifolds of two feature sets; the pairwise distances run through jit in
float32 row x column blocks, so memory stays bounded.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from evaluation.errors import EvaluationError, validate_features


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
def _less_thans(
    u: jax.Array, radii_u: jax.Array, v: jax.Array, radii_v: jax.Array
) -> tuple[jax.Array, jax.Array]:
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
    x = validate_features(features).astype(np.float32)
    if x.shape[0] <= self.k:
      raise EvaluationError(
          f"precision/recall with k={self.k} needs more than {self.k} images "
          f"per set, got {x.shape[0]}; score more samples or turn precision/recall off "
          "(config.evaluation.precision_recall = False)."
      )
    radii = []
    for r in range(0, x.shape[0], self.row_batch_size):
      rows = jnp.asarray(x[r : r + self.row_batch_size])
      # k + 1 smallest per column block, then the k + 1 smallest of those candidates.
      cands = [
          _smallest(rows, jnp.asarray(x[c : c + self.col_batch_size]), self.k + 1)
          for c in range(0, x.shape[0], self.col_batch_size)
      ]
      merged = np.sort(np.concatenate([np.asarray(c) for c in cands], axis=1), axis=1)
      radii.append(merged[:, self.k])
    return np.concatenate(radii)

  def evaluate_pr(
      self, features_1: Any, radii_1: np.ndarray, features_2: Any, radii_2: np.ndarray
  ) -> tuple[float, float]:
    """(precision, recall): share of set 2 inside set 1's manifold, and of set 1 in set 2's."""
    x1 = validate_features(features_1).astype(np.float32)
    x2 = validate_features(features_2, x1.shape[1]).astype(np.float32)
    in_1 = np.zeros(x1.shape[0], bool)
    in_2 = np.zeros(x2.shape[0], bool)
    for a in range(0, x1.shape[0], self.row_batch_size):
      for b in range(0, x2.shape[0], self.col_batch_size):
        a_in, b_in = _less_thans(
            jnp.asarray(x1[a : a + self.row_batch_size]),
            jnp.asarray(radii_1[a : a + self.row_batch_size], jnp.float32),
            jnp.asarray(x2[b : b + self.col_batch_size]),
            jnp.asarray(radii_2[b : b + self.col_batch_size], jnp.float32),
        )
        in_1[a : a + self.row_batch_size] |= np.asarray(a_in)
        in_2[b : b + self.col_batch_size] |= np.asarray(b_in)
    return float(in_2.mean()), float(in_1.mean())


def precision_recall(
    reference_features: Any, sample_features: Any, k: int = 3, batch_size: int = 10000
) -> tuple[float, float]:
  """ADM's (precision, recall) of samples against a reference set of pool features."""
  est = ManifoldEstimator(k=k, row_batch_size=batch_size, col_batch_size=batch_size)
  ref = validate_features(reference_features, what="reference features")
  sam = validate_features(sample_features, ref.shape[1], what="sample features")
  return est.evaluate_pr(ref, est.manifold_radii(ref), sam, est.manifold_radii(sam))
