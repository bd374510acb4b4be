"""The one place where a config becomes a network, a diffusion process, an optimizer and the
settings of the train step."""

import jax.numpy as jnp
import ml_collections
import optax

from adv_diffusion.diffusion import GaussianDiffusion
from adv_diffusion.nets.unet import UNet
from adv_diffusion.settings import AdversarialSettings, ConsistencySettings, StepSettings

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
COMPUTE_DTYPES = tuple(_DTYPES)


def create_unet(config: ml_collections.ConfigDict) -> UNet:
  """ADM UNet for `config.model` on images of `config.data` (ADM's `create_model`)."""
  m, d = config.model, config.data
  # ADM takes attention resolutions as feature-map sides and converts them to downsample
  # factors (script_util.create_model).
  attention_ds = tuple(d.image_size // res for res in m.attention_resolutions)
  return UNet(
      image_size=d.image_size,
      in_channels=d.channels,
      model_channels=m.num_channels,
      out_channels=d.channels * (2 if m.learn_sigma else 1),
      num_res_blocks=m.num_res_blocks,
      attention_resolutions=attention_ds,
      dropout=m.dropout,
      channel_mult=tuple(m.channel_mult),
      conv_resample=m.conv_resample,
      num_classes=d.num_classes or None,
      num_heads=m.num_heads,
      num_head_channels=m.num_head_channels,
      num_heads_upsample=m.num_heads_upsample,
      use_scale_shift_norm=m.use_scale_shift_norm,
      resblock_updown=m.resblock_updown,
      use_new_attention_order=m.use_new_attention_order,
      dtype=_DTYPES[m.compute_dtype],
      remat=m.remat,
  )


def create_diffusion(
    config: ml_collections.ConfigDict, respacing: str | None = None
) -> GaussianDiffusion:
  """The training process of `config.diffusion`, optionally respaced (ADM respacing string)."""
  return GaussianDiffusion.create(
      config.diffusion.noise_schedule, config.diffusion.num_timesteps, respacing=respacing
  )


def learning_rate_schedule(optim: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to the peak rate, then constant (ADM trains at a constant rate)."""
  if optim.warmup_steps == 0:
    return optax.constant_schedule(optim.learning_rate)
  return optax.linear_schedule(0.0, optim.learning_rate, optim.warmup_steps)


def create_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW as torch.optim.AdamW (ADM), with optional global-norm gradient clipping."""
  adamw = optax.adamw(
      learning_rate_schedule(optim),
      b1=optim.b1,
      b2=optim.b2,
      eps=optim.eps,
      weight_decay=optim.weight_decay,
  )
  if optim.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), adamw)
  return adamw


def _fields(cls: type, section: ml_collections.ConfigDict) -> dict:
  """The keys of `section` that name fields of the settings dataclass `cls`."""
  names = cls.__dataclass_fields__
  return {
      k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in section.items() if k in names
  }


def step_settings(config: ml_collections.ConfigDict) -> StepSettings:
  """The train step's settings of `config` (sections adversarial, consistency, diffusion,
  model, data, train)."""
  d = config.diffusion
  return StepSettings(
      adversarial=AdversarialSettings(**_fields(AdversarialSettings, config.adversarial)),
      consistency=ConsistencySettings(**_fields(ConsistencySettings, config.consistency)),
      ema_rates=tuple(float(r) for r in config.train.ema_rates),
      learn_sigma=bool(config.model.learn_sigma),
      loss_type=d.loss_type,
      timestep_sampler=d.timestep_sampler,
      timestep_uniform_prob=float(d.sampler_uniform_prob),
      input_perturbation=float(d.input_perturbation),
      random_flip=bool(config.data.random_flip),
      conditional=bool(config.data.num_classes),
  )
