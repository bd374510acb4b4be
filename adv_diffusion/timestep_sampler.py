"""ADM's importance sampling of training timesteps (ADM resample.py; IDDPM §3.3, Eq. 18).

"uniform" draws t uniformly; "loss-second-moment" draws t with probability ∝ sqrt(E[L_t²]) over a
short per-timestep loss history, mixed with a small uniform part, and reweights each example by
1/(T·p_t) so the loss stays unbiased. The history is a small pytree carried in the train state.
These functions are jax.jit-wrapped (``kind`` and ``batch_size`` static); they nest inside
another jit.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

KINDS = ("uniform", "loss-second-moment")

# These are jax.jit-wrapped (``kind`` and ``batch_size`` static) because they are typically
# called eagerly once per step outside the train step; they nest fine inside another jit.


class TimestepHistory(NamedTuple):
  """Per-timestep loss history for the loss-second-moment sampler."""

  loss_history: jnp.ndarray  # (T, history) float32, oldest first
  loss_counts: jnp.ndarray  # (T,) int32, number of valid history entries per timestep


def init_timestep_history(num_timesteps: int, history_per_term: int = 10) -> TimestepHistory:
  """Empty loss history (nothing seen yet) for ``num_timesteps`` steps."""
  num_timesteps = int(num_timesteps)
  if num_timesteps < 1:
    raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}.")
  if int(history_per_term) < 1:
    raise ValueError(f"history_per_term must be a positive integer, got {history_per_term!r}.")
  return TimestepHistory(
      loss_history=jnp.zeros((num_timesteps, int(history_per_term)), dtype=jnp.float32),
      loss_counts=jnp.zeros((num_timesteps,), dtype=jnp.int32),
  )


def _check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f"Unknown timestep sampler {kind!r}; allowed kinds are {list(KINDS)}.")


@functools.partial(jax.jit, static_argnames=("kind",))
def timestep_weights(state: TimestepHistory, kind: str, uniform_prob: float = 0.001) -> jnp.ndarray:
  """Unnormalised sampling weights (T,) float32, as ADM's Uniform / LossSecondMoment samplers."""
  _check_kind(kind)
  num_t, history = state.loss_history.shape
  ones = jnp.ones((num_t,), dtype=jnp.float32)
  if kind == "uniform":
    return ones
  # IDDPM Eq. 18: p_t proportional to sqrt(E[L_t^2]), mixed with a small uniform part.
  w = jnp.sqrt(jnp.mean(state.loss_history.astype(jnp.float32) ** 2, axis=-1))
  w = w / jnp.sum(w)
  w = w * (1 - uniform_prob)
  w = w + uniform_prob / num_t
  warmed_up = jnp.all(state.loss_counts == history)  # uniform until every t has a full history
  return jnp.where(warmed_up, w, ones)


@functools.partial(jax.jit, static_argnames=("batch_size",))
def _sample_from_weights(
    key: jax.Array, w: jnp.ndarray, batch_size: int
) -> tuple[jnp.ndarray, jnp.ndarray]:
  num_t = w.shape[0]
  p = w / jnp.sum(w)
  t = jax.random.choice(key, num_t, shape=(batch_size,), replace=True, p=p).astype(jnp.int32)
  # Unbiased importance weighting: E_{t~p}[L_t / (T p_t)] = (1/T) sum_t L_t.
  weights = (1.0 / (num_t * p[t])).astype(jnp.float32)
  return t, weights


def sample_timesteps(
    key: jax.Array,
    state: TimestepHistory,
    batch_size: int,
    kind: str,
    uniform_prob: float = 0.001,
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Draw t ~ w/sum(w) (int32, (B,)) and importance weights 1/(T p_t) (float32, (B,))."""
  w = timestep_weights(state, kind, uniform_prob)
  return _sample_from_weights(key, w, int(batch_size))


@jax.jit
def update_timestep_history(
    state: TimestepHistory, t: jnp.ndarray, losses: jnp.ndarray
) -> TimestepHistory:
  """Record ``losses`` at timesteps ``t`` in batch order, as ADM's ``update_with_all_losses``."""
  t = jnp.asarray(t, dtype=jnp.int32).reshape(-1)
  losses = jnp.asarray(losses, dtype=jnp.float32).reshape(-1)
  if t.shape != losses.shape:
    raise ValueError(f"t and losses must have the same length, got {t.shape} and {losses.shape}.")
  history = state.loss_history.shape[1]

  def step(carry: TimestepHistory, item: tuple[jnp.ndarray, jnp.ndarray]):
    hist, counts = carry
    ti, li = item
    row, count = hist[ti], counts[ti]
    full = count == history
    # Full: drop the oldest entry and append; otherwise fill the next free slot.
    shifted = jnp.concatenate([row[1:], li[None]])
    filled = row.at[jnp.minimum(count, history - 1)].set(li)
    hist = hist.at[ti].set(jnp.where(full, shifted, filled))
    counts = counts.at[ti].set(jnp.where(full, count, count + 1))
    return TimestepHistory(hist, counts), None

  init = TimestepHistory(
      state.loss_history.astype(jnp.float32), state.loss_counts.astype(jnp.int32)
  )
  new_state, _ = jax.lax.scan(step, init, (t, losses))
  return new_state
