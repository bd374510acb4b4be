"""Gaussian diffusion process and its losses in JAX (NHWC).

A float-precision re-implementation of the maths in OpenAI's ``guided_diffusion``
(``gaussian_diffusion.py``, ``respace.py``, ``losses.py``) for an
epsilon-predicting network whose variance is either learned (ADM ``LEARNED_RANGE``)
or fixed (ADM ``FIXED_LARGE``).

References (equation numbers refer to these papers):
 * DDPM  -- Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239.
 * IDDPM -- Nichol, Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models",
  arXiv:2102.09672.
 * ADM   -- Dhariwal, Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis",
  arXiv:2105.05233 (the codebase these formulas are checked against).

Conventions:
 * Images are NHWC: channels are the LAST axis. A learned-variance network outputs 2C
  channels; the first C are epsilon, the last C the variance interpolation values v.
 * Schedule tables are float64 numpy arrays (computed exactly as ADM does) and are
  gathered at ``t`` and cast to float32 at use, like ADM's ``_extract_into_tensor``.
 * ``t`` is an int array of shape (B,) indexing THIS (possibly respaced) process;
  ``model_timesteps(t)`` gives the original-grid timestep the network must be told.
 * Everything taking arrays is pure and jit-friendly. ``GaussianDiffusion`` is a frozen,
  identity-hashed dataclass, so it can be closed over or passed as a static argument.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adv_diffusion.likelihood import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from adv_diffusion.vp import eps_from_x0, q_sample_at, x0_from_eps
from adv_diffusion.schedules import get_named_beta_schedule, space_timesteps

__all__ = [
    "GaussianDiffusion",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "get_named_beta_schedule",
    "mean_flat",
    "normal_kl",
    "space_timesteps",
]

LOSS_TYPES = ("mse", "rescaled_mse")

_LN2 = math.log(2.0)  # python float: stays a weak type, so float32 maths stays float32


# ----------------------------------------------------------------------------------------
# The diffusion process
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianDiffusion:
  """Discrete-time Gaussian diffusion with an epsilon-predicting network (ADM semantics)."""

  betas: np.ndarray
  timestep_map: np.ndarray | None = None

  def __post_init__(self) -> None:
    betas = np.array(self.betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0:
      raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}.")
    if not ((betas > 0).all() and (betas <= 1).all()):
      raise ValueError(f"betas must lie in (0, 1], got values in [{betas.min()}, {betas.max()}].")
    n = betas.shape[0]
    if self.timestep_map is None:
      timestep_map = np.arange(n, dtype=np.int32)
    else:
      timestep_map = np.asarray(self.timestep_map).astype(np.int32)
      if timestep_map.shape != (n,):
        raise ValueError(
            f"timestep_map must have shape ({n},) to match betas, got {timestep_map.shape}."
        )
    betas.setflags(write=False)
    timestep_map.setflags(write=False)
    object.__setattr__(self, "betas", betas)
    object.__setattr__(self, "timestep_map", timestep_map)

    alphas = 1.0 - betas
    # IDDPM Eq. 8: alpha_bar_t = prod_{s<=t} alpha_s.
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    tables: dict[str, np.ndarray] = {
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        # IDDPM Eq. 9: q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I).
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "one_minus_alphas_cumprod": 1.0 - ac,
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
        # Inverse of IDDPM Eq. 10: x_0 = sqrt(1/alpha_bar) x_t - sqrt(1/alpha_bar - 1) eps.
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
    }
    # IDDPM Eq. 13: beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t.
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    tables["posterior_variance"] = post_var
    # beta_tilde_0 = 0, so the log is clipped by repeating beta_tilde_1 at t=0 (as ADM).
    tables["posterior_log_variance_clipped"] = np.log(np.append(post_var[1], post_var[1:]))
    # IDDPM Eq. 12: mu_tilde = coef1 * x_0 + coef2 * x_t.
    tables["posterior_mean_coef1"] = betas * np.sqrt(ac_prev) / (1.0 - ac)
    tables["posterior_mean_coef2"] = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)
    # IDDPM Eq. 15 upper end of the learned range: log beta_t.
    tables["log_betas"] = np.log(betas)
    # ADM FIXED_LARGE: sigma^2 = beta_t, except beta_tilde_1 at t=0 (better decoder NLL).
    fixed_large = np.append(post_var[1], betas[1:])
    tables["fixed_large_variance"] = fixed_large
    tables["fixed_large_log_variance"] = np.log(fixed_large)

    tables32 = {}
    for name, arr in tables.items():
      arr.setflags(write=False)
      object.__setattr__(self, name, arr)
      tables32[name] = np.asarray(arr, dtype=np.float32)  # ADM: th.from_numpy(arr).float()
    object.__setattr__(self, "_tables32", tables32)

  def __repr__(self) -> str:
    kept = self.timestep_map
    return (
        f"GaussianDiffusion(num_timesteps={self.num_timesteps}, "
        f"timestep_map=[{kept[0]}..{kept[-1]}], "
        f"beta_range=[{self.betas[0]:.3g}, {self.betas[-1]:.3g}])"
    )

  @classmethod
  def create(
      cls,
      schedule: str,
      num_timesteps: int = 1000,
      respacing: str | Sequence[int] | None = None,
  ) -> GaussianDiffusion:
    """Process from a named schedule, optionally respaced exactly like ADM's SpacedDiffusion."""
    betas = get_named_beta_schedule(schedule, num_timesteps)
    if respacing is None or (isinstance(respacing, str) and respacing.strip() == ""):
      return cls(betas=betas, timestep_map=np.arange(len(betas), dtype=np.int32))
    return cls.from_timesteps(schedule, num_timesteps, space_timesteps(num_timesteps, respacing))

  @classmethod
  def from_timesteps(
      cls, schedule: str, num_timesteps: int, kept: Sequence[int]
  ) -> GaussianDiffusion:
    """Process keeping exactly the sorted original-grid timesteps `kept` (ADM SpacedDiffusion)."""
    kept = np.asarray(list(kept), dtype=np.int64)
    betas = get_named_beta_schedule(schedule, num_timesteps)
    # IDDPM Eq. 19: beta_{S_i} = 1 - alpha_bar_{S_i} / alpha_bar_{S_{i-1}} (1 before S_0),
    # computed in float64 from the base process's cumulative product, as ADM.
    ac_kept = np.cumprod(1.0 - betas, axis=0)[kept]
    new_betas = 1.0 - ac_kept / np.append(1.0, ac_kept[:-1])
    return cls(betas=new_betas, timestep_map=kept.astype(np.int32))

  @property
  def num_timesteps(self) -> int:
    """Number of steps of this (possibly respaced) process."""
    return int(self.betas.shape[0])

  # -- gathering ---------------------------------------------------------------------

  def _extract(self, name: str, t: Any, ndim: int) -> jnp.ndarray:
    """Gather float32 table ``name`` at ``t`` and append singleton axes up to ``ndim``."""
    vals = jnp.asarray(self._tables32[name])[jnp.asarray(t)]
    return vals.reshape(vals.shape + (1,) * (ndim - vals.ndim))

  def model_timesteps(self, t: Any) -> jnp.ndarray:
    """Original-grid timesteps ``timestep_map[t]`` (int32) to feed the network."""
    return jnp.asarray(self.timestep_map, dtype=jnp.int32)[jnp.asarray(t)]

  # -- forward process ---------------------------------------------------------------

  def q_mean_variance(
      self, x_start: jnp.ndarray, t: Any
  ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Mean, variance and log-variance of q(x_t | x_0) (IDDPM Eq. 9), shaped like ``x_start``."""
    x_start = jnp.asarray(x_start)
    nd = x_start.ndim
    mean = self._extract("sqrt_alphas_cumprod", t, nd) * x_start
    # float64 (1 - alpha_bar) table cast at use, as ADM (not 1 - float32(alpha_bar)).
    variance = jnp.broadcast_to(self._extract("one_minus_alphas_cumprod", t, nd), x_start.shape)
    log_variance = jnp.broadcast_to(
        self._extract("log_one_minus_alphas_cumprod", t, nd), x_start.shape
    )
    return mean, variance, log_variance

  def q_sample(self, x_start: jnp.ndarray, t: Any, noise: jnp.ndarray) -> jnp.ndarray:
    """Sample x_t ~ q(x_t | x_0) with the given noise (IDDPM Eq. 10)."""
    x_start, noise = jnp.asarray(x_start), jnp.asarray(noise)
    if noise.shape != x_start.shape:
      raise ValueError(f"noise shape {noise.shape} must equal x_start shape {x_start.shape}.")
    return q_sample_at(
        x_start,
        noise,
        self._extract("sqrt_alphas_cumprod", t, 1),
        self._extract("sqrt_one_minus_alphas_cumprod", t, 1),
    )

  def q_posterior_mean_variance(
      self, x_start: jnp.ndarray, x_t: jnp.ndarray, t: Any
  ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (IDDPM Eqs. 11-13)."""
    x_start, x_t = jnp.asarray(x_start), jnp.asarray(x_t)
    if x_start.shape != x_t.shape:
      raise ValueError(f"x_start shape {x_start.shape} must equal x_t shape {x_t.shape}.")
    nd = x_t.ndim
    mean = (
        self._extract("posterior_mean_coef1", t, nd) * x_start
        + self._extract("posterior_mean_coef2", t, nd) * x_t
    )
    variance = jnp.broadcast_to(self._extract("posterior_variance", t, nd), x_t.shape)
    log_variance = jnp.broadcast_to(
        self._extract("posterior_log_variance_clipped", t, nd), x_t.shape
    )
    return mean, variance, log_variance

  def predict_xstart_from_eps(self, x_t: jnp.ndarray, t: Any, eps: jnp.ndarray) -> jnp.ndarray:
    """x_0 implied by x_t and a noise prediction (IDDPM Eq. 10 solved for x_0)."""
    x_t, eps = jnp.asarray(x_t), jnp.asarray(eps)
    if x_t.shape != eps.shape:
      raise ValueError(f"eps shape {eps.shape} must equal x_t shape {x_t.shape}.")
    return x0_from_eps(
        x_t,
        eps,
        self._extract("sqrt_recip_alphas_cumprod", t, 1),
        self._extract("sqrt_recipm1_alphas_cumprod", t, 1),
    )

  def predict_eps_from_xstart(
      self, x_t: jnp.ndarray, t: Any, pred_xstart: jnp.ndarray
  ) -> jnp.ndarray:
    """Noise implied by x_t and an x_0 prediction (IDDPM Eq. 10 solved for eps)."""
    x_t, pred_xstart = jnp.asarray(x_t), jnp.asarray(pred_xstart)
    return eps_from_x0(
        x_t,
        pred_xstart,
        self._extract("sqrt_recip_alphas_cumprod", t, 1),
        self._extract("sqrt_recipm1_alphas_cumprod", t, 1),
    )

  # -- reverse process ---------------------------------------------------------------

  def _split_output(
      self, model_output: jnp.ndarray, x_t: jnp.ndarray, learn_sigma: bool
  ) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    c = x_t.shape[-1]
    want = 2 * c if learn_sigma else c
    if model_output.shape != x_t.shape[:-1] + (want,):
      raise ValueError(
          f"model_output shape {model_output.shape} must be {x_t.shape[:-1] + (want,)} "
          f"(NHWC, {'2C' if learn_sigma else 'C'} channels for learn_sigma={learn_sigma})."
      )
    if learn_sigma:
      return model_output[..., :c], model_output[..., c:]
    return model_output, None

  def p_mean_variance(
      self,
      model_output: jnp.ndarray,
      x_t: jnp.ndarray,
      t: Any,
      *,
      learn_sigma: bool,
      clip_denoised: bool = True,
  ) -> dict[str, jnp.ndarray]:
    """mean, variance, log_variance, pred_xstart, eps of p(x_{t-1} | x_t) from the raw output."""
    # model_output: eps (C channels) or eps + v (2C channels, learn_sigma), channels last.
    # "eps" is the network's raw epsilon; DDIM should re-derive eps from the (clipped)
    # pred_xstart with predict_eps_from_xstart, as ADM's ddim_sample does.
    model_output, x_t = jnp.asarray(model_output), jnp.asarray(x_t)
    nd = x_t.ndim
    eps, var_values = self._split_output(model_output, x_t, learn_sigma)
    if var_values is not None:
      # IDDPM Eq. 15 (ADM LEARNED_RANGE): log Sigma = frac log beta_t + (1 - frac) log beta_tilde_t,
      # with the network's v in [-1, 1] mapped to frac = (v + 1) / 2.
      min_log = self._extract("posterior_log_variance_clipped", t, nd)
      max_log = self._extract("log_betas", t, nd)
      frac = (var_values + 1) / 2
      log_variance = frac * max_log + (1 - frac) * min_log
      variance = jnp.exp(log_variance)
    else:
      variance = jnp.broadcast_to(self._extract("fixed_large_variance", t, nd), x_t.shape)
      log_variance = jnp.broadcast_to(self._extract("fixed_large_log_variance", t, nd), x_t.shape)
    pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
    if clip_denoised:
      pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
    # DDPM Eq. 7/11: mu_theta(x_t, t) = mu_tilde(x_t, x0_hat(x_t, eps_theta)).
    mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
    return {
        "mean": mean,
        "variance": variance,
        "log_variance": log_variance,
        "pred_xstart": pred_xstart,
        "eps": eps,
    }

  # -- losses ------------------------------------------------------------------------

  def vb_terms_bpd(
      self,
      model_output: jnp.ndarray,
      x_start: jnp.ndarray,
      x_t: jnp.ndarray,
      t: Any,
      *,
      learn_sigma: bool | None = None,
  ) -> jnp.ndarray:
    """Per-example VLB term in bits/dim: decoder NLL L_0 where t == 0, else KL L_{t-1}."""
    # IDDPM Eqs. 4-6. learn_sigma defaults to "model_output has 2x x_start's channels";
    # clip_denoised=False as in ADM training.
    model_output, x_start, x_t = (jnp.asarray(a) for a in (model_output, x_start, x_t))
    if learn_sigma is None:
      learn_sigma = model_output.shape[-1] == 2 * x_start.shape[-1]
    t = jnp.asarray(t)
    true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
    out = self.p_mean_variance(model_output, x_t, t, learn_sigma=learn_sigma, clip_denoised=False)
    # IDDPM Eq. 6: L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)), nats -> bits.
    kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / _LN2
    # IDDPM Eq. 5 / DDPM Eq. 13: L_0 = -log p(x_0 | x_1) under the discretised decoder.
    nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
    nll = mean_flat(nll) / _LN2
    return jnp.where(t == 0, nll, kl)

  def training_losses(
      self,
      model_output: jnp.ndarray,
      x_start: jnp.ndarray,
      x_t: jnp.ndarray,
      t: Any,
      noise: jnp.ndarray,
      *,
      learn_sigma: bool,
      loss_type: str = "rescaled_mse",
  ) -> dict[str, jnp.ndarray]:
    """Per-example ``loss``, ``mse``, ``vb`` (each (B,)) of an eps network (IDDPM L_hybrid)."""
    if loss_type not in LOSS_TYPES:
      raise ValueError(
          f"Unknown loss_type {loss_type!r}; allowed loss types are {list(LOSS_TYPES)}."
      )
    model_output, x_start, x_t, noise = (
        jnp.asarray(a) for a in (model_output, x_start, x_t, noise)
    )
    eps, var_values = self._split_output(model_output, x_t, learn_sigma)
    if var_values is not None:
      # IDDPM Eq. 16: L_hybrid = L_simple + lambda L_vlb; the vlb only trains the
      # variance, so the eps channels are frozen (stop-gradient) inside it.
      frozen = jnp.concatenate([jax.lax.stop_gradient(eps), var_values], axis=-1)
      vb = self.vb_terms_bpd(frozen, x_start, x_t, t, learn_sigma=True)
      if loss_type == "rescaled_mse":
        # ADM: lambda = T / 1000 (1/1000 per term, times T terms).
        vb = vb * (self.num_timesteps / 1000.0)
    else:
      vb = jnp.zeros(x_start.shape[:1], dtype=jnp.result_type(eps.dtype, jnp.float32))
    # IDDPM Eq. 14: L_simple = || eps - eps_theta(x_t, t) ||^2 (mean over pixels).
    mse = mean_flat((noise - eps) ** 2)
    return {"loss": mse + vb, "mse": mse, "vb": vb}
