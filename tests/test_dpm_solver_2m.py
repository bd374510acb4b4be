"""The direct DPM-Solver++(2M) loop against the tableau engine, and its model-call count.

Models: the closed-form optimal ε of per-dimension Gaussian data, E[ε | x_t] = σ_t (x_t - α_t μ)
/ (α_t² s² + σ_t²) (the pattern of tests/gaussian_problem.py, copied so as not to import torch), and
one whose x̂_0 is a fixed random linear map plus tanh, scaled past [-1, 1] so that clipping binds.
Both emit 2C channels (ε plus a dummy variance head): only the first C may be read as ε.
Measured float32 gap to the engine: <= 3.4e-6 (XLA rounds the two sums differently, and x̂_0 =
(x_t - σ ε)/α amplifies that near t = 1); the engine's own float32-vs-float64 error is larger.

By value: a `--mode=table` cell's dpm_solver++ sampler (both tables' settings), and the direct
loop with the same options, against an independent float64 DPM-Solver++(2M) written from Lu et
al. 2022b, Algorithm 2, on Gaussian data whose x̂_0 predictions leave [-1, 1].
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adv_diffusion.diffusion import GaussianDiffusion
from modes.sample import build_sampler
from sampling.dpm_solver import DiscreteVPSchedule, dpm_solver_tableau, sample_dpm_solver
from sampling.dpm_solver_2m import sample_dpm_solver_2m
from tests.gaussian_problem import adm_cosine_alphas_cumprod, max_err

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


# ---------------------------------------------------------------------------------------------
# A table cell's DPM-Solver++(2M) against an independent float64 reference
# ---------------------------------------------------------------------------------------------

# What one `--mode=table` cell of each config runs (modes/table.py sets sampling.method and
# sampling.nfe; modes/sample.py `sampler_options` adds the rest): the story's digits table keeps
# the defaults (t from 1 to 1/N on ADM's 1000 cosine knots, every x̂_0 clipped to [-1, 1]); the
# CIFAR-10 table's "authors" preset starts at t = 0.992 on the reference code's truncated cosine
# grid (knots with λ < -5.1 dropped, τ = (t - 1/N)·1000) and does not clip.
TABLE_CELLS = {
    "digits_at": dict(t_start=1.0, truncate=False, clip=True),
    "table_cifar10": dict(t_start=0.992, truncate=True, clip=False),
}
CELL_SHAPE = (64, 2, 2, 2)  # NHWC
_cell_rng = np.random.default_rng(2)
# Data N(μ, s²) per dimension with |μ| in [0.6, 0.9] and s in [0.3, 0.5]: many samples lie
# outside [-1, 1], so late x̂_0 predictions do too and clipping changes the result.
CELL_MU = _cell_rng.uniform(0.6, 0.9, CELL_SHAPE[1:]) * _cell_rng.choice(
    [-1.0, 1.0], CELL_SHAPE[1:]
)
CELL_S = _cell_rng.uniform(0.3, 0.5, CELL_SHAPE[1:])
CELL_ABAR = adm_cosine_alphas_cumprod()  # ᾱ of the network's training grid (cosine, T = 1000)


def cell_eps_reference(x: np.ndarray, tau: float) -> np.ndarray:
  """float64 E[ε | x] at the network's (fractional) timestep τ of its 1000-step training grid:
  log α piecewise linear in τ through (i, ½ log ᾱ_i)."""
  log_alpha = np.interp(tau, np.arange(T), 0.5 * np.log(CELL_ABAR))
  alpha, var = np.exp(log_alpha), -np.expm1(2 * log_alpha)
  return np.sqrt(var) * (x - alpha * CELL_MU) / (alpha**2 * CELL_S**2 + var)


def cell_model(x: jax.Array, tau: jax.Array) -> jax.Array:
  """The same exact ε in the dtype of x, with a dummy learned-variance head (2C channels)."""
  dt = x.dtype
  log_abar = jnp.asarray(0.5 * np.log(CELL_ABAR), dt)
  log_alpha = jnp.interp(tau.astype(dt), jnp.arange(T, dtype=dt), log_abar)[:, None, None, None]
  alpha, var = jnp.exp(log_alpha), -jnp.expm1(2 * log_alpha)
  mu, s = jnp.asarray(CELL_MU, dt), jnp.asarray(CELL_S, dt)
  eps = jnp.sqrt(var) * (x - alpha * mu) / (alpha**2 * s**2 + var)
  return jnp.concatenate([eps, jnp.full_like(eps, 3.0)], axis=-1)


def reference_dpm_solver_pp_2m(
    x: np.ndarray,
    steps: int,
    *,
    t_start: float,
    truncate: bool,
    clip: bool,
    uniform_in: str = "logSNR",
) -> tuple[np.ndarray, float]:
  """(x at t_end = 1/N, max |x̂_0| before clipping) of DPM-Solver++(2M), float64.

  Lu et al. 2022b, Algorithm 2: λ = log(α/σ) uniform from λ(t_start) to λ(1/N), h_i = λ_i -
  λ_{i-1}, r_i = h_{i-1}/h_i, x̂_0 at t_{i-1} from the model, D_i = (1 + 1/(2r_i)) x̂_0(t_{i-1})
  - 1/(2r_i) x̂_0(t_{i-2}), x_i = (σ_i/σ_{i-1}) x_{i-1} - α_i (e^{-h_i} - 1) D_i; the first
  step, and the last one when steps < 10 (lower_order_final), use D_i = x̂_0(t_{i-1}).
  `uniform_in="time_uniform"` spaces the times uniformly in t instead (r_i != 1).
  Continuous time of the discrete schedule (DPM-Solver's discrete NoiseScheduleVP): knot i at
  t = (i + 1)/N, log α_t piecewise linear in t through (t_i, ½ log ᾱ_i); the network is told
  τ = (t - 1/N)·N, or with `truncate` the knots of λ < -5.1 are dropped and τ = (t - 1/N)·1000.
  """
  log_knots = 0.5 * np.log(CELL_ABAR)
  if truncate:
    log_knots = log_knots[log_knots - 0.5 * np.log(-np.expm1(2 * log_knots)) >= -5.1]
  n = log_knots.size
  t_knots = np.arange(1, n + 1) / n
  tau_scale = 1000.0 if truncate else float(n)
  t_end = 1.0 / n

  def lam(t):
    log_alpha = np.interp(t, t_knots, log_knots)
    return log_alpha - 0.5 * np.log(-np.expm1(2 * log_alpha))

  if uniform_in == "logSNR":
    # Times uniform in λ: log α = -½ log(1 + e^{-2λ}), then t by inverting the interpolation.
    lams = np.linspace(lam(t_start), lam(t_end), steps + 1)
    ts = np.interp(-0.5 * np.log1p(np.exp(-2 * lams)), log_knots[::-1], t_knots[::-1])
    ts[0], ts[-1] = t_start, t_end
  else:  # "time_uniform": then h_i varies and r_i != 1
    ts = np.linspace(t_start, t_end, steps + 1)
  alpha = np.exp(np.interp(ts, t_knots, log_knots))
  sigma, lams = np.sqrt(1 - alpha**2), lam(ts)
  x, x0_prev, x0_max = np.asarray(x, np.float64), None, 0.0
  for i in range(1, steps + 1):
    eps = cell_eps_reference(x, (ts[i - 1] - t_end) * tau_scale)
    x0 = (x - sigma[i - 1] * eps) / alpha[i - 1]
    x0_max = max(x0_max, float(np.max(np.abs(x0))))
    if clip:
      x0 = np.clip(x0, -1.0, 1.0)
    h = lams[i] - lams[i - 1]
    if i == 1 or (steps < 10 and i == steps):
      d = x0
    else:
      r = (lams[i - 1] - lams[i - 2]) / h
      d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
    x = sigma[i] / sigma[i - 1] * x - alpha[i] * np.expm1(-h) * d
    x0_prev = x0
  return x, x0_max


@pytest.mark.parametrize("nfe", [5, 10])  # 5: the last step lowered to first order; 10: not
@pytest.mark.parametrize("config_name", sorted(TABLE_CELLS))
def test_table_cell_matches_an_independent_dpm_solver_pp_2m(config_name, nfe):
  """The sampler a table cell builds, and the direct 2M loop with its options, == the float64
  reference: to 1e-10 in float64 (measured <= 1.1e-12) and to 3e-5 in float32 (measured <=
  1.4e-5: float32 round-off of x̂_0 = (x - σ ε)/α, amplified by 1/α ≈ 2e4 at t = 1)."""
  cell = TABLE_CELLS[config_name]
  config = importlib.import_module(f"configs.{config_name}").get_config()
  config.sampling.method, config.sampling.nfe = "dpm_solver++", nfe  # as modes/table.py
  sampler = build_sampler(config)
  opts = sampler.options
  assert (config.diffusion.noise_schedule, config.diffusion.num_timesteps) == ("cosine", T)
  assert (opts["t_start"], opts["truncate_cosine_like_reference"], opts["clip_denoised"]) == (
      cell["t_start"],
      cell["truncate"],
      cell["clip"],
  )
  assert (opts["order"], opts["solver"], opts["skip_type"], opts["t_end"]) == (
      2,
      "multistep",
      "logSNR",
      None,
  )
  assert opts["lower_order_final"] and opts["lower_order_final_below"] == 10
  assert not opts["denoise_to_zero"] and not opts["multistep3_like_reference"]

  noise = np.random.default_rng(nfe).standard_normal(CELL_SHAPE)
  ref, x0_max = reference_dpm_solver_pp_2m(noise, nfe, **cell)
  if cell["clip"]:  # the clip binds and changes the samples
    unclipped, _ = reference_dpm_solver_pp_2m(noise, nfe, **dict(cell, clip=False))
    assert x0_max > 1.05 and max_err(ref, unclipped) > 0.1
  schedule = DiscreteVPSchedule.create("cosine", T, truncate_cosine_like_reference=cell["truncate"])

  def loop(z):
    return sample_dpm_solver_2m(
        cell_model, z, schedule, nfe, t_start=cell["t_start"], clip_denoised=cell["clip"]
    )[0]

  def cell_sampler(z):
    return sampler(cell_model, z)

  for run in (cell_sampler, loop):
    with jax.enable_x64(True):
      out = jax.jit(run)(jnp.asarray(noise, jnp.float64))
      assert out.dtype == jnp.float64
      assert max_err(out, ref) <= 1e-10
    out = jax.jit(run)(jnp.asarray(noise, jnp.float32))
    assert out.dtype == jnp.float32
    assert max_err(out, ref) <= 3e-5


@pytest.mark.parametrize("steps", [5, 12])
def test_unequal_lambda_steps_match_the_independent_reference(steps):
  """Times uniform in t (r_i != 1, so the 2M weights 1 ± 1/(2r) are tested, which λ-uniform
  table grids cannot do: there r = 1): engine and direct loop == the float64 reference."""
  noise = np.random.default_rng(steps).standard_normal(CELL_SHAPE)
  ref, _ = reference_dpm_solver_pp_2m(
      noise, steps, t_start=1.0, truncate=False, clip=True, uniform_in="time_uniform"
  )
  schedule = DiscreteVPSchedule.create("cosine", T)
  kw = dict(skip_type="time_uniform", clip_denoised=True)
  with jax.enable_x64(True):
    z = jnp.asarray(noise, jnp.float64)
    loop = jax.jit(lambda z: sample_dpm_solver_2m(cell_model, z, schedule, steps, **kw)[0])(z)
    engine = jax.jit(lambda z: sample_dpm_solver(cell_model, z, schedule, steps, **kw)[0])(z)
  assert max_err(loop, ref) <= 1e-10 and max_err(engine, ref) <= 1e-10
