"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric"), VGG16 variant, version 0.1, in Flax Linen, and its torch-free loader.

Reference: the `lpips` PyPI package v0.1.4 (`lpips/lpips.py` `LPIPS.forward`,
`lpips/pretrained_networks.py` `vgg16`), which computes, for images in [-1, 1] (NCHW there):
  x -> ScalingLayer: (x - shift) / scale, shift = [-.030, -.088, -.188], scale = [.458, .448, .450]
    -> torchvision `vgg16().features`, taps after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
       (`features[0:4]`, `[4:9]`, `[9:16]`, `[16:23]`, `[23:30]`: conv 3x3 pad 1 + ReLU, max
       pool 2x2 stride 2 at the start of taps 2..5, no pool after relu5_3)
    -> per tap `normalize_tensor`: f / (sqrt(sum_c f^2) + 1e-10)
    -> (f0 - f1)^2 -> `NetLinLayer`: 1x1 conv to one channel, no bias (weights/v0.1/vgg.pth)
    -> `spatial_average` over H, W -> sum over the five taps.
Four pools precede relu5_3, so the network needs inputs of at least 16x16 pixels. Grey images
are repeated to three channels (what `lpips` users do with `x.repeat(1, 3, 1, 1)`).

Parameters: {"features_N": {"kernel" (3, 3, in, out) HWIO, "bias"}} with N torchvision's index
in `vgg16().features` (0, 2, 5, ..., 28), and {"linK": {"kernel": (C_K,)}} for K = 0..4. The
converted file (`python -m evaluation.convert_lpips`) lives at $ADV_DIFFUSION_LPIPS or
~/.cache/adv_diffusion/lpips_vgg.npz; nothing is downloaded at run time.
"""

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from evaluation.errors import EvaluationError

WEIGHTS_ENV = "ADV_DIFFUSION_LPIPS"
DEFAULT_WEIGHTS_PATH = os.path.join("~", ".cache", "adv_diffusion", "lpips_vgg.npz")
VGG16_FILE = "vgg16-397923af.pth"  # torchvision's VGG16_Weights.IMAGENET1K_V1
CONVERT_COMMAND = f"python -m evaluation.convert_lpips --vgg=PATH/TO/{VGG16_FILE}"
# npz entries that record provenance (the sha256 of the converted files), not parameters.
SOURCE_PREFIX = "source_sha256/"

# torchvision `vgg16().features`: (index of the conv, output channels) per tap; the taps after
# the first start with a 2x2 max pool.
VGG16_TAPS = (
    ((0, 64), (2, 64)),
    ((5, 128), (7, 128)),
    ((10, 256), (12, 256), (14, 256)),
    ((17, 512), (19, 512), (21, 512)),
    ((24, 512), (26, 512), (28, 512)),
)
TAP_CHANNELS = tuple(tap[-1][1] for tap in VGG16_TAPS)
MIN_SIZE = 2 ** (len(VGG16_TAPS) - 1)  # four 2x2 pools before relu5_3
# lpips ScalingLayer (v0.1): ImageNet mean/std re-expressed for inputs in [-1, 1].
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10  # lpips.normalize_tensor


class LPIPSVGG16(nn.Module):
  """Per-example LPIPS between the two halves of a batch (`x[:B]` vs `x[B:]`), NHWC, 3 channels,
  already scaled by the ScalingLayer."""

  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    half = x.shape[0] // 2
    total = jnp.zeros((half,), jnp.float32)
    for k, tap in enumerate(VGG16_TAPS):
      if k:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      for index, channels in tap:
        x = nn.relu(
            nn.Conv(
                channels,
                (3, 3),
                padding=((1, 1), (1, 1)),
                precision=self.precision,
                name=f"features_{index}",
            )(x)
        )
      # normalize_tensor. The floor keeps the gradient finite where all channels are zero (it
      # changes no value: there the features, and so the quotient, are zero anyway).
      norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), 1e-30))
      unit = x / (norm + NORM_EPS)
      diff = jnp.square(unit[:half] - unit[half:])
      lin = self.param(f"lin{k}", nn.initializers.zeros, (x.shape[-1],))
      total = total + jnp.mean(
          jnp.einsum("bhwc,c->bhw", diff, lin, precision=self.precision), axis=(1, 2)
      )
    return total


def _prepare(images: jax.Array, resize: int) -> jax.Array:
  """Grey -> RGB, optional bilinear resize, then lpips' ScalingLayer."""
  x = images.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if resize and x.shape[1:3] != (resize, resize):
    # half-pixel centres, no antialiasing = torch F.interpolate(bilinear, align_corners=False).
    x = jax.image.resize(x, (x.shape[0], resize, resize, 3), "bilinear", antialias=False)
  return (x - jnp.asarray(SHIFT, jnp.float32)) / jnp.asarray(SCALE, jnp.float32)


def lpips_distance(
    params: Any,
    a: jax.Array,
    b: jax.Array,
    resize: int = 0,
    precision: Any = jax.lax.Precision.HIGHEST,
) -> jax.Array:
  """LPIPS-VGG v0.1 per example, shape (B,), between images `a` and `b` in [-1, 1] (NHWC, 1 or 3
  channels); `resize` > 0 bilinearly resizes both to `resize` x `resize` first (0 = as given)."""
  if a.shape != b.shape or a.ndim != 4 or a.shape[-1] not in (1, 3):
    raise ValueError(
        f"LPIPS needs two NHWC batches of the same shape with 1 or 3 channels, got "
        f"{a.shape} and {b.shape}."
    )
  size = min(a.shape[1:3]) if not resize else resize
  if size < MIN_SIZE:
    raise ValueError(
        f"LPIPS-VGG needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels, got "
        f"{a.shape[1]}x{a.shape[2]}; set config.consistency.lpips_resize to "
        f"{MIN_SIZE} or more."
    )
  x = jnp.concatenate([_prepare(a, resize), _prepare(b, resize)], axis=0)
  return LPIPSVGG16(precision=precision).apply({"params": params}, x)


def expected_shapes() -> dict[str, tuple[int, ...]]:
  """{"/"-joined parameter path: shape} of the network (traced abstractly, nothing computed)."""
  abstract = jax.eval_shape(
      LPIPSVGG16().init,
      jax.random.key(0),
      jax.ShapeDtypeStruct((2, MIN_SIZE, MIN_SIZE, 3), jnp.float32),
  )
  flat = traverse_util.flatten_dict(abstract["params"], sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


def resolve_weights_path(path: str | None = None) -> str:
  """`path` if given, else $ADV_DIFFUSION_LPIPS, else ~/.cache/adv_diffusion/lpips_vgg.npz."""
  return os.path.expanduser(path or os.environ.get(WEIGHTS_ENV) or DEFAULT_WEIGHTS_PATH)


def missing_weights_message(path: str) -> str:
  """The one sentence telling how to create the weight file at `path`."""
  out = "" if path == os.path.expanduser(DEFAULT_WEIGHTS_PATH) else f" --out={path}"
  return (
      f"LPIPS weights not found at {path}; create them from torchvision's VGG16 ImageNet "
      f"weights with `{CONVERT_COMMAND}{out}`."
  )


def check_flat_params(flat: dict[str, np.ndarray], source: str) -> None:
  """Raises one sentence unless `flat` holds exactly the network's leaves with the right shapes."""
  shapes = expected_shapes()
  for key, shape in shapes.items():
    if key not in flat:
      raise EvaluationError(
          f"{source} is not a converted LPIPS file: it lacks {key!r}; "
          f"re-create it with `{CONVERT_COMMAND}`."
      )
    if tuple(flat[key].shape) != shape:
      raise EvaluationError(
          f"{source} has {key!r} of shape {tuple(flat[key].shape)}, expected "
          f"{shape}; re-create it with `{CONVERT_COMMAND}`."
      )
  extra = sorted(set(flat) - set(shapes))
  if extra:
    raise EvaluationError(
        f"{source} holds unexpected arrays {extra[:3]}; it is not a converted " "LPIPS file."
    )


def load_lpips_params(path: str | None = None) -> dict:
  """The converted LPIPS-VGG parameters (numpy, no torch needed); one sentence if the file is
  missing or damaged."""
  path = resolve_weights_path(path)
  if not os.path.isfile(path):
    raise EvaluationError(missing_weights_message(path))
  try:
    with np.load(path, allow_pickle=False) as data:
      flat = {
          k: np.asarray(data[k], np.float32) for k in data.files if not k.startswith(SOURCE_PREFIX)
      }
  except Exception as e:  # zipfile.BadZipFile, ValueError from a truncated file, ...
    raise EvaluationError(
        f"LPIPS weights at {path} could not be read ({e}); re-create them "
        f"with `{CONVERT_COMMAND}`."
    ) from None
  check_flat_params(flat, path)
  return traverse_util.unflatten_dict(flat, sep="/")
