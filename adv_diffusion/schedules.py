"""ADM's β schedules and timestep respacing (IDDPM §3.2, §4), exactly as guided_diffusion.

Schedule tables are float64 numpy arrays computed the way ADM computes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

BETA_SCHEDULES = ("linear", "cosine")


def _check_num_timesteps(num_timesteps: int) -> int:
  if isinstance(num_timesteps, bool) or int(num_timesteps) != num_timesteps or num_timesteps < 1:
    raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}.")
  return int(num_timesteps)


def _cosine_alpha_bar(u: float) -> float:
  # IDDPM Eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2),
  # s = 0.008. The 1/f(0) factor cancels in the ratio used below.
  return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
  """ADM's float64 beta schedule ``"linear"`` or ``"cosine"`` with ``num_timesteps`` steps."""
  num_timesteps = _check_num_timesteps(num_timesteps)
  if name == "linear":
    # DDPM Sec. 4 linear schedule 1e-4 .. 0.02 for T=1000, rescaled to any T as ADM does.
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
  if name == "cosine":
    # IDDPM Eq. 17 discretised: beta_t = min(1 - alpha_bar(t+1)/alpha_bar(t), 0.999).
    # Evaluated with python's math (not vectorised numpy) to be bit-identical to ADM.
    t_grid = num_timesteps
    betas = [
        min(1.0 - _cosine_alpha_bar((i + 1) / t_grid) / _cosine_alpha_bar(i / t_grid), 0.999)
        for i in range(t_grid)
    ]
    return np.array(betas, dtype=np.float64)
  raise ValueError(f"Unknown beta schedule {name!r}; allowed schedules are {list(BETA_SCHEDULES)}.")


def _ddim_counts(num_timesteps: int) -> list[int]:
  """Step counts achievable with ADM's "ddimN" integer-stride rule."""
  return sorted({len(range(0, num_timesteps, k)) for k in range(1, num_timesteps)})


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
  """Sorted original-grid timesteps kept by ADM respacing ("ddimN", "10,20,30" or a list)."""
  num_timesteps = _check_num_timesteps(num_timesteps)
  if isinstance(section_counts, str):
    spec = section_counts.strip()
    if spec.startswith("ddim"):
      try:
        desired = int(spec[len("ddim") :])
      except ValueError:
        raise ValueError(
            f"Bad respacing {section_counts!r}: 'ddimN' needs an integer N, e.g. 'ddim50'."
        ) from None
      # DDIM paper's fixed striding: the smallest integer stride giving exactly N steps.
      for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired:
          return list(range(0, num_timesteps, stride))
      allowed = _ddim_counts(num_timesteps)
      if len(allowed) > 20:
        below = [c for c in allowed if c < desired]
        above = [c for c in allowed if c > desired]
        hint = (
            f"the nearest achievable counts are {below[-1] if below else None} and "
            f"{above[0] if above else None}"
        )
      else:
        hint = f"achievable counts are {allowed}"
      raise ValueError(
          f"Bad respacing {section_counts!r}: no integer stride over {num_timesteps} "
          f"timesteps gives exactly {desired} steps ({hint})."
      )
    try:
      counts = [int(c) for c in spec.split(",")]
    except ValueError:
      raise ValueError(
          f"Bad respacing {section_counts!r}: expected 'ddimN' or comma-separated "
          "integer section counts such as '10,20,30'."
      ) from None
  else:
    counts = [int(c) for c in section_counts]
    if any(c != s for c, s in zip(counts, section_counts)):
      raise ValueError(f"Bad respacing {section_counts!r}: section counts must be integers.")
    if len(counts) == 0:
      raise ValueError("Bad respacing []: at least one section count is required.")

  # IDDPM Sec. 4 (Eq. 19): split [0, T) into len(counts) near-equal sections and take
  # `count` evenly spaced (rounded) steps from each, both section ends included.
  size_per, extra = divmod(num_timesteps, len(counts))
  start = 0
  kept: list[int] = []
  for i, count in enumerate(counts):
    size = size_per + (1 if i < extra else 0)
    if count < 0 or count > size:
      raise ValueError(
          f"Bad respacing {section_counts!r}: section {i} covers {size} of the "
          f"{num_timesteps} timesteps, so its count must be between 0 and {size}, got {count}."
      )
    stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
    pos = 0.0
    for _ in range(count):
      kept.append(start + round(pos))  # python's round, as ADM
      pos += stride
    start += size
  if not kept:
    raise ValueError(f"Bad respacing {section_counts!r}: it keeps no timesteps at all.")
  return sorted(set(kept))
