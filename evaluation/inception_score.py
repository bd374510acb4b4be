"""Inception Score (improved-gan) of 1008-way FID-Inception logits, in float64 on the host."""

from typing import Any

import numpy as np

from evaluation.errors import EvaluationError, validate_features


def inception_score(logits: Any, splits: int = 10) -> tuple[float, float]:
  """(mean, std) over `splits` equal splits of exp(E_x KL(p(y|x) || p(y))), from 1008-way logits.

  improved-gan inception_score/model.py: softmax of the unbiased logits, split i is rows
  [i N // splits, (i + 1) N // splits), score exp(mean_x sum_y p (log p - log mean_x p)). ADM
  uses splits of 5000 rows, the same for 50K samples. Log-softmax in float64 here avoids log(0).
  """
  x = validate_features(logits, what="logits")
  n = x.shape[0]
  if n < splits or splits < 1:
    raise EvaluationError(
        f"the Inception Score with {splits} splits needs at least {splits} " f"images, got {n}."
    )
  log_p = x - _logsumexp(x, axis=1)
  scores = []
  for i in range(splits):
    part = log_p[i * n // splits : (i + 1) * n // splits]
    # log p(y) = log mean_x p(y|x), kept finite for classes no image predicts (0 * -inf = nan).
    log_py = _logsumexp(part, axis=0) - np.log(part.shape[0])
    scores.append(np.exp(np.mean(np.sum(np.exp(part) * (part - log_py), axis=1))))
  return float(np.mean(scores)), float(np.std(scores))


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
  top = x.max(axis=axis, keepdims=True)
  return top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))
