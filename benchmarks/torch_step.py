"""The PyTorch peer of our train step: guided-diffusion's UNetModel, hybrid loss and resampler
with torch.optim.AdamW and one EMA, on a fixed random uint8 batch (needs torch and
guided-diffusion; only `benchmarks.torch_peer` imports this module).

One step, as guided-diffusion's TrainLoop does it in float32 (PAPER.md §6): uint8 → [-1, 1] with
a random horizontal flip, t and weights from the schedule sampler, `training_losses` (L_simple +
L_vlb with learned range, RESCALED_MSE), the weighted mean, backward, the global gradient norm
(our step reports it too), AdamW, the EMA update and the sampler's loss history. Left out:
TrainLoop's logging (and its per-parameter norms), checkpoints and distributed all-gathers.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from typing import Callable

import ml_collections
import numpy as np
import torch

with warnings.catch_warnings():  # guided_diffusion.nn uses deprecated torch.cuda.amp decorators
  warnings.simplefilter("ignore")
  from guided_diffusion import gaussian_diffusion as gd
  from guided_diffusion.nn import update_ema
  from guided_diffusion.resample import LossSecondMomentResampler, UniformSampler
  from guided_diffusion.respace import SpacedDiffusion, space_timesteps
  from guided_diffusion.unet import UNetModel

from modes.factories import create_unet

_LOSSES = {"mse": gd.LossType.MSE, "rescaled_mse": gd.LossType.RESCALED_MSE}


class _SecondMomentResampler(LossSecondMomentResampler):
  """guided-diffusion's importance sampler; its __init__ again, as its `np.int` is gone from
  NumPy 2 (the methods are guided-diffusion's)."""

  def __init__(self, diffusion, history_per_term: int, uniform_prob: float):
    self.diffusion = diffusion
    self.history_per_term = history_per_term
    self.uniform_prob = uniform_prob
    self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], np.float64)
    self._loss_counts = np.zeros([diffusion.num_timesteps], np.int64)


@dataclasses.dataclass
class TorchStep:
  """One guided-diffusion train step on a held model, optimizer, EMA and batch."""

  run: Callable[[], dict]  # one step; returns its loss and gradient norm
  param_count: int
  threads: dict  # torch's intra- and inter-op thread counts


def unet_kwargs(config: ml_collections.ConfigDict) -> dict:
  """guided-diffusion UNetModel arguments of `config.model`: the fields of our UNet (built by the
  same factory the train step uses) that UNetModel takes, fp16 and checkpointing off."""
  ours = create_unet(config)
  names = set(inspect.signature(UNetModel.__init__).parameters) - {"self"}
  kwargs = {f.name: getattr(ours, f.name) for f in dataclasses.fields(ours) if f.name in names}
  return dict(kwargs, dims=2, use_fp16=False, use_checkpoint=False)


def create_torch_step(config: ml_collections.ConfigDict, seed: int = 0) -> TorchStep:
  """guided-diffusion's train step for `config` (float32; `config.model.compute_dtype` ignored)."""
  if config.model.learn_sigma is not True or config.diffusion.loss_type not in _LOSSES:
    raise ValueError("the torch peer needs learned σ and an mse / rescaled_mse hybrid loss")
  torch.manual_seed(seed)
  rng = np.random.default_rng(seed)
  model = UNetModel(**unet_kwargs(config)).train()  # dropout on, as in training
  steps = config.diffusion.num_timesteps
  diffusion = SpacedDiffusion(
      use_timesteps=space_timesteps(steps, [steps]),
      betas=gd.get_named_beta_schedule(config.diffusion.noise_schedule, steps),
      model_mean_type=gd.ModelMeanType.EPSILON,
      model_var_type=gd.ModelVarType.LEARNED_RANGE,
      loss_type=_LOSSES[config.diffusion.loss_type],
  )
  d = config.diffusion
  if d.timestep_sampler == "uniform":
    sampler = UniformSampler(diffusion)
  else:
    sampler = _SecondMomentResampler(diffusion, d.sampler_history, d.sampler_uniform_prob)
  params = list(model.parameters())
  o = config.optim
  opt = torch.optim.AdamW(
      params, lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay
  )
  (rate,) = config.train.ema_rates  # one EMA, as the benchmarked configs have
  ema = [p.detach().clone() for p in params]
  size, channels, batch = config.data.image_size, config.data.channels, config.train.batch_size
  images = torch.from_numpy(rng.integers(0, 256, (batch, channels, size, size), dtype=np.uint8))

  def one_step() -> dict:
    with torch.enable_grad():  # whatever grad mode the caller left on
      x = images.float() / 127.5 - 1.0
      flip = torch.rand(batch) < 0.5
      x = torch.where(flip[:, None, None, None], x.flip(3), x)
      t, weights = sampler.sample(batch, "cpu")
      losses = diffusion.training_losses(model, x, t)
      if isinstance(sampler, LossSecondMomentResampler):  # one process: no all-gather
        sampler.update_with_all_losses(t.tolist(), losses["loss"].detach().tolist())
      loss = (losses["loss"] * weights).mean()
      opt.zero_grad(set_to_none=True)
      loss.backward()
      grad_norm = torch.linalg.vector_norm(
          torch.stack([torch.linalg.vector_norm(p.grad) for p in params])
      )
      opt.step()
      update_ema(ema, params, rate=rate)
      return {"loss": float(loss.detach()), "grad_norm": float(grad_norm)}

  threads = {"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads()}
  return TorchStep(one_step, sum(p.numel() for p in params), threads)
