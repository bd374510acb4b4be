"""Clean ADM training on the embedded digits dataset (scikit-learn, 16×16 grayscale).

Small enough to train meaningfully in a few minutes on two CPU cores.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "digits"
  config.data.image_size = 16
  config.data.channels = 1
  config.model.num_channels = 32
  config.model.channel_mult = (1, 2, 2)
  config.model.num_res_blocks = 1
  config.model.attention_resolutions = (8,)
  config.model.num_head_channels = 16
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 100
  config.train.batch_size = 64
  config.train.num_steps = 1200
  config.train.ema_rates = (0.995,)  # half-life ~140 steps: a short run
  config.train.checkpoint_every = 200
  config.train.sample_every = 600
  config.sampling.num_samples = 1024  # the embedded set has 1,797 images
  return config
