"""ADM ancestral sampling p(x_{t-1} | x_t) over any respacing (Ho et al. 2020, Alg. 2;
Nichol & Dhariwal 2021 learned variance).

`model_fn(x, t)` receives timesteps of the (respaced) process; it is the caller's job to map
them to the network's original grid (`GaussianDiffusion.model_timesteps`).
"""

from typing import Callable

import jax
import jax.numpy as jnp

from adv_diffusion.diffusion import GaussianDiffusion


def per_sample_noise(key: jax.Array, indices: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Noise of sample i drawn from fold_in(key, i): independent of batch size and devices."""
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape))(indices)


def ancestral_sample(model_fn: Callable[[jax.Array, jax.Array], jax.Array], noise: jax.Array,
                     diffusion: GaussianDiffusion, sample_keys: jax.Array, *,
                     learn_sigma: bool, clip_denoised: bool = True) -> jax.Array:
  """Runs all reverse steps from x_T = `noise`; `sample_keys` (B,) give each sample's step noise."""
  num_steps = diffusion.num_timesteps
  batch = noise.shape[0]

  def body(i, x):
    t_index = num_steps - 1 - i
    t = jnp.full((batch,), t_index, jnp.int32)
    out = diffusion.p_mean_variance(model_fn(x, t), x, t, learn_sigma=learn_sigma,
                                    clip_denoised=clip_denoised)
    z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, t_index), x.shape[1:]))(
        sample_keys)
    nonzero = (t_index != 0).astype(x.dtype)  # no noise at the last step
    return out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * z

  return jax.lax.fori_loop(0, num_steps, body, noise)
