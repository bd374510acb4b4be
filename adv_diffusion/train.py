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

from adv_diffusion import checkpoint as ckpt_lib
from adv_diffusion import consistency
from adv_diffusion import data as data_lib
from adv_diffusion import parallel
from adv_diffusion.adversarial import ascent_step, example_radius, init_delta
from adv_diffusion.config_validation import validate_config
from adv_diffusion.diffusion import (GaussianDiffusion, LossAwareSamplerState,
                                     init_loss_sampler_state, sample_timesteps,
                                     update_loss_sampler_state)
from adv_diffusion.errors import NonFiniteError
from adv_diffusion.losses import MinibatchInputs, diffusion_loss, input_perturbation_noise
from adv_diffusion.nets.factory import create_unet
from adv_diffusion.preemption import PreemptionWatcher
from adv_diffusion.workdir import check_free_space, check_workdir_writable
from evaluation import lpips as lpips_lib
from evaluation.inception import file_sha256
from sampling import images as image_lib
from sampling.ancestral import ancestral_sample, per_sample_noise
from sampling.consistency import default_timesteps, sample_consistency


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # minibatch iterations done (int32 scalar)
  num_updates: jax.Array  # optimizer updates done: = step, or K·step for "fast" AT
  params: Any  # float32 network parameters
  ema_params: tuple[Any, ...]  # one parameter average per rate of config.train.ema_rates
  opt_state: Any  # optax state
  sampler_state: LossAwareSamplerState  # ADM importance-sampler loss history
  delta: jax.Array | None  # δ carried to the next minibatch (adversarial.init = "carry")
  skipped_updates: jax.Array  # minibatches dropped for a non-finite loss or update (int32)
  target_params: Any  # consistency models: target network θ⁻ (EMA of params); None for DPMs


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
      skipped_updates=jnp.zeros((), jnp.int32),
      target_params=params if config.consistency.mode != "none" else None,
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
                    ema_rates: tuple[float, ...], target_rate: jax.Array | None = None
                    ) -> TrainState:
  """One optimizer update and one EMA update per rate (and of a consistency model's target
  network with `target_rate`); counts the optimizer update."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = tuple(ema_update(e, params, r) for e, r in zip(state.ema_params, ema_rates))
  target = state.target_params
  if target is not None:
    target = ema_update(target, params, target_rate)
  return state.replace(params=params, ema_params=ema_params, opt_state=opt_state,
                       num_updates=state.num_updates + 1, target_params=target)


def _update(state: TrainState, grads: Any, tx: optax.GradientTransformation,
            config: ml_collections.ConfigDict) -> TrainState:
  """`apply_gradients` with the rates of `config`."""
  target_rate = None
  if state.target_params is not None:
    target_rate = consistency.target_ema_rate(config.consistency, state.num_updates)
  return apply_gradients(state, grads, tx, tuple(config.train.ema_rates), target_rate)


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
  if (config.diffusion.timestep_sampler != "loss-second-moment"
      or config.consistency.mode != "none"):
    return state
  return state.replace(sampler_state=update_loss_sampler_state(
      state.sampler_state, t, jax.lax.stop_gradient(losses)))


def _clean_step(state, inputs, dropout_key, loss_fn, tx, config):
  """Plain ADM: one forward/backward, one update."""
  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, None, inputs,
                                                                   dropout_key)
  state = _update_sampler(state, inputs.t, terms["loss"], config)
  state = _update(state, grads, tx, config)
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
    state = _update(state, grads, tx, config)
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
  state = _update(state, grads, tx, config)
  metrics = _delta_metrics(delta, grad_deltas[0], ascent_losses[0], loss, inputs, adv.init)
  return state, loss, terms, grads, metrics, delta


def _consistency_setup(state: TrainState, batch: dict[str, jax.Array], key: jax.Array,
                       teacher_params: Any, lpips_params: Any, apply_fn: Callable,
                       model: nn.Module, diffusion: GaussianDiffusion,
                       config: ml_collections.ConfigDict
                       ) -> tuple[MinibatchInputs, jax.Array, Callable]:
  """Minibatch inputs (incl. the target), dropout key and loss of a consistency model."""
  k_inputs, k_dropout, k_flip = jax.random.split(key, 3)
  x_start = preprocess_images(batch["image"], k_flip if config.data.random_flip else None)
  labels = batch["label"] if config.data.num_classes else None

  def eval_fn(params, x, t, labels):
    return model.apply({"params": params}, x, t, labels, train=False)

  inputs = consistency.consistency_inputs(
      x_start, labels, k_inputs, target_params=state.target_params,
      teacher_params=teacher_params, eval_fn=eval_fn,
      alphas_cumprod=diffusion.alphas_cumprod, cm=config.consistency)
  loss_fn = functools.partial(consistency.consistency_loss, apply_fn=apply_fn,
                              alphas_cumprod=diffusion.alphas_cumprod, cm=config.consistency,
                              lpips_params=lpips_params)
  return inputs, k_dropout, loss_fn


def train_step(state: TrainState, batch: dict[str, jax.Array], root_key: jax.Array,
               teacher_params: Any = None, lpips_params: Any = None, *, model: nn.Module,
               diffusion: GaussianDiffusion,
               tx: optax.GradientTransformation, config: ml_collections.ConfigDict
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One minibatch iteration (`config.adversarial.mode`: none | fast | pgd); scalar metrics.

  Diffusion models (`config.consistency.mode` = "none") use ADM's hybrid loss; consistency
  models the CD/CT loss with `teacher_params` (CD) and, for `config.consistency.distance` =
  "lpips", the LPIPS network `lpips_params` — the δ search is the same code for both. Both are
  frozen weights passed as arguments (not baked into the program as constants); None when
  unused.

  A minibatch whose loss or updated parameters are not finite leaves the state as it was
  (apart from the step and `skipped_updates` counters): a bad update never reaches the state.
  """
  start = state
  key = jax.random.fold_in(root_key, state.step)

  def apply_fn(params, x, timesteps, labels, dropout_key):
    return model.apply({"params": params}, x, timesteps, labels, train=True,
                       rngs={"dropout": dropout_key})

  if config.consistency.mode == "none":
    inputs, dropout_key = minibatch_inputs(state, batch, key, diffusion, config)
    loss_fn = functools.partial(diffusion_loss, apply_fn=apply_fn, diffusion=diffusion,
                                learn_sigma=config.model.learn_sigma,
                                loss_type=config.diffusion.loss_type,
                                target_type=config.adversarial.target)
  else:
    inputs, dropout_key, loss_fn = _consistency_setup(state, batch, key, teacher_params,
                                                      lpips_params, apply_fn, model, diffusion,
                                                      config)
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
  update_ok = jnp.isfinite(loss) & tree_all_finite(state.params)
  state = jax.tree.map(lambda new, old: jnp.where(update_ok, new, old), state, start)
  state = state.replace(skipped_updates=start.skipped_updates + (~update_ok).astype(jnp.int32))
  metrics = {
      "loss": loss,
      **{name: jnp.mean(value) for name, value in terms.items() if name != "loss"},
      "grad_norm": optax.tree.norm(grads),
      "learning_rate": learning_rate_schedule(config.optim)(updates_before),
      "optimizer_updates": state.num_updates,
      "skipped_updates": state.skipped_updates,
      # False only when the state was already non-finite before this step (e.g. bad weights
      # from init_from): such a state is never checkpointed.
      "params_finite": tree_all_finite(state.params),
      **extra,
  }
  return state.replace(step=state.step + 1), metrics


def tree_all_finite(tree: Any) -> jax.Array:
  """Whether every element of every leaf is finite (a boolean scalar)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def compile_train_step(model: nn.Module, diffusion: GaussianDiffusion,
                       tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                       mesh: jax.sharding.Mesh, state: TrainState) -> Callable:
  """`train_step` as one jit program: batch sharded over `data`, state replicated (a carried δ
  sharded like the batch) and donated. `state` gives the pytree structure."""
  step_fn = functools.partial(train_step, model=model, diffusion=diffusion, tx=tx,
                              config=config)
  repl = parallel.replicated(mesh)
  state_sh = state_shardings(state, mesh)
  return jax.jit(step_fn,
                 in_shardings=(state_sh, parallel.batch_sharding(mesh), repl, repl, repl),
                 out_shardings=(state_sh, repl), donate_argnums=(0,))


# ---------------------------------------------------------------------------------------------
# Periodic sample grid
# ---------------------------------------------------------------------------------------------

def make_grid_sampler(model: nn.Module, config: ml_collections.ConfigDict,
                      mesh: jax.sharding.Mesh) -> Callable[[Any], np.ndarray]:
  """params → uint8 NHWC grid of `config.train.sample_grid_size` ancestral samples over
  `config.train.sample_respacing` (consistency models: two-step consistency samples), sharded over the mesh (every process gets the whole grid).

  Sample i's noise, step keys and label depend on (config.seed, i) only.
  """
  diffusion = create_diffusion(config, config.train.sample_respacing)
  diffusion_full = create_diffusion(config)
  d = config.data
  count = config.train.sample_grid_size
  indices = np.arange(-(-count // mesh.size) * mesh.size, dtype=np.int32)  # padded to the mesh
  global_indices = jax.make_array_from_callback(indices.shape, parallel.batch_sharding(mesh),
                                                lambda index: indices[index])

  def run(params, indices):
    key = jax.random.split(jax.random.key(config.seed), 3)[2]
    noise = per_sample_noise(key, indices, (d.image_size, d.image_size, d.channels))
    sample_keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, 1), i))(indices)
    labels = (indices % d.num_classes).astype(jnp.int32) if d.num_classes else None

    if config.consistency.mode != "none":  # a consistency model: two-step sampling
      cm = config.consistency
      return sample_consistency(
          lambda x, t: model.apply({"params": params}, x, t, labels, train=False),
          noise, diffusion_full.alphas_cumprod,
          default_timesteps(2, config.diffusion.num_timesteps), sample_keys,
          sigma_data=cm.sigma_data, timestep_scale=cm.timestep_scale, clip_x0=cm.clip_x0)

    def model_fn(x, t):
      return model.apply({"params": params}, x, diffusion.model_timesteps(t), labels,
                         train=False).astype(jnp.float32)
    return ancestral_sample(model_fn, noise, diffusion, sample_keys,
                            learn_sigma=config.model.learn_sigma)

  repl = parallel.replicated(mesh)
  run = jax.jit(run, in_shardings=(repl, parallel.batch_sharding(mesh)), out_shardings=repl)
  return lambda params: image_lib.to_uint8(np.asarray(run(params, global_indices))[:count])


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def _host_scalars(metrics: dict[str, jax.Array]) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def restore_or_init(config: ml_collections.ConfigDict, state: TrainState,
                    checkpointer: ckpt_lib.Checkpointer, teacher_params: Any = None
                    ) -> TrainState:
  """Resumes from this workdir's newest readable checkpoint, else `init_from`, else starts a
  consistency student from its teacher, else keeps `state`.

  `init_from` copies params and EMA params of another run and keeps this run's fresh
  optimizer state, sampler history and step 0: the new run counts its own iterations. A
  consistency model's target network starts equal to the starting params.
  """
  try:
    resumed = checkpointer.restore_latest_good(state)
  except ValueError as exc:  # shapes or tree of the files differ from this config's state
    raise ckpt_lib.CheckpointError(
        f"the checkpoints in {checkpointer.directory} do not fit this config "
        f"({str(exc).splitlines()[0][:200]}); resume with the config they were written with or "
        "use a new --workdir") from exc
  if resumed is not None:
    logging.info("Resuming from %s at step %d.", checkpointer.directory, resumed[1])
    return resumed[0]
  if config.train.init_from:
    target = {"params": state.params, "ema_params": state.ema_params}
    model, step = ckpt_lib.load_model_weights(config.train.init_from,
                                              config.train.init_from_step, target,
                                              config.train.init_from_command)
    logging.info("Initialised params and EMA from %s step %d (fresh optimizer).",
                 config.train.init_from, step)
    state = state.replace(params=model["params"], ema_params=model["ema_params"])
  elif teacher_params is not None:
    logging.info("Student initialised from the teacher (params, EMA and target network).")
    state = state.replace(params=_copy(teacher_params),
                          ema_params=tuple(_copy(teacher_params) for _ in state.ema_params))
  if state.target_params is not None:
    state = state.replace(target_params=_copy(state.params))
  return state


def _copy(tree: Any) -> Any:
  """New buffers with the same values: the donated state must not share any buffer."""
  return jax.tree.map(jnp.copy, tree)


def _state_bytes(state: TrainState) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def _check_finite(step: int, metrics: dict[str, jax.Array], config: ml_collections.ConfigDict,
                  seen_skips: int, *, saving: bool) -> int:
  """Acts on the non-finite counters of `metrics` (from step `step`); returns the skip count.

  A skipped update is logged ("skip") or ends the run ("stop"); a non-finite state (only
  possible when it started that way) ends the run before it could be checkpointed.
  """
  skips = int(metrics["skipped_updates"])
  if saving and not bool(metrics["params_finite"]):
    raise NonFiniteError(
        f"the parameters are not finite at step {step}, so no checkpoint was written; check the "
        "weights this run started from (config.train.init_from) or its last good checkpoint.")
  if skips > seen_skips:
    if config.train.on_nonfinite == "stop":
      raise NonFiniteError(
          f"step {step} produced a non-finite loss or update (config.train.on_nonfinite = "
          "'stop'); lower config.optim.learning_rate or set config.optim.grad_clip_norm, or "
          "use on_nonfinite = 'skip' to drop such minibatches.")
    logging.warning("Step %d: non-finite loss or update; minibatch skipped (%d skipped so far).",
                    step, skips)
  return skips


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains to `config.train.num_steps`, resuming from `workdir` when it holds checkpoints.

  SIGTERM saves a checkpoint after the current step and returns (see `preemption`).
  """
  validate_config(config)
  mesh = parallel.make_mesh()
  parallel.check_batch_divisible(config.train.batch_size, mesh)
  is_main = jax.process_index() == 0
  check_workdir_writable(workdir)
  if is_main:
    _write_config(config, workdir)

  t = config.train
  resuming = bool(ckpt_lib.checkpoint_steps(ckpt_lib.checkpoint_dir(workdir)))
  if t.init_from and not resuming:
    # Fail before loading data or compiling when the run to start from is missing.
    ckpt_lib.require_checkpoint(t.init_from, t.init_from_step, t.init_from_command)
  cm = config.consistency
  if cm.mode == "distill":
    ckpt_lib.require_checkpoint(cm.teacher, cm.teacher_step, cm.teacher_command,
                                purpose="distil from",
                                step_key="config.consistency.teacher_step")
    consistency.check_teacher_model(config)
  dataset = data_lib.load_dataset(config.data.dataset, config.data.split, config.data.data_dir)
  model = create_unet(config)
  diffusion = create_diffusion(config)
  tx = create_optimizer(config.optim)
  repl = parallel.replicated(mesh)
  # Made by a jit program so that every process holds the same global (replicated) keys; the
  # third key of the split seeds the sample grid.
  root_keys = lambda: tuple(jax.random.split(jax.random.key(config.seed), 3)[:2])  # noqa: E731
  init_key, step_key = jax.jit(root_keys, out_shardings=(repl, repl))()
  state = create_train_state(model, tx, config, init_key, mesh)
  logging.info("UNet parameters: %d",
               sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params)))
  check_free_space(workdir, _state_bytes(state))

  checkpointer = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir),
                                       save_every=t.checkpoint_every, keep=t.keep_checkpoints,
                                       keep_every=t.keep_every,
                                       async_save=t.async_checkpointing)
  teacher_params = None
  if cm.mode == "distill":
    teacher_params, teacher_step = consistency.load_teacher(config, state.params)
    logging.info("Teacher: %s step %d (%s weights).", cm.teacher, teacher_step,
                 "EMA" if cm.teacher_use_ema else "raw")
  lpips_params = None
  if cm.mode != "none" and cm.distance == "lpips":
    lpips_path = lpips_lib.resolve_weights_path(cm.lpips_weights)
    lpips_params = jax.device_put(lpips_lib.load_lpips_params(lpips_path), repl)
    logging.info("LPIPS-VGG weights: %s (sha256 %s).", lpips_path,
                 file_sha256(lpips_path))
  state = restore_or_init(config, state, checkpointer, teacher_params)
  start_step = int(state.step)
  seen_skips = int(state.skipped_updates)

  # clu's writers import TensorFlow (~3 s): only the train loop pays for it, not the modes
  # (sample, eval, table, import) that import this module for its state and params helpers.
  from clu import metric_writers, periodic_actions

  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  report = periodic_actions.ReportProgress(num_train_steps=t.num_steps, writer=writer)
  step_fn = compile_train_step(model, diffusion, tx, config, mesh, state)
  grid_sampler = make_grid_sampler(model, config, mesh) if t.sample_every else None
  batches = data_lib.batch_iterator(dataset, t.batch_size, start_step, config.seed,
                                    jax.process_index(), jax.process_count())
  preemption = PreemptionWatcher(t.preemption_grace_seconds)

  window_start, window_steps = None, 0
  previous = None  # (step, metrics) of the step before: read while the next one runs
  step = start_step
  try:
    for step in range(start_step + 1, t.num_steps + 1):
      batch = parallel.global_batch_from_local(next(batches), mesh)
      state, metrics = step_fn(state, batch, step_key, teacher_params, lpips_params)
      if previous is not None:
        seen_skips = _check_finite(*previous, config, seen_skips, saving=False)
      previous = (step, metrics)
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
      preempted = preemption.should_stop(step)
      if preempted or step % t.checkpoint_every == 0 or step == t.num_steps:
        seen_skips = _check_finite(step, metrics, config, seen_skips, saving=True)
        checkpointer.save(step, state, force=True)
      if preempted:
        checkpointer.wait()
        logging.warning("Preempted: saved the checkpoint of step %d in %s; run the same command "
                        "again to resume.", step, checkpointer.directory)
        break
      if grid_sampler is not None and (step % t.sample_every == 0 or step == t.num_steps):
        grid = image_lib.make_grid(grid_sampler(state.ema_params[0]))
        if is_main:
          image_lib.save_png(os.path.join(workdir, "samples", f"grid_{step:08d}.png"), grid,
                             upscale=2)
          writer.write_images(step, {"samples": grid[None]})
        window_start = None  # do not count sampling time in steps/s
    else:
      if previous is not None:
        _check_finite(*previous, config, seen_skips, saving=False)
      if is_main:
        with open(os.path.join(workdir, "train_done.json"), "w") as f:
          json.dump({"step": int(state.step), "skipped_updates": int(state.skipped_updates)}, f)
    checkpointer.wait()
  finally:
    preemption.close()
    checkpointer.close()
    writer.flush()
  return state
