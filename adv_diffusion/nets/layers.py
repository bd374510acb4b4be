"""Building blocks of the ADM UNet (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on
Image Synthesis"), in Flax Linen with NHWC activations.

Every block reproduces the matching module of OpenAI's guided-diffusion (`guided_diffusion.unet`
and `guided_diffusion.nn`) to float precision; submodule names mirror the torch attribute paths
so that `adv_diffusion.nets.torch_mapping` is a purely mechanical rule (see its docstring).

Precision policy (mirrors ADM's fp16 mode): parameters are always float32; `dtype` is the
compute dtype of convolutions, attention and the activations between them; group norms and the
attention logits and softmax are evaluated in float32 and cast back, and the timestep-embedding
projection (`emb_layers_1`) runs in float32, because ADM's `convert_module_to_f16` converts only
conv layers.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any
Array = jax.Array

# PyTorch's default init for Linear/Conv (kaiming_uniform with a=sqrt(5)) is U(+-1/sqrt(fan_in))
# for weights and biases alike; using it keeps from-scratch training faithful to ADM.
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
zeros_init = nn.initializers.zeros


def torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch's default bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key: Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def conv2d(
    features: int,
    in_features: int,
    *,
    kernel_size: int = 3,
    stride: int = 1,
    zero_init: bool = False,
    dtype: Dtype = jnp.float32,
    name: str,
) -> nn.Conv:
  """A torch-style Conv2d (symmetric padding k//2, torch default or zero init)."""
  pad = kernel_size // 2
  fan_in = in_features * kernel_size * kernel_size
  return nn.Conv(
      features,
      (kernel_size, kernel_size),
      strides=(stride, stride),
      # Explicit symmetric padding: "SAME" would pad (0, 1) for stride 2, unlike torch.
      padding=((pad, pad), (pad, pad)),
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=zeros_init if zero_init else torch_kernel_init,
      bias_init=zeros_init if zero_init else torch_bias_init(fan_in),
      name=name,
  )


def dense(
    features: int,
    in_features: int,
    *,
    zero_init: bool = False,
    dtype: Dtype = jnp.float32,
    name: str,
) -> nn.Dense:
  """A torch-style Linear (also stands in for ADM's 1x1 Conv1d in attention)."""
  return nn.Dense(
      features,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=zeros_init if zero_init else torch_kernel_init,
      bias_init=zeros_init if zero_init else torch_bias_init(in_features),
      name=name,
  )


class GroupNorm32(nn.Module):
  """ADM's `normalization`: GroupNorm(32 groups, eps 1e-5) computed in float32, cast back."""

  num_groups: int = 32
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: Array) -> Array:
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(
          f"GroupNorm32 needs channels divisible by {self.num_groups}, got {channels}."
      )
    scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    h = x.astype(jnp.float32)
    # Statistics over all spatial positions and the channels of each group (torch layout).
    grouped = h.reshape(h.shape[0], -1, self.num_groups, channels // self.num_groups)
    mean = grouped.mean(axis=(1, 3), keepdims=True)
    centred = grouped - mean
    var = jnp.square(centred).mean(axis=(1, 3), keepdims=True)  # two-pass, like torch
    normed = (centred * jax.lax.rsqrt(var + self.epsilon)).reshape(h.shape)
    return (normed * scale + bias).astype(x.dtype)


def timestep_embedding(timesteps: Array, dim: int, max_period: float = 10000.0) -> Array:
  """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps, in float32 (ADM)."""
  half = dim // 2
  # Same operation order as ADM so the float32 frequencies agree bit for bit.
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(timesteps).astype(jnp.float32)[:, None] * freqs[None]
  embedding = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
  return embedding


def upsample_nearest(x: Array) -> Array:
  """Nearest-neighbour x2 upsampling of an NHWC tensor."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool2(x: Array) -> Array:
  """2x2 average pooling with stride 2 of an NHWC tensor."""
  return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class Upsample(nn.Module):
  """ADM `Upsample`: nearest x2, then an optional 3x3 conv named `conv`."""

  use_conv: bool
  out_channels: int | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    channels = x.shape[-1]
    x = upsample_nearest(x)
    if self.use_conv:
      x = conv2d(self.out_channels or channels, channels, dtype=self.dtype, name="conv")(x)
    return x


class Downsample(nn.Module):
  """ADM `Downsample`: a stride-2 3x3 conv named `op`, or 2x2 average pooling."""

  use_conv: bool
  out_channels: int | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    channels = x.shape[-1]
    out_channels = self.out_channels or channels
    if self.use_conv:
      return conv2d(out_channels, channels, stride=2, dtype=self.dtype, name="op")(x)
    if out_channels != channels:
      raise ValueError(
          f"Downsample without conv cannot change channels ({channels} -> {out_channels})."
      )
    return avg_pool2(x)


class ResBlock(nn.Module):
  """ADM residual block conditioned on the timestep embedding, optionally resampling."""

  out_channels: int
  dropout: float = 0.0
  use_scale_shift_norm: bool = False
  up: bool = False
  down: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, emb: Array, train: bool = False) -> Array:
    channels, out = x.shape[-1], self.out_channels
    h = nn.silu(GroupNorm32(name="in_layers_0")(x))
    if self.up or self.down:
      # ADM resamples both paths after norm+SiLU and before the first conv.
      resample = upsample_nearest if self.up else avg_pool2
      h, x = resample(h), resample(x)
    h = conv2d(out, channels, dtype=self.dtype, name="in_layers_2")(h)

    # Linear layers stay in float32 under ADM's fp16 mode; only the result is cast.
    emb_features = 2 * out if self.use_scale_shift_norm else out
    emb_out = dense(emb_features, emb.shape[-1], name="emb_layers_1")(nn.silu(emb))
    emb_out = emb_out.astype(h.dtype)[:, None, None, :]
    if self.use_scale_shift_norm:
      # FiLM-like "AdaGN" conditioning (ADM section 3): norm(h) * (1 + scale) + shift.
      scale, shift = jnp.split(emb_out, 2, axis=-1)
      h = GroupNorm32(name="out_layers_0")(h) * (1 + scale) + shift
    else:
      h = GroupNorm32(name="out_layers_0")(h + emb_out)
    h = nn.silu(h)
    h = nn.Dropout(self.dropout, name="out_layers_2")(h, deterministic=not train)
    # zero_module in ADM: every residual branch starts as the identity.
    h = conv2d(out, out, zero_init=True, dtype=self.dtype, name="out_layers_3")(h)

    if out != channels:
      x = conv2d(out, channels, kernel_size=1, dtype=self.dtype, name="skip_connection")(x)
    return x + h


def resolve_num_heads(channels: int, num_heads: int, num_head_channels: int) -> int:
  """ADM semantics: a fixed head width `num_head_channels` (if != -1) overrides `num_heads`."""
  if num_head_channels == -1:
    heads = num_heads
  elif channels % num_head_channels:
    raise ValueError(
        f"Attention channels {channels} are not divisible by num_head_channels "
        f"{num_head_channels}."
    )
  else:
    heads = channels // num_head_channels
  if heads < 1 or channels % heads:
    raise ValueError(f"Attention channels {channels} cannot be split into {heads} heads.")
  return heads


def qkv_attention(qkv: Array, num_heads: int, new_order: bool) -> Array:
  """Multi-head attention softmax(q·kᵀ/sqrt(ch))·v on packed (B, T, 3*C) qkv, returning (B, T, C).

  Channel packing as in ADM: the legacy order is (head, q/k/v, ch) - `QKVAttentionLegacy` -
  and the new order is (q/k/v, head, ch) - `QKVAttention`. The output is (head, ch).

  Computed by `jax.nn.dot_product_attention` on (batch, seq, heads, head_dim) views: XLA's
  implementation, or whichever JAX picks where it may (cuDNN on GPU). It forms the logits in
  float32 (low-precision q and k accumulate there) and takes a float32 softmax, the precision
  policy of this module. q and k come scaled by ch**-0.25 each and the logits unscaled, in ADM's
  order (against fp16 overflow), so that float32 results match ADM's to rounding.
  """
  batch, length, width = qkv.shape
  ch = width // (3 * num_heads)
  if new_order:
    q, k, v = jnp.moveaxis(qkv.reshape(batch, length, 3, num_heads, ch), 2, 0)
  else:
    q, k, v = jnp.moveaxis(qkv.reshape(batch, length, num_heads, 3, ch), 3, 0)
  scale = 1.0 / math.sqrt(math.sqrt(ch))
  out = jax.nn.dot_product_attention(q * scale, k * scale, v, scale=1.0, implementation=None)
  return out.reshape(batch, length, num_heads * ch)


class AttentionBlock(nn.Module):
  """ADM self-attention over all spatial positions, with a zero-initialised output projection."""

  num_heads: int = 1
  num_head_channels: int = -1
  use_new_attention_order: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    batch, height, width, channels = x.shape
    heads = resolve_num_heads(channels, self.num_heads, self.num_head_channels)
    flat = x.reshape(batch, height * width, channels)
    # qkv / proj_out are 1x1 Conv1d in ADM, i.e. per-position Dense layers here.
    qkv = dense(3 * channels, channels, dtype=self.dtype, name="qkv")(
        GroupNorm32(name="norm")(flat)
    )
    h = qkv_attention(qkv, heads, self.use_new_attention_order)
    h = dense(channels, channels, zero_init=True, dtype=self.dtype, name="proj_out")(h)
    return (flat + h).reshape(x.shape)
