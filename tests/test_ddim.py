"""sampling/ddim.py: DDIM's first-order convergence and its equality with DPM-Solver-1 on
closed-form Gaussian data, respaced processes and timestep grids, a setting it rejects, and
parity with guided-diffusion's `ddim_sample_loop` (closed form: tests/gaussian_problem.py;
parity: tests/guided_diffusion_pair.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch as th

from adv_diffusion.diffusion import GaussianDiffusion, space_timesteps
from sampling.ddim import (
    ddim_nfe,
    diffusion_from_timesteps,
    kept_timesteps,
    respaced_diffusion,
    sample_ddim,
)
from sampling.dpm_solver import DiscreteVPSchedule, dpm_solver_nfe, sample_dpm_solver
from tests import guided_diffusion_pair as gdp
from tests.gaussian_problem import SHAPE, T, Gaussian, assert_one_sentence, max_err, slope


def test_ddim_converges_at_first_order():
  with jax.enable_x64(True):
    g = Gaussian("cosine", jnp.float64)
    nfes, errs = [10, 20, 40, 80], []
    for n in nfes:
      d = respaced_diffusion("cosine", T, n, "adm")
      out, nfe = sample_ddim(g.model_fn, jnp.asarray(g.x_t), d, clip_denoised=False)
      assert nfe == n
      errs.append(max_err(out, g.exact(g.x_t, d.alphas_cumprod[-1], 1.0)))
  assert slope(nfes, errs) >= 0.5, errs


@pytest.mark.parametrize("schedule,x64", [("linear", False), ("cosine", True)])
@pytest.mark.parametrize("predictor", ["noise", "data"])
def test_ddim_equals_dpm_solver_1_on_the_same_grid(schedule, x64, predictor):
  # linspace(1, 1/N, 10) hits the grid points 999, 888, ..., 0 exactly; DDIM's last step (to
  # ᾱ = 1) is DPM-Solver's denoise_to_zero call. Cosine runs in float64: its ᾱ_999 = 2.4e-9
  # makes the first step amplify float32 round-off by 1/sqrt(ᾱ_999) ~ 2e4 in both algebraically
  # equal forms (they then differ by ~1e-4 in float32, ~1e-12 in float64).
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    g = Gaussian(schedule, dtype)
    x = jnp.asarray(g.x_t, dtype)
    d = diffusion_from_timesteps(schedule, T, list(range(0, T, 111)))
    ddim = jax.jit(lambda x: sample_ddim(g.model_fn, x, d, clip_denoised=False)[0])(x)
    dpm = jax.jit(
        lambda x: sample_dpm_solver(
            g.model_fn,
            x,
            DiscreteVPSchedule.create(schedule, T),
            9,
            order=1,
            skip_type="time_uniform",
            predictor=predictor,
            denoise_to_zero=True,
        )[0]
    )(x)
  assert ddim_nfe(d) == dpm_solver_nfe(9, 1, "multistep", denoise_to_zero=True) == 10
  assert max_err(ddim, dpm) <= 1e-5


# ---------------------------------------------------------------------- schedules and grids


def test_respaced_process_from_a_list_equals_adm_respacing():
  for spec in ("10", "ddim25", "5,10"):
    ours = diffusion_from_timesteps("cosine", T, space_timesteps(T, spec))
    ref = GaussianDiffusion.create("cosine", T, spec)
    np.testing.assert_array_equal(ours.betas, ref.betas)
    np.testing.assert_array_equal(ours.timestep_map, ref.timestep_map)


def test_kept_timesteps_spacings():
  assert kept_timesteps(T, 10, "uniform") == list(range(0, T, 100))
  assert kept_timesteps(T, 8, "ddim") == list(range(0, T, 125))
  assert kept_timesteps(T, 10, "adm") == space_timesteps(T, "10")
  quad = kept_timesteps(T, 10, "quad")  # DDIM's quad grid ends at 0.8 T
  assert quad[0] == 0 and quad[-1] == 800 and quad == sorted(set(quad))
  quad50 = kept_timesteps(T, 50, "quad")  # int() gives 0, 0, 1, 3: repeats move up by one
  assert len(quad50) == 50 and quad50[:4] == [0, 1, 2, 3] and quad50 == sorted(set(quad50))


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "call,words",
    [
        (
            lambda: sample_ddim(
                None, jnp.zeros(SHAPE), GaussianDiffusion.create("cosine", T, "5"), eta=1.0
            ),
            ["sample_keys"],
        ),
    ],
)
def test_bad_settings_raise_one_sentence(call, words):
  with pytest.raises(ValueError) as excinfo:
    call()
  assert_one_sentence(excinfo, *words)


# ----------------------------------------------------------------- guided-diffusion parity


@pytest.fixture(scope="module")
def pair():
  yield from gdp.pair_with_one_torch_thread()


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_matches_guided_diffusion(pair, monkeypatch, eta):
  monkeypatch.setattr(gdp.gd, "th", gdp.TorchFeedingNoise(pair.step_noise()))
  with th.no_grad():
    theirs = pair.theirs.ddim_sample_loop(
        pair.torch,
        (2, 3, 8, 8),
        eta=eta,
        device="cpu",
        noise=th.from_numpy(pair.noise.transpose(0, 3, 1, 2)),
    )
  run = jax.jit(lambda x, k: sample_ddim(pair.model_fn, x, pair.ours, k, eta=eta)[0])
  assert max_err(run(jnp.asarray(pair.noise), pair.keys), gdp.nhwc(theirs)) <= gdp.PARITY_TOL
