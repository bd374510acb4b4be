"""sampling/registry.py: every method's model calls equal its NFE, model times lie on the
original grid, and bad settings raise one sentence (Gaussian data: tests/gaussian_problem.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sampling.registry import make_sampler
from tests.gaussian_problem import T, Gaussian, assert_one_sentence, counting, keys_for

NFE_CASES = (
    [
        ("ancestral", 7, {}),
        ("ancestral_es", 5, {"eps_scale_slope": 0.001}),
        ("ddim", 8, {}),
        ("ddim", 10, {"spacing": "quad"}),
        ("ddim", 6, {"eta": 0.5}),
        ("ddim", 5, {"spacing": "uniform"}),
    ]
    # Every order x solver x denoise_to_zero; the predictor (method) alternates, since it
    # changes what is stored, not where the model is called (the tableau test covers both).
    + [
        (m, n, {"order": o, "solver": s, "denoise_to_zero": dz})
        for o in (1, 2, 3)
        for s in ("singlestep", "multistep")
        for m, n, dz in (("dpm_solver", 7, False), ("dpm_solver++", 8, True))
    ]
    + [
        ("dpm_solver", 8, {"order": 3, "solver": "singlestep", "denoise_to_zero": True}),
        ("dpm_solver++", 7, {"order": 3, "solver": "multistep", "denoise_to_zero": False}),
    ]
)


@pytest.mark.parametrize(
    "method,nfe,options",
    NFE_CASES,
    ids=[f"{m}-{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for m, n, o in NFE_CASES],
)
def test_model_calls_equal_nfe(method, nfe, options):
  g = Gaussian("cosine", jnp.float32, shape=(2, 2, 2, 1))
  learn = {"learn_sigma": False} if method.startswith("ancestral") else {}
  sampler = make_sampler(method, nfe, "cosine", T, **learn, **options)
  model_fn, calls = counting(g.model_fn)
  out = jax.jit(lambda x, k: sampler(model_fn, x, k))(jnp.asarray(g.x_t, jnp.float32), keys_for(2))
  jax.effects_barrier()
  assert sampler.nfe == nfe and len(calls) == nfe
  assert np.all(np.isfinite(np.asarray(out)))
  times = np.array([c[0] for c in calls], np.float64)
  assert np.all(np.diff(times) < 0)  # every call at a new, smaller time
  assert times.min() >= -1e-3 and times.max() <= T - 1 + 1e-3  # on the original grid


def test_model_times_on_the_original_grid():
  g = Gaussian("cosine", jnp.float32, shape=(2, 2, 2, 1))
  x = jnp.asarray(g.x_t, jnp.float32)
  model_fn, calls = counting(g.model_fn)
  make_sampler("ddim", 5, "cosine", T)(model_fn, x)
  make_sampler("dpm_solver++", 5, "cosine", T)(model_fn, x)
  make_sampler("dpm_solver++", 5, "cosine", T, truncate_cosine_like_reference=True)(model_fn, x)
  jax.effects_barrier()
  times = [float(c[0]) for c in calls]
  assert times[:5] == [800, 600, 400, 200, 0]  # "ddim5" stride 200
  assert times[5] == pytest.approx(999.0) and times[10] == pytest.approx(1000 - 1000 / 996)


@pytest.mark.parametrize(
    "call,words",
    [
        (lambda: make_sampler("heun", 10, "cosine", T), ["heun", "allowed methods"]),
        (lambda: make_sampler("dpm_solver++", 10, "cosine", T, order=4), ["order", "1, 2 or 3"]),
        (
            lambda: make_sampler("dpm_solver", 2, "cosine", T, order=3, solver="singlestep"),
            ["at least 3"],
        ),
        (
            lambda: make_sampler("dpm_solver++", 10, "cosine", T, t_start=0.5, t_end=0.6),
            ["t_end < t_start"],
        ),
        (lambda: make_sampler("dpm_solver++", 10, "cosine", T, skip_type="karras"), ["karras"]),
        (lambda: make_sampler("dpm_solver++", 10, "cosine", T, solver="adaptive"), ["adaptive"]),
        (lambda: make_sampler("dpm_solver++", 1, "cosine", T, denoise_to_zero=True), ["nfe=1"]),
        (lambda: make_sampler("ddim", 10, "cosine", T, eta=-0.1), ["eta", ">= 0"]),
        (lambda: make_sampler("ddim", 7, "cosine", T, spacing="uniform"), ["uniform", "8 steps"]),
        (lambda: make_sampler("ddim", 10, "cosine", T, spacing="log"), ["log", "allowed spacings"]),
        (lambda: make_sampler("ddim", 0, "cosine", T), ["nfe"]),
        (lambda: make_sampler("ddim", 10, "cosine", T, order=2), ["order", "allowed options"]),
        (lambda: make_sampler("ancestral_es", 10, "cosine", T, eps_scale=0.0), ["positive"]),
    ],
)
def test_bad_settings_raise_one_sentence(call, words):
  with pytest.raises(ValueError) as excinfo:
    call()
  assert_one_sentence(excinfo, *words)
