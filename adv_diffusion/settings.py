"""What the train step reads, as small frozen dataclasses (no ConfigDict below `modes/`).

`modes.factories.step_settings` builds them from a config, the way `create_unet` builds the
network; the defaults are those of `configs/default.py`.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class AdversarialSettings:
  """δ search of adversarial training (PAPER.md §3–§4)."""

  mode: str = "none"  # "none" | "fast" (Free-AT replays) | "pgd"
  num_replays: int = 3  # K of "fast"
  pgd_steps: int = 1  # k of "pgd"
  step_size: float = 0.1  # η: ℓ2 step length, or ℓ∞ per-pixel step
  radius: float = 0.1  # ρ: ℓ2 ball sqrt(d)·ρ, ℓ∞ ball ρ per pixel
  norm: str = "l2"  # "l2" | "linf"
  target: str = "delta_detach"  # "delta_detach" | "delta" | "original"
  init: str = "zero"  # "zero" | "random" | "carry"
  init_magnitude: float = 0.0  # size of a random initial δ
  radius_schedule: str = "constant"  # "constant" | "ddim_gap"
  radius_grid_steps: int = 50  # DDIM grid of the "ddim_gap" radius


@dataclasses.dataclass(frozen=True)
class ConsistencySettings:
  """Consistency distillation / training (PAPER.md §8)."""

  mode: str = "none"  # "none" | "distill" | "train"
  num_scales: int = 50  # N of the grid t_n = round(n·(T−1)/N)
  skip: int = 1  # k: the teacher steps from t_{n+k} to t_n
  distance: str = "l2"  # "l2" | "pseudo_huber" | "lpips"
  lpips_resize: int = 224  # LPIPS input side (0 = as is)
  sigma_data: float = 0.5  # σ_d of c_skip, c_out
  timestep_scale: float = 10.0  # s in c_skip(t) = σ_d²/((s·t)² + σ_d²)
  clip_x0: bool = True  # clip x̂_0 inside f to [-1, 1]
  target_ema: float = 0.95  # μ of θ⁻ ← μ·θ⁻ + (1−μ)·θ
  target_ema_schedule: str = "constant"  # "constant" | "linear"
  target_ema_start: float = 0.9  # "linear": μ at the first update
  target_ema_ramp_updates: int = 0  # "linear": updates of the ramp

  @property
  def enabled(self) -> bool:
    """Whether the step trains a consistency model."""
    return self.mode != "none"


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """Everything one train step needs besides the network, the process and the optimizer."""

  adversarial: AdversarialSettings = AdversarialSettings()
  consistency: ConsistencySettings = ConsistencySettings()
  ema_rates: tuple[float, ...] = (0.9999,)  # one parameter average per rate
  learn_sigma: bool = True  # ADM learned-range variance (hybrid loss)
  loss_type: str = "rescaled_mse"  # "mse" | "rescaled_mse"
  timestep_sampler: str = "loss-second-moment"  # "uniform" | "loss-second-moment"
  timestep_uniform_prob: float = 0.001  # uniform mixing of the importance sampler
  input_perturbation: float = 0.0  # ADM-IP γ (0 = off)
  random_flip: bool = False  # per-example horizontal flip
  conditional: bool = False  # feed the batch's class labels to the network
