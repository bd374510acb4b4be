"""A tiny class-conditional ImageNet-64 run for tests on `tfds.testing.mock_data` (2 CPU cores).

ADM's ImageNet-64 options (class embedding over 1,000 labels, scale-shift norm, new attention
order in the middle block), one level of 32 channels and float32 compute.
"""

from configs import imagenet64_adm


def get_config():
  config = imagenet64_adm.get_config()
  config.model.num_channels = 32  # ADM's GroupNorm(32) needs multiples of 32
  config.model.channel_mult = (1,)  # one level: compiles fast (parity of the full ImageNet-64
  config.model.num_res_blocks = 0  # block types: test_torch_io's guided-diffusion comparison)
  config.model.attention_resolutions = ()
  config.model.num_head_channels = 32  # the middle block's attention runs at 32 channels
  config.model.compute_dtype = "float32"
  config.optim.learning_rate = 1e-3
  config.train.batch_size = 4
  config.train.num_steps = 2
  config.train.log_every = 1
  config.train.checkpoint_every = 1000
  config.train.sample_every = 0
  config.train.ema_rates = (0.9, 0.99)
  config.sampling.method = "ddim"
  config.sampling.nfe = 2
  config.sampling.num_samples = 8
  config.sampling.batch_size = 8
  config.evaluation.max_reference_images = 8
  config.evaluation.batch_size = 8
  config.evaluation.fid_method = "eigh"
  return config
