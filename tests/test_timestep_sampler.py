"""Tests for adv_diffusion.timestep_sampler: parity with guided_diffusion's resample.py."""

from __future__ import annotations

import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adv_diffusion import timestep_sampler as TS

with warnings.catch_warnings():
  warnings.simplefilter("ignore")  # guided_diffusion.nn emits torch.cuda.amp FutureWarnings
  import guided_diffusion.resample as gd_resample


@pytest.fixture
def adm_resampler(monkeypatch):
  # resample.py uses np.int, removed in NumPy >= 1.24; alias it for the reference only.
  monkeypatch.setattr(gd_resample.np, "int", int, raising=False)

  def make(num_timesteps, history):
    return gd_resample.LossSecondMomentResampler(
        types.SimpleNamespace(num_timesteps=num_timesteps), history_per_term=history
    )

  return make


def test_init_and_uniform_weights():
  st = TS.init_timestep_history(7, history_per_term=4)
  assert st.loss_history.shape == (7, 4) and st.loss_history.dtype == jnp.float32
  assert st.loss_counts.shape == (7,) and st.loss_counts.dtype == jnp.int32
  np.testing.assert_array_equal(TS.timestep_weights(st, "uniform"), np.ones(7))
  np.testing.assert_array_equal(TS.timestep_weights(st, "loss-second-moment"), np.ones(7))
  with pytest.raises(ValueError, match=r"'importance'.*uniform.*loss-second-moment"):
    TS.timestep_weights(st, "importance")


def test_loss_second_moment_matches_adm_with_duplicates(adm_resampler):
  T, H = 6, 3
  ref = adm_resampler(T, H)
  st = TS.init_timestep_history(T, H)
  rng = np.random.default_rng(15)
  seen_warm = False
  for step in range(12):
    # Heavy duplication: 8 draws from 6 timesteps, plus a forced run of one t.
    ts = rng.integers(0, T, 8).astype(np.int32)
    ts[:3] = step % T
    losses = rng.uniform(0.1, 3.0, 8).astype(np.float32)
    ref.update_with_all_losses(ts.tolist(), losses.astype(np.float64).tolist())
    st = TS.update_timestep_history(st, ts, losses)
    np.testing.assert_array_equal(st.loss_counts, ref._loss_counts)
    np.testing.assert_array_equal(st.loss_history, ref._loss_history.astype(np.float32))
    warm = bool(ref._warmed_up())
    seen_warm |= warm
    w = TS.timestep_weights(st, "loss-second-moment")
    np.testing.assert_allclose(w, ref.weights(), rtol=1e-6)
    if not warm:
      np.testing.assert_array_equal(w, np.ones(T))
  assert seen_warm
  assert not np.allclose(ref.weights(), ref.weights().mean())


def test_update_sequential_shift_small_example():
  st = TS.init_timestep_history(3, history_per_term=2)
  st2 = TS.update_timestep_history(st, jnp.array([1, 1, 1, 0]), jnp.array([1.0, 2.0, 3.0, 4.0]))
  np.testing.assert_array_equal(st2.loss_history, [[4, 0], [2, 3], [0, 0]])
  np.testing.assert_array_equal(st2.loss_counts, [1, 2, 0])
  np.testing.assert_array_equal(st.loss_counts, [0, 0, 0])  # pure: input untouched


def _warm_state(T=10, H=4, seed=16):
  st = TS.init_timestep_history(T, H)
  ts = np.repeat(np.arange(T), H)
  losses = (np.arange(T)[ts] + 1.0) * np.random.default_rng(seed).uniform(0.8, 1.2, ts.shape)
  return TS.update_timestep_history(st, ts, losses.astype(np.float32))


def test_sampling_distribution_and_importance_weights():
  from scipy.stats import chi2

  st = _warm_state()
  w = np.asarray(TS.timestep_weights(st, "loss-second-moment", uniform_prob=0.05), np.float64)
  p = w / w.sum()
  n = 200_000
  t, iw = TS.sample_timesteps(jax.random.PRNGKey(0), st, n, "loss-second-moment", 0.05)
  assert t.shape == (n,) and t.dtype == jnp.int32 and iw.dtype == jnp.float32
  counts = np.bincount(np.asarray(t), minlength=len(p))
  stat = ((counts - n * p) ** 2 / (n * p)).sum()
  limit = chi2.ppf(1 - 1e-6, df=len(p) - 1)  # ~44.8 for 9 dof
  assert stat < limit, (stat, limit)
  assert np.abs(counts / n - p).max() < 5e-3
  # The test has power: the same draws are far from uniform.
  assert ((counts - n / len(p)) ** 2 / (n / len(p))).sum() > 100 * limit
  # Importance weights 1 / (T p_t): unbiased, E[w] = 1.
  np.testing.assert_allclose(iw, 1.0 / (len(p) * p[np.asarray(t)]), rtol=1e-5)
  assert float(jnp.mean(iw)) == pytest.approx(1.0, abs=0.01)


def test_uniform_sampling_and_determinism():
  st = TS.init_timestep_history(50)
  k = jax.random.PRNGKey(3)
  t1, w1 = TS.sample_timesteps(k, st, 64, "uniform")
  t2, _ = TS.sample_timesteps(k, st, 64, "uniform")
  t3, _ = TS.sample_timesteps(jax.random.PRNGKey(4), st, 64, "uniform")
  np.testing.assert_array_equal(t1, t2)
  assert not np.array_equal(t1, t3)
  assert int(t1.min()) >= 0 and int(t1.max()) < 50
  np.testing.assert_allclose(w1, 1.0, rtol=1e-6)
  # Not warmed up: the loss-aware sampler is uniform too.
  t4, w4 = TS.sample_timesteps(k, st, 64, "loss-second-moment")
  np.testing.assert_array_equal(t4, t1)
  np.testing.assert_allclose(w4, 1.0, rtol=1e-6)
