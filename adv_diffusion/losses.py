"""Pure loss functions: ADM's hybrid ε-loss, its adversarial form (PAPER.md §3) and ADM-IP."""

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp

from adv_diffusion.diffusion import GaussianDiffusion

TARGET_TYPES = ("delta_detach", "delta", "original")

# apply_fn(params, x, model_timesteps, labels, dropout_key) -> raw network output
ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array | None, jax.Array], jax.Array]


@flax.struct.dataclass
class MinibatchInputs:
  """What one minibatch fixes for all of its replays: t and ε are drawn once (PAPER.md §4)."""

  x_start: jax.Array  # clean images in [−1, 1]
  x_t: jax.Array  # forward sample sqrt(ᾱ_t)·x_0 + σ_t·(ε [+ γ·ξ for ADM-IP])
  t: jax.Array  # timesteps of the diffusion process, (B,)
  noise: jax.Array  # ε: the regression target before any δ shift
  weights: jax.Array  # importance weights of the timestep sampler, (B,)
  sigma: jax.Array  # σ_t = sqrt(1 − ᾱ_t) per example, (B,)
  labels: jax.Array | None  # class labels when class-conditional
  target: jax.Array | None = None  # consistency models: the stop-gradient target f_θ⁻(x̂_{t_n})


def adversarial_target(
    noise: jax.Array, delta: jax.Array, sigma: jax.Array, target_type: str
) -> jax.Array:
  """Noise target of the perturbed input x_t + δ (PAPER.md §3).

  x_t + δ = sqrt(ᾱ_t)·x_0 + σ_t·(ε + δ/σ_t), so the noise of the perturbed point is ε + δ/σ_t
  and its implied x_0 is unchanged. "delta_detach" stops the gradient through δ in the target
  (the authors' default), "delta" keeps it, "original" keeps the target ε. The VLB term's x_t
  of each type is `vlb_input`.
  """
  if target_type == "original":
    return noise
  shift = delta / sigma[:, None, None, None]
  if target_type == "delta_detach":
    shift = jax.lax.stop_gradient(shift)
  elif target_type != "delta":
    raise ValueError(f"unknown target type {target_type!r}; use one of {TARGET_TYPES}")
  return noise + shift


def input_perturbation_noise(noise: jax.Array, key: jax.Array, gamma: float) -> jax.Array:
  """ADM-IP (Ning et al. 2023, Eq. 9): x_t is built from ε + γ·ξ, ξ ~ N(0, I); target stays ε."""
  return noise + gamma * jax.random.normal(key, noise.shape, noise.dtype)


def vlb_input(x_t: jax.Array, delta: jax.Array, target_type: str) -> jax.Array:
  """The x_t that ADM's VLB term sees for `target_type` (PAPER.md §3, AdvGaussianDiffusion).

  It enters q(x_{t−1} | x_t, x_0) and the model mean μ_θ(x_t, ε_θ) inside the VLB (the network
  output itself always comes from x_t + δ): "delta_detach" — sg[x_t + δ]; "delta" — x_t + δ
  with the gradient to δ kept; "original" — the clean x_t.
  """
  if target_type == "delta_detach":
    return jax.lax.stop_gradient(x_t + delta)
  if target_type == "delta":
    return x_t + delta
  if target_type == "original":
    return jax.lax.stop_gradient(x_t)
  raise ValueError(f"unknown target type {target_type!r}; use one of {TARGET_TYPES}")


def diffusion_loss(
    params: Any,
    delta: jax.Array | None,
    inputs: MinibatchInputs,
    dropout_key: jax.Array,
    *,
    apply_fn: ApplyFn,
    diffusion: GaussianDiffusion,
    learn_sigma: bool,
    loss_type: str,
    target_type: str = "delta_detach",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Importance-weighted mean of ADM's per-example loss at input x_t + δ (δ = None: clean).

  The ε-MSE compares ε_θ(x_t + δ) with `adversarial_target`. With learned variance the VLB term
  takes the frozen mean output of the same forward pass and the x_t of `vlb_input` (PAPER.md §3):
  sg[x_t + δ] ("delta_detach", the default), x_t + δ ("delta") or the clean x_t ("original").
  """
  if delta is None:
    x_in, target, x_vlb = inputs.x_t, inputs.noise, jax.lax.stop_gradient(inputs.x_t)
  else:
    x_in = inputs.x_t + delta
    target = adversarial_target(inputs.noise, delta, inputs.sigma, target_type)
    x_vlb = vlb_input(inputs.x_t, delta, target_type)
  output = apply_fn(params, x_in, diffusion.model_timesteps(inputs.t), inputs.labels, dropout_key)
  terms = diffusion.training_losses(
      output.astype(jnp.float32),
      inputs.x_start,
      x_vlb,  # only the VLB term reads x_t; the MSE reads the output and the target
      inputs.t,
      target,
      learn_sigma=learn_sigma,
      loss_type=loss_type,
  )
  return jnp.mean(terms["loss"] * inputs.weights), terms  # ADM TrainLoop weighting
