"""adv_diffusion/train_step.py: the step's δ-search variants (clean, Free-AT replays, PGD), its
minibatch inputs (ADM-IP) and a consistency-distillation step, built from `StepSettings`."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adv_diffusion import losses
from adv_diffusion import train_step as step_lib
from modes import parallel, train_programs
from modes.factories import (
    create_diffusion,
    create_optimizer,
    create_unet,
    learning_rate_schedule,
    step_settings,
)
from tests import run_utils
from tests.configs import tiny_digits


def _step_setup(tx=None, consistency: dict | None = None, configure=None, **adv):
  """A tiny UNet, the step's settings, a train state, one batch and the jitted step for the
  given AT settings (`adv`: fields of `AdversarialSettings`) and `config.consistency`
  overrides (the perturbed params then also start the target); `configure(config)` edits any
  other key of the tiny config first (optimizer, diffusion, model).

  `tx` replaces AdamW: tests that compare two computations of the same update use plain SGD,
  because Adam's first update is ±lr for any non-zero gradient and so blows float32 rounding
  noise of mathematically-zero gradients (biases of convs feeding a GroupNorm) up to lr.
  """
  config = tiny_digits.get_config()
  config.train.batch_size = 8
  config.consistency.update(consistency or {})
  if configure is not None:
    configure(config)
  settings = step_settings(config)
  settings = dataclasses.replace(
      settings, adversarial=dataclasses.replace(settings.adversarial, **adv)
  )
  mesh = parallel.make_mesh()
  model = create_unet(config)
  diffusion = create_diffusion(config)
  tx = tx or create_optimizer(config.optim)
  init = functools.partial(
      step_lib.init_train_state,
      model,
      tx,
      settings=settings,
      image_shape=train_programs.image_shape(config),
      batch_size=config.train.batch_size,
      num_timesteps=config.diffusion.num_timesteps,
      timestep_history=config.diffusion.sampler_history,
  )
  key = jax.random.key(0)
  state = jax.jit(
      init, out_shardings=train_programs.state_shardings(jax.eval_shape(init, key), mesh)
  )(key)
  # Move the zero-initialised output layers so that δ has a gradient from the first step.
  state = state.replace(params=_perturbed(state.params))
  state = state.replace(ema_params=tuple(state.params for _ in state.ema_params))
  if state.target_params is not None:
    state = state.replace(target_params=state.params)
  rng = np.random.default_rng(0)
  batch = parallel.global_batch_from_local(
      {
          "image": rng.integers(0, 256, (8, 16, 16, 1), dtype=np.uint8),
          "label": np.zeros((8,), np.int32),
      },
      mesh,
  )
  step = jax.jit(
      functools.partial(
          step_lib.train_step,
          model=model,
          diffusion=diffusion,
          tx=tx,
          settings=settings,
          learning_rate_fn=learning_rate_schedule(config.optim),
      )
  )
  return settings, model, diffusion, tx, state, batch, step


@jax.jit
def _perturbed(params):
  return jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(3), p.shape), params)


# A copy of a whole state in one program (op by op, every leaf shape would compile its own; the
# outputs of a jitted function never alias its non-donated inputs).
_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


def _float_images(batch: dict) -> dict:
  """The batch with float32 pixel values (the step preprocesses uint8 and float32 alike)."""
  return {**batch, "image": jnp.asarray(batch["image"], jnp.float32)}


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
  settings, model, diffusion, tx, state, batch, fast_step = _step_setup(
      tx=optax.sgd(0.1), mode="fast", num_replays=3, step_size=0.0
  )
  key = jax.random.key(42)
  new, metrics = fast_step(_copy(state), batch, key)
  assert int(new.step) == 1 and int(new.num_updates) == 3
  assert int(metrics["optimizer_updates"]) == 3
  assert float(metrics["delta_l2_max"]) == 0.0

  # Replay the three clean updates by hand with the same t, ε and per-replay dropout keys.
  step_key = jax.random.fold_in(key, state.step)
  inputs, dropout_key = step_lib.minibatch_inputs(state, batch, step_key, diffusion, settings)

  def apply_fn(p, x, ts, labels, k):
    return model.apply({"params": p}, x, ts, labels, train=True, rngs={"dropout": k})

  @jax.jit  # one compiled update for the three replays (op by op, the UNet's grad is slow)
  def clean_update(manual, k):
    grads = jax.grad(
        lambda p: losses.diffusion_loss(
            p,
            jnp.zeros_like(inputs.x_t),
            inputs,
            k,
            apply_fn=apply_fn,
            diffusion=diffusion,
            learn_sigma=True,
            loss_type="rescaled_mse",
        )[0]
    )(manual.params)
    return step_lib.apply_gradients(manual, grads, tx, settings.ema_rates)

  manual, params_seen = _copy(state), []
  for k in step_lib.replay_dropout_keys(dropout_key, 3):
    manual = clean_update(manual, k)
    params_seen.append(manual.params)
  assert run_utils.max_abs_diff(manual.params, new.params) <= 1e-6
  # EMA arithmetic: three EMA updates, e3 = r³e0 + (1−r)(r²p1 + r·p2 + p3), for each rate.
  for rate, ema0, ema3 in zip(settings.ema_rates, state.ema_params, new.ema_params):
    expected = jax.tree.map(  # in numpy: float32 arithmetic without an XLA program per leaf
        lambda e, p1, p2, p3: rate**3 * e + (1 - rate) * (rate**2 * p1 + rate * p2 + p3),
        *jax.device_get((ema0, *params_seen)),
    )
    assert run_utils.max_abs_diff(expected, ema3) <= 1e-6


@pytest.mark.parametrize(
    "adv",
    [
        dict(mode="none"),
        # The settings of test_fast_step_moves_delta_and_reports_its_metrics: one program.
        dict(mode="fast", num_replays=3, step_size=0.1),
        dict(mode="pgd", pgd_steps=1, step_size=0.1, init="carry"),
    ],
    ids=["clean", "fast_3_replays", "pgd_carry"],
)
def test_a_nonfinite_minibatch_leaves_the_whole_state_as_it_was(adv):
  # A NaN pixel makes the loss non-finite: θ, the EMAs, AdamW's moments and count, the timestep
  # history and a carried δ (PGD's, init "carry") stay bit for bit what they were — for fast AT
  # after all K replays, whose K − 1 earlier updates are undone too — and only `step` and
  # `skipped_updates` advance.
  _, _, _, _, state, batch, step = _step_setup(**adv)
  key = jax.random.key(42)
  batch = _float_images(batch)  # one program for the good and the bad batch
  images = batch["image"]
  state, _ = step(state, batch, key)  # Adam's count, moments and δ non-zero
  assert int(state.skipped_updates) == 0 and int(state.opt_state[0].count) == state.num_updates
  if state.delta is not None:
    assert float(jnp.max(jnp.abs(state.delta))) > 0.0
  skipped, metrics = step(state, {**batch, "image": images.at[0, 3, 3, 0].set(jnp.nan)}, key)
  assert not np.isfinite(float(metrics["loss"]))
  assert int(skipped.step) == int(state.step) + 1 and int(skipped.skipped_updates) == 1
  assert int(metrics["optimizer_updates"]) == int(skipped.num_updates) == int(state.num_updates)
  assert int(skipped.opt_state[0].count) == int(state.opt_state[0].count)
  counters = dict(step=0, skipped_updates=0)
  same = jax.tree.map(
      lambda a, b: np.asarray(a).tobytes() == np.asarray(b).tobytes(),
      state.replace(**counters),
      skipped.replace(**counters),
  )
  assert all(jax.tree.leaves(same))


def test_fast_step_moves_delta_and_reports_its_metrics():
  _, _, _, _, state, batch, fast_step = _step_setup(mode="fast", num_replays=3, step_size=0.1)
  # Float32 pixels: the program of test_a_nonfinite_minibatch_leaves_the_whole_state_as_it_was.
  new, m = fast_step(_copy(state), _float_images(batch), jax.random.key(1))
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
  settings, _, diffusion, _, state, batch, _ = _step_setup()
  key = jax.random.key(5)
  clean_inputs, _ = step_lib.minibatch_inputs(state, batch, key, diffusion, settings)
  ip_settings = dataclasses.replace(settings, input_perturbation=0.15)
  ip_inputs, _ = step_lib.minibatch_inputs(state, batch, key, diffusion, ip_settings)
  np.testing.assert_array_equal(ip_inputs.noise, clean_inputs.noise)  # target ε unchanged
  xi = losses.input_perturbation_noise(clean_inputs.noise, jax.random.fold_in(key, 1001), 0.15)
  np.testing.assert_allclose(
      ip_inputs.x_t, diffusion.q_sample(clean_inputs.x_start, clean_inputs.t, xi), atol=1e-6
  )
  assert float(jnp.max(jnp.abs(ip_inputs.x_t - clean_inputs.x_t))) > 1e-3


# ---------------------------------------------------------------------------------------------
# Consistency distillation
# ---------------------------------------------------------------------------------------------


def _cd_step_setup(tx, **adv):
  """Tiny UNet CD whose teacher, student and target network are one perturbed init."""
  settings, model, diffusion, _, state, batch, step = _step_setup(
      tx, consistency=dict(mode="distill", teacher="unused", num_scales=10), **adv
  )
  return settings, model, diffusion, state, state.params, batch, step


def test_pgd_with_step_size_zero_is_plain_cd_and_target_follows_the_ema():
  sgd = optax.sgd(1.0)
  _, _, _, state, teacher, batch, plain = _cd_step_setup(sgd, mode="none")
  _, _, _, _, _, _, at_zero = _cd_step_setup(sgd, mode="pgd", pgd_steps=2, step_size=0.0)
  key = jax.random.key(5)
  a, metrics_a = plain(_copy(state), batch, key, teacher)
  b, metrics_b = at_zero(_copy(state), batch, key, teacher)
  moved = run_utils.max_abs_diff(a.params, state.params)
  assert moved > 1e-4
  assert float(metrics_a["loss"]) == float(metrics_b["loss"])
  assert run_utils.max_abs_diff(a.params, b.params) == 0.0
  # θ⁻ ← 0.95·θ⁻ + 0.05·θ after the update (config default μ = 0.95).
  expected_target = jax.tree.map(  # in numpy: no XLA program per leaf
      lambda t, p: 0.95 * t + 0.05 * p, *jax.device_get((state.target_params, a.params))
  )
  assert run_utils.max_abs_diff(a.target_params, expected_target) <= 1e-6  # 1 ulp at |θ| ~ 1


# ---------------------------------------------------------------------------------------------
# Paths real configs take (issue 16): ℓ∞ balls, random δ starts, the ddim_gap radius, warm-up,
# gradient clipping and the importance sampler after its warm-up, all through `train_step`.
# ---------------------------------------------------------------------------------------------


def _apply_fn(model):
  def apply_fn(p, x, ts, labels, k):
    return model.apply({"params": p}, x, ts, labels, train=True, rngs={"dropout": k})

  return apply_fn


def _hand_loss(model, diffusion, settings, params, delta, inputs, dropout_key):
  """The step's minibatch loss at δ, computed outside it."""
  return losses.diffusion_loss(
      params,
      delta,
      inputs,
      dropout_key,
      apply_fn=_apply_fn(model),
      diffusion=diffusion,
      learn_sigma=True,
      loss_type="rescaled_mse",
      target_type=settings.adversarial.target,
  )[0]


def test_linf_pgd_stays_in_the_box_and_ascends_by_sign():
  # PGD-2 from δ = 0 (init "carry": the state's δ starts at zero and keeps the final δ), η = 0.06,
  # ρ = 0.1: δ₁ = clip(η·sign(g₀), ±ρ), δ₂ = clip(δ₁ + η·sign(g₁), ±ρ) ∈ {0, ±ρ} per pixel.
  eta, rho = 0.06, 0.1
  settings, model, diffusion, _, state, batch, step = _step_setup(
      mode="pgd", pgd_steps=2, step_size=eta, radius=rho, norm="linf", init="carry"
  )
  key = jax.random.key(7)
  new, _ = step(_copy(state), batch, key)
  delta = np.asarray(new.delta)
  assert np.max(np.abs(delta)) <= rho * (1 + 1e-6)  # every pixel in the ℓ∞ ball
  inputs, dropout_key = step_lib.minibatch_inputs(
      state, batch, jax.random.fold_in(key, state.step), diffusion, settings
  )
  grad_delta = jax.jit(
      jax.grad(lambda d, k: _hand_loss(model, diffusion, settings, state.params, d, inputs, k))
  )
  keys = [jax.random.fold_in(dropout_key, 10_000 + j) for j in range(2)]
  d1 = jnp.clip(eta * jnp.sign(grad_delta(jnp.zeros_like(inputs.x_t), keys[0])), -rho, rho)
  d2 = np.asarray(jnp.clip(d1 + eta * jnp.sign(grad_delta(d1, keys[1])), -rho, rho))
  np.testing.assert_allclose(delta, d2, rtol=0, atol=1e-7)
  # Both outcomes of a sign-based ascent occur: the clip at ±ρ and the cancellation to 0.
  assert 0.2 < np.mean(np.abs(delta) > rho / 2) < 0.95


def test_random_start_has_norm_sqrt_d_times_magnitude():
  # Fast AT with K = 1: the one forward pass is at δ₀ itself, so the step's δ metrics and loss
  # are those of the random start (ℓ2: a random direction of norm sqrt(d)·init_magnitude, inside
  # the ball sqrt(d)·ρ so the projection leaves it).
  magnitude, rho = 0.05, 0.1
  settings, model, diffusion, _, state, batch, step = _step_setup(
      mode="fast", num_replays=1, init="random", init_magnitude=magnitude, radius=rho
  )
  key = jax.random.key(11)
  _, metrics = step(_copy(state), batch, key)
  sqrt_d = np.sqrt(16 * 16 * 1)
  # mean = max = sqrt(d)·m: every example's norm is sqrt(d)·m.
  assert float(metrics["delta_l2_max"]) == pytest.approx(sqrt_d * magnitude, rel=1e-5)
  assert float(metrics["delta_l2_mean"]) == pytest.approx(sqrt_d * magnitude, rel=1e-5)
  # The loss is the loss at the δ₀ drawn from the step's own δ stream, not at δ = 0.
  step_key = jax.random.fold_in(key, state.step)
  inputs, dropout_key = step_lib.minibatch_inputs(state, batch, step_key, diffusion, settings)
  delta0 = jax.random.normal(jax.random.fold_in(step_key, step_lib._DELTA_STREAM), inputs.x_t.shape)
  delta0 = delta0 / jnp.sqrt(jnp.sum(delta0**2, axis=(1, 2, 3), keepdims=True)) * sqrt_d * magnitude
  hand = jax.jit(
      lambda d: _hand_loss(model, diffusion, settings, state.params, d, inputs, dropout_key)
  )
  assert float(metrics["loss"]) == pytest.approx(float(hand(delta0)), rel=1e-5)
  assert abs(float(hand(delta0)) - float(hand(jnp.zeros_like(delta0)))) > 1e-4 * float(hand(delta0))


def test_ddim_gap_radius_is_the_per_example_ball():
  # One normalised ascent step far longer than the ball (η = 100) from δ = 0 lands on the sphere
  # of each example's radius: ‖δ_i‖ = sqrt(d)·r_{t_i}, r_t = adversarial.ddim_gap_radius.
  from adv_diffusion import adversarial

  rho = 0.5
  settings, _, diffusion, _, state, batch, step = _step_setup(
      mode="fast",
      num_replays=1,
      init="carry",
      step_size=100.0,
      radius=rho,
      radius_schedule="ddim_gap",
  )
  key = jax.random.key(13)
  new, _ = step(_copy(state), batch, key)
  inputs, _ = step_lib.minibatch_inputs(
      state, batch, jax.random.fold_in(key, state.step), diffusion, settings
  )
  r_t = np.asarray(
      adversarial.ddim_gap_radius(
          diffusion.alphas_cumprod, inputs.t, rho, settings.adversarial.radius_grid_steps
      )
  )
  norms = np.asarray(adversarial.per_example_norm(new.delta))
  np.testing.assert_allclose(norms, np.sqrt(256) * r_t, rtol=1e-5)
  # The schedule matters here: some drawn t have a gap below ρ, and the radii differ.
  assert np.min(r_t) < 0.9 * rho and np.ptp(r_t) > 0.05


def test_learning_rate_warmup_through_the_step():
  def configure(config):
    config.optim.warmup_steps = 4

  _, _, _, _, state, batch, step = _step_setup(configure=configure, mode="none")
  key = jax.random.key(2)
  rates, params = [], [state.params]
  for _ in range(3):
    state, metrics = step(state, batch, key)
    rates.append(float(metrics["learning_rate"]))
    params.append(state.params)
  # Linear from 0 to 1e-3 over 4 optimizer updates: the rate of updates 0, 1, 2.
  np.testing.assert_allclose(rates, [0.0, 2.5e-4, 5e-4], rtol=1e-6, atol=0)
  # The rate is the one applied: update 0 (rate 0) leaves the weights exactly, update 1 moves.
  assert run_utils.max_abs_diff(params[0], params[1]) == 0.0
  assert run_utils.max_abs_diff(params[1], params[2]) > 1e-5


def test_gradient_clipping_is_the_clipped_adamw_update():
  clip = 1e-6  # far below the gradient norm: the clipped update is tiny

  def configure(config):
    config.optim.grad_clip_norm = clip

  settings, model, diffusion, _, state, batch, step = _step_setup(configure=configure)
  key = jax.random.key(3)
  new, metrics = step(_copy(state), batch, key)
  inputs, dropout_key = step_lib.minibatch_inputs(
      state, batch, jax.random.fold_in(key, state.step), diffusion, settings
  )
  grads = jax.jit(
      jax.grad(lambda p: _hand_loss(model, diffusion, settings, p, None, inputs, dropout_key))
  )(state.params)
  assert float(metrics["grad_norm"]) > 1e3 * clip  # the metric is the unclipped norm

  @functools.partial(jax.jit, static_argnums=0)  # one program per optimizer, not per leaf
  def by_hand(tx):
    updates, _ = tx.update(grads, tx.init(state.params), state.params)
    return optax.apply_updates(state.params, updates)

  adamw = optax.adamw(1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
  clipped = by_hand(optax.chain(optax.clip_by_global_norm(clip), adamw))
  unclipped = by_hand(adamw)
  # Measured: the step and the hand computation differ by 1 float32 ulp of the weights
  # (1.5e-8 at |θ| < 0.25); the clipped and unclipped updates by ~1e-3.
  tolerance = 6e-8
  assert run_utils.max_abs_diff(new.params, clipped) <= tolerance
  assert run_utils.max_abs_diff(unclipped, clipped) > 1e3 * tolerance


def test_importance_sampler_after_its_warmup_inside_training():
  from adv_diffusion import timestep_sampler

  num_t, history = 20, 2

  def configure(config):
    config.diffusion.num_timesteps = num_t
    config.diffusion.sampler_history = history

  settings, _, diffusion, _, state, batch, step = _step_setup(configure=configure)
  assert settings.timestep_sampler == "loss-second-moment"
  key = jax.random.key(4)
  for _ in range(80):  # 8 draws per step: every t has 2 losses after ~15 steps
    state, _ = step(state, batch, key)
    if bool(jnp.all(state.sampler_state.loss_counts == history)):
      break
  counts = np.asarray(state.sampler_state.loss_counts)
  assert np.all(counts == history), counts
  w = np.asarray(
      timestep_sampler.timestep_weights(
          state.sampler_state, "loss-second-moment", settings.timestep_uniform_prob
      ),
      np.float64,
  )
  p = w / w.sum()
  # sqrt(E[L_t²]) over the two recorded losses, mixed with 0.1 % uniform (IDDPM Eq. 18).
  hist = np.asarray(state.sampler_state.loss_history, np.float64)
  expected = np.sqrt(np.mean(hist**2, axis=1))
  expected = expected / expected.sum() * (1 - 0.001) + 0.001 / num_t
  np.testing.assert_allclose(p, expected, rtol=1e-5)
  assert p.max() / p.min() > 2  # no longer uniform
  # The next step draws t and weights from that distribution.
  inputs, _ = step_lib.minibatch_inputs(
      state, batch, jax.random.fold_in(key, state.step), diffusion, settings
  )
  t = np.asarray(inputs.t)
  np.testing.assert_allclose(np.asarray(inputs.weights), 1 / (num_t * p[t]), rtol=1e-5)
  draws = np.asarray(
      jax.vmap(
          lambda k: timestep_sampler.sample_timesteps(
              k, state.sampler_state, 8, "loss-second-moment", 0.001
          )[0]
      )(jax.random.split(jax.random.key(9), 5000))
  ).reshape(-1)
  freq = np.bincount(draws, minlength=num_t) / draws.size
  # 40,000 draws: each frequency within 5 binomial standard deviations of p_t.
  assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / draws.size) + 1e-4)
