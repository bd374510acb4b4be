"""CD with AT on the embedded digits, distilled from the clean `digits_adm` run.

Train the teacher first (README, first command), then:
  python main.py --config=configs/digits_cd_at.py --workdir=runs/digits_cd_at
"""

from configs import digits_adm
from configs.cifar10_at import apply_paper_at
from configs.cifar10_cd import apply_consistency_distillation


def get_config():
  config = digits_adm.get_config()
  config = apply_paper_at(
      apply_consistency_distillation(config, "runs/digits_adm", "configs/digits_adm.py")
  )
  config.consistency.num_scales = 20
  config.optim.learning_rate = 2e-4
  config.optim.warmup_steps = 0
  config.train.num_steps = 300
  config.train.log_every = 25
  config.train.checkpoint_every = 100
  config.train.sample_every = 300
  config.train.sample_respacing = "50"
  return config
