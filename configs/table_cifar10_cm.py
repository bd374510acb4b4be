"""Consistency-model rows on CIFAR-10: CD and CD-AT with 1- and 2-step sampling, 50K samples.

  python main.py --mode=table --config=configs/table_cifar10_cm.py --workdir=runs/table_cifar10_cm
Train configs/cifar10_cd.py and configs/cifar10_cd_at.py first.
"""

from configs import cifar10_cd


def get_config():
  config = cifar10_cd.get_config()
  config.table.runs = "CD=runs/cifar10_cd,CD-AT=runs/cifar10_cd_at"
  config.sampling.batch_size = 500
  return config
