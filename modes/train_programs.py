"""The train state and step of a config as jit programs over the device mesh: batch sharded over
`data`, state replicated (a carried δ sharded like the batch) and donated; `shared_programs`
makes them once per process and step settings."""

import functools
import json
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
import optax

from adv_diffusion import train_step as step_lib
from adv_diffusion.diffusion import GaussianDiffusion
from adv_diffusion.train_step import TrainState
from modes import parallel
from modes.factories import (
    create_diffusion,
    create_optimizer,
    create_unet,
    learning_rate_schedule,
    step_settings,
)

# The library's step maths, re-exported for the modes and benchmarks that build states.
preprocess_images = step_lib.preprocess_images


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(H, W, C) of `config.data`."""
  d = config.data
  return (d.image_size, d.image_size, d.channels)


def init_params(model: nn.Module, config: ml_collections.ConfigDict, key: jax.Array) -> Any:
  """Fresh network parameters for the images of `config.data`."""
  return step_lib.init_params(model, image_shape(config), bool(config.data.num_classes), key)


def init_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    key: jax.Array,
) -> TrainState:
  """`adv_diffusion.train_step.init_train_state` with the sizes of `config`."""
  return step_lib.init_train_state(
      model,
      tx,
      key,
      settings=step_settings(config),
      image_shape=image_shape(config),
      batch_size=config.train.batch_size,
      num_timesteps=config.diffusion.num_timesteps,
      timestep_history=config.diffusion.sampler_history,
  )


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    key: jax.Array,
    mesh: jax.sharding.Mesh,
) -> TrainState:
  """`init_train_state` compiled to place the state with `state_shardings` on `mesh`."""
  return _state_program(model, tx, config, mesh)[0](key)


def _state_program(
    model: nn.Module,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
) -> tuple[Callable, TrainState]:
  """create_state(key) (jit, placed with `state_shardings`) and the state's abstract shape."""
  init = functools.partial(init_train_state, model, tx, config)
  abstract = jax.eval_shape(init, jax.random.key(0))
  return jax.jit(init, out_shardings=state_shardings(abstract, mesh)), abstract


def state_shardings(state: TrainState, mesh: jax.sharding.Mesh) -> TrainState:
  """Everything replicated except a carried δ, which is split over the batch like the data."""
  shardings = jax.tree.map(lambda _: parallel.replicated(mesh), state)
  if state.delta is not None:
    shardings = shardings.replace(delta=parallel.batch_sharding(mesh))
  return shardings


def make_step_fn(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
) -> Callable:
  """`train_step` with the network, process, optimizer, settings and learning rate of `config`
  bound: step_fn(state, batch, root_key, teacher_params=None, lpips_params=None)."""
  return functools.partial(
      step_lib.train_step,
      model=model,
      diffusion=diffusion,
      tx=tx,
      settings=step_settings(config),
      learning_rate_fn=learning_rate_schedule(config.optim),
  )


def compile_train_step(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    state: TrainState,
) -> Callable:
  """`make_step_fn` as one jit program: batch sharded over `data`, state replicated (a carried δ
  sharded like the batch) and donated. `state` gives the pytree structure."""
  repl = parallel.replicated(mesh)
  state_sh = state_shardings(state, mesh)
  return jax.jit(
      make_step_fn(model, diffusion, tx, config),
      in_shardings=(state_sh, parallel.batch_sharding(mesh), repl, repl, repl),
      out_shardings=(state_sh, repl),
      donate_argnums=(0,),
  )


def step_program_key(config: ml_collections.ConfigDict) -> str:
  """The config values the train step and state programs are built from: configs with the same
  key (stages that differ only in step counts, seed, start or workdir) build the same programs."""
  t = config.train
  sections = ("data", "model", "diffusion", "optim", "adversarial", "consistency")
  return json.dumps(
      [config[s].to_dict() for s in sections] + [t.batch_size, list(t.ema_rates), t.on_nonfinite],
      sort_keys=True,
      default=str,
  )


# One (state, step) program pair per process and step_program_key × mesh (see `shared_programs`).
_SHARED_PROGRAMS: dict[tuple[str, jax.sharding.Mesh], tuple[Callable, Callable]] = {}


def shared_programs(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
) -> tuple[Callable, Callable]:
  """(create_state(key), step_fn) of `config` on `mesh`, made once per process and program key:
  the story's cost estimate, its stages and a study's seeds run one traced and compiled program,
  also where no persistent compilation cache serves a second copy (multi-process runs).

  create_state is `create_train_state` (jit, placed with `state_shardings`); step_fn is
  `compile_train_step` of the network, process and optimizer of `config`."""
  key = (step_program_key(config), mesh)
  if key not in _SHARED_PROGRAMS:
    model, tx = create_unet(config), create_optimizer(config.optim)
    create_state, abstract = _state_program(model, tx, config, mesh)
    step_fn = compile_train_step(model, create_diffusion(config), tx, config, mesh, abstract)
    _SHARED_PROGRAMS[key] = (create_state, step_fn)
  return _SHARED_PROGRAMS[key]
