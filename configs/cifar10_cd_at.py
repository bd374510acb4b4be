"""CD with adversarial training (PAPER.md §8): the student sees x_{t_{n+1}} + δ, δ from the
authors' fast AT loop (§4: K = 3 replays, η = 0.1, ρ = 0.1, ℓ2); the target comes from the
clean trajectory. Everything else as configs/cifar10_cd.py."""

from configs import cifar10_cd
from configs.cifar10_at import apply_paper_at


def get_config():
  return apply_paper_at(cifar10_cd.get_config())
