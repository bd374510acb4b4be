"""Guided-diffusion parity of the samplers (needs torch and guided-diffusion): helpers of
tests/test_ancestral.py and tests/test_ddim.py.

Our samplers with our Flax UNet against guided-diffusion's `p_sample_loop` /
`ddim_sample_loop` with its torch UNetModel carrying the same random weights, respaced to 10
steps through `SpacedDiffusion`; the per-step noise is fed to guided-diffusion by swapping the
`th` module seen by `guided_diffusion.gaussian_diffusion` for a proxy whose `randn_like` returns
our noise (everything else is torch's). Tolerance: max |ours - theirs| <= 1e-5 (observed
<= 6e-6 over 4 weight seeds). Caveat: at the cosine schedule's t = 999, ADM's x_0 prediction
multiplies ε by sqrt(1/ᾱ - 1) ≈ 2e4, so a pixel whose prediction lands inside the [-1, 1] clip
there inherits ~1e-2 of the network's float32 difference; the fixed seeds here avoid it.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import torch as th

with warnings.catch_warnings():
  warnings.simplefilter("ignore")
  import guided_diffusion.gaussian_diffusion as gd
  import guided_diffusion.respace as gd_respace
  from guided_diffusion.unet import UNetModel

from adv_diffusion.diffusion import GaussianDiffusion, space_timesteps  # noqa: E402
from adv_diffusion.nets import UNet  # noqa: E402
from adv_diffusion.nets.torch_mapping import torch_to_flax_params  # noqa: E402
from tests.gaussian_problem import T, keys_for  # noqa: E402

# One resolution level keeps the network's own float32 torch-vs-XLA difference (~3e-6 per call)
# well inside the budget: a two-level UNet reaches ~1e-5 after 10 steps (UNet parity itself is
# tests/test_unet.py's job). Learned variance (2C outputs) exercises ADM's LEARNED_RANGE.
UNET = dict(
    image_size=8,
    in_channels=3,
    model_channels=32,
    out_channels=6,
    num_res_blocks=1,
    attention_resolutions=(1,),
    channel_mult=(1,),
    num_head_channels=8,
    use_scale_shift_norm=True,
    use_new_attention_order=True,
)
RESPACING = "10"
PARITY_TOL = 1e-5


class Pair:
  """A random-weight guided-diffusion UNet, our Flax UNet with the same weights, both processes."""

  def __init__(self):
    th.manual_seed(0)
    self.torch = UNetModel(dims=2, use_fp16=False, use_checkpoint=False, **UNET).eval()
    with th.no_grad():
      for module in self.torch.modules():
        for p in module.parameters(recurse=False):
          p.normal_(0.0, 0.05)
        if isinstance(module, th.nn.GroupNorm):
          module.weight.add_(1.0)
    self.unet = UNet(**UNET)
    x = jnp.zeros((2, 8, 8, 3))
    template = jax.eval_shape(self.unet.init, jax.random.key(0), x, jnp.zeros((2,), jnp.int32))
    self.params = torch_to_flax_params(self.torch.state_dict(), template["params"])
    self.ours = GaussianDiffusion.create("cosine", T, RESPACING)
    self.theirs = gd_respace.SpacedDiffusion(
        use_timesteps=space_timesteps(T, RESPACING),
        betas=gd.get_named_beta_schedule("cosine", T),
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.LEARNED_RANGE,
        loss_type=gd.LossType.RESCALED_MSE,
    )
    rng = np.random.default_rng(1)
    self.noise = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
    self.keys = keys_for(2, seed=7)

  def model_fn(self, x, t):
    return self.unet.apply({"params": self.params}, x, t)

  def step_noise(self) -> list:
    """Our per-step noise (steps N-1 .. 0), NCHW torch tensors, in guided-diffusion's order."""
    out = []
    for t in reversed(range(self.ours.num_timesteps)):
      z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, t), (8, 8, 3)))(self.keys)
      out.append(th.from_numpy(np.asarray(z).transpose(0, 3, 1, 2).copy()))
    return out


class TorchFeedingNoise:
  """Stands in for `torch` inside guided_diffusion.gaussian_diffusion; randn_like pops noise."""

  def __init__(self, noises):
    self._noises = list(noises)

  def randn_like(self, x):
    return self._noises.pop(0)

  def __getattr__(self, name):
    return getattr(th, name)


def pair_with_one_torch_thread():
  """Body of a module-scoped `pair` fixture: yields a Pair while torch runs on one thread."""
  threads = th.get_num_threads()
  th.set_num_threads(1)  # tiny convolutions: extra torch threads only contend with XLA's
  yield Pair()
  th.set_num_threads(threads)


def nhwc(x) -> np.ndarray:
  return x.numpy().transpose(0, 2, 3, 1)
