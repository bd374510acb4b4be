"""δ search for adversarial training (PAPER.md §4): pure functions of arrays and keys.

δ has the shape of the batch (B, H, W, C); every norm and radius is per example. The ℓ2 ball
has radius sqrt(d)·r with d = H·W·C (r = `radius`, a per-pixel scale), the ℓ∞ ball radius r.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adv_diffusion.vp import per_example

MODES = ("none", "fast", "pgd")
NORMS = ("l2", "linf")
INITS = ("zero", "random", "carry")
RADIUS_SCHEDULES = ("constant", "ddim_gap")


def per_example_norm(x: jax.Array) -> jax.Array:
  """ℓ2 norm of each example, shape (B,)."""
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim))))


def num_dims(x: jax.Array) -> int:
  """d = pixels × channels of one example."""
  return int(np.prod(x.shape[1:]))


def l2_normalize(g: jax.Array) -> jax.Array:
  """g_i / ‖g_i‖₂ per example; an all-zero g_i stays zero (ADM's zero-initialised output layers
  give ∂L/∂δ = 0 at initialisation, PAPER.md §4)."""
  norm = per_example_norm(g)
  return g / per_example(jnp.where(norm > 0, norm, 1.0), g)


def project_l2(delta: jax.Array, radius: jax.Array) -> jax.Array:
  """Projects each δ_i onto the ℓ2 ball of radius sqrt(d)·radius_i (radius: scalar or (B,))."""
  bound = jnp.sqrt(float(num_dims(delta))) * jnp.broadcast_to(radius, delta.shape[:1])
  norm = per_example_norm(delta)
  scale = jnp.where(norm > bound, bound / jnp.where(norm > 0, norm, 1.0), 1.0)
  return delta * per_example(scale, delta)


def project_linf(delta: jax.Array, radius: jax.Array) -> jax.Array:
  """Clips every pixel of δ_i to [−radius_i, radius_i]."""
  bound = per_example(jnp.broadcast_to(radius, delta.shape[:1]), delta)
  return jnp.clip(delta, -bound, bound)


def project(delta: jax.Array, radius: jax.Array, norm: str) -> jax.Array:
  """Projection onto the `norm` ball of per-example radius factor `radius`."""
  return project_l2(delta, radius) if norm == "l2" else project_linf(delta, radius)


def ascent_step(
    delta: jax.Array, grad: jax.Array, step_size: float, radius: jax.Array, norm: str
) -> jax.Array:
  """One projected ascent step: ℓ2 δ + η·g/‖g‖₂ (per example), ℓ∞ δ + η·sign(g) (PAPER.md §4)."""
  direction = l2_normalize(grad) if norm == "l2" else jnp.sign(grad)
  return project(delta + step_size * direction, radius, norm)


def init_delta(
    key: jax.Array,
    shape: tuple[int, ...],
    *,
    init: str,
    norm: str,
    magnitude: float,
    radius: jax.Array,
    carried: jax.Array | None = None,
) -> jax.Array:
  """Initial δ of a minibatch: zero (the authors' reset), random, or carried over (Free-AT).

  random: ℓ2 — a uniformly random direction with ‖δ_i‖₂ = sqrt(d)·magnitude; ℓ∞ — uniform in
  [−magnitude, magnitude] per pixel; then projected onto the ball.
  """
  if init == "zero":
    return jnp.zeros(shape, jnp.float32)
  if init == "carry":
    if carried is None:
      raise ValueError("init='carry' needs the δ carried over from the previous minibatch")
    return project(carried, radius, norm)
  if init != "random":
    raise ValueError(f"unknown δ init {init!r}; use one of {INITS}")
  if norm == "l2":
    direction = l2_normalize(jax.random.normal(key, shape, jnp.float32))
    delta = direction * jnp.sqrt(float(np.prod(shape[1:]))) * magnitude
  else:
    delta = jax.random.uniform(key, shape, jnp.float32, -magnitude, magnitude)
  return project(delta, radius, norm)


def ddim_gap_table(alphas_cumprod: np.ndarray, grid_steps: int = 50) -> np.ndarray:
  """sqrt(2 − 2·sqrt(ᾱ_t / ᾱ_s)) for every t, in float64 (PAPER.md §4).

  s is the grid point just below t on a `grid_steps`-step DDIM grid of the T-step process
  (ᾱ_s = 1 below the first grid point). The value is the distance between the noise directions
  of two adjacent DDIM steps, so the ball never exceeds one step's gap. Computed as
  sqrt(2·(1 − r)/(1 + sqrt(r))), r = ᾱ_t/ᾱ_s, to avoid cancellation near r = 1.
  (ours: present but unused in the authors' code, so its exact use is our choice.)
  """
  ac = np.asarray(alphas_cumprod, np.float64)
  t = np.arange(len(ac))
  stride = max(len(ac) // grid_steps, 1)
  below = (t // stride) * stride  # largest grid point ≤ t ...
  s = np.where(below == t, t - stride, below)  # ... strictly below t
  ac_s = np.where(s >= 0, ac[np.clip(s, 0, None)], 1.0)
  ratio = ac / ac_s
  return np.sqrt(2.0 * (1.0 - ratio) / (1.0 + np.sqrt(ratio)))


def ddim_gap_radius(
    alphas_cumprod: np.ndarray, t: jax.Array, rho: float, grid_steps: int = 50
) -> jax.Array:
  """Per-example radius r_t = min(sqrt(2 − 2·sqrt(ᾱ_t / ᾱ_s)), ρ), shape (B,)."""
  table = jnp.asarray(ddim_gap_table(alphas_cumprod, grid_steps), jnp.float32)
  return jnp.minimum(table[t], rho)


def example_radius(
    alphas_cumprod: np.ndarray, t: jax.Array, rho: float, schedule: str, grid_steps: int = 50
) -> jax.Array:
  """Radius factor of each example, shape (B,)."""
  if schedule == "constant":
    return jnp.full(t.shape, rho, jnp.float32)
  if schedule == "ddim_gap":
    return ddim_gap_radius(alphas_cumprod, t, rho, grid_steps)
  raise ValueError(f"unknown radius schedule {schedule!r}; use one of {RADIUS_SCHEDULES}")


# ---------------------------------------------------------------------------------------------
# The two δ searches of the paper's training (PAPER.md §4), as loops over replays / ascent steps
# ---------------------------------------------------------------------------------------------


class Replay(NamedTuple):
  """What one forward/backward of a δ search saw (stacked over replays or ascent steps)."""

  loss: jax.Array  # the minibatch loss at δ
  terms: Any  # the loss function's per-example terms
  grads: Any  # ∂L/∂θ at δ (None for PGD's ascent steps, which take no θ-gradient)
  grad_delta: jax.Array  # ∂L/∂δ at δ
  delta: jax.Array  # the δ this pass was taken at


# loss_and_grads(state, δ, dropout_key) -> ((loss, terms), (∂L/∂θ, ∂L/∂δ)), one forward/backward.
LossAndGrads = Callable[
    [Any, jax.Array, jax.Array], tuple[tuple[jax.Array, Any], tuple[Any, jax.Array]]
]
# update(state, ∂L/∂θ, terms) -> state after one optimizer (+ EMA, timestep history) update.
Update = Callable[[Any, Any, Any], Any]


def free_at_replays(
    state: Any,
    delta0: jax.Array,
    dropout_keys: jax.Array,
    *,
    loss_and_grads: LossAndGrads,
    update: Update,
    step_size: float,
    radius: jax.Array,
    norm: str,
    update_last: bool = True,
) -> tuple[Any, jax.Array, Replay]:
  """The authors' efficient AT (Free-AT, PAPER.md §4): K = len(dropout_keys) replays of one
  minibatch. Replay r takes ∂L/∂θ and ∂L/∂δ in ONE forward/backward at the current δ_r, updates θ
  with the first and then ascends δ_{r+1} = Π(δ_r + η·g_δ/‖g_δ‖) with the second.

  Returns the state after K updates — after K − 1 with `update_last=False`, for a caller that
  makes the K-th from the last replay's ∂L/∂θ itself (`train_step`, which skips a non-finite
  one) — δ_{K+1} (carried to the next minibatch by init "carry") and the replays stacked.
  Unrolled (a Python loop): a rolled loop compiles its body apart and rounds differently, and a
  single replay must equal the clean step bit for bit; K is small (3 in the paper).
  """
  count = dropout_keys.shape[0]
  delta, replays = delta0, []
  for r in range(count):
    (loss, terms), (grads, grad_delta) = loss_and_grads(state, delta, dropout_keys[r])
    if update_last or r + 1 < count:
      state = update(state, grads, terms)
    replays.append(Replay(loss, terms, grads, grad_delta, delta))
    delta = ascent_step(delta, grad_delta, step_size, radius, norm)
  return state, delta, jax.tree.map(lambda *xs: jnp.stack(xs), *replays)


# delta_loss_and_grad(δ, dropout_key) -> (loss, ∂L/∂δ) with θ fixed.
DeltaLossAndGrad = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def pgd_search(
    delta0: jax.Array,
    dropout_keys: jax.Array,
    *,
    delta_loss_and_grad: DeltaLossAndGrad,
    step_size: float,
    radius: jax.Array,
    norm: str,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """PGD-k (Madry et al. 2018; PAPER.md §4): k = len(dropout_keys) projected ascent steps
  δ_{j+1} = Π(δ_j + η·g_δ/‖g_δ‖) with θ fixed. Returns the final δ_k (the θ-update is taken there)
  and the losses and ∂L/∂δ of the k steps."""

  def ascend(delta, dropout_key):
    loss, grad_delta = delta_loss_and_grad(delta, dropout_key)
    return ascent_step(delta, grad_delta, step_size, radius, norm), (loss, grad_delta)

  # Unrolled like the replays (k is small): one program, and XLA's cost analysis counts every step.
  delta, (losses, grad_deltas) = jax.lax.scan(ascend, delta0, dropout_keys, unroll=True)
  return delta, losses, grad_deltas
