"""Class-conditional ADM on ImageNet 64×64 (ADM's ImageNet-64 recipe, Dhariwal & Nichol 2021).

192 channels, mult (1,2,3,4), 3 res blocks, attention at 32/16/8 with 64 head channels,
dropout 0.1, cosine schedule, learned σ, scale-shift norm, resblock up/down, new attention order.
The same network as OpenAI's released `64x64_diffusion.pt`, which `--mode=import_torch` reads.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "imagenet64"
  config.data.image_size = 64
  config.data.channels = 3
  config.data.num_classes = 1000
  config.data.random_flip = False
  config.model.num_channels = 192
  config.model.channel_mult = (1, 2, 3, 4)
  config.model.num_res_blocks = 3
  config.model.attention_resolutions = (32, 16, 8)
  config.model.num_head_channels = 64
  config.model.dropout = 0.1
  config.model.learn_sigma = True
  config.model.use_scale_shift_norm = True
  config.model.resblock_updown = True
  config.model.use_new_attention_order = True
  config.model.compute_dtype = "bfloat16"
  config.diffusion.noise_schedule = "cosine"
  config.diffusion.loss_type = "rescaled_mse"
  config.diffusion.timestep_sampler = "loss-second-moment"
  config.optim.learning_rate = 3e-4  # ADM Table 11 (64×64: lr 3e-4, batch 2048, 540K iterations)
  config.train.batch_size = 2048
  config.train.num_steps = 540_000
  config.train.ema_rates = (0.9999,)
  config.train.log_every = 100
  config.train.checkpoint_every = 10_000
  config.train.keep_every = 50_000
  config.train.sample_every = 10_000
  config.train.sample_respacing = "100"
  config.sampling.eps_scale = 1.006  # ADM-ES b for ImageNet 64×64 (PAPER.md §5)
  return config
