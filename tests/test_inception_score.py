"""Inception Score: closed forms and bad inputs (the logits path is checked in test_fid.py)."""

import numpy as np
import pytest

from evaluation import inception_score
from evaluation.errors import EvaluationError


def _one_sentence(msg: str) -> bool:
  return "\n" not in msg and msg.endswith(".") and len(msg) < 400


def test_inception_score_closed_forms():
  # Identical predictions: p(y|x) = p(y), KL = 0, IS = 1.
  same = np.tile(np.random.default_rng(0).standard_normal(1008), (40, 1))
  np.testing.assert_allclose(inception_score.inception_score(same)[0], 1.0, rtol=1e-12)
  # Confident and uniform over C classes in every split: IS = C.
  c = 4
  logits = np.full((40, 1008), -1e4)
  logits[np.arange(40), np.arange(40) % c] = 0.0
  mean, std = inception_score.inception_score(logits, splits=10)
  np.testing.assert_allclose(mean, c, rtol=1e-9)
  assert std < 1e-9


def test_too_few_images_raise_one_sentence():
  with pytest.raises(EvaluationError, match="at least 10") as e:
    inception_score.inception_score(np.zeros((5, 1008)))
  assert _one_sentence(str(e.value)), str(e.value)
