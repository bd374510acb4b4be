"""DPM-Solver++(2M) as a direct loop, in the style of EDM's `edm_sampler` (Karras et al. 2022).

Lu et al. 2022b, "DPM-Solver++", arXiv:2211.01095, Algorithm 2 (data prediction, multistep,
order 2). Same time grid, step orders and model calls as `sampling.dpm_solver.sample_dpm_solver(
..., order=2, method="multistep", predictor="data")`, which runs the general tableau engine; this
loop is the readable version of that one configuration and agrees with it to float32 round-off.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from adv_diffusion.vp import x0_from_eps
from sampling.dpm_solver import (
    DiscreteVPSchedule,
    ModelFn,
    check_settings,
    multistep_orders,
    time_steps,
)


def sample_dpm_solver_2m(
    model_fn: ModelFn,
    noise: jax.Array,
    schedule: DiscreteVPSchedule,
    steps: int,
    *,
    skip_type: str = "logSNR",
    t_start: float = 1.0,
    t_end: float | None = None,
    lower_order_final: bool = True,
    lower_order_final_below: int | None = 10,
    clip_denoised: bool = False,
) -> tuple[jax.Array, int]:
  """(samples at t_end, nfe = steps) of DPM-Solver++(2M) started from `noise` at t_start."""
  t_end = 1.0 / schedule.total_n if t_end is None else float(t_end)  # as dpm_solver_tableau
  t_start = float(t_start)
  check_settings(steps, 2, "multistep", skip_type, "data", t_start, t_end)
  times = time_steps(schedule, skip_type, t_start, t_end, steps)  # t_0 = t_start > ... > t_end
  orders = multistep_orders(steps, 2, lower_order_final, lower_order_final_below)
  lam = schedule.marginal_lambda(times)  # half log-SNR λ_t (DPM-Solver Sec. 3.1)
  alpha, sigma = schedule.marginal_alpha(times), schedule.marginal_std(times)
  dtype, batch, channels = noise.dtype, noise.shape[0], noise.shape[-1]
  tau_dtype = jnp.result_type(dtype, jnp.float32)  # timesteps never below float32
  x, x0_prev = noise, None
  for i, order in enumerate(orders):  # unrolled at trace time: `steps` is small
    t_model = jnp.full((batch,), schedule.model_time(times[i]), tau_dtype)
    eps = model_fn(x, t_model)[..., :channels].astype(dtype)
    # Data prediction x̂_0 = (x_t - σ_t ε)/α_t (DPM-Solver++ Eq. 8), from 1/α_t and σ_t/α_t.
    a_s, s_s = jnp.asarray(alpha[i], dtype), jnp.asarray(sigma[i], dtype)
    x0 = x0_from_eps(x, eps, 1.0 / a_s, s_s / a_s)
    if clip_denoised:
      x0 = jnp.clip(x0, -1.0, 1.0)  # static thresholding (DPM-Solver++ Sec. 5)
    h = float(lam[i + 1] - lam[i])
    if order == 1:
      d = x0  # first step (no history) and, when lowered, the last step
    else:
      # 2M correction (Alg. 2): D = (1 + 1/(2r)) x̂_0(s) - 1/(2r) x̂_0(s_prev), r = h_prev/h.
      r = float(lam[i] - lam[i - 1]) / h
      d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
    # First-order update (DPM-Solver++ Eq. 9 with k = 1, Alg. 2):
    # x_t = (σ_t/σ_s) x_s - α_t (e^{-h} - 1) D.
    x = float(sigma[i + 1] / sigma[i]) * x - float(alpha[i + 1] * math.expm1(-h)) * d
    x0_prev = x0
  return x, len(orders)
