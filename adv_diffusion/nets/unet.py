"""The ADM UNet (Dhariwal & Nichol 2021) in Flax Linen, NHWC, mirroring
`guided_diffusion.unet.UNetModel` (dims=2) to float precision.

Submodule naming (the rule `torch_mapping` relies on): a torch module path such as
`input_blocks.4.1.qkv` becomes the Flax path `("input_blocks_4_1", "qkv")`, i.e. every integer
index is glued to the name before it with "_". Top level: `time_embed_0`, `time_embed_2`,
`label_emb`, `input_blocks_{i}_{j}` (j = position inside ADM's TimestepEmbedSequential),
`middle_block_{j}`, `output_blocks_{i}_{j}`, `out_0` (norm) and `out_2` (conv). Inside the
blocks: ResBlock `in_layers_0`, `in_layers_2`, `emb_layers_1`, `out_layers_0`, `out_layers_3`,
`skip_connection`; AttentionBlock `norm`, `qkv`, `proj_out`; Downsample `op`; Upsample `conv`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from adv_diffusion.nets.layers import (
    AttentionBlock,
    Downsample,
    GroupNorm32,
    ResBlock,
    Upsample,
    conv2d,
    dense,
    timestep_embedding,
)

Array = jax.Array


class UNet(nn.Module):
  """ADM's UNetModel; fields mirror its constructor (`attention_resolutions` are downsample
  factors ds, as in ADM). Parameters are float32; `dtype` is the compute dtype of the torso."""

  image_size: int
  in_channels: int
  model_channels: int
  out_channels: int
  num_res_blocks: int
  attention_resolutions: tuple[int, ...]
  dropout: float = 0.0
  channel_mult: tuple[int, ...] = (1, 2, 4, 8)
  conv_resample: bool = True
  num_classes: int | None = None
  num_heads: int = 1
  num_head_channels: int = -1
  num_heads_upsample: int = -1
  use_scale_shift_norm: bool = False
  resblock_updown: bool = False
  use_new_attention_order: bool = False
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(
      self, x: Array, timesteps: Array, y: Array | None = None, *, train: bool = False
  ) -> Array:
    """Predict from NHWC `x`, int timesteps (B,) and labels (B,) iff class-conditional."""
    self._check_inputs(x, timesteps, y)
    emb = self._embed(timesteps, y)
    # ADM's torso runs in the compute dtype; the output head runs on float32 (x.dtype).
    h = x.astype(self.dtype)
    h, skips = self._encoder(h, emb, train)
    h = self._middle(h, emb, train)
    h = self._decoder(h, skips, emb, train)
    return self._head(h.astype(jnp.float32))

  # ----------------------------------------------------------------------------- checks

  def _check_inputs(self, x: Array, timesteps: Array, y: Array | None) -> None:
    """Raise ValueError on shapes or labels inconsistent with the configuration."""
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"UNet expects NHWC input with {self.in_channels} channels, got {x.shape}.")
    factor = 2 ** (len(self.channel_mult) - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"UNet input height/width must be divisible by {factor}, got {x.shape}.")
    if jnp.shape(timesteps) != (x.shape[0],):
      raise ValueError(f"timesteps must have shape ({x.shape[0]},), got {jnp.shape(timesteps)}.")
    if (y is None) != (self.num_classes is None):
      raise ValueError(
          "y must be given if and only if the UNet is class-conditional "
          f"(num_classes={self.num_classes}, y {'missing' if y is None else 'given'})."
      )
    if y is not None and jnp.shape(y) != (x.shape[0],):
      raise ValueError(f"y must have shape ({x.shape[0]},), got {jnp.shape(y)}.")

  # ------------------------------------------------------------------------ components

  @property
  def _emb_dim(self) -> int:
    return 4 * self.model_channels

  def _embed(self, timesteps: Array, y: Array | None) -> Array:
    """Timestep MLP (+ class embedding), kept in float32 as in ADM."""
    emb = timestep_embedding(timesteps, self.model_channels)
    emb = dense(self._emb_dim, self.model_channels, name="time_embed_0")(emb)
    emb = dense(self._emb_dim, self._emb_dim, name="time_embed_2")(nn.silu(emb))
    if self.num_classes is not None:
      label_emb = nn.Embed(
          self.num_classes,
          self._emb_dim,
          param_dtype=jnp.float32,
          embedding_init=nn.initializers.normal(1.0),  # torch nn.Embedding default
          name="label_emb",
      )
      emb = emb + label_emb(y)
    return emb

  def _res_block(self, name: str, out_channels: int, *, up: bool = False, down: bool = False):
    """A (possibly rematerialised) ResBlock; call it as block(h, emb, train)."""
    cls = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock  # self is arg 0
    return cls(
        out_channels=out_channels,
        dropout=self.dropout,
        use_scale_shift_norm=self.use_scale_shift_norm,
        up=up,
        down=down,
        dtype=self.dtype,
        name=name,
    )

  def _attention(self, name: str, num_heads: int):
    """A (possibly rematerialised) AttentionBlock."""
    cls = nn.remat(AttentionBlock) if self.remat else AttentionBlock
    return cls(
        num_heads=num_heads,
        num_head_channels=self.num_head_channels,
        use_new_attention_order=self.use_new_attention_order,
        dtype=self.dtype,
        name=name,
    )

  def _encoder(self, h: Array, emb: Array, train: bool) -> tuple[Array, list[Array]]:
    """ADM input_blocks; returns the features and every block's output for the skips."""
    ch = int(self.channel_mult[0] * self.model_channels)
    h = conv2d(ch, self.in_channels, dtype=self.dtype, name="input_blocks_0_0")(h)
    skips, index, ds = [h], 1, 1
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        ch = int(mult * self.model_channels)
        h = self._res_block(f"input_blocks_{index}_0", ch)(h, emb, train)
        if ds in self.attention_resolutions:
          h = self._attention(f"input_blocks_{index}_1", self.num_heads)(h)
        skips.append(h)
        index += 1
      if level != len(self.channel_mult) - 1:
        name = f"input_blocks_{index}_0"
        if self.resblock_updown:
          h = self._res_block(name, ch, down=True)(h, emb, train)
        else:
          h = Downsample(self.conv_resample, ch, dtype=self.dtype, name=name)(h)
        skips.append(h)
        index += 1
        ds *= 2
    return h, skips

  def _middle(self, h: Array, emb: Array, train: bool) -> Array:
    """ADM middle_block: ResBlock, AttentionBlock, ResBlock at constant width."""
    ch = h.shape[-1]
    h = self._res_block("middle_block_0", ch)(h, emb, train)
    h = self._attention("middle_block_1", self.num_heads)(h)
    return self._res_block("middle_block_2", ch)(h, emb, train)

  def _decoder(self, h: Array, skips: list[Array], emb: Array, train: bool) -> Array:
    """ADM output_blocks: concatenate a skip, ResBlock, [attention], [upsample]."""
    heads_up = self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample
    ds = 2 ** (len(self.channel_mult) - 1)
    index = 0
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        ch = int(mult * self.model_channels)
        h = jnp.concatenate([h, skips.pop()], axis=-1)  # torch cat on dim 1 == channels
        h = self._res_block(f"output_blocks_{index}_0", ch)(h, emb, train)
        j = 1
        if ds in self.attention_resolutions:
          h = self._attention(f"output_blocks_{index}_{j}", heads_up)(h)
          j += 1
        if level and i == self.num_res_blocks:
          name = f"output_blocks_{index}_{j}"
          if self.resblock_updown:
            h = self._res_block(name, ch, up=True)(h, emb, train)
          else:
            h = Upsample(self.conv_resample, ch, dtype=self.dtype, name=name)(h)
          ds //= 2
        index += 1
    return h

  def _head(self, h: Array) -> Array:
    """ADM `out`: norm, SiLU, zero-initialised 3x3 conv (all float32)."""
    h = nn.silu(GroupNorm32(name="out_0")(h))
    ch = h.shape[-1]
    return conv2d(self.out_channels, ch, zero_init=True, name="out_2")(h)
