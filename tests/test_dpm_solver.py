"""sampling/dpm_solver.py: DPM-Solver(++) convergence orders on closed-form Gaussian data
(tests/gaussian_problem.py), the reference's second-order multistep-3 coefficient, clipping
against clipped DDIM, the discrete VP schedule, NFE of the tableau, and settings it rejects."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adv_diffusion.diffusion import GaussianDiffusion
from sampling.ddim import diffusion_from_timesteps, sample_ddim
from sampling.dpm_solver import (
    DiscreteVPSchedule,
    dpm_solver_nfe,
    dpm_solver_tableau,
    sample_dpm_solver,
)
from tests.gaussian_problem import SHAPE, T, Gaussian, assert_one_sentence, max_err, slope

# ------------------------------------------------------------------- closed-form convergence

# Observed orders (float64, cosine schedule, logSNR steps) are recorded in the report; the
# assertion is slope >= order - 0.5 over NFE ladders inside the asymptotic range.
LADDERS = {1: [10, 20, 40], 2: [40, 80, 160], 3: [40, 80, 160]}
SINGLESTEP3 = [161, 320, 641]  # NFE = 2 mod 3: DPM-Solver-fast ends with an order-2 step
CONVERGENCE = [
    ("noise", "multistep", 1),
    ("data", "multistep", 1),
    ("noise", "multistep", 2),
    ("data", "multistep", 2),
    ("noise", "singlestep", 2),
    ("data", "singlestep", 2),
    ("noise", "multistep", 3),
    ("data", "multistep", 3),
    ("noise", "singlestep", 3),
    ("data", "singlestep", 3),
]


@pytest.mark.parametrize("predictor,method,order", CONVERGENCE)
def test_dpm_solver_converges_at_its_order(predictor, method, order):
  with jax.enable_x64(True):
    g = Gaussian("cosine", jnp.float64)
    schedule = DiscreteVPSchedule.create("cosine", T)
    target = g.exact(
        g.x_t, schedule.marginal_alpha(1.0) ** 2, schedule.marginal_alpha(1.0 / T) ** 2
    )
    nfes = SINGLESTEP3 if (method, order) == ("singlestep", 3) else LADDERS[order]
    errs = []
    for n in nfes:
      out, nfe = sample_dpm_solver(
          g.model_fn,
          jnp.asarray(g.x_t),
          schedule,
          n,
          order=order,
          method=method,
          predictor=predictor,
          lower_order_final=False,
      )
      assert nfe == n
      errs.append(max_err(out, target))
  assert errs[-1] < errs[0]
  assert slope(nfes, errs) >= order - 0.5, (errs, slope(nfes, errs))


def test_reference_multistep3_coefficient_is_only_second_order():
  with jax.enable_x64(True):
    g = Gaussian("cosine", jnp.float64)
    schedule = DiscreteVPSchedule.create("cosine", T)
    target = g.exact(
        g.x_t, schedule.marginal_alpha(1.0) ** 2, schedule.marginal_alpha(1.0 / T) ** 2
    )
    errs = [
        max_err(
            sample_dpm_solver(
                g.model_fn,
                jnp.asarray(g.x_t),
                schedule,
                n,
                order=3,
                method="multistep",
                lower_order_final=False,
                multistep3_like_reference=True,
            )[0],
            target,
        )
        for n in (80, 160, 320)
    ]
  assert 1.7 < slope([80, 160, 320], errs) < 2.3


def test_clipped_dpm_solver_pp_1_equals_clipped_ddim():
  # A model whose ε is 10 % off: near t = T its x_0 = (x_t − σ_t·ε)/α_t lands far outside
  # [−1, 1], so clipping acts; DDIM's clip_denoised (guided-diffusion parity) is the reference.
  with jax.enable_x64(True):
    g = Gaussian("cosine", jnp.float64)
    x = jnp.asarray(g.x_t, jnp.float64)
    model_fn = lambda x, tau: 1.1 * g.model_fn(x, tau)  # noqa: E731
    d = diffusion_from_timesteps("cosine", T, list(range(0, T, 111)))
    ddim = sample_ddim(model_fn, x, d, clip_denoised=True)[0]
    dpm = {
        clip: sample_dpm_solver(
            model_fn,
            x,
            DiscreteVPSchedule.create("cosine", T),
            9,
            order=1,
            skip_type="time_uniform",
            predictor="data",
            denoise_to_zero=True,
            clip_denoised=clip,
        )[0]
        for clip in (False, True)
    }
  assert max_err(ddim, dpm[True]) <= 1e-9
  assert float(jnp.max(jnp.abs(dpm[False]))) > 10.0  # unclipped: the 1/α_t blow-up
  assert float(jnp.max(jnp.abs(dpm[True]))) <= 1.0


# ---------------------------------------------------------------------- schedule and NFE


def test_reference_truncated_cosine_schedule():
  full = DiscreteVPSchedule.create("cosine", T)
  ref = DiscreteVPSchedule.create("cosine", T, truncate_cosine_like_reference=True)
  assert full.total_n == 1000 and ref.total_n == 996
  assert DiscreteVPSchedule.create("linear", T, truncate_cosine_like_reference=True).total_n == T
  np.testing.assert_allclose(full.model_time([1.0, 1.0 / T]), [999.0, 0.0], atol=1e-9)
  np.testing.assert_allclose(ref.model_time(1.0), (1 - 1 / 996) * 1000)  # ~0.4 % late
  lam = full.marginal_lambda(np.array([0.2, 0.5, 0.9]))
  np.testing.assert_allclose(full.inverse_lambda(lam), [0.2, 0.5, 0.9], atol=1e-12)
  # Grid points carry ᾱ exactly: t = 1 is ᾱ_999, t = 0.5 is ᾱ_499.
  abar = GaussianDiffusion.create("cosine", T).alphas_cumprod
  np.testing.assert_allclose(
      full.marginal_alpha(np.array([1.0, 0.5])) ** 2, abar[[999, 499]], rtol=1e-12
  )


def test_dpm_solver_nfe_function_and_tableau_agree():
  schedule = DiscreteVPSchedule.create("linear", T)
  for order in (1, 2, 3):
    for method in ("singlestep", "multistep"):
      for steps in range(order, 13):
        for dz in (False, True):
          tab = dpm_solver_tableau(schedule, steps, order=order, method=method, denoise_to_zero=dz)
          assert tab.nfe == dpm_solver_nfe(steps, order, method, dz) == steps + dz
          if method == "singlestep":  # DPM-Solver-fast: 3 calls at order 3 are [2, 1]
            assert sum(tab.step_orders) == steps
            assert max(tab.step_orders) == (2 if (order, steps) == (3, 3) else order)
          else:
            assert len(tab.step_orders) == steps


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "call,words",
    [
        (
            lambda: sample_dpm_solver(
                None, jnp.zeros(SHAPE), DiscreteVPSchedule.create("cosine", T), 10, predictor="v"
            ),
            ["'v'"],
        ),
        (
            lambda: DiscreteVPSchedule.from_diffusion(GaussianDiffusion.create("cosine", T, "10")),
            ["respaced"],
        ),
    ],
)
def test_bad_settings_raise_one_sentence(call, words):
  with pytest.raises(ValueError) as excinfo:
    call()
  assert_one_sentence(excinfo, *words)
