"""The FID resize rule `tf1_bilinear` against TensorFlow itself (issue 16).

tests/test_fid.py checks the rules against re-implementations written there; this file checks
`tf1_bilinear` against the op of the TF FID graph, TF1's legacy `ResizeBilinear`
(`tf.compat.v1.image.resize_bilinear`, align_corners=False, half_pixel_centers=False). TensorFlow
is slow to import, so it is imported once, in this module's one test.
"""

import numpy as np
import pytest

from evaluation import preprocess


def test_tf1_bilinear_matches_tensorflow_resize_bilinear():
  tf = pytest.importorskip("tensorflow")
  rng = np.random.default_rng(16)
  # The sizes the pipeline meets: CIFAR-10 / ImageNet-64 (RGB) and the digits (grey), to 299.
  for size, channels in ((32, 3), (64, 3), (16, 1), (16, 3)):
    images = rng.integers(0, 256, (3, size, size, channels), dtype=np.uint8)
    x = images.astype(np.float32)
    reference = tf.compat.v1.image.resize_bilinear(
        x, (299, 299), align_corners=False, half_pixel_centers=False
    ).numpy()
    assert reference.dtype == np.float32
    ours = np.asarray(preprocess.resize(x, 299, "tf1_bilinear"))
    # Both are float32 lerps of [0, 255] values: agreement to a few float32 ulps of 255.
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4)
    # The whole rule: ResizeBilinear, then Sub 128 and Mul 1/128 as in the TF graph.
    inputs = np.asarray(preprocess.preprocess(images, "tf1_bilinear"))
    expected = (reference - np.float32(128)) * np.float32(1 / 128)
    if channels == 1:
      expected = np.repeat(expected, 3, axis=-1)
    np.testing.assert_allclose(inputs, expected, rtol=0, atol=1e-6)
  # TF's half-pixel resize is a different rule, far from ours: the parity above is not vacuous.
  half_pixel = tf.compat.v1.image.resize_bilinear(
      x, (299, 299), align_corners=False, half_pixel_centers=True
  ).numpy()
  assert np.abs(half_pixel - ours).max() > 10
