"""KID (Bińkowski et al. 2018) against torch-fidelity 0.4.0's `kid_features_to_metric` on the
same feature arrays, closed forms that need no reference, and bad inputs."""

import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

from evaluation import kid
from evaluation.errors import EvaluationError


def _one_sentence(msg: str) -> bool:
  return "\n" not in msg and msg.endswith(".") and len(msg) < 400


@pytest.fixture(scope="module")
def torch_fidelity_kid() -> types.ModuleType:
  """torch_fidelity.metric_kid, loaded without the package's __init__ (which needs torchvision).

  The package's submodules load from its directory under a bare stand-in package; the
  extractor helpers metric_kid imports from torch_fidelity.utils (torchvision again) are
  placeholders, as `kid_features_to_metric` never calls them.
  """
  spec = importlib.util.find_spec("torch_fidelity")
  if spec is None:
    # CI installs it (README test command); a missing reference must fail, never skip.
    pytest.fail("the KID parity test needs `pip install --no-deps torch-fidelity==0.4.0`.")
  saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "torch_fidelity"}
  package = types.ModuleType("torch_fidelity")
  package.__path__ = list(spec.submodule_search_locations)
  utils = types.ModuleType("torch_fidelity.utils")
  for name in (
      "create_feature_extractor",
      "extract_featuresdict_from_input_id_cached",
      "resolve_feature_extractor",
      "resolve_feature_layer_for_metric",
  ):
    setattr(utils, name, None)
  try:
    sys.modules.update({"torch_fidelity": package, "torch_fidelity.utils": utils})
    module = importlib.import_module("torch_fidelity.metric_kid")
  finally:
    for k in [k for k in sys.modules if k.split(".")[0] == "torch_fidelity"]:
      del sys.modules[k]
    sys.modules.update(saved)
  return module


def _pool_like(rng: np.random.Generator, n: int, d: int, scale: float = 1.0) -> np.ndarray:
  """Non-negative features like Inception's post-ReLU pool_3 averages (mean ~0.4)."""
  return np.abs(rng.standard_normal((n, d))) * 0.5 * scale


def _reference(tf_kid, f_1, f_2, **kwargs) -> tuple[float, float]:
  out = tf_kid.kid_features_to_metric(
      torch.from_numpy(f_1), torch.from_numpy(f_2), verbose=False, **kwargs
  )
  return out[tf_kid.KEY_METRIC_KID_MEAN], out[tf_kid.KEY_METRIC_KID_STD]


@pytest.mark.parametrize("path", ["gram", "per_subset"])
@pytest.mark.parametrize("d,subset_size,num_subsets", [(64, 100, 30), (2048, 200, 12)])
def test_kid_matches_torch_fidelity(
    torch_fidelity_kid, monkeypatch, path, d, subset_size, num_subsets
):
  # Both ways of forming the subsets' kernels: indexing whole-set ones, or per subset.
  monkeypatch.setattr(kid, "_use_gram", lambda *_: path == "gram")
  rng = np.random.default_rng(d)
  f_1 = _pool_like(rng, 300, d)
  f_2 = _pool_like(rng, 250, d, scale=1.1)
  kwargs = dict(num_subsets=num_subsets, subset_size=subset_size, seed=7)
  ours = kid.kernel_inception_distance(f_1, f_2, **kwargs)
  theirs = _reference(
      torch_fidelity_kid, f_1, f_2, kid_subsets=num_subsets, kid_subset_size=subset_size, rng_seed=7
  )
  assert ours[0] > ours[1] > 0  # A positive, noisy value: the check is not vacuous.
  np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=0)


def test_kid_defaults_are_torch_fidelitys(torch_fidelity_kid):
  # Default seed (2020), subsets (100), degree 3, gamma 1/d, coef0 1; identical sets too.
  rng = np.random.default_rng(1)
  f_1, f_2 = _pool_like(rng, 60, 32), _pool_like(rng, 50, 32)
  np.testing.assert_allclose(
      kid.kernel_inception_distance(f_1, f_2, subset_size=40),
      _reference(torch_fidelity_kid, f_1, f_2, kid_subset_size=40),
      rtol=1e-9,
      atol=1e-15,
  )
  # Non-default kernels are passed the same way.
  np.testing.assert_allclose(
      kid.kernel_inception_distance(f_1, f_2, subset_size=40, degree=2, gamma=0.1, coef0=0.5),
      _reference(
          torch_fidelity_kid,
          f_1,
          f_2,
          kid_subset_size=40,
          kid_kernel_poly_degree=2,
          kid_kernel_poly_gamma=0.1,
          kid_kernel_poly_coef0=0.5,
      ),
      rtol=1e-10,
  )


def _direct_unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
  """MMD²_u with k = (xᵀy/d + 1)³ (Bińkowski et al. 2018 §4), term by term in float64."""
  m, d = x.shape

  def k(a, b):
    return (a @ b / d + 1.0) ** 3

  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
  return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / (m * m)


@pytest.mark.parametrize("path", ["gram", "per_subset"])
def test_one_full_subset_is_the_direct_estimate(monkeypatch, path):
  monkeypatch.setattr(kid, "_use_gram", lambda *_: path == "gram")
  rng = np.random.default_rng(2)
  x, y = _pool_like(rng, 40, 16), _pool_like(rng, 40, 16, scale=1.2) + 0.05
  mean, std = kid.kernel_inception_distance(x, y, num_subsets=1, subset_size=40)
  assert std == 0.0
  np.testing.assert_allclose(mean, _direct_unbiased_mmd2(x, y), rtol=1e-12)
  # Every subset of a whole set is a permutation of it: the same value, std at round-off.
  mean, std = kid.kernel_inception_distance(x, y, num_subsets=5, subset_size=40)
  np.testing.assert_allclose(mean, _direct_unbiased_mmd2(x, y), rtol=1e-12)
  assert std < 1e-12 * abs(mean)


def test_same_distribution_is_zero_and_a_shift_grows():
  rng = np.random.default_rng(3)
  base = rng.standard_normal((400, 32))
  other = rng.standard_normal((400, 32))
  mean, std = kid.kernel_inception_distance(base, other, num_subsets=50, subset_size=200)
  assert abs(mean) < 3 * std + 1e-12 and std > 0  # Unbiased: zero within its noise.
  values = [
      kid.kernel_inception_distance(base, other + shift, num_subsets=50, subset_size=200)
      for shift in (0.25, 0.5, 1.0)
  ]
  means = [v[0] for v in values]
  assert all(m > 3 * s for m, s in values)
  assert mean < means[0] < means[1] < means[2]


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: kid.kernel_inception_distance(np.zeros((1, 4)), np.zeros((5, 4))), "at least 2"),
        (
            lambda: kid.kernel_inception_distance(np.zeros((5, 4)), np.zeros((5, 3))),
            "one dimension",
        ),
        (lambda: kid.kernel_inception_distance(np.zeros((5, 4)), np.zeros((6, 4))), "subset_size"),
        (
            lambda: kid.kernel_inception_distance(
                np.zeros((9, 4)), np.zeros((6, 4)), subset_size=7
            ),
            "subset_size",
        ),
        (
            lambda: kid.kernel_inception_distance(
                np.zeros((9, 4)), np.zeros((6, 4)), subset_size=1
            ),
            "subset_size",
        ),
        (
            lambda: kid.kernel_inception_distance(
                np.zeros((9, 4)), np.zeros((6, 4)), subset_size=4, num_subsets=0
            ),
            "num_subsets",
        ),
        (lambda: kid.kernel_inception_distance(np.zeros(5), np.zeros((6, 4))), "2-D"),
        (
            lambda: kid.kernel_inception_distance(np.full((5, 4), np.nan), np.zeros((6, 4))),
            "NaN",
        ),
    ],
)
def test_bad_inputs_raise_one_sentence(call, match):
  with pytest.raises(EvaluationError, match=match) as e:
    call()
  assert _one_sentence(str(e.value)), str(e.value)


def _mmd2_direct(x: np.ndarray, y: np.ndarray) -> float:
  """MMD²_u of sets of any sizes, from the definition (Gretton et al. 2012, Eq. 3)."""
  d = x.shape[1]
  k = lambda p, q: (p @ q.T / d + 1) ** 3  # noqa: E731
  m, n = len(x), len(y)
  k_xx, k_yy = k(x, x), k(y, y)
  return (
      (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
      + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
      - 2 * k(x, y).sum() / (m * n)
  )


def test_paired_difference_is_the_direct_estimate_and_its_leave_one_out_jackknife():
  rng = np.random.default_rng(0)
  m, d = 20, 5
  a = rng.normal(size=(m, d))
  b = a + 0.3 * rng.normal(size=(m, d))
  y = rng.normal(size=(30, d)) + 0.2
  result = kid.paired_mmd2_difference(a, b, y)
  np.testing.assert_allclose(result["mmd2_a"], _mmd2_direct(a, y), rtol=1e-12)
  np.testing.assert_allclose(result["mmd2_b"], _mmd2_direct(b, y), rtol=1e-12)
  loo = np.array(
      [_mmd2_direct(np.delete(a, i, 0), y) - _mmd2_direct(np.delete(b, i, 0), y) for i in range(m)]
  )
  jackknife = np.sqrt((m - 1) / m * np.sum((loo - loo.mean()) ** 2))
  np.testing.assert_allclose(result["standard_error"], jackknife, rtol=1e-10)
  assert result["pairs"] == m and result["reference_rows"] == 30


def test_paired_standard_error_matches_the_spread_over_new_noise():
  # A fixed reference, and 300 draws of 60 pairs with shared per-pair noise z (as two models
  # sampled from the same initial noise): the mean jackknife s.e. must match the actual
  # standard deviation of the difference, and ±1.96 s.e. must cover its mean ~95 % of the time.
  # The jackknife is slightly conservative at small m (Efron & Stein 1981): measured 1.10 and
  # 0.957 here.
  rng = np.random.default_rng(1)
  d = 8
  y = 1.2 * rng.normal(size=(100, d))
  differences, errors = [], []
  for _ in range(300):
    z = rng.normal(size=(60, d))
    a = z + 0.5 * rng.normal(size=z.shape)
    b = z + 0.5 * rng.normal(size=z.shape) + 0.1
    result = kid.paired_mmd2_difference(a, b, y)
    differences.append(result["difference"])
    errors.append(result["standard_error"])
  differences, errors = np.array(differences), np.array(errors)
  assert 0.85 < errors.mean() / differences.std() < 1.3
  covered = np.abs(differences - differences.mean()) < 1.96 * errors
  assert 0.9 < covered.mean() < 0.99
  # Pairing is what makes the error small: unpaired sets (b from other noise) spread more.
  unpaired = [
      kid.paired_mmd2_difference(a, rng.normal(size=a.shape) * np.sqrt(1.25) + 0.1, y)
      for _ in range(50)
  ]
  assert np.mean([r["standard_error"] for r in unpaired]) > 1.5 * errors.mean()


@pytest.mark.parametrize(
    "args, match",
    [
        ((np.zeros((5, 3)), np.zeros((4, 3)), np.zeros((6, 3))), "as many rows"),
        ((np.zeros((5, 3)), np.zeros((5, 2)), np.zeros((6, 3))), "dimensions"),
        ((np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((6, 3))), "at least 3 pairs"),
    ],
)
def test_paired_difference_bad_inputs_raise_one_sentence(args, match):
  with pytest.raises(EvaluationError, match=match) as info:
    kid.paired_mmd2_difference(*args)
  assert _one_sentence(str(info.value))
