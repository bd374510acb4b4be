"""sampling/ancestral.py: the ancestral sampler on closed-form Gaussian data, its train-loop entry
point, batch-independent noise, ε-scaling (ADM-ES), and parity with guided-diffusion's
`p_sample_loop` (closed form: tests/gaussian_problem.py; parity: tests/guided_diffusion_pair.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch as th

from adv_diffusion.diffusion import GaussianDiffusion, space_timesteps
from sampling.ancestral import ancestral_sample, eps_scale_schedule, sample_ancestral
from tests import guided_diffusion_pair as gdp
from tests.gaussian_problem import T, Gaussian, keys_for, max_err


def test_ancestral_reproduces_data_mean_and_variance():
  # Exact ε, fixed (β_t) variance, 250 respaced steps, n = 4096 samples x 8 dims. Tolerances:
  # each mean within 4 standard errors s/sqrt(n); each std within 5 % (its standard error is
  # 1/sqrt(2n) = 1.1 %). Observed: worst mean error 1.9 s.e., worst std error 1.5 %.
  n = 4096
  g = Gaussian("cosine", jnp.float32, shape=(n, 2, 2, 2))
  d = GaussianDiffusion.create("cosine", T, "250")
  run = jax.jit(
      lambda x, k: sample_ancestral(g.model_fn, x, d, k, learn_sigma=False, clip_denoised=False)[0]
  )
  out = np.asarray(run(jnp.asarray(g.x_t, jnp.float32), keys_for(n)))
  assert np.max(np.abs(out.mean(0) - g.mu) / (g.s / np.sqrt(n))) < 4
  assert np.max(np.abs(out.std(0) / g.s - 1)) < 0.05


def test_train_loop_entry_point_matches_sample_ancestral():
  # ancestral_sample's model_fn gets respaced indices (the train loop maps them itself).
  g = Gaussian("cosine", jnp.float32)
  d = GaussianDiffusion.create("cosine", T, "ddim20")
  keys, x = keys_for(16, seed=5), jnp.asarray(g.x_t, jnp.float32)
  es = dict(eps_scale=1.017, eps_scale_slope=-0.001)
  new, nfe = sample_ancestral(g.model_fn, x, d, keys, learn_sigma=False, **es)
  legacy = ancestral_sample(
      lambda x, t: g.model_fn(x, d.model_timesteps(t)), x, d, keys, learn_sigma=False, **es
  )
  plain = sample_ancestral(g.model_fn, x, d, keys, learn_sigma=False)[0]
  assert nfe == 20
  np.testing.assert_array_equal(legacy, new)
  assert max_err(plain, new) > 1e-3  # ε-scaling changes the samples


def test_ancestral_noise_does_not_depend_on_batch():
  g = Gaussian("linear", jnp.float32)
  d = GaussianDiffusion.create("linear", T, "20")
  keys, x = keys_for(16, seed=3), jnp.asarray(g.x_t, jnp.float32)
  run = jax.jit(lambda x, k: sample_ancestral(g.model_fn, x, d, k, learn_sigma=False)[0])
  np.testing.assert_array_equal(run(x, keys)[:4], run(x[:4], keys[:4]))


def test_eps_scale_schedule_is_centred_linear():
  scales = eps_scale_schedule(10, 1.017, 0.002)
  np.testing.assert_allclose(scales.mean(), 1.017)
  np.testing.assert_allclose(np.diff(scales), 0.002)
  np.testing.assert_array_equal(eps_scale_schedule(5, 1.006), np.full(5, 1.006))


# ----------------------------------------------------------------- guided-diffusion parity


@pytest.fixture(scope="module")
def pair():
  yield from gdp.pair_with_one_torch_thread()


@pytest.mark.parametrize(
    "eps_scale,eps_scale_slope", [(1.0, 0.0), (1.017, 0.004)], ids=["adm", "adm-es-linear"]
)
def test_ancestral_matches_guided_diffusion(pair, monkeypatch, eps_scale, eps_scale_slope):
  kept = space_timesteps(T, gdp.RESPACING)
  scales = eps_scale_schedule(len(kept), eps_scale, eps_scale_slope).astype(np.float32)

  def es_model(x, ts):  # ADM-ES: ε / λ_i inside the x_0 prediction (ts on the original grid)
    out = pair.torch(x, ts)
    return th.cat([out[:, :3] / float(scales[kept.index(int(ts[0]))]), out[:, 3:]], dim=1)

  monkeypatch.setattr(gdp.gd, "th", gdp.TorchFeedingNoise(pair.step_noise()))
  with th.no_grad():
    theirs = pair.theirs.p_sample_loop(
        es_model, (2, 3, 8, 8), device="cpu", noise=th.from_numpy(pair.noise.transpose(0, 3, 1, 2))
    )
  run = jax.jit(
      lambda x, k: sample_ancestral(
          pair.model_fn,
          x,
          pair.ours,
          k,
          learn_sigma=True,
          eps_scale=eps_scale,
          eps_scale_slope=eps_scale_slope,
      )[0]
  )
  assert max_err(run(jnp.asarray(pair.noise), pair.keys), gdp.nhwc(theirs)) <= gdp.PARITY_TOL
