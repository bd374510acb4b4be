"""Train state and the pure, jit-able train step: clean ADM, fast AT, PGD AT and consistency models.

One step = one minibatch: draw t (ADM's timestep sampler) and ε, build x_t, then the δ search of
`settings.adversarial.mode` around ADM's hybrid loss (or the CD/CT loss), AdamW and EMA updates.
All randomness of step s comes from fold_in(root_key, s), drawn with global shapes, so the
numbers do not depend on the device count and a resumed run repeats an uninterrupted one.
The step reads `StepSettings` and gets the learning-rate function as an argument; the state and
its updates are `adv_diffusion.train_state`; compiling the step over a device mesh is
`modes.train`'s job.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from adv_diffusion import consistency
from adv_diffusion.adversarial import (
    example_radius,
    free_at_replays,
    init_delta,
    per_example_norm,
    pgd_search,
)
from adv_diffusion.diffusion import GaussianDiffusion
from adv_diffusion.losses import MinibatchInputs, diffusion_loss, input_perturbation_noise
from adv_diffusion.settings import StepSettings
from adv_diffusion.timestep_sampler import sample_timesteps, update_timestep_history
from adv_diffusion.train_state import (
    TrainState,
    apply_gradients,
    ema_update,
    init_params,
    init_train_state,
    preprocess_images,
    tree_all_finite,
    updated_params,
)

__all__ = [
    "StepResult",
    "TrainState",
    "apply_gradients",
    "ema_update",
    "init_params",
    "init_train_state",
    "minibatch_inputs",
    "preprocess_images",
    "replay_dropout_keys",
    "train_step",
    "tree_all_finite",
]


@dataclasses.dataclass(frozen=True)
class StepResult:
  """One δ search's outcome inside a step."""

  state: TrainState  # before the step's last optimizer update, which `train_step` makes
  loss: jax.Array  # the minibatch loss of the last forward pass
  terms: dict[str, jax.Array]  # its per-example loss terms
  grads: Any  # its θ-gradient
  metrics: dict[str, jax.Array] = dataclasses.field(default_factory=dict)  # δ statistics
  next_delta: jax.Array | None = None  # δ for the next minibatch (init "carry")


def _updater(
    tx: optax.GradientTransformation, settings: StepSettings, t: jax.Array
) -> Callable[[TrainState, Any, dict[str, jax.Array]], TrainState]:
  """update(state, grads, terms): ADM's timestep history fed with the pass's per-example losses,
  then `apply_gradients` with the rates of `settings`."""
  feed_history = (
      settings.timestep_sampler == "loss-second-moment" and not settings.consistency.enabled
  )

  def update(state, grads, terms):
    if feed_history:
      state = state.replace(
          sampler_state=update_timestep_history(
              state.sampler_state, t, jax.lax.stop_gradient(terms["loss"])
          )
      )
    target_rate = None
    if state.target_params is not None:
      target_rate = consistency.target_ema_rate(settings.consistency, state.num_updates)
    return apply_gradients(state, grads, tx, settings.ema_rates, target_rate)

  return update


# ---------------------------------------------------------------------------------------------
# Minibatch inputs
# ---------------------------------------------------------------------------------------------

# Independent random streams of a step key beyond the four of `minibatch_inputs`.
_IP_STREAM, _DELTA_STREAM = 1001, 1002


def minibatch_inputs(
    state: TrainState,
    batch: dict[str, jax.Array],
    key: jax.Array,
    diffusion: GaussianDiffusion,
    settings: StepSettings,
) -> tuple[MinibatchInputs, jax.Array]:
  """Draws t (ADM's sampler) and ε once for the minibatch; returns them and the dropout key."""
  k_t, k_noise, k_dropout, k_flip = jax.random.split(key, 4)
  x_start = preprocess_images(batch["image"], k_flip if settings.random_flip else None)
  t, weights = sample_timesteps(
      k_t,
      state.sampler_state,
      x_start.shape[0],
      settings.timestep_sampler,
      settings.timestep_uniform_prob,
  )
  noise = jax.random.normal(k_noise, x_start.shape, jnp.float32)
  noise_in = noise
  if settings.input_perturbation > 0:
    noise_in = input_perturbation_noise(
        noise, jax.random.fold_in(key, _IP_STREAM), settings.input_perturbation
    )
  inputs = MinibatchInputs(
      x_start=x_start,
      x_t=diffusion.q_sample(x_start, t, noise_in),
      t=t,
      noise=noise,
      weights=weights,
      sigma=jnp.asarray(diffusion.sqrt_one_minus_alphas_cumprod, jnp.float32)[t],
      labels=batch["label"] if settings.conditional else None,
  )
  return inputs, k_dropout


def _consistency_setup(
    state: TrainState,
    batch: dict[str, jax.Array],
    key: jax.Array,
    teacher_params: Any,
    lpips_params: Any,
    apply_fn: Callable,
    model: nn.Module,
    diffusion: GaussianDiffusion,
    settings: StepSettings,
) -> tuple[MinibatchInputs, jax.Array, Callable]:
  """Minibatch inputs (incl. the target), dropout key and loss of a consistency model."""
  k_inputs, k_dropout, k_flip = jax.random.split(key, 3)
  x_start = preprocess_images(batch["image"], k_flip if settings.random_flip else None)
  labels = batch["label"] if settings.conditional else None

  def eval_fn(params, x, t, labels):
    return model.apply({"params": params}, x, t, labels, train=False)

  inputs = consistency.consistency_inputs(
      x_start,
      labels,
      k_inputs,
      target_params=state.target_params,
      teacher_params=teacher_params,
      eval_fn=eval_fn,
      alphas_cumprod=diffusion.alphas_cumprod,
      cm=settings.consistency,
  )
  loss_fn = functools.partial(
      consistency.consistency_loss,
      apply_fn=apply_fn,
      alphas_cumprod=diffusion.alphas_cumprod,
      cm=settings.consistency,
      lpips_params=lpips_params,
  )
  return inputs, k_dropout, loss_fn


# ---------------------------------------------------------------------------------------------
# The three δ searches
# ---------------------------------------------------------------------------------------------


def _clean_step(state, inputs, dropout_key, loss_fn) -> StepResult:
  """Plain ADM: one forward/backward (for the step's one update)."""
  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, None, inputs, dropout_key
  )
  return StepResult(state, loss, terms, grads)


def replay_dropout_keys(dropout_key: jax.Array, count: int) -> jax.Array:
  """Replay r uses fold_in(key, r) for r ≥ 1 and the step's own key for r = 0, so a single
  replay is exactly the clean step."""
  return jnp.stack([dropout_key] + [jax.random.fold_in(dropout_key, r) for r in range(1, count)])


def _delta_metrics(delta, grad_delta0, loss0, loss_final, inputs, init: str) -> dict:
  norms = per_example_norm(delta)
  metrics = {
      "delta_l2_mean": jnp.mean(norms),
      "delta_l2_max": jnp.max(norms),
      "grad_delta_l2_mean": jnp.mean(per_example_norm(grad_delta0)),
      "loss_final_delta": loss_final,
      # RMS per pixel of the target shift δ/σ_t (ε itself has RMS 1).
      "target_shift_rms": jnp.mean(norms / inputs.sigma) / jnp.sqrt(float(delta[0].size)),
  }
  if init == "zero":  # the first forward pass is at δ = 0 for free
    metrics["loss_delta0"] = loss0
  return metrics


def _fast_step(state, inputs, dropout_key, loss_fn, update, settings, delta0, radius) -> StepResult:
  """Fast AT: `adversarial.free_at_replays` over K replays of the minibatch (K − 1 updates here,
  the K-th is the step's last)."""
  adv = settings.adversarial
  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
  state, next_delta, replays = free_at_replays(
      state,
      delta0,
      replay_dropout_keys(dropout_key, adv.num_replays),
      loss_and_grads=lambda s, delta, key: grad_fn(s.params, delta, inputs, key),
      update=update,
      step_size=adv.step_size,
      radius=radius,
      norm=adv.norm,
      update_last=False,
  )
  last = lambda tree: jax.tree.map(lambda x: x[-1], tree)  # noqa: E731
  metrics = _delta_metrics(
      replays.delta[-1], replays.grad_delta[0], replays.loss[0], replays.loss[-1], inputs, adv.init
  )
  return StepResult(
      state, replays.loss[-1], last(replays.terms), last(replays.grads), metrics, next_delta
  )


def _pgd_step(state, inputs, dropout_key, loss_fn, update, settings, delta0, radius) -> StepResult:
  """PGD-k AT: `adversarial.pgd_search` with θ fixed, then the forward/backward of the step's one
  update at the final δ."""
  adv = settings.adversarial
  delta_grad_fn = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)

  def delta_loss_and_grad(delta, key):
    (loss, _), grad_delta = delta_grad_fn(state.params, delta, inputs, key)
    return loss, grad_delta

  ascent_keys = jnp.stack(
      [jax.random.fold_in(dropout_key, 10_000 + j) for j in range(adv.pgd_steps)]
  )
  delta, ascent_losses, grad_deltas = pgd_search(
      delta0,
      ascent_keys,
      delta_loss_and_grad=delta_loss_and_grad,
      step_size=adv.step_size,
      radius=radius,
      norm=adv.norm,
  )
  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, delta, inputs, dropout_key
  )
  metrics = _delta_metrics(delta, grad_deltas[0], ascent_losses[0], loss, inputs, adv.init)
  return StepResult(state, loss, terms, grads, metrics, delta)


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------


def _last_update(
    start: TrainState,
    result: StepResult,
    update: Callable,
    tx: optax.GradientTransformation,
    carry: bool,
    one_update: bool,
) -> tuple[TrainState, jax.Array]:
  """The step's last optimizer update of `result.state` with the final pass's gradient, or
  `start` as it was when that pass's loss or the updated parameters are not finite.

  The verdict comes first, from the updated parameters alone (`updated_params`: the update's
  own arithmetic, which XLA fuses into the finiteness reduction). A step of one update then
  makes it inside `lax.cond`, whose other branch passes `start` through: no second copy of the
  state is ever computed beside the donated one, the update writes in place, and only the
  gradient is held until the verdict. After K ≥ 2 fast-AT replays the state of replay K − 1 is
  a copy of the state anyway (a skip must undo all K updates, so `start` stays alive beside it):
  there a select per element writes the result over the donated `start` in place (a `lax.cond`
  measured worse there: its result cannot share a buffer with both the copy and `start`).
  """
  prev, grads = result.state, result.grads
  ok = jnp.isfinite(result.loss) & tree_all_finite(updated_params(prev, grads, tx))

  def accept() -> TrainState:
    state = update(prev, grads, result.terms)
    return state.replace(delta=result.next_delta) if carry else state

  if one_update:
    return jax.lax.cond(ok, accept, lambda: start), ok
  return jax.tree.map(lambda new, old: jnp.where(ok, new, old), accept(), start), ok


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    root_key: jax.Array,
    teacher_params: Any = None,
    lpips_params: Any = None,
    *,
    model: nn.Module,
    diffusion: GaussianDiffusion,
    tx: optax.GradientTransformation,
    settings: StepSettings,
    learning_rate_fn: optax.Schedule,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One minibatch iteration (`settings.adversarial.mode`: none | fast | pgd); scalar metrics.

  Diffusion models (consistency mode "none") use ADM's hybrid loss; consistency models the
  CD/CT loss with `teacher_params` (CD) and, for the "lpips" distance, the LPIPS network
  `lpips_params` — the δ search is the same code for both. Both are frozen weights passed as
  arguments (not baked into the program as constants); None when unused.

  A minibatch whose loss or updated parameters are not finite leaves the state as it was
  (apart from the step and `skipped_updates` counters): a bad update never reaches the state.
  """
  start = state
  key = jax.random.fold_in(root_key, state.step)

  def apply_fn(params, x, timesteps, labels, dropout_key):
    return model.apply(
        {"params": params}, x, timesteps, labels, train=True, rngs={"dropout": dropout_key}
    )

  adv = settings.adversarial
  if not settings.consistency.enabled:
    inputs, dropout_key = minibatch_inputs(state, batch, key, diffusion, settings)
    loss_fn = functools.partial(
        diffusion_loss,
        apply_fn=apply_fn,
        diffusion=diffusion,
        learn_sigma=settings.learn_sigma,
        loss_type=settings.loss_type,
        target_type=adv.target,
    )
  else:
    inputs, dropout_key, loss_fn = _consistency_setup(
        state, batch, key, teacher_params, lpips_params, apply_fn, model, diffusion, settings
    )
  update = _updater(tx, settings, inputs.t)
  updates_before = state.num_updates
  if adv.mode == "none":
    result = _clean_step(state, inputs, dropout_key, loss_fn)
  else:
    radius = example_radius(
        diffusion.alphas_cumprod, inputs.t, adv.radius, adv.radius_schedule, adv.radius_grid_steps
    )
    delta0 = init_delta(
        jax.random.fold_in(key, _DELTA_STREAM),
        inputs.x_t.shape,
        init=adv.init,
        norm=adv.norm,
        magnitude=adv.init_magnitude,
        radius=radius,
        carried=state.delta,
    )
    search = _fast_step if adv.mode == "fast" else _pgd_step
    result = search(state, inputs, dropout_key, loss_fn, update, settings, delta0, radius)
  carry = adv.mode != "none" and adv.init == "carry"
  one_update = adv.mode != "fast" or adv.num_replays == 1
  state, update_ok = _last_update(start, result, update, tx, carry, one_update)
  state = state.replace(skipped_updates=start.skipped_updates + (~update_ok).astype(jnp.int32))
  metrics = {
      "loss": result.loss,
      **{name: jnp.mean(value) for name, value in result.terms.items() if name != "loss"},
      "grad_norm": optax.tree.norm(result.grads),
      "learning_rate": learning_rate_fn(updates_before),
      "optimizer_updates": state.num_updates,
      "skipped_updates": state.skipped_updates,
      # False only when the state was already non-finite before this step (e.g. bad weights
      # from init_from): such a state is never checkpointed.
      "params_finite": tree_all_finite(state.params),
      **result.metrics,
  }
  return state.replace(step=state.step + 1), metrics
