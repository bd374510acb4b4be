"""`--mode=fid_stats` and `--mode=eval`: the FID library (`evaluation/`) applied to a run.

fid_stats: reference statistics of a dataset split, cached with provenance (dataset, split,
count, Inception weights hash, resize rule) in `config.evaluation.reference` or
`workdir/eval/reference_<dataset>_<split>.npz`.
eval: scores a sample `.npz` (`config.evaluation.samples`, default the set that
`config.sampling` names) against that reference; writes `workdir/eval/<samples>.json` with the
scores and the full provenance of the number (weights hash, resize rule, reference file and hash,
sample count, checkpoint step, EMA or raw, sampler, uint8 rule).
"""

import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging

from modes import data as data_lib
from modes.config_validation import validate_config
from evaluation import fid, inception, metrics
from modes import statistics_file


def reference_path(config: ml_collections.ConfigDict, workdir: str) -> str:
  e, d = config.evaluation, config.data
  if e.reference:
    return e.reference
  return os.path.join(workdir, "eval", f"reference_{d.dataset}_{d.split}.npz")


def _weights_path(config: ml_collections.ConfigDict) -> str | None:
  return config.evaluation.inception_weights or None


def run_fid_stats(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Computes (or reuses) the reference statistics of `config.data`; returns their path.

  With `config.evaluation.reference_features_file` (a file an earlier fid_stats exported with
  `evaluation.export_reference_features`), the statistics come from its pool features when it
  describes the same images through the same Inception weights and resize rule (no sFID then);
  otherwise Inception runs over the images."""
  validate_config(config, "fid_stats")
  e, d = config.evaluation, config.data
  path = reference_path(config, workdir)
  dataset = data_lib.load_dataset(d.dataset, d.split, d.data_dir)
  images = dataset.images
  if e.max_reference_images:
    images = images[: e.max_reference_images]
  images_sha = statistics_file.images_sha256(images)
  described = dict(dataset=d.dataset, split=d.split, count=int(images.shape[0]))
  if os.path.isfile(path) and _cached_reference_serves(config, path, described, images_sha):
    logging.info("Reference statistics already in %s.", path)
    _export_features(config, path)
    return path
  weights = inception.load_inception_weights(_weights_path(config))
  record = dict(
      metrics.pipeline_provenance(weights, e.resize_rule),
      **described,
      images_sha256=images_sha,
      image_shape=[int(n) for n in images.shape[1:]],
      data_dir=d.data_dir or "TFDS default",
  )
  shipped = _shipped_features(config, record)
  if shipped is not None:
    pool = fid.compute_statistics(shipped, batch_size=4096, provenance=record)
    spatial, kept = None, shipped
  else:
    feats, pool, spatial = metrics.image_statistics(images, weights, e.resize_rule, e.batch_size)
    kept = feats["pool"] if e.reference_features else None
  if jax.process_index() == 0:  # every process holds the same statistics; one writes them
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    statistics_file.save_reference(path, metrics.Reference(pool, spatial, kept, record))
  _all_processes_reach("fid_stats: reference written")
  logging.info(
      "Wrote reference statistics of %d %s/%s images to %s.",
      images.shape[0],
      d.dataset,
      d.split,
      path,
  )
  _export_features(config, path)
  return path


def _cached_reference_serves(
    config: ml_collections.ConfigDict, path: str, described: dict, images_sha: str
) -> bool:
  """Whether the statistics file at `path` describes these images and has what is asked."""
  e = config.evaluation
  cached = metrics.load_reference(
      path, _weights_path(config), e.resize_rule, e.batch_size, progress=False
  )
  record = cached.provenance
  has_what_is_asked = cached.pool_features is not None or not e.reference_features
  same_images = (
      all(record.get(k) == v for k, v in described.items())
      and record.get("images_sha256", images_sha) == images_sha
  )
  return has_what_is_asked and same_images


def _shipped_features(config: ml_collections.ConfigDict, expected: dict) -> np.ndarray | None:
  """The pool features of `evaluation.reference_features_file` when it describes what
  `expected` records, else None (and a warning naming the fields that differ)."""
  e = config.evaluation
  if not e.reference_features_file:
    return None
  features, provenance = statistics_file.load_reference_features(
      e.reference_features_file, e.reference_features_sha256
  )
  differ = statistics_file.features_file_mismatch(provenance, expected)
  if differ:
    logging.warning(
        "The reference features file %s was computed for other %s; running Inception over "
        "the images instead.",
        e.reference_features_file,
        ", ".join(differ),
    )
    return None
  logging.info(
      "Reference statistics from the %d pool features in %s (no sFID: the file keeps no "
      "spatial features).",
      features.shape[0],
      e.reference_features_file,
  )
  return features


def _export_features(config: ml_collections.ConfigDict, statistics: str) -> None:
  """Writes `evaluation.export_reference_features` (when set) from the statistics file."""
  out = config.evaluation.export_reference_features
  if not out or jax.process_index() != 0:
    return
  stats = fid.load_statistics(statistics)
  if stats.pool_features is None or "images_sha256" not in stats.provenance:
    from modes.errors import UserFacingError

    raise UserFacingError(
        f"the statistics file {statistics} keeps no pool features or no images_sha256 to "
        "export; delete it and run --mode=fid_stats again with "
        "config.evaluation.reference_features=True."
    )
  keep = (*statistics_file.FEATURES_FILE_MATCH, "network", "weights_file", "data_dir")
  provenance = {k: stats.provenance[k] for k in keep if k in stats.provenance}
  sha = statistics_file.save_reference_features(out, stats.pool_features, provenance)
  print(f"Wrote {stats.pool_features.shape[0]} reference pool features to {out} (sha256 {sha}).")


def _all_processes_reach(name: str) -> None:
  """No process reads what process 0 writes before it is written."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def samples_path(config: ml_collections.ConfigDict, workdir: str) -> str:
  """`config.evaluation.samples`, else the newest `samples/<tag>.npz` of `config.sampling`."""
  if config.evaluation.samples:
    return config.evaluation.samples
  from modes import sample as generate

  directory = os.path.join(workdir, "samples")
  prefix = generate.sample_tag(config, 0).split("_step")[0] + "_step"
  candidates = sorted(
      (f for f in os.listdir(directory) if f.startswith(prefix) and f.endswith(".npz"))
      if os.path.isdir(directory)
      else [],
      key=lambda f: os.path.getmtime(os.path.join(directory, f)),
  )
  if not candidates:
    from modes.errors import UserFacingError

    raise UserFacingError(
        f"no sample set {prefix}*.npz in {directory}; generate one first with --mode=sample "
        "and the same config, or set config.evaluation.samples to an .npz path."
    )
  return os.path.join(directory, candidates[-1])


def load_samples(path: str) -> np.ndarray:
  """The images `arr_0` of a sample npz, at least 2 of them, or one sentence (before Inception)."""
  from modes.errors import UserFacingError

  hint = (
      "pass an .npz written by --mode=sample (uint8 images in arr_0) as config.evaluation.samples"
  )
  if not os.path.isfile(path):
    raise UserFacingError(f"the sample file {path} does not exist; {hint}.")
  try:
    with np.load(path, allow_pickle=False) as data:
      if not hasattr(data, "files") or "arr_0" not in data.files:
        raise UserFacingError(f"the sample file {path} holds no array arr_0; {hint}.")
      samples = data["arr_0"]
  except UserFacingError:
    raise
  except Exception as exc:  # noqa: BLE001 - a text file, a pickle, a truncated zip: unreadable
    raise UserFacingError(
        f"the sample file {path} is not a readable numpy .npz ({type(exc).__name__}); {hint}."
    ) from exc
  if samples.ndim == 4 and samples.shape[0] < 2:  # other shapes: evaluation's image checks
    raise UserFacingError(
        f"the sample file {path} holds {samples.shape[0]} image(s) but FID needs at least 2 (a "
        "covariance); generate more with --mode=sample (config.sampling.num_samples ≥ 2)."
    )
  return samples


def evaluate_samples(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Scores a sample set against the reference statistics and writes the JSON record."""
  validate_config(config, "eval")
  e = config.evaluation
  reference = reference_path(config, workdir)
  if not os.path.isfile(reference):
    from modes.errors import UserFacingError

    raise UserFacingError(
        f"reference statistics {reference} do not exist; compute them first "
        "with --mode=fid_stats and the same config."
    )
  path = samples_path(config, workdir)
  samples = load_samples(path)
  provenance = {"samples_file": os.path.abspath(path)}
  sidecar = os.path.splitext(path)[0] + ".json"
  if os.path.isfile(sidecar):  # written by --mode=sample: step, EMA or raw, sampler, rounding
    with open(sidecar) as f:
      provenance["samples_provenance"] = json.load(f)
  result = metrics.evaluate(
      samples,
      reference,
      _weights_path(config),
      e.resize_rule,
      e.batch_size,
      inception_score=None,
      precision_recall=e.precision_recall,
      provenance=provenance,
      fid_method=e.fid_method,
      keep_features=e.save_sample_features,
  )
  out = record_path(path, workdir)
  features = result.pop("pool_features", None)
  if jax.process_index() == 0:  # every process holds the same scores; one writes them
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if features is not None:
      np.savez(features_path(path, workdir), pool_features=features)
    with open(out, "w") as f:
      json.dump(result, f, indent=2, default=float)
  _all_processes_reach("eval: scores written")
  logging.info("FID %.3f over %d samples -> %s", result["fid"], samples.shape[0], out)
  print(
      f"FID {result['fid']:.4f} ({samples.shape[0]} samples, reference "
      f"{result['provenance']['reference_count']} images) -> {out}"
  )
  return result


def record_path(samples: str, workdir: str) -> str:
  """Where the JSON record of the sample file `samples` goes."""
  return os.path.join(workdir, "eval", os.path.splitext(os.path.basename(samples))[0] + ".json")


def features_path(samples: str, workdir: str) -> str:
  """Where `evaluation.save_sample_features` writes the pool features of the sample file."""
  return os.path.splitext(record_path(samples, workdir))[0] + "_pool.npz"


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> str:
  """--mode=eval: `evaluate_samples`; returns the path of its JSON record."""
  evaluate_samples(config, workdir)
  return record_path(samples_path(config, workdir), workdir)
