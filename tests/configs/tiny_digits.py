"""A tiny digits run for tests: a one-level UNet without residual blocks in its level and
without attention but the middle block's, which compiles fast on 2 CPU cores (its layers, and
this block layout, are tested against guided-diffusion in test_unet.py)."""

from configs import digits_adm


def get_config():
  config = digits_adm.get_config()
  config.model.num_channels = 32
  config.model.channel_mult = (1,)
  config.model.num_res_blocks = 0  # stem conv + middle block + one output block
  config.model.attention_resolutions = ()
  config.model.dropout = 0.1
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 0
  config.train.batch_size = 16
  config.train.num_steps = 3
  config.train.log_every = 1
  config.train.checkpoint_every = 1000
  config.train.sample_every = 0
  config.train.sample_respacing = "10"
  config.train.sample_grid_size = 16
  config.train.ema_rates = (0.9, 0.99)
  return config
