"""Closed-form Gaussian problems shared by the sampler, consistency and perturbation tests, and
the small helpers those tests share (error measures, call counting, keys, one-sentence errors).

Closed form. For data x_0 ~ N(μ, diag(s²)) and x_t = α_t x_0 + σ_t ε (α_t² = ᾱ_t, VP), x_t is
Gaussian with mean α_t μ and variance α_t² s² + σ_t², so the optimal noise predictor is the
posterior mean E[ε | x_t] = Cov(ε, x_t) Var(x_t)^{-1} (x_t - α_t μ) = σ_t (x_t - α_t μ) /
(α_t² s² + σ_t²). The probability-flow ODE of a Gaussian family moves every point so that its
standardised coordinate z = (x_t - α_t μ) / sqrt(α_t² s² + σ_t²) stays constant, so the exact
ODE map from time T to time e is x_e = α_e μ + sqrt(α_e² s² + σ_e²) z_T (α_e = 1, σ_e = 0 gives
x_0 = μ + s z_T). Convergence runs use float64 (jax.enable_x64) so that the measured slopes are
not hidden by float32 round-off.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from adv_diffusion.diffusion import GaussianDiffusion

T = 1000
SHAPE = (16, 2, 2, 2)  # NHWC, 8 dimensions per sample


class Gaussian:
  """Per-dimension Gaussian data with its exact ε predictor and exact PF-ODE map."""

  def __init__(self, schedule: str, dtype=jnp.float32, seed: int = 0, shape=SHAPE):
    rng = np.random.default_rng(seed)
    self.dtype = dtype
    self.mu = rng.uniform(-0.5, 0.5, shape[1:])
    self.s = rng.uniform(0.2, 0.6, shape[1:])
    self.alphas_cumprod = GaussianDiffusion.create(schedule, T).alphas_cumprod
    self.x_t = rng.standard_normal(shape)

  def model_fn(self, x: jax.Array, tau: jax.Array) -> jax.Array:
    """Exact E[ε | x_t] at original-grid (possibly fractional) timestep τ."""
    dt = self.dtype
    # log α piecewise linear in τ: exact at integer τ, and the DPM-Solver schedule between.
    log_alpha = jnp.interp(
        jnp.asarray(tau, dt),
        jnp.arange(T, dtype=dt),
        jnp.asarray(0.5 * np.log(self.alphas_cumprod), dt),
    )
    log_alpha = log_alpha.reshape((-1,) + (1,) * (x.ndim - 1))
    alpha, var = jnp.exp(log_alpha), -jnp.expm1(2 * log_alpha)
    mu, s = jnp.asarray(self.mu, dt), jnp.asarray(self.s, dt)
    return jnp.sqrt(var) * (x - alpha * mu) / (alpha**2 * s**2 + var)

  def exact(self, x_start: np.ndarray, abar_start: float, abar_end: float) -> np.ndarray:
    """PF-ODE solution at ᾱ_end from x_start at ᾱ_start."""
    z = (x_start - np.sqrt(abar_start) * self.mu) / np.sqrt(abar_start * self.s**2 + 1 - abar_start)
    return np.sqrt(abar_end) * self.mu + np.sqrt(abar_end * self.s**2 + 1 - abar_end) * z


class GaussianProblem:
  """Data N(μ, diag s²) on a linear VP schedule: the exact ε, E[x_0 | x_t] and ODE flow."""

  mu = jnp.array([0.3, -0.2, 0.1, 0.0])
  s = jnp.array([0.5, 0.2, 0.3, 0.4])

  def __init__(self):
    self.alphas_cumprod = GaussianDiffusion.create("linear", T).alphas_cumprod
    self.a = jnp.sqrt(jnp.asarray(self.alphas_cumprod, jnp.float32))[:, None]
    self.sig = jnp.sqrt(1.0 - jnp.asarray(self.alphas_cumprod, jnp.float32))[:, None]
    self.var = self.a**2 * self.s**2 + self.sig**2  # Var[x_t] per dimension

  def teacher(self):
    """Exact posterior mean E[x_0 | x_t] = w_t·x_t + b_t as tables over t."""
    w = self.a * self.s**2 / self.var
    return {"w": w, "b": self.mu - w * self.a * self.mu}

  def net(self, params, x, t, labels=None, key=None):
    """ε-output network predicting x_0 with per-t affine tables (well conditioned at large t)."""
    del labels, key
    x0 = x * params["w"][t][:, None, None, :] + params["b"][t][:, None, None, :]
    return (x - self.a[t][:, None, None, :] * x0) / self.sig[t][:, None, None, :]

  def ode_pairs(self, grid, per_step: int, key):
    """Points x_t on exact probability-flow trajectories and their end points at t_0 = 0:
    along the VP ODE of Gaussian data, (x_t − a_t·μ)/sqrt(Var[x_t]) is constant."""
    t = jnp.repeat(jnp.asarray(grid[1:]), per_step)
    z = jax.random.normal(key, (t.shape[0], 1, 1, 4))
    x_t = self.a[t][:, None, None, :] * self.mu + jnp.sqrt(self.var[t])[:, None, None, :] * z
    return x_t, t, self.a[0] * self.mu + jnp.sqrt(self.var[0]) * z


def adm_cosine_alphas_cumprod(n: int = T) -> np.ndarray:
  """ᾱ_i = Π_{j<=i} (1 - β_j), β_j = min(1 - g((j+1)/n)/g(j/n), 0.999), g(u) = cos²((u + 0.008)
  /1.008·π/2): IDDPM Eq. 17 discretised as ADM does, written here from the paper so that value
  tests do not take the schedule from the code they check."""
  g = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
  betas = np.array([min(1.0 - g((j + 1) / n) / g(j / n), 0.999) for j in range(n)])
  return np.cumprod(1.0 - betas)


def max_err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def slope(nfes, errs) -> float:
  """-d log(err) / d log(NFE) by least squares (the observed order of convergence)."""
  return float(-np.polyfit(np.log(nfes), np.log(errs), 1)[0])


def counting(model_fn):
  """(wrapped model_fn, list of the timesteps of every actual call) via an ordered callback."""
  calls: list[np.ndarray] = []

  def record(t):
    calls.append(np.asarray(t))

  def wrapped(x, t):
    jax.debug.callback(record, t, ordered=True)
    return model_fn(x, t)

  return wrapped, calls


def keys_for(n: int, seed: int = 0) -> jax.Array:
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(n))


def assert_one_sentence(excinfo, *words: str) -> None:
  msg = str(excinfo.value)
  assert "\n" not in msg and msg.endswith("."), msg
  assert len(re.findall(r"[.!?](?:\s|$)", msg)) == 1, msg
  for w in words:
    assert w in msg, (w, msg)
