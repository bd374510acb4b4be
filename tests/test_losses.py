"""adv_diffusion/losses.py (PAPER.md §3): the AT target shift keeps the implied x_0, the loss's
δ gradient against finite differences, the analytic worst-case direction of a linear predictor."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adv_diffusion import adversarial, losses
from adv_diffusion.diffusion import GaussianDiffusion
from modes import train_programs
from modes.factories import create_diffusion, create_unet
from tests.configs import tiny_digits


def _random(shape, seed=0, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def test_implied_x0_of_perturbed_input_and_shifted_target_is_x0():
  diffusion = GaussianDiffusion.create("cosine", 1000)
  x0 = _random((5, 4, 4, 3), seed=6, scale=0.5)
  eps = _random((5, 4, 4, 3), seed=7)
  delta = _random((5, 4, 4, 3), seed=8, scale=0.05)
  t = jnp.asarray([1, 10, 200, 600, 900])
  sigma = jnp.asarray(diffusion.sqrt_one_minus_alphas_cumprod, jnp.float32)[t]
  x_t = diffusion.q_sample(x0, t, eps)
  target = losses.adversarial_target(eps, delta, sigma, "delta_detach")
  implied = diffusion.predict_xstart_from_eps(x_t + delta, t, target)
  np.testing.assert_allclose(implied, x0, atol=2e-5)
  # The unshifted target would imply a different x_0.
  wrong = diffusion.predict_xstart_from_eps(x_t + delta, t, eps)
  assert float(jnp.max(jnp.abs(wrong - x0))) > 1e-2


# ---------------------------------------------------------------------------------------------
# The loss and its δ gradient
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _tiny_setup():
  config = tiny_digits.get_config()
  config.model.dropout = 0.0
  model = create_unet(config)
  diffusion = create_diffusion(config)
  params = train_programs.init_params(model, config, jax.random.key(0))
  # Randomise ADM's zero-initialised output layers, else ∂L/∂δ is exactly zero.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(
      treedef, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
  )
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.uniform(-1, 1, (4, 16, 16, 1)), jnp.float32)
  t = jnp.asarray([3, 150, 500, 850])
  eps = jnp.asarray(rng.normal(size=x0.shape), jnp.float32)
  inputs = losses.MinibatchInputs(
      x_start=x0,
      x_t=diffusion.q_sample(x0, t, eps),
      t=t,
      noise=eps,
      weights=jnp.asarray([0.5, 1.0, 1.5, 1.0]),
      sigma=jnp.asarray(diffusion.sqrt_one_minus_alphas_cumprod, jnp.float32)[t],
      labels=None,
  )

  def apply_fn(p, x, ts, labels, key):
    return model.apply({"params": p}, x, ts, labels, train=False)

  return config, diffusion, params, inputs, apply_fn


def _loss_and_terms(target_type, params, delta, inputs, diffusion, apply_fn):
  return losses.diffusion_loss(
      params,
      delta,
      inputs,
      jax.random.key(0),
      apply_fn=apply_fn,
      diffusion=diffusion,
      learn_sigma=True,
      loss_type="rescaled_mse",
      target_type=target_type,
  )


def _loss(target_type, params, delta, inputs, diffusion, apply_fn):
  return _loss_and_terms(target_type, params, delta, inputs, diffusion, apply_fn)[0]


@pytest.mark.parametrize("target_type", ["delta_detach", "delta"])
def test_delta_gradient_matches_finite_differences(target_type):
  config, diffusion, params, inputs, apply_fn = _tiny_setup()
  delta0 = _random(inputs.x_t.shape, seed=9, scale=0.02)
  grad_fn = jax.jit(jax.grad(lambda d: _loss(target_type, params, d, inputs, diffusion, apply_fn)))
  grad = grad_fn(delta0)

  # The reference differentiates the network input; for delta_detach the VLB term's x_t stays
  # at the detached x_t + δ0 and the target at ε + δ0/σ_t, while "delta" lets both move with δ
  # (PAPER.md §3). ADM's hybrid loss also freezes the ε channels inside the VLB term, so the
  # reference holds those at their δ0 values and lets only the variance move.
  channels = inputs.x_t.shape[-1]
  out0 = apply_fn(params, inputs.x_t + delta0, diffusion.model_timesteps(inputs.t), None, None)

  @jax.jit
  def reference(d):
    moving = d if target_type == "delta" else delta0
    target = losses.adversarial_target(inputs.noise, moving, inputs.sigma, "delta")
    out = apply_fn(params, inputs.x_t + d, diffusion.model_timesteps(inputs.t), None, None)
    mixed = jnp.concatenate([out0[..., :channels], out[..., channels:]], axis=-1)
    kwargs = dict(learn_sigma=True, loss_type="rescaled_mse")
    mse = diffusion.training_losses(
        out, inputs.x_start, inputs.x_t + moving, inputs.t, target, **kwargs
    )["mse"]
    vb = diffusion.training_losses(
        mixed, inputs.x_start, inputs.x_t + moving, inputs.t, target, **kwargs
    )["vb"]
    return jnp.mean((mse + vb) * inputs.weights)

  assert float(reference(delta0)) == pytest.approx(
      float(_loss(target_type, params, delta0, inputs, diffusion, apply_fn)), rel=1e-6
  )
  h = 1e-2
  for seed in range(3):
    v = adversarial.l2_normalize(_random(delta0.shape, seed=20 + seed))
    fd = (reference(delta0 + h * v) - reference(delta0 - h * v)) / (2 * h)
    analytic = jnp.sum(grad * v)
    assert float(analytic) == pytest.approx(float(fd), rel=2e-2, abs=1e-6)
  # The two target types really differ (the check above can tell them apart).
  other_type = "delta" if target_type == "delta_detach" else "delta_detach"
  other = jax.jit(jax.grad(lambda d: _loss(other_type, params, d, inputs, diffusion, apply_fn)))(
      delta0
  )
  assert float(jnp.linalg.norm(other - grad)) > 0.05 * float(jnp.linalg.norm(grad))


# ---------------------------------------------------------------------------------------------
# The VLB term of the three target types (PAPER.md §3, the authors' AdvGaussianDiffusion)
# ---------------------------------------------------------------------------------------------


def _terms(target_type, params, delta, inputs, diffusion, apply_fn):
  return _loss_and_terms(target_type, params, delta, inputs, diffusion, apply_fn)[1]


def test_vlb_term_sees_the_clean_x_t_for_original_and_the_perturbed_one_otherwise():
  config, diffusion, params, inputs, apply_fn = _tiny_setup()
  delta = _random(inputs.x_t.shape, seed=11, scale=0.05)
  out = apply_fn(params, inputs.x_t + delta, diffusion.model_timesteps(inputs.t), None, None)
  kwargs = dict(learn_sigma=True, loss_type="rescaled_mse")
  # "original": ADM's terms with the output at x_t + δ, the target ε and the CLEAN x_t.
  expected = diffusion.training_losses(
      out, inputs.x_start, inputs.x_t, inputs.t, inputs.noise, **kwargs
  )
  got = _terms("original", params, delta, inputs, diffusion, apply_fn)
  for name in ("vb", "mse", "loss"):
    np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, atol=1e-7)
  # "delta_detach" and "delta": the same output with x_t + δ (equal values, gradients differ).
  shifted = losses.adversarial_target(inputs.noise, delta, inputs.sigma, "delta")
  perturbed = diffusion.training_losses(
      out, inputs.x_start, inputs.x_t + delta, inputs.t, shifted, **kwargs
  )
  for target_type in ("delta_detach", "delta"):
    got = _terms(target_type, params, delta, inputs, diffusion, apply_fn)
    for name in ("vb", "mse", "loss"):
      np.testing.assert_allclose(got[name], perturbed[name], rtol=1e-6, atol=1e-7)
  # The two VLB inputs give measurably different terms, so the checks above tell them apart.
  assert float(jnp.max(jnp.abs(expected["vb"] - perturbed["vb"]))) > 1e-3


def test_vlb_gradient_to_delta_flows_only_for_the_delta_target():
  # With the network's own input gradient cut, every ∂vb/∂δ flows through the VLB's x_t (the
  # posterior q(x_{t−1} | x_t, x_0) and μ_θ(x_t, ε_θ)): zero for "delta_detach" and "original",
  # non-zero for "delta" (PAPER.md §3). Without the cut the variance channels carry a δ-gradient
  # in all three, as in ADM's hybrid loss, which freezes only the mean output.
  config, diffusion, params, inputs, unet_fn = _tiny_setup()

  def apply_fn(p, x, ts, labels, key):
    return unet_fn(p, jax.lax.stop_gradient(x), ts, labels, key)

  delta0 = _random(inputs.x_t.shape, seed=12, scale=0.05)

  def vb_grad(target_type):
    vb = lambda d: jnp.sum(_terms(target_type, params, d, inputs, diffusion, apply_fn)["vb"])
    return jax.jit(jax.grad(vb))(delta0)

  for target_type in ("delta_detach", "original"):
    assert float(jnp.max(jnp.abs(vb_grad(target_type)))) == 0.0, target_type
  # "delta": the gradient of ADM's VLB term in its x_t argument, the output held fixed.
  out0 = apply_fn(params, inputs.x_t + delta0, diffusion.model_timesteps(inputs.t), None, None)
  expected = jax.grad(
      lambda d: jnp.sum(
          diffusion.training_losses(
              out0,
              inputs.x_start,
              inputs.x_t + d,
              inputs.t,
              inputs.noise,
              learn_sigma=True,
              loss_type="rescaled_mse",
          )["vb"]
      )
  )(delta0)
  got = vb_grad("delta")
  assert float(jnp.linalg.norm(got)) > 1e-2
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * float(jnp.max(jnp.abs(got))))


def test_first_l2_ascent_direction_is_the_analytic_worst_case_of_a_linear_predictor():
  # ε_θ(x) = A x on the flattened image, Gaussian data: L(δ) = mean_i w_i ‖A(x_i + δ_i) − ε_i‖²/d
  # (target held: delta_detach, first step from δ = 0), whose steepest ascent direction is
  # w_i Aᵀ(A x_i − ε_i) per example.
  d = 12
  rng = np.random.default_rng(1)
  a = rng.normal(size=(d, d)) / np.sqrt(d)
  diffusion = GaussianDiffusion.create("linear", 1000)
  x0 = rng.normal(size=(3, 2, 2, 3)) * 0.5
  eps = rng.normal(size=x0.shape)
  t = jnp.asarray([100, 400, 800])
  x_t = np.asarray(
      diffusion.q_sample(jnp.asarray(x0, jnp.float32), t, jnp.asarray(eps, jnp.float32)), np.float64
  )
  inputs = losses.MinibatchInputs(
      x_start=jnp.asarray(x0, jnp.float32),
      x_t=jnp.asarray(x_t, jnp.float32),
      t=t,
      noise=jnp.asarray(eps, jnp.float32),
      weights=jnp.ones(3),
      sigma=jnp.asarray(diffusion.sqrt_one_minus_alphas_cumprod, jnp.float32)[t],
      labels=None,
  )
  a32 = jnp.asarray(a, jnp.float32)

  def apply_fn(p, x, ts, labels, key):
    return (x.reshape(x.shape[0], -1) @ a32.T).reshape(x.shape)

  def loss(delta):
    return losses.diffusion_loss(
        None,
        delta,
        inputs,
        jax.random.key(0),
        apply_fn=apply_fn,
        diffusion=diffusion,
        learn_sigma=False,
        loss_type="mse",
    )[0]

  zero = jnp.zeros(x0.shape, jnp.float32)
  step = adversarial.ascent_step(zero, jax.grad(loss)(zero), 1.0, 1e9, "l2")
  residual = x_t.reshape(3, -1) @ a.T - eps.reshape(3, -1)
  analytic = residual @ a
  analytic /= np.linalg.norm(analytic, axis=1, keepdims=True)
  np.testing.assert_allclose(np.asarray(step).reshape(3, -1), analytic, atol=1e-5)
  # And no random unit direction raises the loss more for a small step.
  eta = 1e-2
  best = float(loss(eta * step))
  for seed in range(200):
    u = adversarial.l2_normalize(_random(x0.shape, seed=100 + seed))
    assert float(loss(eta * u)) <= best + 1e-7
