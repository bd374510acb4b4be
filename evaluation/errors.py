"""One exception type for the evaluation package and the image and feature checks that raise it."""

from typing import Any

import numpy as np


class EvaluationError(Exception):
  """Bad images, statistics or weights given to the evaluation code; the message is one sentence."""


def validate_images(images: Any, min_count: int = 1, what: str = "images") -> np.ndarray:
  """Returns `images` as a uint8 NHWC numpy array with 1 or 3 channels, or raises one sentence."""
  # jax.Array and lists go through np.asarray; a device array is copied to the host once here.
  try:
    array = np.asarray(images)
  except Exception as e:  # A ragged list, an object that is not array-like.
    raise EvaluationError(
        f"{what} must be an array of shape (N, H, W, C), got " f"{type(images).__name__} ({e})."
    ) from None
  if np.issubdtype(array.dtype, np.floating) and array.size and np.isnan(array).any():
    raise EvaluationError(
        f"{what} contain NaN values ({int(np.isnan(array).sum())} of "
        f"{array.size}); check the sampler before scoring its output."
    )
  if array.dtype != np.uint8:
    # DESIGN.md: images are uint8 on disk; the float -> uint8 rounding rule belongs to the sampler
    # and is part of an FID result's provenance, so it is never guessed here.
    raise EvaluationError(
        f"{what} must have dtype uint8 with values in [0, 255], got "
        f"{array.dtype}; quantize them first, e.g. "
        f"np.clip(np.round(x), 0, 255).astype(np.uint8) for x in [0, 255]."
    )
  if array.ndim != 4:
    raise EvaluationError(f"{what} must have rank 4 (N, H, W, C), got shape {array.shape}.")
  n, h, w, c = array.shape
  if c not in (1, 3):
    hint = " (this looks like NCHW; transpose it to NHWC)" if array.shape[1] in (1, 3) else ""
    raise EvaluationError(
        f"{what} must have 1 or 3 channels in the last axis (NHWC), got shape "
        f"{array.shape}{hint}."
    )
  if h < 1 or w < 1:
    raise EvaluationError(
        f"{what} must have a positive height and width, got shape " f"{array.shape}."
    )
  if n < min_count:
    why = " (a covariance needs two)" if min_count == 2 else ""
    raise EvaluationError(
        f"{what} must hold at least {min_count} image"
        f"{'s' if min_count != 1 else ''}{why}, got {n}."
    )
  return array


def validate_features(features: Any, dim: int | None = None, what: str = "features") -> np.ndarray:
  """Returns `features` as a finite float64 (rows, dims) array with `dim` dims, or raises."""
  x = np.asarray(features)
  if x.ndim != 2:
    raise EvaluationError(f"{what} must be a 2-D array (rows, dims), got shape {x.shape}.")
  if dim is not None and x.shape[1] != dim:
    raise EvaluationError(f"{what} have {x.shape[1]} dimensions but the statistics have {dim}.")
  x = x.astype(np.float64)
  if not np.isfinite(x).all():
    raise EvaluationError(
        f"{what} contain NaN or infinite values " f"({int((~np.isfinite(x)).sum())} of {x.size})."
    )
  return x
