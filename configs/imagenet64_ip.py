"""ADM-IP baseline on class-conditional ImageNet 64×64 (Ning et al., ICML 2023): γ = 0.1.

Same network, schedule and optimiser as `imagenet64_adm`; x_t is built from ε + γ·ξ while the
target stays ε (PAPER.md §5: γ = 0.15 for CIFAR-10, 0.1 elsewhere).
"""

from configs import imagenet64_adm


def get_config():
  config = imagenet64_adm.get_config()
  config.diffusion.input_perturbation = 0.1
  return config
