"""Conversions between model space [-1, 1] and uint8 images, and PNG grids."""

import math
import os

import numpy as np


def to_uint8(x: np.ndarray, rounding: str = "truncate") -> np.ndarray:
  """[-1, 1] floats to uint8.

  "truncate" is ADM's rule (`((x + 1) * 127.5).clamp(0, 255).to(uint8)` in its sample script,
  which is what the paper's FIDs were computed on); "round" rounds to nearest.
  """
  scaled = (np.asarray(x, np.float32) + 1.0) * 127.5
  if rounding == "round":
    scaled = np.round(scaled)
  elif rounding != "truncate":
    raise ValueError(f"rounding must be 'truncate' or 'round', got {rounding!r}")
  return np.clip(scaled, 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, columns: int | None = None, pad: int = 1) -> np.ndarray:
  """Tiles uint8 NHWC images into one HWC image (grey images become RGB)."""
  images = np.asarray(images)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  n, h, w, c = images.shape
  columns = columns or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / columns))
  grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, columns)
    grid[
        pad + r * (h + pad) : pad + r * (h + pad) + h,
        pad + col * (w + pad) : pad + col * (w + pad) + w,
    ] = img
  return grid


def save_png(path: str, image: np.ndarray, upscale: int = 1) -> None:
  from PIL import Image

  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  img = Image.fromarray(np.asarray(image, np.uint8))
  if upscale > 1:
    img = img.resize((img.width * upscale, img.height * upscale), Image.Resampling.NEAREST)
  img.save(path)
