"""DDIM sampling (Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models", Eq. 12) with η.

The sampler runs over a respaced `GaussianDiffusion`, so every step grid shares the same maths:
ADM's respacings ("N", "ddimN", section lists) and the DDIM paper's "uniform" / "quad" skip
types, built from a list of kept original-grid timesteps (`diffusion_from_timesteps`).

`model_fn(x, t)` gets NHWC `x` and int timesteps of the ORIGINAL grid and returns the raw
network output; only its first C channels (ε) are used. The update reproduces guided-diffusion's
`ddim_sample`: the x_0 prediction is optionally clipped to [-1, 1] and ε is re-derived from it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from adv_diffusion.diffusion import GaussianDiffusion, space_timesteps
from adv_diffusion.vp import ddim_update, eps_from_x0, per_example, x0_from_eps

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
SPACINGS = ("adm", "ddim", "uniform", "quad")


def kept_timesteps(num_timesteps: int, steps: int, spacing: str = "ddim") -> list[int]:
  """Sorted original-grid timesteps of a `steps`-step sampler with the named spacing."""
  if isinstance(steps, bool) or int(steps) != steps or steps < 1:
    raise ValueError(f"steps must be a positive integer, got {steps!r}.")
  steps, num_timesteps = int(steps), int(num_timesteps)
  if steps > num_timesteps:
    raise ValueError(
        f"steps={steps} exceeds the {num_timesteps} timesteps of the process; allowed are "
        f"1 to {num_timesteps}."
    )
  if spacing == "adm":
    # IDDPM Sec. 4 respacing "N": N evenly spaced (rounded) steps, both ends included.
    return space_timesteps(num_timesteps, str(steps))
  if spacing == "ddim":
    # ADM's "ddimN": the smallest integer stride giving exactly N steps, starting at 0.
    return space_timesteps(num_timesteps, f"ddim{steps}")
  if spacing == "uniform":
    # DDIM code, skip_type "uniform": range(0, T, T // S).
    kept = list(range(0, num_timesteps, num_timesteps // steps))
    if len(kept) != steps:
      raise ValueError(
          f"spacing='uniform' (stride T // steps = {num_timesteps // steps}) gives {len(kept)} "
          f"steps instead of {steps} for T={num_timesteps}; use spacing 'ddim' or 'adm', which "
          "always give exactly the requested count."
      )
    return kept
  if spacing == "quad":
    # DDIM code, skip_type "quad": int((linspace(0, sqrt(0.8 T), S))^2), ending at 0.8 T. Where
    # truncation repeats a timestep (S > ~30 for T = 1000) the repeat is moved to the previous
    # kept step + 1, so the sampler still makes exactly S distinct model calls.
    raw = [int(s) for s in np.linspace(0, math.sqrt(num_timesteps * 0.8), steps) ** 2]
    kept = []
    for s in raw:
      kept.append(max(s, kept[-1] + 1) if kept else s)
    if kept[-1] >= num_timesteps:
      raise ValueError(
          f"spacing='quad' with steps={steps} does not fit in T={num_timesteps} distinct "
          "timesteps; use fewer steps or spacing 'adm'."
      )
    return kept
  raise ValueError(f"Unknown spacing {spacing!r}; allowed spacings are {list(SPACINGS)}.")


def diffusion_from_timesteps(
    schedule: str, num_timesteps: int, timesteps: Sequence[int]
) -> GaussianDiffusion:
  """Process keeping exactly the given original-grid timesteps (as ADM's SpacedDiffusion)."""
  kept = np.asarray(list(timesteps))
  if kept.ndim != 1 or kept.size == 0 or not np.issubdtype(kept.dtype, np.integer):
    raise ValueError(f"timesteps must be a non-empty list of integers, got {list(timesteps)!r}.")
  if kept[0] < 0 or kept[-1] >= num_timesteps or np.any(np.diff(kept) <= 0):
    raise ValueError(
        f"timesteps must be strictly increasing integers in [0, {num_timesteps}), got "
        f"{kept.tolist()!r}."
    )
  return GaussianDiffusion.from_timesteps(schedule, num_timesteps, kept.tolist())


def respaced_diffusion(
    schedule: str, num_timesteps: int, steps: int, spacing: str = "ddim"
) -> GaussianDiffusion:
  """The `steps`-step process of `kept_timesteps(num_timesteps, steps, spacing)`."""
  return diffusion_from_timesteps(
      schedule, num_timesteps, kept_timesteps(num_timesteps, steps, spacing)
  )


def ddim_nfe(diffusion: GaussianDiffusion) -> int:
  """Number of model calls of DDIM: one per step of the respaced process."""
  return diffusion.num_timesteps


def check_eta(eta: float) -> float:
  """Validates DDIM's η (0 = deterministic DDIM, 1 = DDPM-like posterior variance)."""
  if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
    raise ValueError(f"eta must be a finite number >= 0 (0 is deterministic DDIM), got {eta!r}.")
  return float(eta)


# perturb(i, t, x_t) -> x_t': applied to the trajectory before step i (t: original-grid timesteps).
Perturbation = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def sample_ddim(
    model_fn: ModelFn,
    noise: jax.Array,
    diffusion: GaussianDiffusion,
    sample_keys: jax.Array | None = None,
    *,
    eta: float = 0.0,
    clip_denoised: bool = True,
    perturb: Perturbation | None = None,
) -> tuple[jax.Array, int]:
  """(samples, nfe) of DDIM from x_T = `noise` over every step of the (respaced) `diffusion`.

  `perturb` (robustness evaluation) replaces x_t before step i; the sampler then continues from
  the perturbed state, as it would from an off-trajectory x_t.
  """
  eta = check_eta(eta)
  if eta > 0 and sample_keys is None:
    raise ValueError("sample_keys are required when eta > 0 (DDIM then adds noise each step).")
  num_steps = diffusion.num_timesteps
  batch, channels = noise.shape[0], noise.shape[-1]
  dtype = noise.dtype
  # Schedule tables in the sample dtype (float64 -> float32 like ADM's _extract_into_tensor).
  tables = {
      name: jnp.asarray(np.asarray(getattr(diffusion, name)), dtype)
      for name in (
          "alphas_cumprod",
          "alphas_cumprod_prev",
          "sqrt_recip_alphas_cumprod",
          "sqrt_recipm1_alphas_cumprod",
      )
  }

  def gather(name: str, t: jax.Array) -> jax.Array:
    return tables[name][t]

  def body(i, x):
    t_index = num_steps - 1 - i
    t = jnp.full((batch,), t_index, jnp.int32)
    if perturb is not None:
      x = perturb(i, diffusion.model_timesteps(t), x)
    eps = model_fn(x, diffusion.model_timesteps(t))[..., :channels]
    coefs = gather("sqrt_recip_alphas_cumprod", t), gather("sqrt_recipm1_alphas_cumprod", t)
    pred_xstart = x0_from_eps(x, eps, *coefs)
    if clip_denoised:
      pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
    eps = eps_from_x0(x, pred_xstart, *coefs)  # as ADM's ddim_sample
    alpha_bar, alpha_bar_prev = gather("alphas_cumprod", t), gather("alphas_cumprod_prev", t)
    # DDIM Eq. 16: sigma_t(eta) = eta sqrt((1 - a_prev)/(1 - a)) sqrt(1 - a/a_prev).
    sigma = (
        eta
        * jnp.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
        * jnp.sqrt(1 - alpha_bar / alpha_bar_prev)
    )
    mean = ddim_update(pred_xstart, eps, alpha_bar_prev, sigma)
    if eta == 0:
      return mean
    z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, t_index), x.shape[1:], dtype))(
        sample_keys
    )
    nonzero = (t_index != 0).astype(dtype)  # no noise at the last step
    return mean + nonzero * per_example(sigma, x) * z

  return jax.lax.fori_loop(0, num_steps, body, noise), ddim_nfe(diffusion)
