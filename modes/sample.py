"""`--mode=sample`: sharded, resumable generation of a sample set from a trained checkpoint.

Sample i draws its starting noise, its step noise and (class-conditional models) its label from
fold_in(key(config.sampling.seed), i) only, so the set does not depend on the batch size or the
device count. Each global batch is written atomically as `chunk_{start:08d}.npz` under
`workdir/samples/<tag>/b<batch>_<settings digest>/` as soon as it finishes; a rerun of the same
config skips finished chunks. At the end `workdir/samples/<tag>.npz` holds the whole set in
ADM's format (`arr_0` uint8 NHWC, `arr_1` labels when class-conditional), next to a PNG grid of
the first 64 samples and a JSON file with its provenance.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from modes import checkpoint as ckpt_lib
from modes import parallel
from modes.config_validation import validate_config
from modes.errors import ConfigError
from modes.factories import create_unet
from modes.train_programs import init_params
from modes import images as image_lib
from sampling.registry import Sampler, make_sampler

ROUNDING = "truncate"  # ADM's uint8 rule (modes.images.to_uint8)
GRID_SIZE = 64  # samples in the PNG grid
# Independent streams of sample i's key fold_in(key(seed), i).
_NOISE_STREAM, _STEP_STREAM, _LABEL_STREAM = 0, 1, 2


def sample_tag(config: ml_collections.ConfigDict, step: int) -> str:
  """Name of a sample set: method, NFE, checkpoint step, EMA or raw weights and seed."""
  s = config.sampling
  return f"{s.method}_nfe{s.nfe}_step{step}_{'ema' if s.use_ema else 'raw'}_seed{s.seed}"


# sampling.preset → the dpm_solver++ options it fixes. "authors": the settings of the paper's
# sampling script (PAPER.md §7): t_start 0.992, the reference code's 996-knot cosine truncation
# and time mapping, no x_0 clipping. Presets touch dpm_solver++ only: a table's other samplers
# keep their own settings.
PRESETS = {
    "": {},
    "authors": dict(t_start=0.992, truncate_cosine_like_reference=True, clip_denoised=False),
}


def sampler_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The `make_sampler` options of `config.sampling.method` taken from the config."""
  s = config.sampling
  if s.method in ("ancestral", "ancestral_es"):
    opts = dict(learn_sigma=config.model.learn_sigma, clip_denoised=s.clip_denoised)
    if s.method == "ancestral_es":
      opts["eps_scale"] = s.eps_scale
    return opts
  if s.method == "ddim":
    return dict(eta=s.eta, clip_denoised=s.clip_denoised)
  if s.method in ("dpm_solver", "dpm_solver++"):
    opts = dict(
        t_start=s.dpm_t_start,
        truncate_cosine_like_reference=s.dpm_truncate_cosine_like_reference,
    )
    if s.method == "dpm_solver++":
      opts["clip_denoised"] = s.clip_denoised
      if s.preset == "authors":
        opts.update(PRESETS["authors"])
    return opts
  if s.method == "consistency":
    cm = config.consistency
    return dict(
        timesteps=tuple(s.cm_timesteps) or None,
        sigma_data=cm.sigma_data,
        timestep_scale=cm.timestep_scale,
        clip_x0=cm.clip_x0,
    )
  return {}


def build_sampler(config: ml_collections.ConfigDict) -> Sampler:
  """`make_sampler` for `config.sampling`, with its ValueErrors as one-sentence ConfigErrors."""
  s = config.sampling
  try:
    return make_sampler(
        s.method,
        s.nfe,
        config.diffusion.noise_schedule,
        config.diffusion.num_timesteps,
        **sampler_options(config),
    )
  except ValueError as exc:
    raise ConfigError(
        f"config.sampling (method {s.method!r}, nfe {s.nfe}) is not allowed: "
        f"{str(exc).rstrip('.')}."
    ) from exc


def sample_inputs(
    seed: int, indices: jax.Array, shape: tuple[int, ...], num_classes: int
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """(noise, step keys, labels) of samples `indices`: pure functions of (seed, index)."""
  root = jax.random.key(seed)
  keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(indices)
  noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, _NOISE_STREAM), shape))(keys)
  step_keys = jax.vmap(lambda k: jax.random.fold_in(k, _STEP_STREAM))(keys)
  labels = None
  if num_classes:
    labels = jax.vmap(
        lambda k: jax.random.randint(
            jax.random.fold_in(k, _LABEL_STREAM), (), 0, num_classes, jnp.int32
        )
    )(keys)
  return noise, step_keys, labels


def compile_batch_sampler(
    config: ml_collections.ConfigDict, sampler: Sampler, mesh: jax.sharding.Mesh
) -> Callable:
  """Jitted (params, indices) → (samples in [-1, 1], labels), batch sharded over `data`."""
  model = create_unet(config)
  d = config.data
  shape = (d.image_size, d.image_size, d.channels)

  def run(params: Any, indices: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    noise, step_keys, labels = sample_inputs(config.sampling.seed, indices, shape, d.num_classes)

    def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
      return model.apply({"params": params}, x, t, labels, train=False).astype(jnp.float32)

    return sampler(model_fn, noise, step_keys), labels

  repl = parallel.replicated(mesh)
  return jax.jit(
      run, in_shardings=(repl, parallel.batch_sharding(mesh)), out_shardings=(repl, repl)
  )


def resolve_checkpoint(workdir: str, step: int) -> int:
  """The checkpoint step to sample from (`step` = -1: latest), or a one-sentence CheckpointError."""
  how = (
      f"train this run first with `python main.py --mode=train` and the same --config and "
      f"--workdir={workdir}"
  )
  return ckpt_lib.require_checkpoint(
      workdir, step, how=how, purpose="sample from", step_key="config.sampling.checkpoint_step"
  )


def load_params(
    config: ml_collections.ConfigDict, workdir: str, step: int, mesh: jax.sharding.Mesh
) -> Any:
  """The replicated raw or EMA (`config.sampling.ema_index`) params of checkpoint `step`."""
  model = create_unet(config)
  repl = parallel.replicated(mesh)
  abstract = jax.eval_shape(lambda key: init_params(model, config, key), jax.random.key(0))
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), abstract)
  target = {"params": params, "ema_params": tuple(params for _ in config.train.ema_rates)}
  restored, _ = ckpt_lib.load_model_weights(workdir, step, target)
  s = config.sampling
  return restored["ema_params"][s.ema_index] if s.use_ema else restored["params"]


def _settings_digest(config: ml_collections.ConfigDict, sampler: Sampler) -> str:
  """Short hash of everything that changes the samples beyond the tag's fields."""
  settings = dict(
      options=sampler.options,
      num_timesteps=config.diffusion.num_timesteps,
      noise_schedule=config.diffusion.noise_schedule,
      ema_index=config.sampling.ema_index,
  )
  return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _write_npz_atomic(path: str, **arrays: np.ndarray) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)


def _chunk_ok(path: str, count: int, image_shape: tuple[int, ...], conditional: bool) -> bool:
  """Whether `path` is a finished chunk of `count` uint8 samples of `image_shape`."""
  if not os.path.exists(path):
    return False
  try:
    with np.load(path) as chunk:
      images = chunk["arr_0"]
      ok = images.dtype == np.uint8 and images.shape == (count, *image_shape)
      if conditional:
        ok = ok and chunk["arr_1"].shape == (count,)
      return bool(ok)
  except (OSError, ValueError, KeyError):
    return False


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    sampler: Sampler | None = None,
    tag_suffix: str = "",
) -> str:
  """Generates (or completes) the sample set of `config.sampling`; returns its .npz path.

  `sampler` replaces the one `config.sampling` names (e.g. an attacked sampler); its `options`
  must then describe everything it does, and `tag_suffix` tells its sets apart.
  """
  validate_config(config, "sample")
  s, d = config.sampling, config.data
  mesh = parallel.make_mesh()
  if s.batch_size % mesh.size:
    raise ConfigError(
        f"config.sampling.batch_size = {s.batch_size} is not allowed: it must be "
        f"divisible by the {mesh.size} devices of the mesh."
    )
  sampler = sampler or build_sampler(config)
  step = resolve_checkpoint(workdir, s.checkpoint_step)
  is_main = jax.process_index() == 0
  tag = sample_tag(config, step) + tag_suffix
  samples_dir = os.path.join(workdir, "samples")
  digest = _settings_digest(config, sampler)
  chunk_dir = os.path.join(samples_dir, tag, f"b{s.batch_size}_{digest}")
  image_shape = (d.image_size, d.image_size, d.channels)
  conditional = bool(d.num_classes)
  starts = list(range(0, s.num_samples, s.batch_size))

  def count(start: int) -> int:
    return min(s.batch_size, s.num_samples - start)

  def path(start: int) -> str:
    return os.path.join(chunk_dir, f"chunk_{start:08d}.npz")

  # Every process decides the same pending list before anything new is written.
  pending = [b for b in starts if not _chunk_ok(path(b), count(b), image_shape, conditional)]
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("sampling: pending chunks listed")
  logging.info(
      "Sampling %s from step %d: %d of %d chunks of %d to do in %s.",
      tag,
      step,
      len(pending),
      len(starts),
      s.batch_size,
      chunk_dir,
  )
  if is_main:
    os.makedirs(chunk_dir, exist_ok=True)

  if pending:
    params = load_params(config, workdir, step, mesh)
    run = compile_batch_sampler(config, sampler, mesh)
    sharding = parallel.batch_sharding(mesh)
    progress = None
    if is_main:
      from tqdm import tqdm

      done = s.num_samples - sum(count(b) for b in pending)
      progress = tqdm(total=s.num_samples, initial=done, unit="sample", desc=tag)
    for start in pending:
      n = count(start)
      # Pad the last batch with the following indices; their samples are dropped.
      indices = np.arange(start, start + s.batch_size, dtype=np.int32)
      global_indices = jax.make_array_from_callback(
          indices.shape, sharding, lambda idx: indices[idx]
      )
      samples, labels = run(params, global_indices)
      if is_main:
        arrays = {"arr_0": image_lib.to_uint8(np.asarray(samples)[:n], ROUNDING)}
        if conditional:
          arrays["arr_1"] = np.asarray(labels)[:n].astype(np.int64)
        _write_npz_atomic(path(start), **arrays)
        progress.update(n)
    if progress is not None:
      progress.close()

  out_path = os.path.join(samples_dir, f"{tag}.npz")
  if is_main:
    chunks = [np.load(path(b)) for b in starts]
    images = np.concatenate([c["arr_0"] for c in chunks])
    arrays = {"arr_0": images}
    if conditional:
      arrays["arr_1"] = np.concatenate([c["arr_1"] for c in chunks])
    if images.shape[0] != s.num_samples:
      raise RuntimeError(f"assembled {images.shape[0]} samples, expected {s.num_samples}")
    _write_npz_atomic(out_path, **arrays)
    image_lib.save_png(
        os.path.join(samples_dir, f"{tag}.png"), image_lib.make_grid(images[:GRID_SIZE]), upscale=2
    )
    provenance = dict(
        checkpoint_step=step,
        weights="ema" if s.use_ema else "raw",
        ema_index=s.ema_index if s.use_ema else None,
        ema_rate=config.train.ema_rates[s.ema_index] if s.use_ema else None,
        method=s.method,
        nfe=sampler.nfe,
        num_samples=s.num_samples,
        seed=s.seed,
        batch_size=s.batch_size,
        rounding=ROUNDING,
        sampler_options=dict(sampler.options),
        workdir=os.path.abspath(workdir),
    )
    tmp = os.path.join(samples_dir, f"{tag}.json.tmp")
    with open(tmp, "w") as f:
      json.dump(provenance, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, os.path.join(samples_dir, f"{tag}.json"))
    logging.info("Wrote %d samples to %s.", s.num_samples, out_path)
  return out_path
