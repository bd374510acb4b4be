"""Precision and recall (ADM's k-NN manifolds) against brute force, and bad inputs."""

import numpy as np
import pytest

from evaluation import precision_recall
from evaluation.errors import EvaluationError


def _one_sentence(msg: str) -> bool:
  return "\n" not in msg and msg.endswith(".") and len(msg) < 400


def _brute_force_pr(ref, sam, k=3):
  def radii(x):
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    return np.sort(d, axis=1)[:, k]

  d = ((ref[:, None] - sam[None]) ** 2).sum(-1)
  precision = np.mean((d <= radii(ref)[:, None]).any(0))
  recall = np.mean((d <= radii(sam)[None, :]).any(1))
  return precision, recall


def test_precision_recall_matches_brute_force():
  rng = np.random.default_rng(0)
  ref = rng.standard_normal((37, 8))
  sam = rng.standard_normal((29, 8)) * 1.3 + 0.4
  expected = _brute_force_pr(ref, sam)
  assert 0 < expected[0] < 1 and 0 < expected[1] < 1
  np.testing.assert_allclose(precision_recall.precision_recall(ref, sam), expected)
  # Row/column blocks smaller than the sets give the same answer.
  np.testing.assert_allclose(precision_recall.precision_recall(ref, sam, batch_size=5), expected)
  np.testing.assert_allclose(precision_recall.precision_recall(ref, ref), (1.0, 1.0))


def test_too_few_images_raise_one_sentence():
  with pytest.raises(EvaluationError, match="more than 3") as e:
    precision_recall.precision_recall(np.zeros((3, 4)), np.zeros((9, 4)))
  assert _one_sentence(str(e.value)), str(e.value)
