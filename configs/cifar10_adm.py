"""Clean ADM on CIFAR-10: the paper's recipe (PAPER.md §6, the authors' scripts).

UNet 128 ch, mult (1,2,2,2), 3 res blocks, attention at 16 and 8 with 32 head channels,
resblock up/down, new attention order, scale-shift norm, dropout 0.3, learned σ with the
rescaled hybrid loss, cosine schedule, 1000 steps, loss-second-moment timestep sampler,
AdamW lr 1e-4 without weight decay, EMA 0.9999, global batch 128; 250K iterations before AT.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "cifar10"
  config.data.image_size = 32
  config.data.channels = 3
  config.data.random_flip = True
  config.model.num_channels = 128
  config.model.channel_mult = (1, 2, 2, 2)
  config.model.num_res_blocks = 3
  config.model.attention_resolutions = (16, 8)
  config.model.num_head_channels = 32
  config.model.dropout = 0.3
  config.model.learn_sigma = True
  config.model.use_scale_shift_norm = True
  config.model.resblock_updown = True
  config.model.use_new_attention_order = True
  config.model.compute_dtype = "bfloat16"  # the authors train in fp16 (PAPER.md §6)
  config.diffusion.noise_schedule = "cosine"
  config.diffusion.num_timesteps = 1000
  config.diffusion.loss_type = "rescaled_mse"
  config.diffusion.timestep_sampler = "loss-second-moment"
  config.optim.learning_rate = 1e-4
  config.optim.weight_decay = 0.0
  config.train.batch_size = 128
  config.train.num_steps = 250_000
  config.train.ema_rates = (0.9999,)
  config.train.log_every = 100
  config.train.checkpoint_every = 10_000
  config.train.keep_every = 50_000
  config.train.sample_every = 10_000
  config.train.sample_respacing = "100"
  return config
