"""The train step's fast AT and PGD-k against an independent float64 reference (PAPER.md §3–§4).

The problem is a tiny differentiable network that is not the UNet, ε̂(x, t) = tanh(x·W + b + c·t/T)
(a per-pixel channel map plus a timestep term), with the plain ε-MSE (learn_sigma=False, loss
"mse"). The reference writes one minibatch of the paper's procedure by hand in float64 numpy, with
`jax.grad` on its own loss and none of the project's losses / adversarial / train-step code: the
target ε + sg[δ]/σ_t (§3), the per-example ℓ2-normalised ascent and the projection onto the ball
of radius sqrt(d)·ρ (§4), AdamW (bias-corrected moments, decoupled weight decay, as
torch.optim.AdamW and optax.adamw), the EMAs and ADM's loss-second-moment history. The project's
float32 `train_step` runs the same minibatch: the same x_0, and t and ε drawn by its own
`minibatch_inputs` from fold_in(root_key, step). The δ of every ascent and the θ-gradient of every
pass come from the step itself, read by a spy around `free_at_replays` / `pgd_search` in an
un-jitted run; the jitted step must reach the same state.
"""

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adv_diffusion import train_step as step_lib
from adv_diffusion.diffusion import GaussianDiffusion
from adv_diffusion.settings import AdversarialSettings, StepSettings
from adv_diffusion.timestep_sampler import TimestepHistory

T = 20  # diffusion steps (cosine schedule)
BATCH, SHAPE = 4, (4, 4, 2)  # d = 32 per example
D = int(np.prod(SHAPE))
ETA, RHO = 0.3, 0.08  # ball radius sqrt(32)·0.08 = 0.45: the second ascent step is projected
LR0, LR1, RAMP = 0.05, 0.02, 4  # linear learning-rate ramp over the optimizer updates
B1, B2, ADAM_EPS, WEIGHT_DECAY = 0.9, 0.99, 1e-8, 0.1
EMA_RATES = (0.9, 0.5)
HISTORY = 2  # loss history per timestep: three replays overflow it, so the order matters
UNIFORM_PROB = 0.001  # StepSettings default
ROOT_KEY = 7
TOL = 1e-5  # float32 step against the float64 reference (values are O(1))


class TanhNet(nn.Module):
  """ε̂(x, t) = tanh(x·W + b + c·t/T): W mixes channels per pixel, b per pixel, c per channel."""

  num_timesteps: int

  @nn.compact
  def __call__(
      self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *, train: bool = False
  ) -> jax.Array:
    """The network output, shaped like x (ε only: learn_sigma=False)."""
    channels = x.shape[-1]
    w = self.param("w", nn.initializers.normal(0.7), (channels, channels))
    b = self.param("b", nn.initializers.normal(0.5), x.shape[1:])
    c = self.param("c", nn.initializers.normal(1.0), (channels,))
    time = (t.astype(jnp.float32) / self.num_timesteps)[:, None, None, None]
    return jnp.tanh(jnp.einsum("bhwc,cd->bhwd", x, w) + b + c * time)


# ---------------------------------------------------------------------------------------------
# The reference, float64
# ---------------------------------------------------------------------------------------------


def _alphas_cumprod() -> np.ndarray:
  """ᾱ_t of the cosine schedule (IDDPM Eq. 17; β clipped at 0.999), written out here."""
  f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
  i = np.arange(T, dtype=np.float64)
  return np.cumprod(1.0 - np.minimum(1.0 - f((i + 1) / T) / f(i / T), 0.999))


class Problem(NamedTuple):
  """One minibatch, float64: x_t = sqrt(ᾱ_t)·x_0 + σ_t·ε (PAPER.md §2) and the weights."""

  x_t: np.ndarray
  t: np.ndarray
  eps: np.ndarray
  sigma: np.ndarray
  weights: np.ndarray


def _reference_weights(hist: np.ndarray, counts: np.ndarray, t: np.ndarray) -> np.ndarray:
  """ADM's importance weights 1/(T·p_t), p_t ∝ sqrt(E[L_t²]) mixed with uniform (IDDPM Eq. 18)."""
  if not np.all(counts == HISTORY):
    return np.ones(len(t))  # uniform until the history is full
  w = np.sqrt(np.mean(hist**2, axis=-1))
  p = (1 - UNIFORM_PROB) * w / w.sum() + UNIFORM_PROB / T
  p = p / p.sum()
  return 1.0 / (T * p[t])


def _problem(images: np.ndarray, t, eps, hist, counts) -> Problem:
  x0 = images.astype(np.float64) / 127.5 - 1.0
  ac = _alphas_cumprod()[np.asarray(t)]
  eps = np.asarray(eps, np.float64)
  x_t = np.sqrt(ac)[:, None, None, None] * x0 + np.sqrt(1 - ac)[:, None, None, None] * eps
  t = np.asarray(t)
  return Problem(x_t, t, eps, np.sqrt(1 - ac), _reference_weights(hist, counts, t))


def _net(theta, x, t):
  time = (t / T)[:, None, None, None]
  return jnp.tanh(jnp.einsum("bhwc,cd->bhwd", x, theta["w"]) + theta["b"] + theta["c"] * time)


def _loss(theta, delta, prob: Problem):
  """L(θ; δ) = mean_i w_i·mean_pixels (ε̂(x_t + δ) − (ε + sg[δ]/σ_t))² (PAPER.md §3)."""
  target = prob.eps + jax.lax.stop_gradient(delta) / prob.sigma[:, None, None, None]
  per_example = jnp.mean((_net(theta, prob.x_t + delta, prob.t) - target) ** 2, axis=(1, 2, 3))
  return jnp.mean(prob.weights * per_example), per_example


def _norms(x: np.ndarray) -> np.ndarray:
  return np.sqrt(np.sum(x**2, axis=(1, 2, 3)))


def _ascend(delta: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, bool]:
  """δ ← Π(δ + η·g/‖g‖₂) per example, ball radius sqrt(d)·ρ (PAPER.md §4); and whether Π bound."""
  moved = delta + ETA * g / _norms(g)[:, None, None, None]
  bound = np.sqrt(D) * RHO
  scale = np.minimum(1.0, bound / _norms(moved))
  return moved * scale[:, None, None, None], bool(np.any(scale < 1))


def _lr(n: int) -> float:
  return LR0 + (LR1 - LR0) * min(n, RAMP) / RAMP


def _adamw(theta, g, m, v, n):
  """AdamW update number n (0-based) as torch.optim.AdamW / optax.adamw: bias-corrected moments,
  weight decay decoupled from the gradient (Loshchilov & Hutter 2019)."""
  m = {k: B1 * m[k] + (1 - B1) * g[k] for k in theta}
  v = {k: B2 * v[k] + (1 - B2) * g[k] ** 2 for k in theta}
  new = {}
  for k in theta:
    m_hat, v_hat = m[k] / (1 - B1 ** (n + 1)), v[k] / (1 - B2 ** (n + 1))
    new[k] = theta[k] - _lr(n) * (m_hat / (np.sqrt(v_hat) + ADAM_EPS) + WEIGHT_DECAY * theta[k])
  return new, m, v


def _record_losses(hist, counts, t, losses):
  """ADM's update_with_all_losses: per example in batch order, drop the oldest when full."""
  hist, counts = hist.copy(), counts.copy()
  for ti, li in zip(t, losses):
    if counts[ti] == HISTORY:
      hist[ti] = np.append(hist[ti, 1:], li)
    else:
      hist[ti, counts[ti]] = li
      counts[ti] += 1
  return hist, counts


def _pass(theta, delta, prob):
  """One forward/backward of the reference loss in float64: (L, per-example L, g_θ, g_δ)."""
  with jax.enable_x64(True):
    (loss, per_example), (g_theta, g_delta) = jax.value_and_grad(_loss, (0, 1), has_aux=True)(
        theta, delta, prob
    )
    return (
        float(loss),
        np.asarray(per_example),
        {k: np.asarray(g) for k, g in g_theta.items()},
        np.asarray(g_delta),
    )


class Reference(NamedTuple):
  """What the reference minibatch saw and produced."""

  deltas: list  # δ of every forward/backward pass, then the δ after the last ascent
  losses: list  # L at every pass
  per_example: list  # per-example L at every pass
  grads_theta: list  # g_θ of the passes that update θ
  grads_delta: list  # g_δ of every pass
  theta: dict  # θ after the minibatch
  emas: list  # one EMA per rate
  m: dict  # AdamW moments
  v: dict
  hist: np.ndarray  # the loss history after the minibatch
  counts: np.ndarray
  projected: bool  # whether some ascent step hit the ball


def _new_record() -> Reference:
  return Reference([], [], [], [], [], *([None] * 7))


def _update(theta, g, m, v, emas, n):
  """AdamW, then every EMA ← μ·EMA + (1 − μ)·θ (PAPER.md §4 step 2b)."""
  theta, m, v = _adamw(theta, g, m, v, n)
  emas = [{k: r * e[k] + (1 - r) * theta[k] for k in theta} for r, e in zip(EMA_RATES, emas)]
  return theta, m, v, emas


def _reference_fast(theta0, prob, hist, counts, num_replays, feed_history) -> Reference:
  """PAPER.md §4 fast AT: δ = 0; K times: g_θ, g_δ at the current δ_r, AdamW + EMA, ascend."""
  theta, emas = dict(theta0), [dict(theta0) for _ in EMA_RATES]
  m = {k: np.zeros_like(p) for k, p in theta.items()}
  v = {k: np.zeros_like(p) for k, p in theta.items()}
  delta, projected = np.zeros(prob.x_t.shape), False
  rec = _new_record()
  for r in range(num_replays):
    loss, per_example, g_theta, g_delta = _pass(theta, delta, prob)
    rec.deltas.append(delta)
    rec.losses.append(loss)
    rec.per_example.append(per_example)
    rec.grads_theta.append(g_theta)
    rec.grads_delta.append(g_delta)
    if feed_history:
      hist, counts = _record_losses(hist, counts, prob.t, per_example)
    theta, m, v, emas = _update(theta, g_theta, m, v, emas, r)
    delta, bound = _ascend(delta, g_delta)
    projected |= bound
  rec.deltas.append(delta)  # δ_{K+1}: what init "carry" would take to the next minibatch
  return rec._replace(
      theta=theta, emas=emas, m=m, v=v, hist=hist, counts=counts, projected=projected
  )


def _reference_pgd(theta0, prob, hist, counts, steps, feed_history) -> Reference:
  """PAPER.md §4 PGD-k: k ascent steps with θ fixed, then one update with g_θ at the final δ."""
  delta, projected = np.zeros(prob.x_t.shape), False
  rec = _new_record()
  for _ in range(steps):
    loss, per_example, _, g_delta = _pass(theta0, delta, prob)
    rec.deltas.append(delta)
    rec.losses.append(loss)
    rec.per_example.append(per_example)
    rec.grads_delta.append(g_delta)
    delta, bound = _ascend(delta, g_delta)
    projected |= bound
  loss, per_example, g_theta, g_delta = _pass(theta0, delta, prob)
  rec.deltas.append(delta)
  rec.losses.append(loss)
  rec.per_example.append(per_example)
  rec.grads_theta.append(g_theta)
  rec.grads_delta.append(g_delta)
  if feed_history:
    hist, counts = _record_losses(hist, counts, prob.t, per_example)
  zeros = {k: np.zeros_like(p) for k, p in theta0.items()}
  theta, m, v, emas = _update(
      dict(theta0), g_theta, zeros, zeros, [dict(theta0) for _ in EMA_RATES], 0
  )
  return rec._replace(
      theta=theta, emas=emas, m=m, v=v, hist=hist, counts=counts, projected=projected
  )


# ---------------------------------------------------------------------------------------------
# The project's step on the same problem
# ---------------------------------------------------------------------------------------------


class Setup(NamedTuple):
  settings: StepSettings
  model: nn.Module
  diffusion: GaussianDiffusion
  tx: optax.GradientTransformation
  schedule: Any
  state: step_lib.TrainState
  batch: dict


def _setup(mode: str, sampler: str, warm: bool, **adv) -> Setup:
  """The tiny network, AdamW and a state whose loss history is empty or full (warm)."""
  settings = StepSettings(
      adversarial=AdversarialSettings(
          mode=mode, step_size=ETA, radius=RHO, norm="l2", init="zero", **adv
      ),
      ema_rates=EMA_RATES,
      learn_sigma=False,
      loss_type="mse",
      timestep_sampler=sampler,
      timestep_uniform_prob=UNIFORM_PROB,
  )
  model = TanhNet(T)
  schedule = optax.linear_schedule(LR0, LR1, RAMP)
  tx = optax.adamw(schedule, b1=B1, b2=B2, eps=ADAM_EPS, weight_decay=WEIGHT_DECAY)
  state = step_lib.init_train_state(
      model,
      tx,
      jax.random.key(0),
      settings=settings,
      image_shape=SHAPE,
      batch_size=BATCH,
      num_timesteps=T,
      timestep_history=HISTORY,
  )
  if warm:  # a full history: t is importance-sampled and the weights differ from 1
    rng = np.random.default_rng(1)
    state = state.replace(
        sampler_state=TimestepHistory(
            jnp.asarray(rng.uniform(0.05, 2.0, (T, HISTORY)), jnp.float32),
            jnp.full((T,), HISTORY, jnp.int32),
        )
    )
  images = np.random.default_rng(0).integers(0, 256, (BATCH,) + SHAPE, dtype=np.uint8)
  batch = {"image": jnp.asarray(images), "label": jnp.zeros((BATCH,), jnp.int32)}
  return Setup(settings, model, GaussianDiffusion.create("cosine", T), tx, schedule, state, batch)


def _step(setup: Setup):
  return functools.partial(
      step_lib.train_step,
      model=setup.model,
      diffusion=setup.diffusion,
      tx=setup.tx,
      settings=setup.settings,
      learning_rate_fn=setup.schedule,
  )


def _run(setup: Setup, search: str, monkeypatch):
  """The jitted step, and the un-jitted step with a spy on the δ search `search`."""
  root = jax.random.key(ROOT_KEY)
  jitted = jax.jit(_step(setup))(setup.state, setup.batch, root)
  real, seen = getattr(step_lib, search), {}

  def spy(*args, **kwargs):
    seen["out"] = real(*args, **kwargs)
    return seen["out"]

  monkeypatch.setattr(step_lib, search, spy)
  eager = _step(setup)(setup.state, setup.batch, root)
  return jitted, eager, seen["out"]


def _reference_problem(setup: Setup):
  """t and ε of the step (its own `minibatch_inputs` on fold_in(root, step)); θ_0; history."""
  key = jax.random.fold_in(jax.random.key(ROOT_KEY), setup.state.step)
  inputs, _ = step_lib.minibatch_inputs(
      setup.state, setup.batch, key, setup.diffusion, setup.settings
  )
  hist = np.asarray(setup.state.sampler_state.loss_history, np.float64)
  counts = np.asarray(setup.state.sampler_state.loss_counts).copy()
  prob = _problem(np.asarray(setup.batch["image"]), inputs.t, inputs.noise, hist, counts)
  np.testing.assert_allclose(inputs.weights, prob.weights, rtol=1e-5)  # the sampler's weights
  theta0 = {k: np.asarray(p, np.float64) for k, p in setup.state.params.items()}
  return prob, theta0, hist, counts


def _close(name: str, got, want, tol: float = TOL) -> float:
  """max |got − want| over a pytree (or arrays / floats); asserts it is below tol."""
  got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got_leaves) == len(want_leaves), name
  diff = max(
      float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64))))
      for g, w in zip(got_leaves, want_leaves)
  )
  print(f"{name}: max |Δ| = {diff:.2e}")
  assert diff <= tol, f"{name}: max |Δ| = {diff:.3g} > {tol}"
  return diff


def _check_state(name, state, ref: Reference, setup: Setup, updates: int, feed_history: bool):
  """θ, the EMAs, AdamW's moments and counter, and the loss history after the minibatch."""
  _close(f"{name} θ", state.params, ref.theta)
  _close(f"{name} EMAs", list(state.ema_params), ref.emas)
  adam = state.opt_state[0]
  _close(f"{name} AdamW m", adam.mu, ref.m)
  _close(f"{name} AdamW v", adam.nu, ref.v)
  assert int(adam.count) == updates and int(state.num_updates) == updates
  assert int(state.step) == int(setup.state.step) + 1
  if feed_history:
    _close(f"{name} loss history", state.sampler_state.loss_history, ref.hist)
    np.testing.assert_array_equal(state.sampler_state.loss_counts, ref.counts)
  else:  # the uniform sampler keeps no history
    np.testing.assert_array_equal(
        state.sampler_state.loss_history, setup.state.sampler_state.loss_history
    )


def _check_metrics(metrics, ref: Reference, prob: Problem, final_delta: np.ndarray, updates: int):
  """The step's scalar metrics against the reference."""
  norms = _norms(final_delta)
  _close("metric loss", metrics["loss"], ref.losses[-1])
  _close("metric loss_final_delta", metrics["loss_final_delta"], ref.losses[-1])
  _close("metric loss_delta0", metrics["loss_delta0"], ref.losses[0])
  _close("metric mse", metrics["mse"], np.mean(ref.per_example[-1]))
  _close("metric delta_l2_mean", metrics["delta_l2_mean"], np.mean(norms))
  _close("metric delta_l2_max", metrics["delta_l2_max"], np.max(norms))
  _close(
      "metric grad_delta_l2_mean", metrics["grad_delta_l2_mean"], _norms(ref.grads_delta[0]).mean()
  )
  _close(
      "metric target_shift_rms",
      metrics["target_shift_rms"],
      np.mean(norms / prob.sigma) / np.sqrt(D),
  )
  g = ref.grads_theta[-1]
  _close("metric grad_norm", metrics["grad_norm"], np.sqrt(sum(np.sum(x**2) for x in g.values())))
  assert float(metrics["learning_rate"]) == pytest.approx(LR0)
  assert int(metrics["optimizer_updates"]) == updates


CASES = [("uniform", False), ("loss-second-moment", False), ("loss-second-moment", True)]


@pytest.mark.parametrize("sampler,warm", CASES, ids=["uniform", "history-filling", "history-full"])
def test_fast_at_minibatch_matches_the_reference(sampler, warm, monkeypatch):
  setup = _setup("fast", sampler, warm, num_replays=3)
  prob, theta0, hist, counts = _reference_problem(setup)
  feed = sampler == "loss-second-moment"
  ref = _reference_fast(theta0, prob, hist, counts, 3, feed)
  # The problem can tell the paper's procedure from its likely mistakes: the ball binds, the
  # θ-gradient moves with δ, and the target shift δ/σ_t is not small.
  assert ref.projected
  g0, g2 = ref.grads_theta[0], ref.grads_theta[2]
  assert max(float(np.max(np.abs(g0[k] - g2[k]))) for k in g0) > 1e-2
  assert float(np.max(np.abs(ref.deltas[2] / prob.sigma[:, None, None, None]))) > 0.1

  (jitted, jit_metrics), (eager, _), (_, next_delta, replays) = _run(
      setup, "free_at_replays", monkeypatch
  )
  # Inside the step: replay r saw δ_r, took its θ-gradient and δ-gradient there, then ascended.
  for r in range(3):
    _close(f"δ_{r + 1}", replays.delta[r], ref.deltas[r])
    _close(f"g_θ at δ_{r + 1}", jax.tree.map(lambda x: x[r], replays.grads), ref.grads_theta[r])
    _close(f"g_δ at δ_{r + 1}", replays.grad_delta[r], ref.grads_delta[r])
    _close(f"L at δ_{r + 1}", replays.loss[r], ref.losses[r])
    _close(f"per-example L at δ_{r + 1}", replays.terms["loss"][r], ref.per_example[r])
  _close("δ_4", next_delta, ref.deltas[3])
  for name, state in (("eager", eager), ("jitted", jitted)):
    _check_state(name, state, ref, setup, 3, feed)
  _check_metrics(jit_metrics, ref, prob, ref.deltas[2], 3)


@pytest.mark.parametrize("sampler,warm", CASES[::2], ids=["uniform", "history-full"])
def test_pgd_minibatch_matches_the_reference(sampler, warm, monkeypatch):
  setup = _setup("pgd", sampler, warm, pgd_steps=2)
  prob, theta0, hist, counts = _reference_problem(setup)
  feed = sampler == "loss-second-moment"
  ref = _reference_pgd(theta0, prob, hist, counts, 2, feed)
  assert ref.projected
  # The θ-gradient at the final δ differs from the one at δ = 0, which the update must not use.
  _, _, g_clean, _ = _pass(theta0, np.zeros(prob.x_t.shape), prob)
  assert max(float(np.max(np.abs(g_clean[k] - ref.grads_theta[0][k]))) for k in g_clean) > 1e-2

  (jitted, jit_metrics), (eager, _), (final_delta, losses, grad_deltas) = _run(
      setup, "pgd_search", monkeypatch
  )
  for j in range(2):  # ascent step j saw δ_j with θ fixed
    _close(f"L at δ_{j + 1}", losses[j], ref.losses[j])
    _close(f"g_δ at δ_{j + 1}", grad_deltas[j], ref.grads_delta[j])
  _close("final δ", final_delta, ref.deltas[2])
  for name, state in (("eager", eager), ("jitted", jitted)):
    _check_state(name, state, ref, setup, 1, feed)
  _check_metrics(jit_metrics, ref, prob, ref.deltas[2], 1)
