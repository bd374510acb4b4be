"""The direct DPM-Solver++(2M) loop against the tableau engine, and its model-call count.

Models: the closed-form optimal ε of per-dimension Gaussian data, E[ε | x_t] = σ_t (x_t - α_t μ)
/ (α_t² s² + σ_t²) (the pattern of tests/gaussian_problem.py, copied so as not to import torch), and
one whose x̂_0 is a fixed random linear map plus tanh, scaled past [-1, 1] so that clipping binds.
Both emit 2C channels (ε plus a dummy variance head): only the first C may be read as ε.
Measured float32 gap to the engine: <= 3.4e-6 (XLA rounds the two sums differently, and x̂_0 =
(x_t - σ ε)/α amplifies that near t = 1); the engine's own float32-vs-float64 error is larger.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adv_diffusion.diffusion import GaussianDiffusion
from sampling.dpm_solver import DiscreteVPSchedule, dpm_solver_tableau, sample_dpm_solver
from sampling.dpm_solver_2m import sample_dpm_solver_2m

T = 1000
SHAPE = (8, 3, 3, 2)  # NHWC
ATOL = 1e-5


def _log_alpha(schedule: str, tau: jax.Array) -> jax.Array:
  """log α at a (fractional) original-grid timestep τ, piecewise linear as the solver's."""
  log_abar = 0.5 * np.log(GaussianDiffusion.create(schedule, T).alphas_cumprod)
  dt = tau.dtype
  return jnp.interp(tau, jnp.arange(T, dtype=dt), jnp.asarray(log_abar, dt))[:, None, None, None]


def gaussian_model(schedule: str, seed: int = 0):
  """Exact E[ε | x_t] = σ_t (x_t - α_t μ) / (α_t² s² + σ_t²) for x_0 ~ N(μ, diag(s²))."""
  rng = np.random.default_rng(seed)
  mu, s = rng.uniform(-0.5, 0.5, SHAPE[1:]), rng.uniform(0.2, 0.6, SHAPE[1:])

  def model_fn(x: jax.Array, tau: jax.Array) -> jax.Array:
    log_alpha = _log_alpha(schedule, tau).astype(x.dtype)
    alpha, var = jnp.exp(log_alpha), -jnp.expm1(2 * log_alpha)
    m, sd = jnp.asarray(mu, x.dtype), jnp.asarray(s, x.dtype)
    eps = jnp.sqrt(var) * (x - alpha * m) / (alpha**2 * sd**2 + var)
    return jnp.concatenate([eps, jnp.full_like(eps, 7.0)], axis=-1)

  return model_fn


def tanh_model(schedule: str, seed: int = 1):
  """ε whose x̂_0 is 1.5 tanh(x W + b + k τ/T): a fixed random non-linear map, past the clip."""
  rng = np.random.default_rng(seed)
  c = SHAPE[-1]
  w, b, k = rng.standard_normal((c, c)) / np.sqrt(c), rng.standard_normal(c), rng.standard_normal(c)

  def model_fn(x: jax.Array, tau: jax.Array) -> jax.Array:
    log_alpha = _log_alpha(schedule, tau).astype(x.dtype)
    dt = x.dtype
    x0 = 1.5 * jnp.tanh(
        x @ jnp.asarray(w, dt)
        + jnp.asarray(b, dt)
        + jnp.asarray(k, dt) * (tau / T).astype(dt)[:, None, None, None]
    )
    eps = (x - jnp.exp(log_alpha) * x0) / jnp.sqrt(-jnp.expm1(2 * log_alpha))  # x_t = αx_0 + σε
    return jnp.concatenate([eps, -eps], axis=-1)

  return model_fn


MODELS = {"gaussian": gaussian_model, "tanh": tanh_model}


def run_both(model: str, steps: int, schedule: str, dtype=jnp.float32, **kw):
  """(direct loop, engine, nfe) from the same noise, both jitted."""
  model_fn = MODELS[model](schedule)
  noise = jax.random.normal(jax.random.key(steps), SHAPE, dtype)
  schedule = DiscreteVPSchedule.create(schedule, T)
  ours, nfe = jax.jit(lambda z: sample_dpm_solver_2m(model_fn, z, schedule, steps, **kw))(noise)
  ref = jax.jit(
      lambda z: sample_dpm_solver(
          model_fn, z, schedule, steps, order=2, method="multistep", predictor="data", **kw
      )[0]
  )(noise)
  assert ours.dtype == ref.dtype == dtype and ours.shape == SHAPE
  return np.asarray(ours, np.float64), np.asarray(ref, np.float64), nfe


@pytest.mark.parametrize("clip_denoised", [False, True])
@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("steps", [3, 5, 10, 12])  # < 10: lower-order final steps; >= 10: not
def test_matches_engine(steps, model, clip_denoised):
  """Direct loop == sample_dpm_solver(order=2, multistep, data) to float32 round-off."""
  ours, ref, _ = run_both(model, steps, "cosine", clip_denoised=clip_denoised)
  assert np.all(np.isfinite(ours))
  assert float(np.max(np.abs(ours - ref))) <= ATOL


@pytest.mark.parametrize("steps", [3, 12])
def test_matches_engine_float64(steps):
  """In float64 the two agree to ~1e-14: the float32 gap above is round-off, not algorithm."""
  with jax.enable_x64(True):
    ours, ref, _ = run_both("tanh", steps, "cosine", jnp.float64, clip_denoised=True)
  assert float(np.max(np.abs(ours - ref))) <= 1e-12


@pytest.mark.parametrize(
    "steps,kw",
    [
        (6, dict(skip_type="time_uniform")),
        (7, dict(skip_type="time_quadratic", t_start=0.9, t_end=0.01)),
        (5, dict(lower_order_final=False)),
        (12, dict(lower_order_final_below=None)),  # lowered final steps even for steps >= 10
    ],
)
def test_matches_engine_options(steps, kw):
  """Same agreement for the other time grids and lower-order-final settings (linear betas)."""
  ours, ref, _ = run_both("tanh", steps, "linear", clip_denoised=True, **kw)
  assert float(np.max(np.abs(ours - ref))) <= ATOL


@pytest.mark.parametrize("steps", [1, 4, 11])
def test_nfe_equals_steps(steps):
  """nfe == steps, one model call per time point, at the engine's timesteps in float32."""
  schedule, calls = DiscreteVPSchedule.create("cosine", T), []
  base = tanh_model("cosine")

  def model_fn(x, tau):
    calls.append(tau)
    return base(x, tau)

  _, nfe = sample_dpm_solver_2m(model_fn, jnp.zeros(SHAPE), schedule, steps)
  tab = dpm_solver_tableau(schedule, steps, order=2, method="multistep", predictor="data")
  assert nfe == steps == len(calls) == tab.nfe
  assert all(t.shape == (SHAPE[0],) and t.dtype == jnp.float32 for t in calls)
  np.testing.assert_array_equal(
      np.stack([np.asarray(t) for t in calls]),
      np.repeat(tab.model_times.astype(np.float32)[:, None], SHAPE[0], axis=1),
  )
