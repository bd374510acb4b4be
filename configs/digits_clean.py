"""The clean digits model the main job fine-tunes: the story's UNet trained to a plateau.

  python main.py --config=configs/digits_clean.py --workdir=runs/digits_clean

The main job (configs/digits_at.py) starts its AT fine-tune and its clean control from this
run's EMA weights, as the paper starts from a converged clean checkpoint (PAPER.md §4); the
weights it ships were written by this command (README, "What the main job does").
"""

from configs import digits_at


def get_config():
  config = digits_at.get_config()
  config.mode = "train"
  config.adversarial.mode = "none"
  config.train.init_from = ""
  config.train.init_from_command = ""
  config.train.batch_size = 64
  config.train.num_steps = 2000
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 100
  config.train.ema_rates = (0.995,)  # half-life ~140 steps: averages the last few hundred
  config.train.log_every = 100
  config.train.checkpoint_every = 500
  config.train.keep_every = 500  # the shipped weights' step and its neighbours stay
  config.train.sample_every = 500
  return config
