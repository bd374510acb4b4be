"""adv_diffusion/adversarial.py (PAPER.md §4): δ normalisation, ℓ2/ℓ∞ balls, the normalised
ascent step, δ initialisation and the DDIM-gap radius."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adv_diffusion import adversarial
from adv_diffusion.diffusion import GaussianDiffusion


def _random(shape, seed=0, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _norms(x):
  return np.sqrt(np.sum(np.square(np.asarray(x, np.float64)), axis=(1, 2, 3)))


def test_l2_normalize_gives_unit_norms_and_keeps_zero():
  g = _random((5, 4, 4, 3)).at[2].set(0.0)
  n = _norms(adversarial.l2_normalize(g))
  np.testing.assert_allclose(n[[0, 1, 3, 4]], 1.0, rtol=1e-6)
  assert n[2] == 0.0


def test_l2_projection_closed_form_and_never_enlarges():
  delta = (
      _random((6, 4, 4, 3), seed=1) * jnp.asarray([0.01, 0.1, 0.3, 1, 3, 10])[:, None, None, None]
  )
  radius = 0.1
  bound = np.sqrt(48) * radius
  projected = adversarial.project_l2(delta, radius)
  before, after = _norms(delta), _norms(projected)
  np.testing.assert_allclose(after, np.minimum(before, bound), rtol=1e-6)
  assert np.all(after <= before * (1 + 1e-7))
  inside = before <= bound
  np.testing.assert_array_equal(np.asarray(projected)[inside], np.asarray(delta)[inside])
  # Direction is kept when the ball binds.
  cos = np.sum(np.asarray(projected) * np.asarray(delta), axis=(1, 2, 3)) / (after * before)
  np.testing.assert_allclose(cos, 1.0, rtol=1e-6)
  # Per-example radii.
  radii = jnp.asarray([0.0, 0.01, 0.05, 0.1, 1.0, 100.0])
  np.testing.assert_allclose(
      _norms(adversarial.project_l2(delta, radii)),
      np.minimum(before, np.sqrt(48) * np.asarray(radii)),
      rtol=1e-6,
      atol=1e-7,
  )


def test_linf_projection_and_sign_step():
  delta = _random((3, 2, 2, 1), seed=2)
  clipped = adversarial.project_linf(delta, 0.3)
  np.testing.assert_array_equal(clipped, np.clip(np.asarray(delta), -0.3, 0.3))
  zero = jnp.zeros((2, 2, 2, 1))
  grad = _random((2, 2, 2, 1), seed=3)
  step = adversarial.ascent_step(zero, grad, 0.05, 0.1, "linf")
  np.testing.assert_array_equal(step, 0.05 * np.sign(np.asarray(grad)))
  step2 = adversarial.ascent_step(step, grad, 0.05, 0.07, "linf")
  assert float(jnp.max(jnp.abs(step2))) == pytest.approx(0.07)


def test_l2_ascent_norms_follow_the_closed_form():
  grad = _random((4, 4, 4, 3), seed=4)
  delta = jnp.zeros_like(grad)
  for k in range(1, 4):  # steps along the same g add up: ‖δ‖ = k·η while inside the ball
    delta = adversarial.ascent_step(delta, grad, 0.1, 0.1, "l2")
    np.testing.assert_allclose(_norms(delta), 0.1 * k, rtol=1e-5)
  # A small ball binds: ‖δ‖ = sqrt(d)·ρ.
  tight = adversarial.ascent_step(jnp.zeros_like(grad), grad, 10.0, 0.01, "l2")
  np.testing.assert_allclose(_norms(tight), np.sqrt(48) * 0.01, rtol=1e-5)


def test_random_init_has_the_requested_size():
  shape = (8, 4, 4, 3)
  d = adversarial.init_delta(
      jax.random.key(0), shape, init="random", norm="l2", magnitude=0.02, radius=jnp.full((8,), 0.1)
  )
  np.testing.assert_allclose(_norms(d), np.sqrt(48) * 0.02, rtol=1e-5)
  d = adversarial.init_delta(
      jax.random.key(0),
      shape,
      init="random",
      norm="linf",
      magnitude=0.02,
      radius=jnp.full((8,), 0.1),
  )
  assert float(jnp.max(jnp.abs(d))) <= 0.02 and float(jnp.std(d)) > 0.005
  carried = _random(shape, seed=5)
  d = adversarial.init_delta(
      jax.random.key(0),
      shape,
      init="carry",
      norm="l2",
      magnitude=0.0,
      radius=jnp.full((8,), 0.1),
      carried=carried,
  )
  np.testing.assert_allclose(_norms(d), np.minimum(_norms(carried), np.sqrt(48) * 0.1), rtol=1e-5)


def test_ddim_gap_radius():
  diffusion = GaussianDiffusion.create("cosine", 1000)
  ac = diffusion.alphas_cumprod
  t = jnp.asarray([0, 1, 19, 20, 21, 500, 999])
  r = np.asarray(adversarial.ddim_gap_radius(ac, t, rho=10.0, grid_steps=50))
  s = np.asarray([-1, 0, 0, 0, 20, 480, 980])  # grid point strictly below t (stride 20)
  ac_s = np.where(s >= 0, ac[np.clip(s, 0, None)], 1.0)
  expected = np.sqrt(2 - 2 * np.sqrt(ac[np.asarray(t)] / ac_s))
  np.testing.assert_allclose(r, expected, rtol=1e-5)
  capped = np.asarray(adversarial.ddim_gap_radius(ac, t, rho=0.1, grid_steps=50))
  np.testing.assert_allclose(capped, np.minimum(expected, 0.1), rtol=1e-5)
