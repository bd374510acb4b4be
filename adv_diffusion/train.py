"""Train state, the jit-compiled sharded train step, and the training loop.

One step = one minibatch: draw t (ADM's timestep sampler) and ε, build x_t, one
forward/backward of ADM's hybrid loss, one AdamW update, one EMA update per rate.
All randomness of step s comes from fold_in(root_key, s), drawn with global shapes, so the
numbers do not depend on the device count and a resumed run repeats an uninterrupted one.
"""

import functools
import json
import os
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions

from adv_diffusion import checkpoint as ckpt_lib
from adv_diffusion import data as data_lib
from adv_diffusion import parallel
from adv_diffusion.adversarial import ascent_step, example_radius, init_delta
from adv_diffusion.config_validation import validate_config
from adv_diffusion.diffusion import (GaussianDiffusion, LossAwareSamplerState,
                                     init_loss_sampler_state, sample_timesteps,
                                     update_loss_sampler_state)
from adv_diffusion.losses import MinibatchInputs, diffusion_loss, input_perturbation_noise
from adv_diffusion.nets.factory import create_unet
from sampling import images as image_lib
from sampling.ancestral import ancestral_sample, per_sample_noise


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # minibatch iterations done (int32 scalar)
  num_updates: jax.Array  # optimizer updates done: = step, or K·step for "fast" AT
  params: Any  # float32 network parameters
  ema_params: tuple[Any, ...]  # one parameter average per rate of config.train.ema_rates
  opt_state: Any  # optax state
  sampler_state: LossAwareSamplerState  # ADM importance-sampler loss history
  delta: jax.Array | None  # δ carried to the next minibatch (adversarial.init = "carry")


# ---------------------------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------------------------

def create_diffusion(config: ml_collections.ConfigDict, respacing: str | None = None
                     ) -> GaussianDiffusion:
  return GaussianDiffusion.create(config.diffusion.noise_schedule,
                                  config.diffusion.num_timesteps, respacing=respacing)


def learning_rate_schedule(optim: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to the peak rate, then constant (ADM trains at a constant rate)."""
  if optim.warmup_steps == 0:
    return optax.constant_schedule(optim.learning_rate)
  return optax.linear_schedule(0.0, optim.learning_rate, optim.warmup_steps)


def create_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW as torch.optim.AdamW (ADM), with optional global-norm gradient clipping."""
  adamw = optax.adamw(learning_rate_schedule(optim), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                      weight_decay=optim.weight_decay)
  if optim.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), adamw)
  return adamw


def init_params(model: nn.Module, config: ml_collections.ConfigDict, key: jax.Array) -> Any:
  d = config.data
  x = jnp.zeros((1, d.image_size, d.image_size, d.channels), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  y = jnp.zeros((1,), jnp.int32) if d.num_classes else None
  return model.init({"params": key}, x, t, y, train=False)["params"]


def init_train_state(model: nn.Module, tx: optax.GradientTransformation,
                     config: ml_collections.ConfigDict, key: jax.Array) -> TrainState:
  params = init_params(model, config, key)
  carry = config.adversarial.mode != "none" and config.adversarial.init == "carry"
  d = config.data
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      num_updates=jnp.zeros((), jnp.int32),
      delta=(jnp.zeros((config.train.batch_size, d.image_size, d.image_size, d.channels),
                       jnp.float32) if carry else None),
      params=params,
      ema_params=tuple(params for _ in config.train.ema_rates),
      opt_state=tx.init(params),
      sampler_state=init_loss_sampler_state(config.diffusion.num_timesteps,
                                            config.diffusion.sampler_history),
  )


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       config: ml_collections.ConfigDict, key: jax.Array,
                       mesh: jax.sharding.Mesh) -> TrainState:
  """`init_train_state` compiled to place the state with `state_shardings` on `mesh`."""
  init = functools.partial(init_train_state, model, tx, config)
  abstract = jax.eval_shape(init, key)
  return jax.jit(init, out_shardings=state_shardings(abstract, mesh))(key)


def state_shardings(state: TrainState, mesh: jax.sharding.Mesh) -> TrainState:
  """Everything replicated except a carried δ, which is split over the batch like the data."""
  shardings = jax.tree.map(lambda _: parallel.replicated(mesh), state)
  if state.delta is not None:
    shardings = shardings.replace(delta=parallel.batch_sharding(mesh))
  return shardings


# ---------------------------------------------------------------------------------------------
# The step (pure; compiled by `compile_train_step`)
# ---------------------------------------------------------------------------------------------

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


def apply_gradients(state: TrainState, grads: Any, tx: optax.GradientTransformation,
                    ema_rates: tuple[float, ...]) -> TrainState:
  """One optimizer update and one EMA update per rate; counts the optimizer update."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = tuple(ema_update(e, params, r) for e, r in zip(state.ema_params, ema_rates))
  return state.replace(params=params, ema_params=ema_params, opt_state=opt_state,
                       num_updates=state.num_updates + 1)


def minibatch_inputs(state: TrainState, batch: dict[str, jax.Array], key: jax.Array,
                     diffusion: GaussianDiffusion, config: ml_collections.ConfigDict
                     ) -> tuple[MinibatchInputs, jax.Array]:
  """Draws t (ADM's sampler) and ε once for the minibatch; returns them and the dropout key."""
  k_t, k_noise, k_dropout, k_flip = jax.random.split(key, 4)
  x_start = preprocess_images(batch["image"], k_flip if config.data.random_flip else None)
  t, weights = sample_timesteps(k_t, state.sampler_state, x_start.shape[0],
                                config.diffusion.timestep_sampler,
                                config.diffusion.sampler_uniform_prob)
  noise = jax.random.normal(k_noise, x_start.shape, jnp.float32)
  noise_in = noise
  if config.diffusion.input_perturbation > 0:
    noise_in = input_perturbation_noise(noise, jax.random.fold_in(key, _IP_STREAM),
                                        config.diffusion.input_perturbation)
  inputs = MinibatchInputs(
      x_start=x_start, x_t=diffusion.q_sample(x_start, t, noise_in), t=t, noise=noise,
      weights=weights,
      sigma=jnp.asarray(diffusion.sqrt_one_minus_alphas_cumprod, jnp.float32)[t],
      labels=batch["label"] if config.data.num_classes else None)
  return inputs, k_dropout


# Independent random streams of a step key beyond the four of `minibatch_inputs`.
_IP_STREAM, _DELTA_STREAM = 1001, 1002


def _update_sampler(state: TrainState, t: jax.Array, losses: jax.Array,
                    config: ml_collections.ConfigDict) -> TrainState:
  """Feeds ADM's importance sampler the per-example losses of one forward pass."""
  if config.diffusion.timestep_sampler != "loss-second-moment":
    return state
  return state.replace(sampler_state=update_loss_sampler_state(
      state.sampler_state, t, jax.lax.stop_gradient(losses)))


def _clean_step(state, inputs, dropout_key, loss_fn, tx, config):
  """Plain ADM: one forward/backward, one update."""
  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, None, inputs,
                                                                   dropout_key)
  state = _update_sampler(state, inputs.t, terms["loss"], config)
  state = apply_gradients(state, grads, tx, tuple(config.train.ema_rates))
  return state, loss, terms, grads, {}


def _replay_dropout_keys(dropout_key: jax.Array, count: int) -> jax.Array:
  """Replay r uses fold_in(key, r) for r ≥ 1 and the step's own key for r = 0, so a single
  replay is exactly the clean step."""
  return jnp.stack([dropout_key] + [jax.random.fold_in(dropout_key, r)
                                    for r in range(1, count)])


def _delta_metrics(delta, grad_delta0, loss0, loss_final, inputs, init: str) -> dict:
  norms = jnp.sqrt(jnp.sum(jnp.square(delta), axis=(1, 2, 3)))
  metrics = {
      "delta_l2_mean": jnp.mean(norms),
      "delta_l2_max": jnp.max(norms),
      "grad_delta_l2_mean": jnp.mean(jnp.sqrt(jnp.sum(jnp.square(grad_delta0), axis=(1, 2, 3)))),
      "loss_final_delta": loss_final,
      # RMS per pixel of the target shift δ/σ_t (ε itself has RMS 1).
      "target_shift_rms": jnp.mean(norms / inputs.sigma) / jnp.sqrt(float(delta[0].size)),
  }
  if init == "zero":  # the first forward pass is at δ = 0 for free
    metrics["loss_delta0"] = loss0
  return metrics


def _fast_step(state, inputs, dropout_key, loss_fn, tx, config, delta0, radius):
  """The authors' efficient AT (PAPER.md §4): K replays of one minibatch, each one
  forward/backward giving ∂L/∂θ and ∂L/∂δ together, an optimizer + EMA update, then a
  normalised ascent step on δ. Returns δ after the last ascent (carried when init='carry')."""
  adv = config.adversarial
  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)

  def replay(carry, dropout_key_r):
    state, delta = carry
    (loss, terms), (grads, grad_delta) = grad_fn(state.params, delta, inputs, dropout_key_r)
    state = _update_sampler(state, inputs.t, terms["loss"], config)
    state = apply_gradients(state, grads, tx, tuple(config.train.ema_rates))
    next_delta = ascent_step(delta, grad_delta, adv.step_size, radius, adv.norm)
    return (state, next_delta), (loss, terms, grads, grad_delta, delta)

  keys = _replay_dropout_keys(dropout_key, adv.num_replays)
  # Unrolled: a rolled loop compiles its body apart and rounds differently (~3e-7), and a
  # single replay must equal the clean step bit for bit. K is small (3 in the paper).
  (state, next_delta), (losses, terms, grads, grad_deltas, deltas) = jax.lax.scan(
      replay, (state, delta0), keys, unroll=True)
  last = lambda tree: jax.tree.map(lambda x: x[-1], tree)  # noqa: E731
  metrics = _delta_metrics(deltas[-1], grad_deltas[0], losses[0], losses[-1], inputs, adv.init)
  return state, losses[-1], last(terms), last(grads), metrics, next_delta


def _pgd_step(state, inputs, dropout_key, loss_fn, tx, config, delta0, radius):
  """PGD-k AT: k projected ascent steps on δ with θ fixed, then one update at the final δ."""
  adv = config.adversarial
  delta_grad_fn = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)

  def ascend(delta, dropout_key_j):
    (loss, _), grad_delta = delta_grad_fn(state.params, delta, inputs, dropout_key_j)
    return ascent_step(delta, grad_delta, adv.step_size, radius, adv.norm), (loss, grad_delta)

  ascent_keys = jnp.stack([jax.random.fold_in(dropout_key, 10_000 + j)
                           for j in range(adv.pgd_steps)])
  delta, (ascent_losses, grad_deltas) = jax.lax.scan(ascend, delta0, ascent_keys)
  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, delta, inputs,
                                                                   dropout_key)
  state = _update_sampler(state, inputs.t, terms["loss"], config)
  state = apply_gradients(state, grads, tx, tuple(config.train.ema_rates))
  metrics = _delta_metrics(delta, grad_deltas[0], ascent_losses[0], loss, inputs, adv.init)
  return state, loss, terms, grads, metrics, delta


def train_step(state: TrainState, batch: dict[str, jax.Array], root_key: jax.Array, *,
               model: nn.Module, diffusion: GaussianDiffusion,
               tx: optax.GradientTransformation, config: ml_collections.ConfigDict
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One minibatch iteration (`config.adversarial.mode`: none | fast | pgd); scalar metrics."""
  key = jax.random.fold_in(root_key, state.step)
  inputs, dropout_key = minibatch_inputs(state, batch, key, diffusion, config)

  def apply_fn(params, x, timesteps, labels, dropout_key):
    return model.apply({"params": params}, x, timesteps, labels, train=True,
                       rngs={"dropout": dropout_key})

  loss_fn = functools.partial(diffusion_loss, apply_fn=apply_fn, diffusion=diffusion,
                              learn_sigma=config.model.learn_sigma,
                              loss_type=config.diffusion.loss_type,
                              target_type=config.adversarial.target)
  adv = config.adversarial
  updates_before = state.num_updates
  if adv.mode == "none":
    state, loss, terms, grads, extra = _clean_step(state, inputs, dropout_key, loss_fn, tx,
                                                   config)
  else:
    radius = example_radius(diffusion.alphas_cumprod, inputs.t, adv.radius, adv.radius_schedule,
                            adv.radius_grid_steps)
    delta0 = init_delta(jax.random.fold_in(key, _DELTA_STREAM), inputs.x_t.shape, init=adv.init,
                        norm=adv.norm, magnitude=adv.init_magnitude, radius=radius,
                        carried=state.delta)
    search = _fast_step if adv.mode == "fast" else _pgd_step
    state, loss, terms, grads, extra, next_delta = search(state, inputs, dropout_key, loss_fn,
                                                          tx, config, delta0, radius)
    if adv.init == "carry":
      state = state.replace(delta=next_delta)
  metrics = {
      "loss": loss,
      "mse": jnp.mean(terms["mse"]),
      "vb": jnp.mean(terms["vb"]),
      "grad_norm": optax.tree.norm(grads),
      "learning_rate": learning_rate_schedule(config.optim)(updates_before),
      "optimizer_updates": state.num_updates,
      **extra,
  }
  return state.replace(step=state.step + 1), metrics


def compile_train_step(model: nn.Module, diffusion: GaussianDiffusion,
                       tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                       mesh: jax.sharding.Mesh, state: TrainState) -> Callable:
  """`train_step` as one jit program: batch sharded over `data`, state replicated (a carried δ
  sharded like the batch) and donated. `state` gives the pytree structure."""
  step_fn = functools.partial(train_step, model=model, diffusion=diffusion, tx=tx,
                              config=config)
  repl = parallel.replicated(mesh)
  state_sh = state_shardings(state, mesh)
  return jax.jit(step_fn, in_shardings=(state_sh, parallel.batch_sharding(mesh), repl),
                 out_shardings=(state_sh, repl), donate_argnums=(0,))


# ---------------------------------------------------------------------------------------------
# Periodic sample grid
# ---------------------------------------------------------------------------------------------

def sample_grid(params: Any, model: nn.Module, config: ml_collections.ConfigDict,
                key: jax.Array, num_samples: int) -> np.ndarray:
  """uint8 NHWC samples of the ancestral sampler over `config.train.sample_respacing`."""
  diffusion = create_diffusion(config, config.train.sample_respacing)
  d = config.data
  indices = jnp.arange(num_samples)
  noise = per_sample_noise(key, indices, (d.image_size, d.image_size, d.channels))
  sample_keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, 1), i))(indices)
  labels = (indices % d.num_classes).astype(jnp.int32) if d.num_classes else None

  @jax.jit
  def run(params, noise, sample_keys):
    def model_fn(x, t):
      return model.apply({"params": params}, x, diffusion.model_timesteps(t), labels,
                         train=False).astype(jnp.float32)
    return ancestral_sample(model_fn, noise, diffusion, sample_keys,
                            learn_sigma=config.model.learn_sigma)

  return image_lib.to_uint8(np.asarray(run(params, noise, sample_keys)))


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def _host_scalars(metrics: dict[str, jax.Array]) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def restore_or_init(config: ml_collections.ConfigDict, state: TrainState,
                    checkpointer: ckpt_lib.Checkpointer) -> TrainState:
  """Resumes from this workdir's latest checkpoint, else `init_from`, else keeps `state`.

  `init_from` copies params and EMA params of another run and keeps this run's fresh
  optimizer state, sampler history and step 0: the new run counts its own iterations.
  """
  latest = checkpointer.latest_step()
  if latest is not None:
    logging.info("Resuming from %s at step %d.", checkpointer.directory, latest)
    return checkpointer.restore(latest, state)
  if config.train.init_from:
    target = {"params": state.params, "ema_params": state.ema_params}
    model, step = ckpt_lib.load_model_weights(config.train.init_from,
                                              config.train.init_from_step, target,
                                              config.train.init_from_command)
    logging.info("Initialised params and EMA from %s step %d (fresh optimizer).",
                 config.train.init_from, step)
    return state.replace(params=model["params"], ema_params=model["ema_params"])
  return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains to `config.train.num_steps`, resuming from `workdir` when it holds checkpoints."""
  validate_config(config)
  mesh = parallel.make_mesh()
  parallel.check_batch_divisible(config.train.batch_size, mesh)
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    _write_config(config, workdir)

  t = config.train
  resuming = bool(ckpt_lib.checkpoint_steps(ckpt_lib.checkpoint_dir(workdir)))
  if t.init_from and not resuming:
    # Fail before loading data or compiling when the run to start from is missing.
    ckpt_lib.require_checkpoint(t.init_from, t.init_from_step, t.init_from_command)
  dataset = data_lib.load_dataset(config.data.dataset, config.data.split, config.data.data_dir)
  model = create_unet(config)
  diffusion = create_diffusion(config)
  tx = create_optimizer(config.optim)
  root_key = jax.random.key(config.seed)
  init_key, step_key, sample_key = jax.random.split(root_key, 3)
  repl = parallel.replicated(mesh)
  state = create_train_state(model, tx, config, init_key, mesh)
  logging.info("UNet parameters: %d",
               sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params)))

  checkpointer = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir),
                                       save_every=t.checkpoint_every, keep=t.keep_checkpoints,
                                       keep_every=t.keep_every,
                                       async_save=t.async_checkpointing)
  state = restore_or_init(config, state, checkpointer)
  start_step = int(state.step)

  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  report = periodic_actions.ReportProgress(num_train_steps=t.num_steps, writer=writer)
  step_fn = compile_train_step(model, diffusion, tx, config, mesh, state)
  batches = data_lib.batch_iterator(dataset, t.batch_size, start_step, config.seed,
                                    jax.process_index(), jax.process_count())
  step_key = jax.device_put(step_key, repl)

  window_start, window_steps = None, 0
  for step in range(start_step + 1, t.num_steps + 1):
    batch = parallel.global_batch_from_local(next(batches), mesh)
    state, metrics = step_fn(state, batch, step_key)
    report(step, time.time())
    if window_start is None:  # the first step compiles; time the steady state only
      jax.block_until_ready(metrics)
      window_start, window_steps = time.perf_counter(), 0
    else:
      window_steps += 1
    if step % t.log_every == 0 or step == t.num_steps:
      scalars = _host_scalars(metrics)
      elapsed = time.perf_counter() - window_start
      if window_steps:
        scalars["steps_per_sec"] = window_steps / elapsed
        scalars["images_per_sec"] = window_steps * t.batch_size / elapsed
      writer.write_scalars(step, scalars)
      window_start, window_steps = time.perf_counter(), 0
    checkpointer.save(step, state, force=step == t.num_steps)
    if t.sample_every and (step % t.sample_every == 0 or step == t.num_steps):
      grid = sample_grid(state.ema_params[0], model, config, sample_key, t.sample_grid_size)
      if is_main:
        image_lib.save_png(os.path.join(workdir, "samples", f"grid_{step:08d}.png"),
                           image_lib.make_grid(grid), upscale=2)
        writer.write_images(step, {"samples": image_lib.make_grid(grid)[None]})
      window_start = None  # do not count sampling time in steps/s
  checkpointer.wait()
  checkpointer.close()
  writer.flush()
  if is_main:
    with open(os.path.join(workdir, "train_done.json"), "w") as f:
      json.dump({"step": int(state.step)}, f)
  return state
