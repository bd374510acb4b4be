"""PAPER.md §7 grid on CIFAR-10: ADM, ADM-IP, ADM-AT × {ancestral, ES, DDIM, DPM-Solver++ 2M} ×
NFE {5, 8, 10, 20, 50}, 50K samples per cell, FID against the training set.

  python main.py --mode=table --config=configs/table_cifar10.py --workdir=runs/table_cifar10
Train the three runs first (configs/cifar10_adm.py, cifar10_ip.py, cifar10_at.py).
"""

from configs import cifar10_adm


def get_config():
  config = cifar10_adm.get_config()
  config.table.runs = "ADM=runs/cifar10_adm,ADM-IP=runs/cifar10_ip,ADM-AT=runs/cifar10_at"
  config.sampling.batch_size = 500
  config.sampling.preset = "authors"  # DPM-Solver++ as the paper's script ran it (PAPER.md §7)
  return config
