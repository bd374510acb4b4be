"""Consistency distillation (CD) of the clean CIFAR-10 ADM (PAPER.md §8; our formulation).

The student is the teacher's network, initialised from the teacher's EMA weights; the teacher
takes one DDIM step from t_{n+1} to t_n on an N = 50 grid (LCM's 20-step skip on ADM's 1000
steps), the target network is an EMA of the student with μ = 0.95 (LCM), distance ℓ2. LPIPS,
the distance of Song et al. 2023's published CD numbers, is not available yet.
Sample: --mode=sample --config.sampling.method=consistency --config.sampling.nfe=1 (or 2).
"""

from configs import cifar10_adm


def apply_consistency_distillation(config, teacher: str, teacher_config: str):
  """CD settings shared by every *_cd config; `teacher` is the clean run's workdir."""
  config.consistency.mode = "distill"
  config.consistency.teacher = teacher
  config.consistency.teacher_step = -1
  config.consistency.teacher_command = (
      f"python main.py --config={teacher_config} --workdir={teacher}"
  )
  config.consistency.num_scales = 50
  config.consistency.skip = 1
  config.consistency.distance = "l2"
  config.consistency.target_ema = 0.95
  config.sampling.method = "consistency"
  config.sampling.nfe = 1
  return config


def get_config():
  config = apply_consistency_distillation(
      cifar10_adm.get_config(), "runs/cifar10_adm", "configs/cifar10_adm.py"
  )
  config.train.num_steps = 200_000
  config.train.sample_every = 10_000
  return config
