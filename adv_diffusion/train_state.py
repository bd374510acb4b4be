"""The train state: construction, preprocessing, optimizer and EMA updates (pure functions)."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from adv_diffusion.settings import StepSettings
from adv_diffusion.timestep_sampler import TimestepHistory, init_timestep_history


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # minibatch iterations done (int32 scalar)
  num_updates: jax.Array  # optimizer updates done: = step, or K·step for "fast" AT
  params: Any  # float32 network parameters
  ema_params: tuple[Any, ...]  # one parameter average per rate of StepSettings.ema_rates
  opt_state: Any  # optax state
  # ADM's timestep importance-sampler loss history (the name is the checkpoint's key).
  sampler_state: TimestepHistory
  delta: jax.Array | None  # δ carried to the next minibatch (adversarial init = "carry")
  skipped_updates: jax.Array  # minibatches dropped for a non-finite loss or update (int32)
  target_params: Any  # consistency models: target network θ⁻ (EMA of params); None for DPMs


def init_params(
    model: nn.Module, image_shape: tuple[int, int, int], conditional: bool, key: jax.Array
) -> Any:
  """Network parameters for NHWC images of `image_shape` (H, W, C)."""
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  y = jnp.zeros((1,), jnp.int32) if conditional else None
  return model.init({"params": key}, x, t, y, train=False)["params"]


def init_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    key: jax.Array,
    *,
    settings: StepSettings,
    image_shape: tuple[int, int, int],
    batch_size: int,
    num_timesteps: int,
    timestep_history: int,
) -> TrainState:
  """A fresh state: new parameters, EMAs equal to them, empty timestep history, δ = 0."""
  params = init_params(model, image_shape, settings.conditional, key)
  adv = settings.adversarial
  carry = adv.mode != "none" and adv.init == "carry"
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      num_updates=jnp.zeros((), jnp.int32),
      delta=jnp.zeros((batch_size,) + tuple(image_shape), jnp.float32) if carry else None,
      params=params,
      ema_params=tuple(params for _ in settings.ema_rates),
      opt_state=tx.init(params),
      sampler_state=init_timestep_history(num_timesteps, timestep_history),
      skipped_updates=jnp.zeros((), jnp.int32),
      target_params=params if settings.consistency.enabled else None,
  )


def preprocess_images(images: jax.Array, flip_key: jax.Array | None) -> jax.Array:
  """uint8 NHWC → float32 [-1, 1]; optional per-example random horizontal flip."""
  x = images.astype(jnp.float32) / 127.5 - 1.0
  if flip_key is not None:
    flip = jax.random.bernoulli(flip_key, 0.5, (x.shape[0],))
    x = jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)
  return x


def ema_update(ema: Any, params: Any, rate: float) -> Any:
  """ema ← rate·ema + (1 − rate)·params (ADM `update_ema`)."""
  return jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, ema, params)


def _optimizer_update(
    state: TrainState, grads: Any, tx: optax.GradientTransformation
) -> tuple[Any, Any]:
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return optax.apply_updates(state.params, updates), opt_state


def updated_params(state: TrainState, grads: Any, tx: optax.GradientTransformation) -> Any:
  """The parameters that `apply_gradients` makes of `state` and `grads` (the same arithmetic),
  without the rest of the update: what the train step tests for finiteness before it updates."""
  return _optimizer_update(state, grads, tx)[0]


def apply_gradients(
    state: TrainState,
    grads: Any,
    tx: optax.GradientTransformation,
    ema_rates: tuple[float, ...],
    target_rate: jax.Array | None = None,
) -> TrainState:
  """One optimizer update and one EMA update per rate (and of a consistency model's target
  network with `target_rate`); counts the optimizer update."""
  params, opt_state = _optimizer_update(state, grads, tx)
  ema_params = tuple(ema_update(e, params, r) for e, r in zip(state.ema_params, ema_rates))
  target = state.target_params
  if target is not None:
    target = ema_update(target, params, target_rate)
  return state.replace(
      params=params,
      ema_params=ema_params,
      opt_state=opt_state,
      num_updates=state.num_updates + 1,
      target_params=target,
  )


def tree_all_finite(tree: Any) -> jax.Array:
  """Whether every element of every leaf is finite (a boolean scalar)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
