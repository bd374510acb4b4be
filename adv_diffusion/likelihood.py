"""Gaussian likelihood helpers of ADM's losses.py (KL, discretised decoder log-likelihood)."""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp


def mean_flat(x: jnp.ndarray) -> jnp.ndarray:
  """Mean over all non-batch axes."""
  x = jnp.asarray(x)
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1: Any, logvar1: Any, mean2: Any, logvar2: Any) -> jnp.ndarray:
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats (broadcasting)."""
  mean1, logvar1, mean2, logvar2 = (jnp.asarray(a) for a in (mean1, logvar1, mean2, logvar2))
  # Closed-form Gaussian KL (used for L_{t-1}, IDDPM Eq. 6 / DDPM Eq. 5). Term order mirrors
  # ADM so float32 rounding matches.
  return 0.5 * (
      -1.0
      + logvar2
      - logvar1
      + jnp.exp(logvar1 - logvar2)
      + ((mean1 - mean2) ** 2) * jnp.exp(-logvar2)
  )


def approx_standard_normal_cdf(x: jnp.ndarray) -> jnp.ndarray:
  """Tanh approximation of the standard normal CDF used by DDPM/ADM."""
  x = jnp.asarray(x)
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: jnp.ndarray, means: jnp.ndarray, log_scales: jnp.ndarray
) -> jnp.ndarray:
  """Elementwise log-likelihood (nats) of [-1, 1] images (256 bins) under a discretised Gaussian."""
  x, means, log_scales = jnp.asarray(x), jnp.asarray(means), jnp.asarray(log_scales)
  if not (x.shape == means.shape == log_scales.shape):
    raise ValueError(
        f"x, means and log_scales must share a shape, got {x.shape}, {means.shape}, "
        f"{log_scales.shape}."
    )
  # DDPM Eq. 13: each of the 256 levels owns a bin of width 2/255; the outermost bins
  # extend to -inf / +inf.
  centered = x - means
  inv_std = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(
      x < -0.999,
      log_cdf_plus,
      jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta),
  )
