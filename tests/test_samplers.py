"""Tests of the samplers: closed-form Gaussian checks, guided-diffusion parity, NFE, validation.

Closed form. For data x_0 ~ N(μ, diag(s²)) and x_t = α_t x_0 + σ_t ε (α_t² = ᾱ_t, VP), x_t is
Gaussian with mean α_t μ and variance α_t² s² + σ_t², so the optimal noise predictor is the
posterior mean E[ε | x_t] = Cov(ε, x_t) Var(x_t)^{-1} (x_t - α_t μ) = σ_t (x_t - α_t μ) /
(α_t² s² + σ_t²). The probability-flow ODE of a Gaussian family moves every point so that its
standardised coordinate z = (x_t - α_t μ) / sqrt(α_t² s² + σ_t²) stays constant, so the exact
ODE map from time T to time e is x_e = α_e μ + sqrt(α_e² s² + σ_e²) z_T (α_e = 1, σ_e = 0 gives
x_0 = μ + s z_T). Convergence runs use float64 (jax.enable_x64) so that the measured slopes are
not hidden by float32 round-off.

Parity. Our samplers with our Flax UNet against guided-diffusion's `p_sample_loop` /
`ddim_sample_loop` with its torch UNetModel carrying the same random weights, respaced to 10
steps through `SpacedDiffusion`; the per-step noise is fed to guided-diffusion by swapping the
`th` module seen by `guided_diffusion.gaussian_diffusion` for a proxy whose `randn_like` returns
our noise (everything else is torch's). Tolerance: max |ours - theirs| <= 1e-5 (observed
<= 6e-6 over 4 weight seeds). Caveat: at the cosine schedule's t = 999, ADM's x_0 prediction
multiplies ε by sqrt(1/ᾱ - 1) ≈ 2e4, so a pixel whose prediction lands inside the [-1, 1] clip
there inherits ~1e-2 of the network's float32 difference; the fixed seeds here avoid it.
"""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adv_diffusion.diffusion import GaussianDiffusion, space_timesteps
from sampling.ancestral import ancestral_sample, eps_scale_schedule, sample_ancestral
from sampling.ddim import (ddim_nfe, diffusion_from_timesteps, kept_timesteps,
                           respaced_diffusion, sample_ddim)
from sampling.dpm_solver import (DiscreteVPSchedule, dpm_solver_nfe, dpm_solver_tableau,
                                 sample_dpm_solver)
from sampling.registry import make_sampler

T = 1000
SHAPE = (16, 2, 2, 2)  # NHWC, 8 dimensions per sample


# ------------------------------------------------------------------------------ helpers


class Gaussian:
  """Per-dimension Gaussian data with its exact ε predictor and exact PF-ODE map."""

  def __init__(self, schedule: str, dtype=jnp.float32, seed: int = 0, shape=SHAPE):
    rng = np.random.default_rng(seed)
    self.dtype = dtype
    self.mu = rng.uniform(-0.5, 0.5, shape[1:])
    self.s = rng.uniform(0.2, 0.6, shape[1:])
    self.alphas_cumprod = GaussianDiffusion.create(schedule, T).alphas_cumprod
    self.x_t = rng.standard_normal(shape)

  def model_fn(self, x: jax.Array, tau: jax.Array) -> jax.Array:
    """Exact E[ε | x_t] at original-grid (possibly fractional) timestep τ."""
    dt = self.dtype
    # log α piecewise linear in τ: exact at integer τ, and the DPM-Solver schedule between.
    log_alpha = jnp.interp(jnp.asarray(tau, dt), jnp.arange(T, dtype=dt),
                           jnp.asarray(0.5 * np.log(self.alphas_cumprod), dt))
    log_alpha = log_alpha.reshape((-1,) + (1,) * (x.ndim - 1))
    alpha, var = jnp.exp(log_alpha), -jnp.expm1(2 * log_alpha)
    mu, s = jnp.asarray(self.mu, dt), jnp.asarray(self.s, dt)
    return jnp.sqrt(var) * (x - alpha * mu) / (alpha**2 * s**2 + var)

  def exact(self, x_start: np.ndarray, abar_start: float, abar_end: float) -> np.ndarray:
    """PF-ODE solution at ᾱ_end from x_start at ᾱ_start."""
    z = (x_start - np.sqrt(abar_start) * self.mu) / np.sqrt(abar_start * self.s**2 + 1 - abar_start)
    return np.sqrt(abar_end) * self.mu + np.sqrt(abar_end * self.s**2 + 1 - abar_end) * z


def max_err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def slope(nfes, errs) -> float:
  """-d log(err) / d log(NFE) by least squares (the observed order of convergence)."""
  return float(-np.polyfit(np.log(nfes), np.log(errs), 1)[0])


def counting(model_fn):
  """(wrapped model_fn, list of the timesteps of every actual call) via an ordered callback."""
  calls: list[np.ndarray] = []

  def record(t):
    calls.append(np.asarray(t))

  def wrapped(x, t):
    jax.debug.callback(record, t, ordered=True)
    return model_fn(x, t)

  return wrapped, calls


def keys_for(n: int, seed: int = 0) -> jax.Array:
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(n))


def assert_one_sentence(excinfo, *words: str) -> None:
  msg = str(excinfo.value)
  assert "\n" not in msg and msg.endswith("."), msg
  assert len(re.findall(r"[.!?](?:\s|$)", msg)) == 1, msg
  for w in words:
    assert w in msg, (w, msg)


# ------------------------------------------------------------------- closed-form convergence

# Observed orders (float64, cosine schedule, logSNR steps) are recorded in the report; the
# assertion is slope >= order - 0.5 over NFE ladders inside the asymptotic range.
LADDERS = {1: [10, 20, 40], 2: [40, 80, 160], 3: [40, 80, 160]}
SINGLESTEP3 = [161, 320, 641]  # NFE = 2 mod 3: DPM-Solver-fast ends with an order-2 step
CONVERGENCE = [
    ("noise", "multistep", 1), ("data", "multistep", 1),
    ("noise", "multistep", 2), ("data", "multistep", 2),
    ("noise", "singlestep", 2), ("data", "singlestep", 2),
    ("noise", "multistep", 3), ("data", "multistep", 3),
    ("noise", "singlestep", 3), ("data", "singlestep", 3),
]


@pytest.mark.parametrize("predictor,method,order", CONVERGENCE)
def test_dpm_solver_converges_at_its_order(predictor, method, order):
  with jax.enable_x64(True):
    g = Gaussian("cosine", jnp.float64)
    schedule = DiscreteVPSchedule.create("cosine", T)
    target = g.exact(g.x_t, schedule.marginal_alpha(1.0) ** 2,
                     schedule.marginal_alpha(1.0 / T) ** 2)
    nfes = SINGLESTEP3 if (method, order) == ("singlestep", 3) else LADDERS[order]
    errs = []
    for n in nfes:
      out, nfe = sample_dpm_solver(g.model_fn, jnp.asarray(g.x_t), schedule, n, order=order,
                                   method=method, predictor=predictor, lower_order_final=False)
      assert nfe == n
      errs.append(max_err(out, target))
  assert errs[-1] < errs[0]
  assert slope(nfes, errs) >= order - 0.5, (errs, slope(nfes, errs))


def test_reference_multistep3_coefficient_is_only_second_order():
  with jax.enable_x64(True):
    g = Gaussian("cosine", jnp.float64)
    schedule = DiscreteVPSchedule.create("cosine", T)
    target = g.exact(g.x_t, schedule.marginal_alpha(1.0) ** 2,
                     schedule.marginal_alpha(1.0 / T) ** 2)
    errs = [max_err(sample_dpm_solver(g.model_fn, jnp.asarray(g.x_t), schedule, n, order=3,
                                      method="multistep", lower_order_final=False,
                                      multistep3_like_reference=True)[0], target)
            for n in (80, 160, 320)]
  assert 1.7 < slope([80, 160, 320], errs) < 2.3


def test_ddim_converges_at_first_order():
  with jax.enable_x64(True):
    g = Gaussian("cosine", jnp.float64)
    nfes, errs = [10, 20, 40, 80], []
    for n in nfes:
      d = respaced_diffusion("cosine", T, n, "adm")
      out, nfe = sample_ddim(g.model_fn, jnp.asarray(g.x_t), d, clip_denoised=False)
      assert nfe == n
      errs.append(max_err(out, g.exact(g.x_t, d.alphas_cumprod[-1], 1.0)))
  assert slope(nfes, errs) >= 0.5, errs


@pytest.mark.parametrize("schedule,x64", [("linear", False), ("cosine", True)])
@pytest.mark.parametrize("predictor", ["noise", "data"])
def test_ddim_equals_dpm_solver_1_on_the_same_grid(schedule, x64, predictor):
  # linspace(1, 1/N, 10) hits the grid points 999, 888, ..., 0 exactly; DDIM's last step (to
  # ᾱ = 1) is DPM-Solver's denoise_to_zero call. Cosine runs in float64: its ᾱ_999 = 2.4e-9
  # makes the first step amplify float32 round-off by 1/sqrt(ᾱ_999) ~ 2e4 in both algebraically
  # equal forms (they then differ by ~1e-4 in float32, ~1e-12 in float64).
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    g = Gaussian(schedule, dtype)
    x = jnp.asarray(g.x_t, dtype)
    d = diffusion_from_timesteps(schedule, T, list(range(0, T, 111)))
    ddim = jax.jit(lambda x: sample_ddim(g.model_fn, x, d, clip_denoised=False)[0])(x)
    dpm = jax.jit(lambda x: sample_dpm_solver(
        g.model_fn, x, DiscreteVPSchedule.create(schedule, T), 9, order=1,
        skip_type="time_uniform", predictor=predictor, denoise_to_zero=True)[0])(x)
  assert ddim_nfe(d) == dpm_solver_nfe(9, 1, "multistep", denoise_to_zero=True) == 10
  assert max_err(ddim, dpm) <= 1e-5



def test_clipped_dpm_solver_pp_1_equals_clipped_ddim():
  # A model whose ε is 10 % off: near t = T its x_0 = (x_t − σ_t·ε)/α_t lands far outside
  # [−1, 1], so clipping acts; DDIM's clip_denoised (guided-diffusion parity) is the reference.
  with jax.enable_x64(True):
    g = Gaussian("cosine", jnp.float64)
    x = jnp.asarray(g.x_t, jnp.float64)
    model_fn = lambda x, tau: 1.1 * g.model_fn(x, tau)  # noqa: E731
    d = diffusion_from_timesteps("cosine", T, list(range(0, T, 111)))
    ddim = sample_ddim(model_fn, x, d, clip_denoised=True)[0]
    dpm = {clip: sample_dpm_solver(model_fn, x, DiscreteVPSchedule.create("cosine", T), 9,
                                   order=1, skip_type="time_uniform", predictor="data",
                                   denoise_to_zero=True, clip_denoised=clip)[0]
           for clip in (False, True)}
  assert max_err(ddim, dpm[True]) <= 1e-9
  assert float(jnp.max(jnp.abs(dpm[False]))) > 10.0  # unclipped: the 1/α_t blow-up
  assert float(jnp.max(jnp.abs(dpm[True]))) <= 1.0

def test_ancestral_reproduces_data_mean_and_variance():
  # Exact ε, fixed (β_t) variance, 250 respaced steps, n = 4096 samples x 8 dims. Tolerances:
  # each mean within 4 standard errors s/sqrt(n); each std within 5 % (its standard error is
  # 1/sqrt(2n) = 1.1 %). Observed: worst mean error 1.9 s.e., worst std error 1.5 %.
  n = 4096
  g = Gaussian("cosine", jnp.float32, shape=(n, 2, 2, 2))
  d = GaussianDiffusion.create("cosine", T, "250")
  run = jax.jit(lambda x, k: sample_ancestral(g.model_fn, x, d, k, learn_sigma=False,
                                              clip_denoised=False)[0])
  out = np.asarray(run(jnp.asarray(g.x_t, jnp.float32), keys_for(n)))
  assert np.max(np.abs(out.mean(0) - g.mu) / (g.s / np.sqrt(n))) < 4
  assert np.max(np.abs(out.std(0) / g.s - 1)) < 0.05


def test_train_loop_entry_point_matches_sample_ancestral():
  # ancestral_sample's model_fn gets respaced indices (the train loop maps them itself).
  g = Gaussian("cosine", jnp.float32)
  d = GaussianDiffusion.create("cosine", T, "ddim20")
  keys, x = keys_for(16, seed=5), jnp.asarray(g.x_t, jnp.float32)
  es = dict(eps_scale=1.017, eps_scale_slope=-0.001)
  new, nfe = sample_ancestral(g.model_fn, x, d, keys, learn_sigma=False, **es)
  legacy = ancestral_sample(lambda x, t: g.model_fn(x, d.model_timesteps(t)), x, d, keys,
                            learn_sigma=False, **es)
  plain = sample_ancestral(g.model_fn, x, d, keys, learn_sigma=False)[0]
  assert nfe == 20
  np.testing.assert_array_equal(legacy, new)
  assert max_err(plain, new) > 1e-3  # ε-scaling changes the samples


def test_ancestral_noise_does_not_depend_on_batch():
  g = Gaussian("linear", jnp.float32)
  d = GaussianDiffusion.create("linear", T, "20")
  keys, x = keys_for(16, seed=3), jnp.asarray(g.x_t, jnp.float32)
  run = jax.jit(lambda x, k: sample_ancestral(g.model_fn, x, d, k, learn_sigma=False)[0])
  np.testing.assert_array_equal(run(x, keys)[:4], run(x[:4], keys[:4]))


# ---------------------------------------------------------------------- schedules and grids


def test_respaced_process_from_a_list_equals_adm_respacing():
  for spec in ("10", "ddim25", "5,10"):
    ours = diffusion_from_timesteps("cosine", T, space_timesteps(T, spec))
    ref = GaussianDiffusion.create("cosine", T, spec)
    np.testing.assert_array_equal(ours.betas, ref.betas)
    np.testing.assert_array_equal(ours.timestep_map, ref.timestep_map)


def test_kept_timesteps_spacings():
  assert kept_timesteps(T, 10, "uniform") == list(range(0, T, 100))
  assert kept_timesteps(T, 8, "ddim") == list(range(0, T, 125))
  assert kept_timesteps(T, 10, "adm") == space_timesteps(T, "10")
  quad = kept_timesteps(T, 10, "quad")  # DDIM's quad grid ends at 0.8 T
  assert quad[0] == 0 and quad[-1] == 800 and quad == sorted(set(quad))
  quad50 = kept_timesteps(T, 50, "quad")  # int() gives 0, 0, 1, 3: repeats move up by one
  assert len(quad50) == 50 and quad50[:4] == [0, 1, 2, 3] and quad50 == sorted(set(quad50))


def test_eps_scale_schedule_is_centred_linear():
  scales = eps_scale_schedule(10, 1.017, 0.002)
  np.testing.assert_allclose(scales.mean(), 1.017)
  np.testing.assert_allclose(np.diff(scales), 0.002)
  np.testing.assert_array_equal(eps_scale_schedule(5, 1.006), np.full(5, 1.006))


def test_reference_truncated_cosine_schedule():
  full = DiscreteVPSchedule.create("cosine", T)
  ref = DiscreteVPSchedule.create("cosine", T, truncate_cosine_like_reference=True)
  assert full.total_n == 1000 and ref.total_n == 996
  assert DiscreteVPSchedule.create("linear", T, truncate_cosine_like_reference=True).total_n == T
  np.testing.assert_allclose(full.model_time([1.0, 1.0 / T]), [999.0, 0.0], atol=1e-9)
  np.testing.assert_allclose(ref.model_time(1.0), (1 - 1 / 996) * 1000)  # ~0.4 % late
  lam = full.marginal_lambda(np.array([0.2, 0.5, 0.9]))
  np.testing.assert_allclose(full.inverse_lambda(lam), [0.2, 0.5, 0.9], atol=1e-12)
  # Grid points carry ᾱ exactly: t = 1 is ᾱ_999, t = 0.5 is ᾱ_499.
  abar = GaussianDiffusion.create("cosine", T).alphas_cumprod
  np.testing.assert_allclose(full.marginal_alpha(np.array([1.0, 0.5])) ** 2, abar[[999, 499]],
                             rtol=1e-12)


# ------------------------------------------------------------------------------------ NFE


NFE_CASES = (
    [("ancestral", 7, {}), ("ancestral_es", 5, {"eps_scale_slope": 0.001}),
     ("ddim", 8, {}), ("ddim", 10, {"spacing": "quad"}), ("ddim", 6, {"eta": 0.5}),
     ("ddim", 5, {"spacing": "uniform"})]
    # Every order x solver x denoise_to_zero; the predictor (method) alternates, since it
    # changes what is stored, not where the model is called (the tableau test covers both).
    + [(m, n, {"order": o, "solver": s, "denoise_to_zero": dz})
       for o in (1, 2, 3) for s in ("singlestep", "multistep")
       for m, n, dz in (("dpm_solver", 7, False), ("dpm_solver++", 8, True))]
    + [("dpm_solver", 8, {"order": 3, "solver": "singlestep", "denoise_to_zero": True}),
       ("dpm_solver++", 7, {"order": 3, "solver": "multistep", "denoise_to_zero": False})]
)


@pytest.mark.parametrize("method,nfe,options", NFE_CASES,
                         ids=[f"{m}-{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}"
                              for m, n, o in NFE_CASES])
def test_model_calls_equal_nfe(method, nfe, options):
  g = Gaussian("cosine", jnp.float32, shape=(2, 2, 2, 1))
  learn = {"learn_sigma": False} if method.startswith("ancestral") else {}
  sampler = make_sampler(method, nfe, "cosine", T, **learn, **options)
  model_fn, calls = counting(g.model_fn)
  out = jax.jit(lambda x, k: sampler(model_fn, x, k))(jnp.asarray(g.x_t, jnp.float32),
                                                      keys_for(2))
  jax.effects_barrier()
  assert sampler.nfe == nfe and len(calls) == nfe
  assert np.all(np.isfinite(np.asarray(out)))
  times = np.array([c[0] for c in calls], np.float64)
  assert np.all(np.diff(times) < 0)  # every call at a new, smaller time
  assert times.min() >= -1e-3 and times.max() <= T - 1 + 1e-3  # on the original grid


def test_model_times_on_the_original_grid():
  g = Gaussian("cosine", jnp.float32, shape=(2, 2, 2, 1))
  x = jnp.asarray(g.x_t, jnp.float32)
  model_fn, calls = counting(g.model_fn)
  make_sampler("ddim", 5, "cosine", T)(model_fn, x)
  make_sampler("dpm_solver++", 5, "cosine", T)(model_fn, x)
  make_sampler("dpm_solver++", 5, "cosine", T, truncate_cosine_like_reference=True)(model_fn, x)
  jax.effects_barrier()
  times = [float(c[0]) for c in calls]
  assert times[:5] == [800, 600, 400, 200, 0]  # "ddim5" stride 200
  assert times[5] == pytest.approx(999.0) and times[10] == pytest.approx(1000 - 1000 / 996)


def test_dpm_solver_nfe_function_and_tableau_agree():
  schedule = DiscreteVPSchedule.create("linear", T)
  for order in (1, 2, 3):
    for method in ("singlestep", "multistep"):
      for steps in range(order, 13):
        for dz in (False, True):
          tab = dpm_solver_tableau(schedule, steps, order=order, method=method,
                                   denoise_to_zero=dz)
          assert tab.nfe == dpm_solver_nfe(steps, order, method, dz) == steps + dz
          if method == "singlestep":  # DPM-Solver-fast: 3 calls at order 3 are [2, 1]
            assert sum(tab.step_orders) == steps
            assert max(tab.step_orders) == (2 if (order, steps) == (3, 3) else order)
          else:
            assert len(tab.step_orders) == steps


# ----------------------------------------------------------------- guided-diffusion parity

th = pytest.importorskip("torch")
with warnings.catch_warnings():
  warnings.simplefilter("ignore")
  gd = pytest.importorskip("guided_diffusion.gaussian_diffusion")
  gd_respace = pytest.importorskip("guided_diffusion.respace")
  from guided_diffusion.unet import UNetModel

from adv_diffusion.nets import UNet  # noqa: E402
from adv_diffusion.nets.torch_mapping import torch_to_flax_params  # noqa: E402

# One resolution level keeps the network's own float32 torch-vs-XLA difference (~3e-6 per call)
# well inside the budget: a two-level UNet reaches ~1e-5 after 10 steps (UNet parity itself is
# tests/test_unet.py's job). Learned variance (2C outputs) exercises ADM's LEARNED_RANGE.
UNET = dict(image_size=8, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
            attention_resolutions=(1,), channel_mult=(1,), num_head_channels=8,
            use_scale_shift_norm=True, use_new_attention_order=True)
RESPACING = "10"
PARITY_TOL = 1e-5


class Pair:
  """A random-weight guided-diffusion UNet, our Flax UNet with the same weights, both processes."""

  def __init__(self):
    th.manual_seed(0)
    self.torch = UNetModel(dims=2, use_fp16=False, use_checkpoint=False, **UNET).eval()
    with th.no_grad():
      for module in self.torch.modules():
        for p in module.parameters(recurse=False):
          p.normal_(0.0, 0.05)
        if isinstance(module, th.nn.GroupNorm):
          module.weight.add_(1.0)
    self.unet = UNet(**UNET)
    x = jnp.zeros((2, 8, 8, 3))
    template = jax.eval_shape(self.unet.init, jax.random.key(0), x, jnp.zeros((2,), jnp.int32))
    self.params = torch_to_flax_params(self.torch.state_dict(), template["params"])
    self.ours = GaussianDiffusion.create("cosine", T, RESPACING)
    self.theirs = gd_respace.SpacedDiffusion(
        use_timesteps=space_timesteps(T, RESPACING),
        betas=gd.get_named_beta_schedule("cosine", T),
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.LEARNED_RANGE, loss_type=gd.LossType.RESCALED_MSE)
    rng = np.random.default_rng(1)
    self.noise = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
    self.keys = keys_for(2, seed=7)

  def model_fn(self, x, t):
    return self.unet.apply({"params": self.params}, x, t)

  def step_noise(self) -> list:
    """Our per-step noise (steps N-1 .. 0), NCHW torch tensors, in guided-diffusion's order."""
    out = []
    for t in reversed(range(self.ours.num_timesteps)):
      z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, t), (8, 8, 3)))(self.keys)
      out.append(th.from_numpy(np.asarray(z).transpose(0, 3, 1, 2).copy()))
    return out


class _TorchFeedingNoise:
  """Stands in for `torch` inside guided_diffusion.gaussian_diffusion; randn_like pops noise."""

  def __init__(self, noises):
    self._noises = list(noises)

  def randn_like(self, x):
    return self._noises.pop(0)

  def __getattr__(self, name):
    return getattr(th, name)


@pytest.fixture(scope="module")
def pair():
  threads = th.get_num_threads()
  th.set_num_threads(1)  # tiny convolutions: extra torch threads only contend with XLA's
  yield Pair()
  th.set_num_threads(threads)


def _nhwc(x) -> np.ndarray:
  return x.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("eps_scale,eps_scale_slope", [(1.0, 0.0), (1.017, 0.004)],
                         ids=["adm", "adm-es-linear"])
def test_ancestral_matches_guided_diffusion(pair, monkeypatch, eps_scale, eps_scale_slope):
  kept = space_timesteps(T, RESPACING)
  scales = eps_scale_schedule(len(kept), eps_scale, eps_scale_slope).astype(np.float32)

  def es_model(x, ts):  # ADM-ES: ε / λ_i inside the x_0 prediction (ts on the original grid)
    out = pair.torch(x, ts)
    return th.cat([out[:, :3] / float(scales[kept.index(int(ts[0]))]), out[:, 3:]], dim=1)

  monkeypatch.setattr(gd, "th", _TorchFeedingNoise(pair.step_noise()))
  with th.no_grad():
    theirs = pair.theirs.p_sample_loop(es_model, (2, 3, 8, 8), device="cpu",
                                       noise=th.from_numpy(pair.noise.transpose(0, 3, 1, 2)))
  run = jax.jit(lambda x, k: sample_ancestral(pair.model_fn, x, pair.ours, k, learn_sigma=True,
                                              eps_scale=eps_scale,
                                              eps_scale_slope=eps_scale_slope)[0])
  assert max_err(run(jnp.asarray(pair.noise), pair.keys), _nhwc(theirs)) <= PARITY_TOL


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_matches_guided_diffusion(pair, monkeypatch, eta):
  monkeypatch.setattr(gd, "th", _TorchFeedingNoise(pair.step_noise()))
  with th.no_grad():
    theirs = pair.theirs.ddim_sample_loop(pair.torch, (2, 3, 8, 8), eta=eta, device="cpu",
                                          noise=th.from_numpy(pair.noise.transpose(0, 3, 1, 2)))
  run = jax.jit(lambda x, k: sample_ddim(pair.model_fn, x, pair.ours, k, eta=eta)[0])
  assert max_err(run(jnp.asarray(pair.noise), pair.keys), _nhwc(theirs)) <= PARITY_TOL


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("call,words", [
    (lambda: make_sampler("heun", 10, "cosine", T), ["heun", "allowed methods"]),
    (lambda: make_sampler("dpm_solver++", 10, "cosine", T, order=4), ["order", "1, 2 or 3"]),
    (lambda: make_sampler("dpm_solver", 2, "cosine", T, order=3, solver="singlestep"),
     ["at least 3"]),
    (lambda: make_sampler("dpm_solver++", 10, "cosine", T, t_start=0.5, t_end=0.6),
     ["t_end < t_start"]),
    (lambda: make_sampler("dpm_solver++", 10, "cosine", T, skip_type="karras"), ["karras"]),
    (lambda: make_sampler("dpm_solver++", 10, "cosine", T, solver="adaptive"), ["adaptive"]),
    (lambda: make_sampler("dpm_solver++", 1, "cosine", T, denoise_to_zero=True), ["nfe=1"]),
    (lambda: make_sampler("ddim", 10, "cosine", T, eta=-0.1), ["eta", ">= 0"]),
    (lambda: make_sampler("ddim", 7, "cosine", T, spacing="uniform"), ["uniform", "8 steps"]),
    (lambda: make_sampler("ddim", 10, "cosine", T, spacing="log"), ["log", "allowed spacings"]),
    (lambda: make_sampler("ddim", 0, "cosine", T), ["nfe"]),
    (lambda: make_sampler("ddim", 10, "cosine", T, order=2), ["order", "allowed options"]),
    (lambda: make_sampler("ancestral_es", 10, "cosine", T, eps_scale=0.0), ["positive"]),
    (lambda: sample_dpm_solver(None, jnp.zeros(SHAPE), DiscreteVPSchedule.create("cosine", T),
                               10, predictor="v"), ["'v'"]),
    (lambda: sample_ddim(None, jnp.zeros(SHAPE), GaussianDiffusion.create("cosine", T, "5"),
                         eta=1.0), ["sample_keys"]),
    (lambda: DiscreteVPSchedule.from_diffusion(GaussianDiffusion.create("cosine", T, "10")),
     ["respaced"]),
])
def test_bad_settings_raise_one_sentence(call, words):
  with pytest.raises(ValueError) as excinfo:
    call()
  assert_one_sentence(excinfo, *words)
