"""One- and multistep consistency sampling on ADM's VP grid.

The consistency function f(x, t) = c_skip(t)·x + c_out(t)·x̂_0(x, t) of an ε-network is defined
with its loss in `adv_diffusion.consistency` (PAPER.md §8).

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

from adv_diffusion.consistency import consistency_function
from adv_diffusion.vp import q_sample_at

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def default_timesteps(nfe: int, num_timesteps: int) -> tuple[int, ...]:
  """`nfe` evenly spaced timesteps from T − 1 down: 1 → (999,), 2 → (999, 500), ..."""
  return tuple(int(round((num_timesteps - 1) * (1.0 - i / nfe))) for i in range(nfe))


def check_timesteps(timesteps: Sequence[int], nfe: int, num_timesteps: int) -> tuple[int, ...]:
  """The sampling timesteps as a strictly decreasing tuple in [1, T − 1] of length `nfe`."""
  steps = tuple(int(t) for t in timesteps)
  if len(steps) != nfe:
    raise ValueError(f"consistency timesteps {list(steps)} must list exactly nfe={nfe} steps.")
  if any(b >= a for a, b in zip(steps, steps[1:])) or steps[-1] < 1 or steps[0] > num_timesteps - 1:
    raise ValueError(
        f"consistency timesteps {list(steps)} must decrease strictly within "
        f"[1, {num_timesteps - 1}]."
    )
  return steps


def sample_consistency(
    model_fn: ModelFn,
    noise: jax.Array,
    alphas_cumprod: np.ndarray,
    timesteps: Sequence[int],
    keys: jax.Array | None = None,
    *,
    sigma_data: float = 0.5,
    timestep_scale: float = 10.0,
    clip_x0: bool = True,
) -> jax.Array:
  """One- (len(timesteps) = 1) or multistep consistency sampling; `noise` is x at τ_0."""
  if len(timesteps) > 1 and keys is None:
    raise ValueError("multistep consistency sampling re-noises and needs per-sample keys.")
  ac = jnp.asarray(alphas_cumprod, jnp.float32)
  batch = noise.shape[0]

  def f(x, tau):
    t = jnp.full((batch,), tau, jnp.int32)
    return consistency_function(
        model_fn(x, t),
        x,
        t,
        ac,
        sigma_data=sigma_data,
        timestep_scale=timestep_scale,
        clip_x0=clip_x0,
    )

  x0 = f(noise, timesteps[0])
  for i, tau in enumerate(timesteps[1:], start=1):
    z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), noise.shape[1:]))(keys)
    x0 = f(q_sample_at(x0, z, jnp.sqrt(ac[tau]), jnp.sqrt(1.0 - ac[tau])), tau)
  return x0
