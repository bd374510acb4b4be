"""Pure formulas of the variance-preserving process, shared by the losses, the samplers and the
attacks (one home each; README "Code map").

α_t = sqrt(ᾱ_t) and σ_t = sqrt(1 − ᾱ_t). Coefficients are per-example arrays of shape (B,) (or
scalars); `per_example` broadcasts them against NHWC images. x̂_0 and ε are written with ADM's
coefficients 1/α_t = sqrt(1/ᾱ_t) and σ_t/α_t = sqrt(1/ᾱ_t − 1) (`x0_coefficients`), so that
GaussianDiffusion can pass its float64-derived tables and match guided_diffusion bit for bit.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp


def per_example(v: Any, like: jnp.ndarray) -> jnp.ndarray:
  """`v` of shape (B,) (or a scalar) with singleton axes appended to broadcast against `like`."""
  v = jnp.asarray(v)
  return v.reshape(v.shape + (1,) * (jnp.ndim(like) - v.ndim))


def q_sample_at(x_start: jnp.ndarray, noise: jnp.ndarray, alpha: Any, sigma: Any) -> jnp.ndarray:
  """x_t = α_t·x_0 + σ_t·ε (IDDPM Eq. 9/10; DDPM Eq. 4)."""
  return per_example(alpha, x_start) * x_start + per_example(sigma, x_start) * noise


def x0_coefficients(alpha_bar: Any) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(1/α_t, σ_t/α_t) = (sqrt(1/ᾱ_t), sqrt(1/ᾱ_t − 1)) of `alpha_bar` (any shape)."""
  alpha_bar = jnp.asarray(alpha_bar)
  return jnp.sqrt(1.0 / alpha_bar), jnp.sqrt(1.0 / alpha_bar - 1.0)


def x0_from_eps(
    x_t: jnp.ndarray, eps: jnp.ndarray, recip_alpha: Any, sigma_over_alpha: Any
) -> jnp.ndarray:
  """x̂_0 = x_t/α_t − (σ_t/α_t)·ε = (x_t − σ_t·ε)/α_t: IDDPM Eq. 10 solved for x_0 (DPM-Solver++'s
  data prediction, its Eq. 8)."""
  return per_example(recip_alpha, x_t) * x_t - per_example(sigma_over_alpha, x_t) * eps


def eps_from_x0(
    x_t: jnp.ndarray, x0: jnp.ndarray, recip_alpha: Any, sigma_over_alpha: Any
) -> jnp.ndarray:
  """ε = (x_t/α_t − x̂_0) / (σ_t/α_t): IDDPM Eq. 10 solved for ε (ADM re-derives ε from a clipped
  x̂_0)."""
  return (per_example(recip_alpha, x_t) * x_t - x0) / per_example(sigma_over_alpha, x_t)


def ddim_update(
    x0: jnp.ndarray, eps: jnp.ndarray, alpha_bar_prev: Any, sigma: Any = 0.0
) -> jnp.ndarray:
  """Mean of DDIM's step to the previous time: sqrt(ᾱ_prev)·x̂_0 + sqrt(1 − ᾱ_prev − σ²)·ε
  (DDIM Eq. 12; σ = 0 is the deterministic step); add σ·z for η > 0."""
  ab_prev, sig = per_example(alpha_bar_prev, x0), per_example(sigma, x0)
  return jnp.sqrt(ab_prev) * x0 + jnp.sqrt(1.0 - ab_prev - sig**2) * eps
