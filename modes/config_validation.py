"""Start-up checks of a configuration: each failure names the key, the value and what is allowed."""

import os

import ml_collections

from modes import data as data_lib
from modes.config_checks import check_choice as _check_choice
from modes.config_checks import check_float as _check_float
from modes.config_checks import check_int as _check_int
from modes.config_checks import fail as _fail
from modes.errors import ConfigError
from modes.story_checks import validate_story

# The config sections each mode reads (and so validates).
TRAINING = ("data", "model", "diffusion", "optim", "train", "adversarial", "consistency")
MODE_SECTIONS = {
    "train": TRAINING,
    "story": TRAINING + ("story", "table", "sampling", "evaluation"),
    "study": TRAINING + ("story", "study", "table", "robustness", "sampling", "evaluation"),
    "sample": ("data", "model", "diffusion", "train", "consistency", "sampling"),
    "fid_stats": ("data", "evaluation"),
    "eval": ("data", "sampling", "evaluation"),
    "table": (
        "data",
        "model",
        "diffusion",
        "train",
        "consistency",
        "table",
        "sampling",
        "evaluation",
    ),
    "robustness": (
        "data",
        "model",
        "diffusion",
        "train",
        "consistency",
        "table",
        "robustness",
        "sampling",
        "evaluation",
    ),
    "import_torch": TRAINING + ("torch_io",),
    "export_torch": TRAINING + ("torch_io",),
    "export_weights": ("data", "model", "train", "sampling"),
}


def validate_config(config: ml_collections.ConfigDict, mode: str | None = None) -> None:
  """Raises ConfigError with one sentence for the first bad value found in the sections that
  `mode` reads (None: every section)."""
  _check_int(config, "seed", 0)
  if mode in ("story", "study") and (
      config.adversarial.mode == "none" or config.consistency.mode != "none"
  ):
    _fail(
        "adversarial.mode",
        config.adversarial.mode,
        f"--mode={mode} fine-tunes a diffusion "
        "model with AT: use adversarial.mode 'fast' or 'pgd' and consistency.mode 'none'",
    )
  sections = MODE_SECTIONS[mode] if mode else tuple(_VALIDATORS)
  for name in _VALIDATORS:
    if name in sections:
      _VALIDATORS[name](config)


def _validate_data(config) -> None:
  _check_choice(config, "data.dataset", data_lib.DATASETS)
  spec = data_lib.DATASETS[config.data.dataset]
  if config.data.image_size != spec.image_size:
    _fail(
        "data.image_size",
        config.data.image_size,
        f"dataset {config.data.dataset!r} has {spec.image_size}-pixel images",
    )
  if config.data.channels != spec.channels:
    _fail(
        "data.channels",
        config.data.channels,
        f"dataset {config.data.dataset!r} has {spec.channels} channel(s)",
    )
  if config.data.num_classes not in (0, spec.num_classes):
    _fail(
        "data.num_classes",
        config.data.num_classes,
        f"use 0 (unconditional) or {spec.num_classes} for dataset {config.data.dataset!r}",
    )


def _validate_model(config) -> None:
  m = config.model
  _check_int(config, "model.num_channels", 1)
  _check_int(config, "model.num_res_blocks", 0)  # 0 as guided-diffusion: one block up per level
  if not m.channel_mult or any(not isinstance(c, int) or c < 1 for c in m.channel_mult):
    _fail("model.channel_mult", m.channel_mult, "use a non-empty tuple of positive integers")
  size = config.data.image_size
  if size % (2 ** (len(m.channel_mult) - 1)):
    _fail(
        "model.channel_mult",
        m.channel_mult,
        f"{len(m.channel_mult) - 1} downsamplings need an image size divisible by "
        f"{2 ** (len(m.channel_mult) - 1)}, got {size}",
    )
  reachable = {size // 2**i for i in range(len(m.channel_mult))}
  for res in m.attention_resolutions:
    if res not in reachable:
      _fail(
          "model.attention_resolutions",
          m.attention_resolutions,
          f"each entry must be a feature-map side the UNet visits, one of {sorted(reachable)}",
      )
  if m.num_head_channels != -1:
    _check_int(config, "model.num_head_channels", 1)
    widths = {m.num_channels * c for c in m.channel_mult}
    bad = sorted(w for w in widths if w % m.num_head_channels)
    if bad:
      _fail(
          "model.num_head_channels",
          m.num_head_channels,
          f"it must divide every attention width, and {bad[0]} is not a multiple",
      )
  else:
    _check_int(config, "model.num_heads", 1)
  _check_float(config, "model.dropout", 0.0, 1.0, high_open=True)
  from modes.factories import COMPUTE_DTYPES

  _check_choice(config, "model.compute_dtype", COMPUTE_DTYPES)
  for key in (
      "learn_sigma",
      "use_scale_shift_norm",
      "resblock_updown",
      "use_new_attention_order",
      "conv_resample",
      "remat",
  ):
    if not isinstance(m[key], bool):
      _fail(f"model.{key}", m[key], "use True or False")
  if m.num_channels % 32:
    _fail(
        "model.num_channels",
        m.num_channels,
        "ADM's GroupNorm uses 32 groups, so use a multiple of 32",
    )


def _validate_diffusion(config) -> None:
  from adv_diffusion import diffusion, schedules, timestep_sampler

  _check_choice(config, "diffusion.noise_schedule", schedules.BETA_SCHEDULES)
  _check_int(config, "diffusion.num_timesteps", 2)
  _check_choice(config, "diffusion.loss_type", diffusion.LOSS_TYPES)
  _check_choice(config, "diffusion.timestep_sampler", timestep_sampler.KINDS)
  _check_int(config, "diffusion.sampler_history", 1)
  _check_float(config, "diffusion.sampler_uniform_prob", 0.0, 1.0)
  _check_float(config, "diffusion.input_perturbation", 0.0, float("inf"))


def _validate_optim(config) -> None:
  _check_float(config, "optim.learning_rate", 0.0, 1.0, low_open=True)
  _check_float(config, "optim.weight_decay", 0.0, 1.0)
  _check_float(config, "optim.b1", 0.0, 1.0, high_open=True)
  _check_float(config, "optim.b2", 0.0, 1.0, high_open=True)
  _check_float(config, "optim.eps", 0.0, 1.0, low_open=True)
  _check_int(config, "optim.warmup_steps", 0)
  _check_float(config, "optim.grad_clip_norm", 0.0, float("inf"))


def _validate_train(config) -> None:
  t = config.train
  _check_int(config, "train.batch_size", 1)
  _check_int(config, "train.num_steps", 0)
  if not t.ema_rates or any(not 0.0 < r < 1.0 for r in t.ema_rates):
    _fail("train.ema_rates", t.ema_rates, "use a non-empty tuple of rates in (0, 1)")
  for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
    _check_int(config, f"train.{key}", 1)
  for key in ("keep_every", "sample_every"):
    _check_int(config, f"train.{key}", 0)
  _check_int(config, "train.sample_grid_size", 1)
  if t.init_from_step < -1:
    _fail("train.init_from_step", t.init_from_step, "use -1 (latest) or a checkpoint step ≥ 0")
  from modes.nonfinite import ON_NONFINITE

  _check_choice(config, "train.on_nonfinite", ON_NONFINITE)
  _check_int(config, "train.max_consecutive_skips", 0)
  _check_float(config, "train.preemption_grace_seconds", 0.0, 86400.0, low_open=True)


def _validate_adversarial(config) -> None:
  from adv_diffusion import adversarial, losses

  _check_choice(config, "adversarial.mode", adversarial.MODES)
  _check_int(config, "adversarial.num_replays", 1)
  _check_int(config, "adversarial.pgd_steps", 1)
  _check_float(config, "adversarial.step_size", 0.0, float("inf"))
  _check_float(config, "adversarial.radius", 0.0, float("inf"))
  _check_choice(config, "adversarial.norm", adversarial.NORMS)
  _check_choice(config, "adversarial.target", losses.TARGET_TYPES)
  _check_choice(config, "adversarial.init", adversarial.INITS)
  _check_float(config, "adversarial.init_magnitude", 0.0, float("inf"))
  _check_choice(config, "adversarial.radius_schedule", adversarial.RADIUS_SCHEDULES)
  _check_int(config, "adversarial.radius_grid_steps", 1)
  if config.adversarial.radius_grid_steps > config.diffusion.num_timesteps:
    _fail(
        "adversarial.radius_grid_steps",
        config.adversarial.radius_grid_steps,
        f"use at most diffusion.num_timesteps = {config.diffusion.num_timesteps}",
    )


def _validate_consistency(config) -> None:
  from adv_diffusion import consistency

  cm = config.consistency
  _check_choice(config, "consistency.mode", consistency.MODES)
  if cm.mode == "none":
    return
  _check_int(config, "consistency.num_scales", 2)
  if cm.num_scales > config.diffusion.num_timesteps - 1:
    _fail(
        "consistency.num_scales",
        cm.num_scales,
        f"use at most diffusion.num_timesteps − 1 = {config.diffusion.num_timesteps - 1}",
    )
  _check_int(config, "consistency.skip", 1)
  if cm.skip > cm.num_scales:
    _fail("consistency.skip", cm.skip, f"use at most consistency.num_scales = {cm.num_scales}")
  _check_choice(config, "consistency.distance", consistency.DISTANCES)
  if cm.distance == "lpips":
    _validate_lpips(config)
  _check_float(config, "consistency.sigma_data", 0.0, float("inf"), low_open=True)
  _check_float(config, "consistency.timestep_scale", 0.0, float("inf"), low_open=True)
  for key in ("target_ema", "target_ema_start"):
    _check_float(config, f"consistency.{key}", 0.0, 1.0, high_open=True)
  _check_choice(config, "consistency.target_ema_schedule", consistency.TARGET_EMA_SCHEDULES)
  _check_int(config, "consistency.target_ema_ramp_updates", 0)
  if cm.mode == "distill":
    if not cm.teacher:
      _fail(
          "consistency.teacher",
          cm.teacher,
          "consistency distillation needs the workdir of a trained diffusion model",
      )
    if cm.teacher_step < -1:
      _fail("consistency.teacher_step", cm.teacher_step, "use -1 (latest) or a step ≥ 0")
    _check_int(config, "consistency.teacher_ema_index", 0)


def _validate_lpips(config) -> None:
  from evaluation import lpips

  cm = config.consistency
  _check_int(config, "consistency.lpips_resize", 0)
  if 0 < cm.lpips_resize < lpips.MIN_SIZE or (
      cm.lpips_resize == 0 and config.data.image_size < lpips.MIN_SIZE
  ):
    _fail(
        "consistency.lpips_resize",
        cm.lpips_resize,
        f"LPIPS-VGG needs images of at least {lpips.MIN_SIZE} pixels (data.image_size = "
        f"{config.data.image_size}); use {lpips.MIN_SIZE} or more, or 0 for images that large",
    )
  if not isinstance(cm.lpips_weights, str):
    _fail("consistency.lpips_weights", cm.lpips_weights, "use a file path or '' (the default)")
  path = lpips.resolve_weights_path(cm.lpips_weights)
  if not os.path.isfile(path):
    # config.consistency.lpips_weights = '' means the default file.
    raise ConfigError(
        f"config.consistency.distance = 'lpips' but " f"{lpips.missing_weights_message(path)}"
    )


def _validate_table(config) -> None:
  from sampling.registry import METHODS

  t = config.table
  if not t.methods or any(m not in METHODS or m == "consistency" for m in t.methods):
    _fail("table.methods", t.methods, f"use a non-empty tuple of {list(METHODS[:-1])}")
  for key in ("nfes", "cm_nfes"):
    values = t[key]
    if not values or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in values):
      _fail(f"table.{key}", values, "use a non-empty tuple of positive integers")
  _check_int(config, "table.num_samples", 1)


def _validate_robustness(config) -> None:
  from sampling.perturbations import KINDS

  r = config.robustness
  _check_int(config, "robustness.nfe", 1)
  _check_int(config, "robustness.pgd_steps", 1)
  _check_int(config, "robustness.num_samples", 2)
  if not r.kinds or any(k not in KINDS for k in r.kinds):
    _fail("robustness.kinds", r.kinds, f"use a non-empty tuple of {list(KINDS)}")
  if not r.budgets or any(
      isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b < float("inf")
      for b in r.budgets
  ):
    _fail("robustness.budgets", r.budgets, "use a non-empty tuple of positive numbers (ρ)")
  if not r.attack_steps or any(
      isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < r.nfe for i in r.attack_steps
  ):
    _fail(
        "robustness.attack_steps",
        r.attack_steps,
        f"use a non-empty tuple of sampler step indices in [0, robustness.nfe = {r.nfe})",
    )


def _validate_study(config) -> None:
  seeds = config.study.seeds
  if (
      not seeds
      or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)
      or len(set(seeds)) != len(seeds)
  ):
    _fail("study.seeds", seeds, "use a non-empty tuple of distinct non-negative integers")


def _validate_sampling(config) -> None:
  from sampling.registry import METHODS

  s = config.sampling
  _check_choice(config, "sampling.method", METHODS)
  _check_int(config, "sampling.nfe", 1)
  _check_int(config, "sampling.num_samples", 1)
  _check_int(config, "sampling.batch_size", 1)
  _check_int(config, "sampling.seed", 0)
  _check_int(config, "sampling.ema_index", 0)
  if s.ema_index >= len(config.train.ema_rates):
    _fail(
        "sampling.ema_index",
        s.ema_index,
        f"use an index below the {len(config.train.ema_rates)} rate(s) of train.ema_rates",
    )
  _check_int(config, "sampling.checkpoint_step", -1)
  for key in ("use_ema", "clip_denoised", "dpm_truncate_cosine_like_reference"):
    if not isinstance(s[key], bool):
      _fail(f"sampling.{key}", s[key], "use True or False")
  _check_float(config, "sampling.eps_scale", 0.0, float("inf"), low_open=True)
  _check_float(config, "sampling.eta", 0.0, float("inf"))
  _check_float(config, "sampling.dpm_t_start", 0.0, 1.0, low_open=True)
  from modes.sample import PRESETS

  _check_choice(config, "sampling.preset", PRESETS)


def _validate_evaluation(config) -> None:
  from evaluation import fid, preprocess

  _check_choice(config, "evaluation.resize_rule", preprocess.RESIZE_RULES)
  _check_int(config, "evaluation.batch_size", 1)
  _check_int(config, "evaluation.max_reference_images", 0)
  if config.evaluation.max_reference_images == 1:
    _fail("evaluation.max_reference_images", 1, "FID needs at least 2 images; use 0 (all) or ≥ 2")
  _check_choice(config, "evaluation.fid_method", fid.FRECHET_METHODS)


def _validate_torch_io(config) -> None:
  t = config.torch_io
  _check_int(config, "torch_io.step", -1)
  for key in ("checkpoint", "ema", "out"):
    if not isinstance(t[key], str):
      _fail(f"torch_io.{key}", t[key], "use a string (file paths; ema: comma-separated)")


_VALIDATORS = {
    "data": _validate_data,
    "model": _validate_model,
    "diffusion": _validate_diffusion,
    "optim": _validate_optim,
    "train": _validate_train,
    "adversarial": _validate_adversarial,
    "consistency": _validate_consistency,
    "table": _validate_table,
    "robustness": _validate_robustness,
    "story": validate_story,
    "study": _validate_study,
    "sampling": _validate_sampling,
    "evaluation": _validate_evaluation,
    "torch_io": _validate_torch_io,
}
