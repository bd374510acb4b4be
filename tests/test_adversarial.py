"""Adversarial training (PAPER.md §3-§4): δ search maths, the loss, and the train-step variants."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adv_diffusion import adversarial, losses
from adv_diffusion import train_step as step_lib
from modes import parallel, train
from modes.factories import step_settings
from adv_diffusion.diffusion import GaussianDiffusion
from modes.factories import create_unet
from tests import run_utils
from tests.configs import tiny_digits

# ---------------------------------------------------------------------------------------------
# Pure δ maths
# ---------------------------------------------------------------------------------------------


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
  delta = _random((6, 4, 4, 3), seed=1) * jnp.asarray([0.01, 0.1, 0.3, 1, 3, 10])[:, None, None,
                                                                                   None]
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
  np.testing.assert_allclose(_norms(adversarial.project_l2(delta, radii)),
                             np.minimum(before, np.sqrt(48) * np.asarray(radii)), rtol=1e-6,
                             atol=1e-7)


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
  d = adversarial.init_delta(jax.random.key(0), shape, init="random", norm="l2", magnitude=0.02,
                             radius=jnp.full((8,), 0.1))
  np.testing.assert_allclose(_norms(d), np.sqrt(48) * 0.02, rtol=1e-5)
  d = adversarial.init_delta(jax.random.key(0), shape, init="random", norm="linf", magnitude=0.02,
                             radius=jnp.full((8,), 0.1))
  assert float(jnp.max(jnp.abs(d))) <= 0.02 and float(jnp.std(d)) > 0.005
  carried = _random(shape, seed=5)
  d = adversarial.init_delta(jax.random.key(0), shape, init="carry", norm="l2", magnitude=0.0,
                             radius=jnp.full((8,), 0.1), carried=carried)
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
  diffusion = train.create_diffusion(config)
  params = train.init_params(model, config, jax.random.key(0))
  # Randomise ADM's zero-initialised output layers, else ∂L/∂δ is exactly zero.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(treedef, [p + 0.05 * jax.random.normal(k, p.shape)
                                        for p, k in zip(leaves, keys)])
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.uniform(-1, 1, (4, 16, 16, 1)), jnp.float32)
  t = jnp.asarray([3, 150, 500, 850])
  eps = jnp.asarray(rng.normal(size=x0.shape), jnp.float32)
  inputs = losses.MinibatchInputs(
      x_start=x0, x_t=diffusion.q_sample(x0, t, eps), t=t, noise=eps,
      weights=jnp.asarray([0.5, 1.0, 1.5, 1.0]),
      sigma=jnp.asarray(diffusion.sqrt_one_minus_alphas_cumprod, jnp.float32)[t], labels=None)

  def apply_fn(p, x, ts, labels, key):
    return model.apply({"params": p}, x, ts, labels, train=False)

  return config, diffusion, params, inputs, apply_fn


def _loss(target_type, params, delta, inputs, diffusion, apply_fn):
  return losses.diffusion_loss(params, delta, inputs, jax.random.key(0), apply_fn=apply_fn,
                               diffusion=diffusion, learn_sigma=True, loss_type="rescaled_mse",
                               target_type=target_type)[0]


@pytest.mark.parametrize("target_type", ["delta_detach", "delta"])
def test_delta_gradient_matches_finite_differences(target_type):
  config, diffusion, params, inputs, apply_fn = _tiny_setup()
  delta0 = _random(inputs.x_t.shape, seed=9, scale=0.02)
  grad_fn = jax.jit(jax.grad(lambda d: _loss(target_type, params, d, inputs, diffusion,
                                             apply_fn)))
  grad = grad_fn(delta0)

  # The reference differentiates the network input only: the VLB term's x_t stays at the
  # detached x_t + δ0 and, for delta_detach, the target stays at ε + δ0/σ_t ("delta" lets the
  # target move with δ as well). ADM's hybrid loss also freezes the ε channels inside the VLB
  # term, so the reference holds those at their δ0 values and lets only the variance move.
  channels = inputs.x_t.shape[-1]
  out0 = apply_fn(params, inputs.x_t + delta0, diffusion.model_timesteps(inputs.t), None, None)

  @jax.jit
  def reference(d):
    target = losses.adversarial_target(inputs.noise, d if target_type == "delta" else delta0,
                                       inputs.sigma, "delta")
    out = apply_fn(params, inputs.x_t + d, diffusion.model_timesteps(inputs.t), None, None)
    mixed = jnp.concatenate([out0[..., :channels], out[..., channels:]], axis=-1)
    kwargs = dict(learn_sigma=True, loss_type="rescaled_mse")
    mse = diffusion.training_losses(out, inputs.x_start, inputs.x_t + delta0, inputs.t, target,
                                    **kwargs)["mse"]
    vb = diffusion.training_losses(mixed, inputs.x_start, inputs.x_t + delta0, inputs.t, target,
                                   **kwargs)["vb"]
    return jnp.mean((mse + vb) * inputs.weights)

  assert float(reference(delta0)) == pytest.approx(
      float(_loss(target_type, params, delta0, inputs, diffusion, apply_fn)), rel=1e-6)
  h = 1e-2
  for seed in range(3):
    v = adversarial.l2_normalize(_random(delta0.shape, seed=20 + seed))
    fd = (reference(delta0 + h * v) - reference(delta0 - h * v)) / (2 * h)
    analytic = jnp.sum(grad * v)
    assert float(analytic) == pytest.approx(float(fd), rel=2e-2, abs=1e-6)
  # The two target types really differ (the check above can tell them apart).
  other_type = "delta" if target_type == "delta_detach" else "delta_detach"
  other = jax.jit(jax.grad(lambda d: _loss(other_type, params, d, inputs, diffusion,
                                           apply_fn)))(delta0)
  assert float(jnp.linalg.norm(other - grad)) > 0.05 * float(jnp.linalg.norm(grad))


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
  x_t = np.asarray(diffusion.q_sample(jnp.asarray(x0, jnp.float32), t,
                                      jnp.asarray(eps, jnp.float32)), np.float64)
  inputs = losses.MinibatchInputs(
      x_start=jnp.asarray(x0, jnp.float32), x_t=jnp.asarray(x_t, jnp.float32), t=t,
      noise=jnp.asarray(eps, jnp.float32), weights=jnp.ones(3),
      sigma=jnp.asarray(diffusion.sqrt_one_minus_alphas_cumprod, jnp.float32)[t], labels=None)
  a32 = jnp.asarray(a, jnp.float32)

  def apply_fn(p, x, ts, labels, key):
    return (x.reshape(x.shape[0], -1) @ a32.T).reshape(x.shape)

  def loss(delta):
    return losses.diffusion_loss(None, delta, inputs, jax.random.key(0), apply_fn=apply_fn,
                                 diffusion=diffusion, learn_sigma=False, loss_type="mse")[0]

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


# ---------------------------------------------------------------------------------------------
# Train-step variants
# ---------------------------------------------------------------------------------------------


def _step_setup(tx=None, consistency: dict | None = None, **adv):
  """A tiny UNet, a train state, one batch and the jitted step for the given AT settings
  (and `config.consistency` overrides: the perturbed params then also start the target).

  `tx` replaces AdamW: tests that compare two computations of the same update use plain SGD,
  because Adam's first update is ±lr for any non-zero gradient and so blows float32 rounding
  noise of mathematically-zero gradients (biases of convs feeding a GroupNorm) up to lr.
  """
  config = tiny_digits.get_config()
  config.train.batch_size = 8
  for k, v in adv.items():
    config.adversarial[k] = v
  config.consistency.update(consistency or {})
  mesh = parallel.make_mesh()
  model = create_unet(config)
  diffusion = train.create_diffusion(config)
  tx = tx or train.create_optimizer(config.optim)
  state = train.create_train_state(model, tx, config, jax.random.key(0), mesh)
  # Move the zero-initialised output layers so that δ has a gradient from the first step.
  state = state.replace(params=jax.tree.map(
      lambda p: p + 0.02 * jax.random.normal(jax.random.key(3), p.shape), state.params))
  state = state.replace(ema_params=tuple(state.params for _ in state.ema_params))
  if state.target_params is not None:
    state = state.replace(target_params=state.params)
  rng = np.random.default_rng(0)
  batch = parallel.global_batch_from_local(
      {"image": rng.integers(0, 256, (8, 16, 16, 1), dtype=np.uint8),
       "label": np.zeros((8,), np.int32)}, mesh)
  step = jax.jit(train.make_step_fn(model, diffusion, tx, config))
  return config, model, diffusion, tx, state, batch, step


def _copy(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def test_single_replay_is_the_clean_step():
  # Same t, ε, dropout mask and input: the update equals the clean one up to float32 rounding
  # (computing ∂L/∂δ in the same program changes XLA's fusion, ~1 ulp in the loss). Bit
  # equality is not attainable for that reason; `mode="none"` is the clean step itself.
  sgd = optax.sgd(1.0)  # params_new = params − grad: the comparison sees the gradients
  _, _, _, _, state, batch, clean_step = _step_setup(tx=sgd, mode="none")
  _, _, _, _, _, _, fast_step = _step_setup(tx=sgd, mode="fast", num_replays=1)
  key = jax.random.key(42)
  clean, clean_metrics = clean_step(_copy(state), batch, key)
  fast, metrics = fast_step(_copy(state), batch, key)
  assert float(metrics["loss"]) == pytest.approx(float(clean_metrics["loss"]), rel=1e-6)
  moved = run_utils.max_abs_diff(clean.params, state.params)
  assert moved > 1e-3
  assert run_utils.max_abs_diff(clean.params, fast.params) <= 1e-6 * max(1.0, moved)
  assert run_utils.max_abs_diff(list(clean.ema_params), list(fast.ema_params)) <= 1e-6
  assert run_utils.max_abs_diff(clean.sampler_state, fast.sampler_state) <= 1e-6
  assert int(fast.num_updates) == int(clean.num_updates) == 1


def test_three_replays_make_three_updates_and_step_size_zero_is_three_clean_updates():
  config, model, diffusion, tx, state, batch, fast_step = _step_setup(
      tx=optax.sgd(0.1), mode="fast", num_replays=3, step_size=0.0)
  key = jax.random.key(42)
  new, metrics = fast_step(_copy(state), batch, key)
  assert int(new.step) == 1 and int(new.num_updates) == 3
  assert int(metrics["optimizer_updates"]) == 3
  assert float(metrics["delta_l2_max"]) == 0.0

  # Replay the three clean updates by hand with the same t, ε and per-replay dropout keys.
  step_key = jax.random.fold_in(key, state.step)
  inputs, dropout_key = step_lib.minibatch_inputs(state, batch, step_key, diffusion,
                                                  step_settings(config))

  def apply_fn(p, x, ts, labels, k):
    return model.apply({"params": p}, x, ts, labels, train=True, rngs={"dropout": k})

  manual, params_seen = _copy(state), []
  for r, k in enumerate(step_lib.replay_dropout_keys(dropout_key, 3)):
    grads = jax.grad(lambda p: losses.diffusion_loss(
        p, jnp.zeros_like(inputs.x_t), inputs, k, apply_fn=apply_fn, diffusion=diffusion,
        learn_sigma=True, loss_type="rescaled_mse")[0])(manual.params)
    manual = step_lib.apply_gradients(manual, grads, tx, tuple(config.train.ema_rates))
    params_seen.append(manual.params)
  assert run_utils.max_abs_diff(manual.params, new.params) <= 1e-6
  # EMA arithmetic: three EMA updates, e3 = r³e0 + (1−r)(r²p1 + r·p2 + p3), for each rate.
  for rate, ema0, ema3 in zip(config.train.ema_rates, state.ema_params, new.ema_params):
    expected = jax.tree.map(
        lambda e, p1, p2, p3: rate ** 3 * e + (1 - rate) * (rate ** 2 * p1 + rate * p2 + p3),
        ema0, *params_seen)
    assert run_utils.max_abs_diff(expected, ema3) <= 1e-6


def test_fast_step_moves_delta_and_reports_its_metrics():
  _, _, _, _, state, batch, fast_step = _step_setup(mode="fast", num_replays=3, step_size=0.1)
  new, m = fast_step(_copy(state), batch, jax.random.key(1))
  assert int(new.opt_state[0].count) == 3  # AdamW's own update counter: 3 updates
  # δ of the last replay took K − 1 = 2 normalised steps of length 0.1 (ball radius 1.6).
  assert 0.1 < float(m["delta_l2_mean"]) <= 0.2 + 1e-5
  assert float(m["delta_l2_max"]) <= 0.2 + 1e-5
  assert float(m["grad_delta_l2_mean"]) > 0
  assert float(m["target_shift_rms"]) > 0
  assert np.isfinite(float(m["loss_delta0"])) and np.isfinite(float(m["loss_final_delta"]))


def test_pgd_makes_one_update_per_minibatch():
  _, _, _, _, state, batch, pgd_step = _step_setup(mode="pgd", pgd_steps=3, step_size=0.1)
  new, m = pgd_step(_copy(state), batch, jax.random.key(1))
  assert int(new.num_updates) == 1 and int(new.step) == 1
  # Three normalised steps of 0.1: at most 0.3, more than one step (the direction turns between
  # steps: each ascent step draws its own dropout mask).
  assert 0.1 < float(m["delta_l2_mean"]) <= 0.3 + 1e-5
  assert float(m["loss_final_delta"]) > float(m["loss_delta0"])  # ascent raised the loss


def test_input_perturbation_builds_x_t_from_perturbed_noise_and_keeps_the_target():
  config, _, diffusion, _, state, batch, _ = _step_setup()
  key = jax.random.key(5)
  clean_inputs, _ = step_lib.minibatch_inputs(state, batch, key, diffusion, step_settings(config))
  config.diffusion.input_perturbation = 0.15
  ip_inputs, _ = step_lib.minibatch_inputs(state, batch, key, diffusion, step_settings(config))
  np.testing.assert_array_equal(ip_inputs.noise, clean_inputs.noise)  # target ε unchanged
  xi = losses.input_perturbation_noise(clean_inputs.noise, jax.random.fold_in(key, 1001), 0.15)
  np.testing.assert_allclose(ip_inputs.x_t, diffusion.q_sample(clean_inputs.x_start,
                                                               clean_inputs.t, xi), atol=1e-6)
  assert float(jnp.max(jnp.abs(ip_inputs.x_t - clean_inputs.x_t))) > 1e-3


# ---------------------------------------------------------------------------------------------
# Runs: device-count invariance and exact resume with a carried δ
# ---------------------------------------------------------------------------------------------

AT_OVERRIDES = ("--config.adversarial.mode=fast", "--config.adversarial.num_replays=2",
                "--config.adversarial.init=carry", "--config.optim.learning_rate=1e-4",
                "--config.train.async_checkpointing=False", "--config.train.checkpoint_every=2")


def test_at_runs_equal_on_one_and_eight_devices_and_resume_exactly(tmp_path):
  run_utils.run_main(str(tmp_path / "one"), *AT_OVERRIDES, "--config.train.num_steps=4")
  run_utils.run_main(str(tmp_path / "eight"), *AT_OVERRIDES, "--config.train.num_steps=4",
                     num_devices=8)
  # As if stopped after checkpoint 2; resumed to 4 in a new process: δ comes back from it.
  run_utils.copy_as_stopped_at(str(tmp_path / "one"), str(tmp_path / "resumed"), 2)
  run_utils.run_main(str(tmp_path / "resumed"), *AT_OVERRIDES, "--config.train.num_steps=4")
  one = run_utils.read_checkpoint(str(tmp_path / "one"), 4)
  eight = run_utils.read_checkpoint(str(tmp_path / "eight"), 4)
  resumed = run_utils.read_checkpoint(str(tmp_path / "resumed"), 4)
  assert int(one["train"]["num_updates"]) == 8
  assert float(np.abs(one["train"]["delta"]).max()) > 0  # δ is carried and non-trivial
  assert run_utils.max_abs_diff(one["model"], eight["model"]) <= 1e-5
  assert run_utils.max_abs_diff(one["train"]["delta"], eight["train"]["delta"]) <= 1e-4
  assert run_utils.max_abs_diff(one["model"], resumed["model"]) == 0.0
  assert run_utils.max_abs_diff(one["train"], resumed["train"]) == 0.0
