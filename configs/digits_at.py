"""ADM-AT on the embedded digits: fine-tunes the clean `digits_adm` run as the paper does.

Train the clean run first (README, first command), then:
  python main.py --config=configs/digits_at.py --workdir=runs/digits_at
"""

from configs import digits_adm
from configs.cifar10_at import apply_paper_at


def get_config():
  config = apply_paper_at(digits_adm.get_config())
  config.optim.learning_rate = 2e-4  # fine-tuning: a smaller rate than the clean run's 1e-3
  config.optim.warmup_steps = 0
  config.train.num_steps = 300
  config.train.log_every = 25
  config.train.checkpoint_every = 100
  config.train.sample_every = 300
  config.train.init_from = "runs/digits_adm"
  config.train.init_from_command = (
      "python main.py --config=configs/digits_adm.py --workdir=runs/digits_adm")
  return config
