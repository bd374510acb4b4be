"""How much a denoiser's output moves when its input x_t is perturbed (issue 7; PAPER.md §1).

The denoising error of an ε-network at x_t + δ is the per-example mean over pixels of
(x̂_0(x_t + δ, t) − x_ref)², x̂_0(x, t) = (x − σ_t·ε_θ(x, t)) / sqrt(ᾱ_t): against the true x_0
when it is known (forward-noised data), or against the model's own prediction at the
unperturbed x_t on a sampling trajectory. Perturbations have an ℓ2 budget ‖δ‖₂ ≤ ρ·sqrt(d)
per example (d = pixels × channels, the AT radius convention of PAPER.md §4):
  * random: δ = ρ·sqrt(d)·u/‖u‖₂, u Gaussian (exactly on the sphere);
  * adversarial: PGD — a random start on half the sphere, then normalised gradient ascent on
    the denoising error, projected back onto the ball after every step.
`trajectory_perturbation` applies either to a sampler's state x_t at chosen steps, the
reference being the model's own x̂_0 at the unperturbed x_t (`sampling.ddim`'s `perturb` hook).
Pure functions of (model_fn, arrays, key); the ball and the ascent step are AT's
(`adv_diffusion.adversarial`), with the radius factor ρ.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from adv_diffusion.adversarial import ascent_step, l2_normalize, num_dims
from adv_diffusion.vp import x0_coefficients, x0_from_eps

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x, t) -> raw output, ε first


def budget(rho: float, x: jax.Array) -> float:
  """ℓ2 budget ρ·sqrt(d) of a perturbation of one example of `x`."""
  return float(rho * np.sqrt(num_dims(x)))


def x0_prediction(
    model_fn: ModelFn, x: jax.Array, t: jax.Array, alphas_cumprod: np.ndarray
) -> jax.Array:
  """x̂_0(x, t) of the ε-network at original-grid timesteps `t`, unclipped."""
  eps = model_fn(x, t)[..., : x.shape[-1]].astype(jnp.float32)
  return x0_from_eps(x, eps, *x0_coefficients(jnp.asarray(alphas_cumprod, jnp.float32)[t]))


def denoising_error(
    model_fn: ModelFn, x: jax.Array, t: jax.Array, x_ref: jax.Array, alphas_cumprod: np.ndarray
) -> jax.Array:
  """Per-example mean squared error of x̂_0(x, t) against `x_ref`, shape (B,)."""
  diff = x0_prediction(model_fn, x, t, alphas_cumprod) - x_ref
  return jnp.mean(jnp.square(diff), axis=tuple(range(1, x.ndim)))


def random_perturbation(key: jax.Array, x: jax.Array, rho: float) -> jax.Array:
  """Gaussian direction scaled to exactly the budget ρ·sqrt(d) per example.

  `key` is one key for the batch, or one key per example (shape (B,)): then example i's
  direction depends on its own key only, whatever the batch it is in.
  """
  if key.ndim == 1:
    u = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], jnp.float32))(key)
  else:
    u = jax.random.normal(key, x.shape, jnp.float32)
  return budget(rho, x) * l2_normalize(u)


def pgd_perturbation(
    model_fn: ModelFn,
    x: jax.Array,
    t: jax.Array,
    x_ref: jax.Array,
    alphas_cumprod: np.ndarray,
    rho: float,
    key: jax.Array,
    *,
    steps: int = 10,
    step_size: float | None = None,
) -> jax.Array:
  """δ with ‖δ‖₂ ≤ ρ·sqrt(d) per example that (locally) maximises the denoising error.

  The random start matters when `x_ref` is the model's own prediction at x: the error then has
  a minimum, and a zero gradient, at δ = 0. `step_size` defaults to 2.5·budget/steps (Madry et
  al. 2018).
  """
  radius = budget(rho, x)
  step = 2.5 * radius / steps if step_size is None else step_size * radius
  grad_fn = jax.grad(lambda d: jnp.sum(denoising_error(model_fn, x + d, t, x_ref, alphas_cumprod)))

  def ascend(delta, _):
    return ascent_step(delta, grad_fn(delta), step, jnp.asarray(rho, jnp.float32), "l2"), None

  delta0 = 0.5 * random_perturbation(key, x, rho)
  delta, _ = jax.lax.scan(ascend, delta0, None, length=steps)
  return delta


KINDS = ("random", "adversarial")


def trajectory_perturbation(
    model_fn: ModelFn,
    kind: str,
    rho: float,
    attack_steps: Sequence[int],
    num_steps: int,
    alphas_cumprod: np.ndarray,
    keys: jax.Array,
    *,
    pgd_steps: int = 5,
) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
  """perturb(i, t, x_t) for a sampler: x_t + δ at the steps i in `attack_steps`, else x_t.

  δ is `kind` "random" (on the budget sphere) or "adversarial" (PGD maximising the error of
  x̂_0 against the model's own prediction at the unperturbed x_t); ‖δ‖₂ ≤ ρ·sqrt(d). `keys` are
  per-example keys; step i uses fold_in(key, i). `t` are original-grid timesteps.
  """
  if kind not in KINDS:
    raise ValueError(f"Unknown perturbation kind {kind!r}; allowed kinds are {list(KINDS)}.")
  bad = [i for i in attack_steps if not 0 <= int(i) < num_steps]
  if bad or not attack_steps:
    raise ValueError(
        f"attack steps {list(attack_steps)} must be a non-empty list of sampler "
        f"step indices in [0, {num_steps})."
    )
  attacked = jnp.zeros((num_steps,), bool).at[jnp.asarray(list(attack_steps))].set(True)

  def perturb(i: jax.Array, t: jax.Array, x: jax.Array) -> jax.Array:
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)

    def add_delta(x):
      if kind == "random":
        return x + random_perturbation(step_keys, x, rho)
      reference = jax.lax.stop_gradient(x0_prediction(model_fn, x, t, alphas_cumprod))
      return x + pgd_perturbation(
          model_fn, x, t, reference, alphas_cumprod, rho, step_keys, steps=pgd_steps
      )

    return jax.lax.cond(attacked[i], add_delta, lambda x: x, x)

  return perturb
