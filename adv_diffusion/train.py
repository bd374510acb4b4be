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
from adv_diffusion.config_validation import validate_config
from adv_diffusion.diffusion import (GaussianDiffusion, LossAwareSamplerState,
                                     init_loss_sampler_state, sample_timesteps,
                                     update_loss_sampler_state)
from adv_diffusion.nets.factory import create_unet
from sampling import images as image_lib
from sampling.ancestral import ancestral_sample, per_sample_noise


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # minibatch iterations done (int32 scalar)
  params: Any  # float32 network parameters
  ema_params: tuple[Any, ...]  # one parameter average per rate of config.train.ema_rates
  opt_state: Any  # optax state
  sampler_state: LossAwareSamplerState  # ADM importance-sampler loss history


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
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=tuple(params for _ in config.train.ema_rates),
      opt_state=tx.init(params),
      sampler_state=init_loss_sampler_state(config.diffusion.num_timesteps,
                                            config.diffusion.sampler_history),
  )


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


def train_step(state: TrainState, batch: dict[str, jax.Array], root_key: jax.Array, *,
               model: nn.Module, diffusion: GaussianDiffusion,
               tx: optax.GradientTransformation, config: ml_collections.ConfigDict
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One minibatch of clean ADM training; returns the new state and scalar metrics."""
  key = jax.random.fold_in(root_key, state.step)
  k_t, k_noise, k_dropout, k_flip = jax.random.split(key, 4)
  x_start = preprocess_images(batch["image"], k_flip if config.data.random_flip else None)
  labels = batch["label"] if config.data.num_classes else None
  batch_size = x_start.shape[0]

  t, weights = sample_timesteps(k_t, state.sampler_state, batch_size,
                                config.diffusion.timestep_sampler,
                                config.diffusion.sampler_uniform_prob)
  noise = jax.random.normal(k_noise, x_start.shape, jnp.float32)
  x_t = diffusion.q_sample(x_start, t, noise)

  def loss_fn(params):
    output = model.apply({"params": params}, x_t, diffusion.model_timesteps(t), labels,
                         train=True, rngs={"dropout": k_dropout})
    terms = diffusion.training_losses(output.astype(jnp.float32), x_start, x_t, t, noise,
                                      learn_sigma=config.model.learn_sigma,
                                      loss_type=config.diffusion.loss_type)
    return jnp.mean(terms["loss"] * weights), terms  # importance-weighted (ADM TrainLoop)

  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = tuple(ema_update(e, params, r)
                     for e, r in zip(state.ema_params, config.train.ema_rates))
  sampler_state = state.sampler_state
  if config.diffusion.timestep_sampler == "loss-second-moment":
    sampler_state = update_loss_sampler_state(sampler_state, t,
                                              jax.lax.stop_gradient(terms["loss"]))
  new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                            opt_state=opt_state, sampler_state=sampler_state)
  metrics = {
      "loss": loss,
      "mse": jnp.mean(terms["mse"]),
      "vb": jnp.mean(terms["vb"]),
      "grad_norm": optax.global_norm(grads),
      "learning_rate": learning_rate_schedule(config.optim)(state.step),
  }
  return new_state, metrics


def compile_train_step(model: nn.Module, diffusion: GaussianDiffusion,
                       tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                       mesh: jax.sharding.Mesh) -> Callable:
  """`train_step` as one jit program: batch sharded over `data`, state replicated and donated."""
  step_fn = functools.partial(train_step, model=model, diffusion=diffusion, tx=tx,
                              config=config)
  repl = parallel.replicated(mesh)
  return jax.jit(step_fn, in_shardings=(repl, parallel.batch_sharding(mesh), repl),
                 out_shardings=(repl, repl), donate_argnums=(0,))


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
                                              config.train.init_from_step, target)
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

  dataset = data_lib.load_dataset(config.data.dataset, config.data.split, config.data.data_dir)
  model = create_unet(config)
  diffusion = create_diffusion(config)
  tx = create_optimizer(config.optim)
  root_key = jax.random.key(config.seed)
  init_key, step_key, sample_key = jax.random.split(root_key, 3)
  repl = parallel.replicated(mesh)
  state = jax.jit(lambda k: init_train_state(model, tx, config, k), out_shardings=repl)(init_key)
  logging.info("UNet parameters: %d",
               sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params)))

  t = config.train
  checkpointer = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir),
                                       save_every=t.checkpoint_every, keep=t.keep_checkpoints,
                                       keep_every=t.keep_every,
                                       async_save=t.async_checkpointing)
  state = restore_or_init(config, state, checkpointer)
  start_step = int(state.step)

  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  report = periodic_actions.ReportProgress(num_train_steps=t.num_steps, writer=writer)
  step_fn = compile_train_step(model, diffusion, tx, config, mesh)
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
