"""Consistency distillation (CD) and consistency training (CT) on ADM's VP grid (PAPER.md §8).

Discretisation: t_n = round(n·(T − 1)/N), n = 0..N, so t_0 = 0 and t_N = T − 1. A minibatch
draws n uniformly from [0, N − k], ε and x_{t_{n+k}} = q_sample(x_0, t_{n+k}, ε), then
  CD: x̂_{t_n} = one DDIM (η = 0) step of the frozen teacher from x_{t_{n+k}} to t_n,
  CT: x̂_{t_n} = q_sample(x_0, t_n, ε)  (the same ε: Song et al. 2023's CT estimator),
and the target f_{θ⁻}(x̂_{t_n}, t_n) with θ⁻ the target network (an EMA of θ, updated after
every optimizer update). Teacher and target do not depend on θ or δ, so they run once per
minibatch, also under fast AT's K replays. The student loss is d(f_θ(x_{t_{n+k}} + δ, t_{n+k}),
target): the target comes from the clean trajectory, its x_0 is unchanged (PAPER.md §3, §8).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from adv_diffusion.vp import ddim_update, q_sample_at, x0_coefficients, x0_from_eps
from adv_diffusion.losses import ApplyFn, MinibatchInputs
from adv_diffusion.settings import ConsistencySettings

MODES = ("none", "distill", "train")
DISTANCES = ("l2", "pseudo_huber", "lpips")
TARGET_EMA_SCHEDULES = ("constant", "linear")


# ---------------------------------------------------------------------------------------------
# The parameterisation f(x, t) = c_skip(t)·x + c_out(t)·x̂_0(x, t)
# ---------------------------------------------------------------------------------------------
# LCM's boundary scalings (Luo et al. 2023) with t the integer timestep of the original grid,
# σ_d = `sigma_data` and s = `timestep_scale`: c_skip(t) = σ_d² / ((s·t)² + σ_d²),
# c_out(t) = s·t / sqrt((s·t)² + σ_d²). At t = 0, c_skip = 1 and c_out = 0 exactly, so
# f(x, 0) = x for any network.


def boundary_scalings(
    t: jax.Array, sigma_data: float, timestep_scale: float
) -> tuple[jax.Array, jax.Array]:
  """(c_skip(t), c_out(t)) of LCM, each shaped like `t`; (1, 0) at t = 0."""
  scaled = timestep_scale * jnp.asarray(t, jnp.float32)
  c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
  c_out = scaled / jnp.sqrt(scaled**2 + sigma_data**2)
  return c_skip, c_out


def predict_x0(
    eps: jax.Array, x: jax.Array, t: jax.Array, alphas_cumprod: jax.Array, clip: bool
) -> jax.Array:
  """x̂_0 at the integer timesteps `t` per example, optionally clipped to [−1, 1] (ADM's
  `clip_denoised`: with the cosine schedule sqrt(ᾱ_999) ≈ 5e-5 would amplify ε errors)."""
  x0 = x0_from_eps(x, eps, *x0_coefficients(jnp.asarray(alphas_cumprod, jnp.float32)[t]))
  return jnp.clip(x0, -1.0, 1.0) if clip else x0


def consistency_function(
    output: jax.Array,
    x: jax.Array,
    t: jax.Array,
    alphas_cumprod: jax.Array,
    *,
    sigma_data: float = 0.5,
    timestep_scale: float = 10.0,
    clip_x0: bool = True,
) -> jax.Array:
  """f(x, t) from the raw network output (ε in its first C channels; learned σ ignored)."""
  eps = output[..., : x.shape[-1]].astype(jnp.float32)
  c_skip, c_out = boundary_scalings(t, sigma_data, timestep_scale)
  x0 = predict_x0(eps, x, t, alphas_cumprod, clip_x0)
  return c_skip[:, None, None, None] * x + c_out[:, None, None, None] * x0


# ---------------------------------------------------------------------------------------------
# The CD / CT loss
# ---------------------------------------------------------------------------------------------


def time_grid(num_scales: int, num_timesteps: int) -> np.ndarray:
  """t_0 = 0 < t_1 < … < t_N = T − 1 on ADM's integer grid (int32, N + 1 entries)."""
  grid = np.round(np.arange(num_scales + 1) * (num_timesteps - 1) / num_scales).astype(np.int32)
  if np.any(np.diff(grid) <= 0):
    raise ValueError(f"num_scales={num_scales} is finer than the {num_timesteps}-step grid.")
  return grid


def ddim_step(
    eps: jax.Array, x: jax.Array, t: jax.Array, s: jax.Array, alphas_cumprod: jax.Array
) -> jax.Array:
  """Deterministic DDIM step (η = 0) from x_t to x_s with noise prediction `eps`:
  x_s = sqrt(ᾱ_s)·x̂_0 + sqrt(1 − ᾱ_s)·ε (Song et al. 2021, Eq. 12), x̂_0 unclipped."""
  a_s = jnp.asarray(alphas_cumprod, jnp.float32)[s]
  x0 = predict_x0(eps, x, t, alphas_cumprod, clip=False)
  return ddim_update(x0, eps, a_s)


def distance(
    a: jax.Array, b: jax.Array, kind: str, lpips_params: Any = None, lpips_resize: int = 0
) -> jax.Array:
  """Per-example distance: "l2" = mean squared error over pixels; "pseudo_huber" =
  sqrt(‖a − b‖² + c²) − c with c = 0.00054·sqrt(d) (Song & Dhariwal 2023, iCT); "lpips" =
  LPIPS-VGG v0.1 (Zhang et al. 2018) with the frozen `lpips_params`, both images bilinearly
  resized to `lpips_resize` pixels first (0 = as they are; Song et al. 2023 use 224)."""
  if kind == "lpips":
    from evaluation.lpips import lpips_distance

    if lpips_params is None:
      raise ValueError("distance 'lpips' needs lpips_params (see evaluation.lpips).")
    return lpips_distance(lpips_params, a, b, resize=lpips_resize)
  diff = (a - b).reshape(a.shape[0], -1)
  if kind == "l2":
    return jnp.mean(jnp.square(diff), axis=1)
  if kind == "pseudo_huber":
    c = 0.00054 * np.sqrt(diff.shape[1])
    return jnp.sqrt(jnp.sum(jnp.square(diff), axis=1) + c * c) - c
  raise ValueError(f"unknown distance {kind!r}; use one of {DISTANCES}")


def target_ema_rate(cm: ConsistencySettings, num_updates: jax.Array) -> jax.Array:
  """μ of θ⁻ ← μ·θ⁻ + (1 − μ)·θ after optimizer update `num_updates` (constant, or a linear
  ramp from `target_ema_start` to `target_ema` over `target_ema_ramp_updates`)."""
  if cm.target_ema_schedule == "constant" or cm.target_ema_ramp_updates == 0:
    return jnp.asarray(cm.target_ema, jnp.float32)
  frac = jnp.minimum(num_updates.astype(jnp.float32) / cm.target_ema_ramp_updates, 1.0)
  return cm.target_ema_start + (cm.target_ema - cm.target_ema_start) * frac


def consistency_inputs(
    x_start: jax.Array,
    labels: jax.Array | None,
    key: jax.Array,
    *,
    target_params: Any,
    teacher_params: Any,
    eval_fn: Callable,
    alphas_cumprod: np.ndarray,
    cm: ConsistencySettings,
) -> MinibatchInputs:
  """Draws (n, ε) once for the minibatch and computes x_{t_{n+k}} and the stop-gradient target.

  `eval_fn(params, x, t, labels)` is the network in eval mode (no dropout); `teacher_params`
  is None for consistency training.
  """
  grid = jnp.asarray(time_grid(cm.num_scales, alphas_cumprod.shape[0]))
  ac = jnp.asarray(alphas_cumprod, jnp.float32)
  k_n, k_noise = jax.random.split(key)
  batch = x_start.shape[0]
  n = jax.random.randint(k_n, (batch,), 0, cm.num_scales - cm.skip + 1)
  t_hi, t_lo = grid[n + cm.skip], grid[n]
  noise = jax.random.normal(k_noise, x_start.shape, jnp.float32)

  def q_sample(t):
    return q_sample_at(x_start, noise, jnp.sqrt(ac[t]), jnp.sqrt(1.0 - ac[t]))

  x_hi = q_sample(t_hi)
  if teacher_params is None:  # consistency training
    x_lo = q_sample(t_lo)
  else:
    eps = eval_fn(teacher_params, x_hi, t_hi, labels)[..., : x_start.shape[-1]]
    x_lo = ddim_step(eps.astype(jnp.float32), x_hi, t_hi, t_lo, alphas_cumprod)
  target = consistency_function(
      eval_fn(target_params, x_lo, t_lo, labels),
      x_lo,
      t_lo,
      ac,
      sigma_data=cm.sigma_data,
      timestep_scale=cm.timestep_scale,
      clip_x0=cm.clip_x0,
  )
  return MinibatchInputs(
      x_start=x_start,
      x_t=x_hi,
      t=t_hi,
      noise=noise,
      weights=jnp.ones((batch,), jnp.float32),
      sigma=jnp.sqrt(1.0 - ac[t_hi]),
      labels=labels,
      target=jax.lax.stop_gradient(target),
  )


def consistency_loss(
    params: Any,
    delta: jax.Array | None,
    inputs: MinibatchInputs,
    dropout_key: jax.Array,
    *,
    apply_fn: ApplyFn,
    alphas_cumprod: np.ndarray,
    cm: ConsistencySettings,
    lpips_params: Any = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean over the batch of d(f_θ(x_{t_{n+k}} + δ, t_{n+k}), target) (δ = None: clean);
  `lpips_params`: the frozen LPIPS network of `cm.distance` = "lpips" (else unused)."""
  x_in = inputs.x_t if delta is None else inputs.x_t + delta
  output = apply_fn(params, x_in, inputs.t, inputs.labels, dropout_key)
  student = consistency_function(
      output,
      x_in,
      inputs.t,
      jnp.asarray(alphas_cumprod, jnp.float32),
      sigma_data=cm.sigma_data,
      timestep_scale=cm.timestep_scale,
      clip_x0=cm.clip_x0,
  )
  resize = cm.lpips_resize if cm.distance == "lpips" else 0
  dist = distance(student, inputs.target, cm.distance, lpips_params, resize)
  return jnp.mean(dist * inputs.weights), {"loss": dist, "consistency_distance": dist}
