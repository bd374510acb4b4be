"""ADM ancestral sampling p(x_{t-1} | x_t) over any respacing, with optional ADM-ES ε-scaling.

References:
 * DDPM  -- Ho et al. 2020, Alg. 2 (ancestral sampling).
 * IDDPM -- Nichol & Dhariwal 2021, Eq. 15 (learned variance) and Eq. 19 (respacing).
 * ADM-ES -- Ning et al. ICLR 2024, "Elucidating the Exposure Bias in Diffusion Models"
  (arXiv:2308.15321): the predicted ε is divided by λ(t) at every step ("epsilon scaling").

Two entry points share one loop:
 * `sample_ancestral(model_fn, ...)` follows the convention of every sampler in `sampling/`:
  `model_fn(x, t)` gets NHWC `x` and timesteps of the ORIGINAL grid (what the network was trained
  on) and returns the raw network output; it returns `(samples, nfe)`.
 * `ancestral_sample(model_fn, ...)` is the train loop's entry point (kept as it was):
  `model_fn(x, t)` gets indices of the RESPACED process and maps them itself with
  `diffusion.model_timesteps`; it returns the samples only.

Step noise of sample i at respaced step t is normal(fold_in(sample_keys[i], t)), so a sample
does not depend on the batch it is drawn in.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from adv_diffusion.diffusion import GaussianDiffusion

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def per_sample_noise(key: jax.Array, indices: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Noise of sample i drawn from fold_in(key, i): independent of batch size and devices."""
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape))(indices)


def eps_scale_schedule(
    num_steps: int, eps_scale: float = 1.0, eps_scale_slope: float = 0.0
) -> np.ndarray:
  """ADM-ES divisors λ_i (float64, (num_steps,)) for respaced step i = 0 (least noisy) .. N-1."""
  # ADM-ES (Ning et al. 2024, Sec. 4.2) schedule λ(t) = k·t + b over the N sampling steps. Their
  # code centres it so that its mean over the steps is b: start = b - k·(N - 1)/2 and
  # λ_i = start + k·i, i.e. λ_i = b + k·(i - (N - 1)/2). The paper reports the uniform
  # schedule k = 0 (b = 1.017 for CIFAR-10, 1.006 for ImageNet-64).
  num_steps = int(num_steps)
  if not (np.isfinite(eps_scale) and np.isfinite(eps_scale_slope)):
    raise ValueError(
        f"eps_scale and eps_scale_slope must be finite numbers, got {eps_scale!r} and "
        f"{eps_scale_slope!r}."
    )
  steps = np.arange(num_steps, dtype=np.float64)
  scales = float(eps_scale) + float(eps_scale_slope) * (steps - (num_steps - 1) / 2.0)
  if num_steps < 1 or not np.all(scales > 0):
    raise ValueError(
        f"eps_scale={eps_scale!r} with eps_scale_slope={eps_scale_slope!r} over {num_steps} "
        f"steps gives divisors in [{scales.min():.4g}, {scales.max():.4g}], but every "
        "divisor b + k·(i - (N - 1)/2) must be positive."
    )
  return scales


def ancestral_nfe(diffusion: GaussianDiffusion) -> int:
  """Number of model calls of the ancestral sampler: one per step of the respaced process."""
  return diffusion.num_timesteps


def _scale_eps(model_output: jax.Array, scale: jax.Array, channels: int) -> jax.Array:
  """Divides the ε channels (the first C) of a raw output by `scale`, leaving v untouched."""
  eps = model_output[..., :channels] / scale  # ADM-ES: eps / λ(t) inside x_0 prediction
  if model_output.shape[-1] == channels:
    return eps
  return jnp.concatenate([eps, model_output[..., channels:]], axis=-1)


def ancestral_sample(
    model_fn: ModelFn,
    noise: jax.Array,
    diffusion: GaussianDiffusion,
    sample_keys: jax.Array,
    *,
    learn_sigma: bool,
    clip_denoised: bool = True,
    eps_scale: float = 1.0,
    eps_scale_slope: float = 0.0,
) -> jax.Array:
  """Runs all reverse steps from x_T = `noise`; `model_fn` gets RESPACED indices (train loop)."""
  num_steps = diffusion.num_timesteps
  batch, channels = noise.shape[0], noise.shape[-1]
  scaled = not (eps_scale == 1.0 and eps_scale_slope == 0.0)
  scales = jnp.asarray(eps_scale_schedule(num_steps, eps_scale, eps_scale_slope), jnp.float32)

  def body(i, x):
    t_index = num_steps - 1 - i
    t = jnp.full((batch,), t_index, jnp.int32)
    output = model_fn(x, t)
    if scaled:
      output = _scale_eps(output, scales[t_index], channels)
    # DDPM Eq. 11 / IDDPM Eq. 15: mean from the x_0 prediction, learned or fixed variance.
    out = diffusion.p_mean_variance(
        output, x, t, learn_sigma=learn_sigma, clip_denoised=clip_denoised
    )
    z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, t_index), x.shape[1:], x.dtype))(
        sample_keys
    )
    nonzero = (t_index != 0).astype(x.dtype)  # no noise at the last step
    return out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * z

  return jax.lax.fori_loop(0, num_steps, body, noise)


def sample_ancestral(
    model_fn: ModelFn,
    noise: jax.Array,
    diffusion: GaussianDiffusion,
    sample_keys: jax.Array,
    *,
    learn_sigma: bool,
    clip_denoised: bool = True,
    eps_scale: float = 1.0,
    eps_scale_slope: float = 0.0,
) -> tuple[jax.Array, int]:
  """(samples, nfe) of ADM(-ES) ancestral sampling; `model_fn` gets original-grid timesteps."""

  def respaced_fn(x: jax.Array, t: jax.Array) -> jax.Array:
    return model_fn(x, diffusion.model_timesteps(t))

  samples = ancestral_sample(
      respaced_fn,
      noise,
      diffusion,
      sample_keys,
      learn_sigma=learn_sigma,
      clip_denoised=clip_denoised,
      eps_scale=eps_scale,
      eps_scale_slope=eps_scale_slope,
  )
  return samples, ancestral_nfe(diffusion)
