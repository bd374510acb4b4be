"""ADM-IP baseline on CIFAR-10 (Ning et al., ICML 2023): input perturbation γ = 0.15.

Same network, schedule and optimiser as `cifar10_adm`; x_t is built from ε + γ·ξ while the
target stays ε (PAPER.md §5).
"""

from configs import cifar10_adm


def get_config():
  config = cifar10_adm.get_config()
  config.diffusion.input_perturbation = 0.15
  config.train.num_steps = 450_000
  return config
