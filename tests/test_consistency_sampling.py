"""sampling/consistency.py: one- and multistep consistency sampling makes exactly the configured
model calls, at the configured timesteps; and, by value, every step of 1-, 2- and 3-step
sampling of a network whose consistency function is the exact one of Gaussian data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import table_cifar10_cm
from modes.sample import build_sampler
from sampling.registry import make_sampler
from tests.gaussian_problem import T, adm_cosine_alphas_cumprod, counting, keys_for


def test_multistep_sampling_makes_exactly_the_configured_model_calls():
  for nfe, expected in ((1, [999]), (3, [999, 666, 333])):
    sampler = make_sampler("consistency", nfe, "cosine", T)
    model_fn, calls = counting(lambda x, t: jnp.zeros_like(x))
    out = jax.jit(lambda noise, keys: sampler(model_fn, noise, keys))(
        jnp.ones((2, 4, 4, 1)), jax.random.split(jax.random.key(0), 2)
    )
    jax.effects_barrier()
    assert sampler.nfe == nfe and [int(c[0]) for c in calls] == expected
    assert out.shape == (2, 4, 4, 1)
  custom = make_sampler("consistency", 2, "cosine", T, timesteps=(900, 300))
  assert custom.options["timesteps"] == (900, 300)
  with pytest.raises(ValueError, match="exactly nfe=3"):
    make_sampler("consistency", 3, "cosine", T, timesteps=(900, 300))


# ---------------------------------------------------------------------------------------------
# Every step against the closed form (Gaussian data)
# ---------------------------------------------------------------------------------------------
# For data N(μ, s²) per dimension the PF-ODE keeps z = (x_t - α_t μ)/sqrt(α_t² s² + σ_t²), so the
# exact consistency function is f*(x, t) = μ + s·(x - α_t μ)/sqrt(α_t² s² + σ_t²). |μ| <= 0.3 and
# s <= 0.15 keep f* inside [-1, 1] for these samples, so a network can reproduce it through
# f = c_skip·x + c_out·clip(x̂_0) (asserted below).

CM_SHAPE = (2048, 2, 2, 2)  # NHWC
_cm_rng = np.random.default_rng(3)
CM_MU = _cm_rng.uniform(-0.3, 0.3, CM_SHAPE[1:])
CM_S = _cm_rng.uniform(0.08, 0.15, CM_SHAPE[1:])
CM_ABAR = adm_cosine_alphas_cumprod()
U32 = 2.0**-24  # float32 unit round-off
C = 8  # round-off units allowed per float32 expression (measured <= 0.3 of the bound)


def exact_consistency(x: np.ndarray, t: int) -> np.ndarray:
  """f*(x, t) in float64."""
  abar = CM_ABAR[t]
  return CM_MU + CM_S * (x - np.sqrt(abar) * CM_MU) / np.sqrt(abar * CM_S**2 + 1 - abar)


def lcm_scalings(t, sigma_data: float, scale: float):
  """LCM's c_skip = σ_d²/((s t)² + σ_d²), c_out = s t/sqrt((s t)² + σ_d²) (Luo et al. 2023)."""
  st = scale * t
  return sigma_data**2 / (st**2 + sigma_data**2), st / (st**2 + sigma_data**2) ** 0.5


def exact_consistency_model(sigma_data: float, scale: float):
  """ε-network whose f is f*: f = c_skip x + c_out x̂_0 = f* needs x̂_0 = y = (f* - c_skip x)/c_out
  and x̂_0 = (x - σ ε)/α gives ε = (x - α y)/σ (float32, with the sampler's float32 ᾱ)."""

  def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
    abar = jnp.asarray(CM_ABAR, jnp.float32)[t][:, None, None, None]
    alpha, sigma = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
    c_skip, c_out = lcm_scalings(t.astype(jnp.float32)[:, None, None, None], sigma_data, scale)
    mu, s = jnp.asarray(CM_MU, jnp.float32), jnp.asarray(CM_S, jnp.float32)
    f = mu + s * (x - alpha * mu) / jnp.sqrt(abar * s**2 + 1.0 - abar)
    eps = (x - alpha * (f - c_skip * x) / c_out) / sigma
    return jnp.concatenate([eps, jnp.zeros_like(eps)], axis=-1)  # + a learned-variance head

  return model_fn


def expected_chain(noise, timesteps, keys):
  """The closed-form chain of the sampler from `noise`: per model call (expected input, its
  float32 error bound), the expected output with its bound, max |f*| and the per-dimension mean
  and variance of the output over noise ~ N(0, I) and z.

  Re-noising as the sampler does (Song et al. 2023, Alg. 1): x_τ = sqrt(ᾱ_τ)·x̂_0 +
  sqrt(1 - ᾱ_τ)·z, z of sample b at step i = normal(fold_in(key_b, i)). The bounds carry C = 8
  units of round-off per float32 expression through the exact linear maps: f* has slope
  k = s/sqrt(ᾱ s² + 1 - ᾱ) in x, and x̂_0 = x/α - (σ/α)ε rounds at the scale (|x| + σ|ε|)/α
  (2e4·|x| at t = 999 on the cosine grid: the one-step error there is ~4e-3, intrinsic to
  float32). Every map is affine, so the moments follow exactly: m ← μ + k(m - αμ), v ← k² v
  through f*, and m ← α m, v ← α² v + σ² through the re-noising.
  """
  x, tol = np.asarray(noise, np.float64), np.zeros(noise.shape)
  mean, var, inputs, f_max = np.zeros(CM_MU.shape), np.ones(CM_MU.shape), [], 0.0
  for i, t in enumerate(timesteps):
    a, sg = np.sqrt(CM_ABAR[t]), np.sqrt(1 - CM_ABAR[t])
    if i:
      z = np.asarray(
          jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), noise.shape[1:]))(keys),
          np.float64,
      )
      tol = a * tol + C * U32 * (a * np.abs(x) + sg * np.abs(z))
      x, mean, var = a * x + sg * z, a * mean, a**2 * var + sg**2
    inputs.append((x, tol))
    f = exact_consistency(x, t)
    eps_abs = (np.abs(x) + a * np.abs(f)) / sg
    k = CM_S / np.sqrt(CM_ABAR[t] * CM_S**2 + 1 - CM_ABAR[t])
    tol = k * tol + C * U32 * ((np.abs(x) + sg * eps_abs) / a + np.abs(f))
    x, f_max = f, max(f_max, float(np.max(np.abs(f))))
    mean, var = CM_MU + k * (mean - a * CM_MU), k**2 * var
  return inputs, (x, tol), f_max, (mean, var)


@pytest.mark.parametrize("cm_timesteps", [(), (800, 500, 200)], ids=["from999", "from800"])
@pytest.mark.parametrize("nfe", [1, 2, 3])
def test_every_step_matches_the_exact_consistency_function_of_gaussian_data(nfe, cm_timesteps):
  """Model inputs at every call and the samples == the closed-form chain within its float32
  bound; the samples' per-dimension mean and s.d. == the chain's exact moments (μ and s when
  sampling starts at T - 1) within 4 standard errors (sd/sqrt(n), sd/sqrt(2n))."""
  config = table_cifar10_cm.get_config()  # the consistency table's sampler settings
  config.sampling.method, config.sampling.nfe = "consistency", nfe  # as modes/table.py
  config.sampling.cm_timesteps = cm_timesteps[:nfe] if cm_timesteps else ()
  sampler = build_sampler(config)
  opts = sampler.options
  assert opts["clip_x0"] and (opts["sigma_data"], opts["timestep_scale"]) == (0.5, 10.0)
  timesteps = opts["timesteps"]
  if not cm_timesteps:
    assert timesteps == ((999,), (999, 500), (999, 666, 333))[nfe - 1]
  recorded = []

  def record(x, t):
    recorded.append((np.asarray(x, np.float64), np.asarray(t)))

  base = exact_consistency_model(opts["sigma_data"], opts["timestep_scale"])

  def model_fn(x, t):
    jax.debug.callback(record, x, t, ordered=True)
    return base(x, t)

  noise = jnp.asarray(np.random.default_rng(nfe).standard_normal(CM_SHAPE), jnp.float32)
  keys = keys_for(CM_SHAPE[0], seed=nfe)
  out = jax.jit(lambda z, k: sampler(model_fn, z, k))(noise, keys)
  jax.effects_barrier()
  inputs, (expected, tol), f_max, (mean, var) = expected_chain(noise, timesteps, keys)
  assert f_max < 0.99  # the clip of x̂_0 leaves f* reachable
  assert [int(t[0]) for _, t in recorded] == list(timesteps)
  assert all(np.all(t == t[0]) for _, t in recorded)
  for (x, _), (want, want_tol) in zip(recorded, inputs):
    assert np.all(np.abs(x - want) <= want_tol)
  assert out.dtype == jnp.float32 and out.shape == CM_SHAPE
  assert np.all(np.abs(np.asarray(out, np.float64) - expected) <= tol)
  n, samples, sd = CM_SHAPE[0], np.asarray(out, np.float64), np.sqrt(var)
  if not cm_timesteps:  # from T - 1 the noise is the marginal: samples ~ the data N(μ, s²)
    np.testing.assert_allclose(mean, CM_MU, atol=1e-5)
    np.testing.assert_allclose(sd, CM_S, rtol=1e-5)
  assert np.all(np.abs(samples.mean(0) - mean) <= 4 * sd / np.sqrt(n))
  assert np.all(np.abs(samples.std(0) - sd) <= 4 * sd / np.sqrt(2 * n))
