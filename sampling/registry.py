"""One entry point for every sampler: `make_sampler(method, nfe, schedule, T, **options)`.

The returned function `sample(model_fn, noise, keys=None) -> samples` is pure and jit-able;
`model_fn(x, t)` gets NHWC `x` and timesteps of the network's original grid and returns the
raw network output (C channels, or 2C with learned variance). `sample.nfe` is the exact number
of model calls, which always equals the requested `nfe`:
 * "ancestral" / "ancestral_es" / "ddim": the process is respaced to `nfe` steps;
 * "dpm_solver" / "dpm_solver++": `nfe` solver calls (one of them the final denoising call when
  `denoise_to_zero=True`);
 * "consistency": one consistency-function call per timestep of `timesteps` (default: `nfe`
  evenly spaced from T − 1), re-noising in between (sampling/consistency.py).

Options and defaults per method (anything else is a ValueError):
 * ancestral:    learn_sigma=True, clip_denoised=True, spacing="adm"
 * ancestral_es: the same plus eps_scale=1.017 (PAPER.md §5, CIFAR-10), eps_scale_slope=0.0
 * ddim:         eta=0.0, clip_denoised=True, spacing="ddim"
 * dpm_solver:   order=3, solver="singlestep" (DPM-Solver-fast), skip_type="logSNR", ...
 * dpm_solver++: order=2, solver="multistep" (the paper's DPM-Solver++ 2M), skip_type="logSNR",
  t_start=1.0, t_end=None (1/N), lower_order_final=True, lower_order_final_below=10,
  denoise_to_zero=False, truncate_cosine_like_reference=False, multistep3_like_reference=False,
  clip_denoised=False (True clips every x_0 prediction to [-1, 1]; dpm_solver++ only).
 * consistency:  timesteps=None, sigma_data=0.5, timestep_scale=10.0, clip_x0=True (must match
  the values the model was trained with: config.consistency).
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from adv_diffusion.diffusion import GaussianDiffusion
from sampling.ancestral import eps_scale_schedule, sample_ancestral
from sampling.consistency import check_timesteps, default_timesteps, sample_consistency
from sampling.ddim import check_eta, respaced_diffusion, sample_ddim
from sampling.dpm_solver import DiscreteVPSchedule, check_settings, sample_dpm_solver

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
Sampler = Callable[..., jax.Array]
METHODS = ("ancestral", "ancestral_es", "ddim", "dpm_solver", "dpm_solver++", "consistency")

_ANCESTRAL = dict(learn_sigma=True, clip_denoised=True, spacing="adm")
_DPM = dict(
    skip_type="logSNR",
    t_start=1.0,
    t_end=None,
    lower_order_final=True,
    lower_order_final_below=10,
    denoise_to_zero=False,
    truncate_cosine_like_reference=False,
    multistep3_like_reference=False,
)
DEFAULTS: dict[str, dict[str, Any]] = {
    "ancestral": _ANCESTRAL,
    "ancestral_es": dict(_ANCESTRAL, eps_scale=1.017, eps_scale_slope=0.0),
    "ddim": dict(eta=0.0, clip_denoised=True, spacing="ddim"),
    "dpm_solver": dict(_DPM, order=3, solver="singlestep"),
    "dpm_solver++": dict(_DPM, order=2, solver="multistep", clip_denoised=False),
    "consistency": dict(timesteps=None, sigma_data=0.5, timestep_scale=10.0, clip_x0=True),
}


def _resolve(method: str, options: dict[str, Any]) -> dict[str, Any]:
  if method not in METHODS:
    raise ValueError(f"Unknown sampling method {method!r}; allowed methods are {list(METHODS)}.")
  unknown = sorted(set(options) - set(DEFAULTS[method]))
  if unknown:
    raise ValueError(
        f"Unknown option(s) {unknown} for sampling method {method!r}; allowed options are "
        f"{sorted(DEFAULTS[method])}."
    )
  return {**DEFAULTS[method], **options}


def make_sampler(
    method: str, nfe: int, diffusion_schedule: str, num_timesteps: int, **options: Any
) -> Sampler:
  """A pure `sample(model_fn, noise, keys=None) -> samples` making exactly `nfe` model calls."""
  opts = _resolve(method, options)
  if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
    raise ValueError(f"nfe must be a positive integer (number of model calls), got {nfe!r}.")

  if method in ("ancestral", "ancestral_es"):
    diffusion = respaced_diffusion(diffusion_schedule, num_timesteps, nfe, opts["spacing"])
    scale = opts.get("eps_scale", 1.0)
    slope = opts.get("eps_scale_slope", 0.0)
    eps_scale_schedule(nfe, scale, slope)  # validate now, not at trace time

    def sample(model_fn: ModelFn, noise: jax.Array, keys: jax.Array | None = None) -> jax.Array:
      if keys is None:
        raise ValueError(f"Sampling method {method!r} is stochastic and needs per-sample keys.")
      return sample_ancestral(
          model_fn,
          noise,
          diffusion,
          keys,
          learn_sigma=opts["learn_sigma"],
          clip_denoised=opts["clip_denoised"],
          eps_scale=scale,
          eps_scale_slope=slope,
      )[0]

  elif method == "ddim":
    eta = check_eta(opts["eta"])
    diffusion = respaced_diffusion(diffusion_schedule, num_timesteps, nfe, opts["spacing"])

    def sample(model_fn: ModelFn, noise: jax.Array, keys: jax.Array | None = None) -> jax.Array:
      return sample_ddim(
          model_fn, noise, diffusion, keys, eta=eta, clip_denoised=opts["clip_denoised"]
      )[0]

  elif method == "consistency":
    timesteps = check_timesteps(
        opts["timesteps"] or default_timesteps(nfe, num_timesteps), nfe, num_timesteps
    )
    opts = dict(opts, timesteps=timesteps)
    alphas_cumprod = GaussianDiffusion.create(diffusion_schedule, num_timesteps).alphas_cumprod

    def sample(model_fn: ModelFn, noise: jax.Array, keys: jax.Array | None = None) -> jax.Array:
      return sample_consistency(
          model_fn,
          noise,
          alphas_cumprod,
          timesteps,
          keys,
          sigma_data=opts["sigma_data"],
          timestep_scale=opts["timestep_scale"],
          clip_x0=opts["clip_x0"],
      )

  else:
    schedule = DiscreteVPSchedule.create(
        diffusion_schedule,
        num_timesteps,
        truncate_cosine_like_reference=opts["truncate_cosine_like_reference"],
    )
    steps = nfe - int(bool(opts["denoise_to_zero"]))
    if steps < 1:
      raise ValueError(
          f"nfe={nfe} leaves no solver step once denoise_to_zero takes one model call; use "
          "nfe >= 2 or denoise_to_zero=False."
      )
    predictor = "noise" if method == "dpm_solver" else "data"
    t_end = 1.0 / schedule.total_n if opts["t_end"] is None else opts["t_end"]
    check_settings(
        steps, opts["order"], opts["solver"], opts["skip_type"], predictor, opts["t_start"], t_end
    )
    kwargs = dict(
        order=opts["order"],
        method=opts["solver"],
        skip_type=opts["skip_type"],
        predictor=predictor,
        t_start=opts["t_start"],
        t_end=t_end,
        lower_order_final=opts["lower_order_final"],
        lower_order_final_below=opts["lower_order_final_below"],
        denoise_to_zero=opts["denoise_to_zero"],
        multistep3_like_reference=opts["multistep3_like_reference"],
        clip_denoised=opts.get("clip_denoised", False),
    )

    def sample(model_fn: ModelFn, noise: jax.Array, keys: jax.Array | None = None) -> jax.Array:
      del keys  # deterministic ODE solver
      return sample_dpm_solver(model_fn, noise, schedule, steps, **kwargs)[0]

  sample.nfe = nfe
  sample.method = method
  sample.options = opts
  return sample
