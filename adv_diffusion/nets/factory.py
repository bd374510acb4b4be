"""The one place where a config becomes a network."""

import jax.numpy as jnp
import ml_collections

from adv_diffusion.nets.unet import UNet

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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
