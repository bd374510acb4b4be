"""Consistency-model parameterisation on ADM's VP grid and one-/multistep consistency sampling.

The consistency function of an ε-network (PAPER.md §8; LCM's boundary scalings, Luo et al. 2023):
    f(x, t) = c_skip(t)·x + c_out(t)·x̂_0(x, t),   x̂_0 = (x − σ_t·ε_θ(x, t)) / sqrt(ᾱ_t),
    c_skip(t) = σ_d² / ((s·t)² + σ_d²),   c_out(t) = s·t / sqrt((s·t)² + σ_d²),
with t the integer timestep of the original grid, σ_d = `sigma_data` and s = `timestep_scale`.
At t = 0, c_skip = 1 and c_out = 0 exactly, so f(x, 0) = x for any network.

Multistep sampling (Song et al. 2023, Algorithm 1) at timesteps τ_0 > τ_1 > …: x̂_0 = f(x_T, τ_0),
then for each later τ re-noise x_τ = sqrt(ᾱ_τ)·x̂_0 + σ_τ·z and denoise x̂_0 = f(x_τ, τ): one
model call per timestep.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def boundary_scalings(t: jax.Array, sigma_data: float, timestep_scale: float
                      ) -> tuple[jax.Array, jax.Array]:
  """(c_skip(t), c_out(t)) of LCM, each shaped like `t`; (1, 0) at t = 0."""
  scaled = timestep_scale * jnp.asarray(t, jnp.float32)
  c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
  c_out = scaled / jnp.sqrt(scaled ** 2 + sigma_data ** 2)
  return c_skip, c_out


def predict_x0(eps: jax.Array, x: jax.Array, t: jax.Array, alphas_cumprod: jax.Array,
               clip: bool) -> jax.Array:
  """x̂_0 = (x − σ_t·ε) / sqrt(ᾱ_t) per example, optionally clipped to [−1, 1] (ADM's
  `clip_denoised`: with the cosine schedule sqrt(ᾱ_999) ≈ 5e-5 would amplify ε errors)."""
  a = jnp.asarray(alphas_cumprod, jnp.float32)[t][:, None, None, None]
  x0 = (x - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)
  return jnp.clip(x0, -1.0, 1.0) if clip else x0


def consistency_function(output: jax.Array, x: jax.Array, t: jax.Array,
                         alphas_cumprod: jax.Array, *, sigma_data: float = 0.5,
                         timestep_scale: float = 10.0, clip_x0: bool = True) -> jax.Array:
  """f(x, t) from the raw network output (ε in its first C channels; learned σ ignored)."""
  eps = output[..., :x.shape[-1]].astype(jnp.float32)
  c_skip, c_out = boundary_scalings(t, sigma_data, timestep_scale)
  x0 = predict_x0(eps, x, t, alphas_cumprod, clip_x0)
  return c_skip[:, None, None, None] * x + c_out[:, None, None, None] * x0


def default_timesteps(nfe: int, num_timesteps: int) -> tuple[int, ...]:
  """`nfe` evenly spaced timesteps from T − 1 down: 1 → (999,), 2 → (999, 500), ..."""
  return tuple(int(round((num_timesteps - 1) * (1.0 - i / nfe))) for i in range(nfe))


def check_timesteps(timesteps: Sequence[int], nfe: int, num_timesteps: int) -> tuple[int, ...]:
  """The sampling timesteps as a strictly decreasing tuple in [1, T − 1] of length `nfe`."""
  steps = tuple(int(t) for t in timesteps)
  if len(steps) != nfe:
    raise ValueError(f"consistency timesteps {list(steps)} must list exactly nfe={nfe} steps.")
  if any(b >= a for a, b in zip(steps, steps[1:])) or steps[-1] < 1 or steps[0] > num_timesteps - 1:
    raise ValueError(f"consistency timesteps {list(steps)} must decrease strictly within "
                     f"[1, {num_timesteps - 1}].")
  return steps


def sample_consistency(model_fn: ModelFn, noise: jax.Array, alphas_cumprod: np.ndarray,
                       timesteps: Sequence[int], keys: jax.Array | None = None, *,
                       sigma_data: float = 0.5, timestep_scale: float = 10.0,
                       clip_x0: bool = True) -> jax.Array:
  """One- (len(timesteps) = 1) or multistep consistency sampling; `noise` is x at τ_0."""
  if len(timesteps) > 1 and keys is None:
    raise ValueError("multistep consistency sampling re-noises and needs per-sample keys.")
  ac = jnp.asarray(alphas_cumprod, jnp.float32)
  batch = noise.shape[0]

  def f(x, tau):
    t = jnp.full((batch,), tau, jnp.int32)
    return consistency_function(model_fn(x, t), x, t, ac, sigma_data=sigma_data,
                                timestep_scale=timestep_scale, clip_x0=clip_x0)

  x0 = f(noise, timesteps[0])
  for i, tau in enumerate(timesteps[1:], start=1):
    z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), noise.shape[1:]))(keys)
    x0 = f(jnp.sqrt(ac[tau]) * x0 + jnp.sqrt(1.0 - ac[tau]) * z, tau)
  return x0
