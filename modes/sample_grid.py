"""The periodic sample grid of a training run (`samples/grid_<step>.png`)."""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from modes import images as image_lib
from modes import parallel
from modes.factories import create_diffusion
from sampling.ancestral import ancestral_sample, per_sample_noise
from sampling.consistency import default_timesteps, sample_consistency


def make_grid_sampler(
    model: nn.Module, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
) -> Callable[[Any], np.ndarray]:
  """params → uint8 NHWC grid of `config.train.sample_grid_size` ancestral samples over
  `config.train.sample_respacing` (consistency models: two-step consistency samples), sharded
  over the mesh (every process gets the whole grid).

  Sample i's noise, step keys and label depend on (config.seed, i) only.
  """
  diffusion = create_diffusion(config, config.train.sample_respacing)
  diffusion_full = create_diffusion(config)
  d = config.data
  count = config.train.sample_grid_size
  indices = np.arange(-(-count // mesh.size) * mesh.size, dtype=np.int32)  # padded to the mesh
  global_indices = jax.make_array_from_callback(
      indices.shape, parallel.batch_sharding(mesh), lambda index: indices[index]
  )

  def run(params, indices):
    key = jax.random.split(jax.random.key(config.seed), 3)[2]
    noise = per_sample_noise(key, indices, (d.image_size, d.image_size, d.channels))
    sample_keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, 1), i))(indices)
    labels = (indices % d.num_classes).astype(jnp.int32) if d.num_classes else None

    if config.consistency.mode != "none":  # a consistency model: two-step sampling
      cm = config.consistency
      return sample_consistency(
          lambda x, t: model.apply({"params": params}, x, t, labels, train=False),
          noise,
          diffusion_full.alphas_cumprod,
          default_timesteps(2, config.diffusion.num_timesteps),
          sample_keys,
          sigma_data=cm.sigma_data,
          timestep_scale=cm.timestep_scale,
          clip_x0=cm.clip_x0,
      )

    def model_fn(x, t):
      return model.apply(
          {"params": params}, x, diffusion.model_timesteps(t), labels, train=False
      ).astype(jnp.float32)

    return ancestral_sample(
        model_fn, noise, diffusion, sample_keys, learn_sigma=config.model.learn_sigma
    )

  repl = parallel.replicated(mesh)
  run = jax.jit(run, in_shardings=(repl, parallel.batch_sharding(mesh)), out_shardings=repl)
  return lambda params: image_lib.to_uint8(np.asarray(run(params, global_indices))[:count])
