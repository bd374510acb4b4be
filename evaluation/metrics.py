"""End-to-end scores with provenance: reference statistics from images or files, then evaluate().

DESIGN.md (FID provenance): every number carries the weights hash, the resize rule, the reference
file and its hash and the sample count; the caller adds what only it knows (uint8 rounding rule,
checkpoint step, EMA or raw weights) through `provenance=`.
"""

import dataclasses
import os
from typing import Any

import numpy as np

from evaluation import features as features_lib
from evaluation import fid, inception, preprocess
from evaluation import inception_score as inception_score_lib
from evaluation import kid as kid_lib
from evaluation import precision_recall as precision_recall_lib
from evaluation.errors import EvaluationError, validate_images


@dataclasses.dataclass(frozen=True, eq=False)
class Reference:
  """Reference-set statistics (FID, sFID) and, when computed from images, its pool features."""

  pool: fid.FIDStatistics
  spatial: fid.FIDStatistics | None
  pool_features: np.ndarray | None
  provenance: dict


def pipeline_provenance(weights: inception.InceptionWeights, resize_rule: str) -> dict:
  """The fields that fix how images become features (equal fields = comparable numbers)."""
  return {
      "network": "FID Inception-v3, TF 2015-12-05 graph (Flax port of pytorch-fid's "
      "fid_inception_v3)",
      "weights_sha256": weights.sha256,
      "weights_file": os.path.basename(weights.path),
      "resize_rule": resize_rule,
      "resize": preprocess.RESIZE_RULES[resize_rule],
      "fid_features": "pool_3 (2048)",
      "sfid_features": "mixed_6/conv[..., :7] = Mixed_6d.branch1x1 (17*17*7 = 2023, HWC order)",
  }


def _weights(weights: Any) -> inception.InceptionWeights:
  if isinstance(weights, inception.InceptionWeights):
    return weights
  return inception.load_inception_weights(weights)


def image_statistics(
    images: Any,
    weights: Any = None,
    resize_rule: str = preprocess.DEFAULT_RESIZE_RULE,
    batch_size: int = 200,
    logits: bool | None = False,
    progress: bool = True,
) -> tuple[dict[str, np.ndarray], fid.FIDStatistics, fid.FIDStatistics]:
  """(features, pool statistics, spatial statistics) of uint8 NHWC images (at least 2)."""
  images = validate_images(images, min_count=2)
  weights = _weights(weights)
  feats = features_lib.extract_features(
      images, weights, batch_size, resize_rule, logits=logits, progress=progress
  )
  record = pipeline_provenance(weights, resize_rule)
  record["count"] = int(images.shape[0])
  record["image_shape"] = [int(n) for n in images.shape[1:]]
  pool = fid.compute_statistics(feats["pool"], batch_size=4096, provenance=record)
  spatial = fid.compute_statistics(feats["spatial"], batch_size=4096, provenance=record)
  return feats, pool, spatial


def load_reference(
    path: str,
    weights: Any = None,
    resize_rule: str = preprocess.DEFAULT_RESIZE_RULE,
    batch_size: int = 200,
    progress: bool = True,
) -> Reference:
  """A reference from an image npz (ADM reference batch `arr_0`) or a statistics npz.

  From images, the statistics are recomputed with this pipeline (an ADM batch's precomputed
  `mu`/`sigma` came from TF and are ignored, so both sides of the FID share one pipeline); the
  pool features are kept for precision/recall and KID. From a statistics file (ours,
  pytorch-fid's) FID and, when `mu_s`/`sigma_s` are present, sFID can be computed, and KID and
  precision/recall when it keeps the reference's `pool_features` (`--mode=fid_stats` does).
  """
  if not os.path.isfile(path):
    raise EvaluationError(f"reference file {path} does not exist.")
  source = {
      "reference_file": os.path.abspath(path),
      "reference_sha256": inception.file_sha256(path),
  }
  try:
    with np.load(path, allow_pickle=False) as data:
      has_images = "arr_0" in data.files
      images = data["arr_0"] if has_images else None
  except Exception as e:  # a text file, a pickle, a truncated zip
    raise EvaluationError(
        f"reference file {path} is not a readable numpy .npz ({type(e).__name__}); recompute "
        "it from images."
    ) from None
  if not has_images:
    stats = fid.load_statistics(path)
    record = dict(stats.provenance)
    record.update(source)
    return Reference(stats.pool, stats.spatial, stats.pool_features, record)
  feats, pool, spatial = image_statistics(
      images, weights, resize_rule, batch_size, progress=progress
  )
  record = dict(pool.provenance)
  record.update(source)
  return Reference(pool, spatial, feats["pool"], record)


_PIPELINE_KEYS = ("weights_sha256", "resize_rule")


def _shape_words(shape: Any) -> str:
  """(16, 16, 1) → "16×16×1"."""
  return "×".join(str(int(n)) for n in shape)


def evaluate(
    samples: Any,
    reference: Reference | str,
    weights: Any = None,
    resize_rule: str = preprocess.DEFAULT_RESIZE_RULE,
    batch_size: int = 200,
    inception_score: bool | None = None,
    precision_recall: bool = True,
    provenance: dict | None = None,
    progress: bool = True,
    fid_method: str = "sqrtm",
    kid: bool = True,
    keep_features: bool = False,
) -> dict[str, Any]:
  """FID, sFID, Inception Score, precision/recall and KID of uint8 samples, with provenance.

  `inception_score`: None = when the weights have the classifier, True = required. Precision and
  recall need a reference built from images, and so does KID (`kid`: result keys `kid` and
  `kid_std`, torch-fidelity's mean ± std over 100 subsets of min(1000, N_samples, N_reference)
  pool features, samples as its input 1; about 0.5 s a subset of 1000 on 2 CPU cores, `kid=False`
  skips it; see `kid.kernel_inception_distance`). A reference whose recorded weights hash or
  resize rule differs from this pipeline's is refused (such an FID compares two pipelines, not
  models). `fid_method`: "sqrtm" (pytorch-fid's numerics) or "eigh" (same value, faster; see
  `fid.frechet_distance`). `keep_features`: also return the samples' (N, 2048) pool features
  under `pool_features` (for paired comparisons of two sample sets, `kid.paired_mmd2_difference`).
  """
  weights = _weights(weights)
  if not isinstance(reference, Reference):
    reference = load_reference(reference, weights, resize_rule, batch_size, progress)
  dim = reference.pool.mu.shape[0]
  if dim != inception.POOL_DIM:  # e.g. pytorch-fid statistics of its 64/192/768-d features
    raise EvaluationError(
        f"the reference statistics {reference.provenance.get('reference_file')} hold {dim}-d "
        f"features but FID uses Inception's {inception.POOL_DIM}-d pool_3 features; recompute "
        "them from images with this pipeline."
    )
  mine = pipeline_provenance(weights, resize_rule)
  for key in _PIPELINE_KEYS:
    theirs = reference.provenance.get(key)
    if theirs is not None and theirs != mine[key]:
      raise EvaluationError(
          f"the reference statistics were computed with {key} = {theirs!r} but "
          f"this pipeline uses {mine[key]!r}; recompute them from images."
      )
  samples = validate_images(samples, min_count=2)
  theirs = reference.provenance.get("image_shape")
  if theirs is not None and list(theirs) != list(samples.shape[1:]):
    raise EvaluationError(
        f"the samples are {_shape_words(samples.shape[1:])} images but the reference statistics "
        f"were computed from {_shape_words(theirs)} images; score samples of the reference's "
        "size, or recompute the reference from images of the samples' size."
    )
  if inception_score and not weights.has_logits:
    raise EvaluationError(features_lib.logits_missing_message(weights.path))
  want_is = weights.has_logits if inception_score is None else inception_score
  feats, pool, spatial = image_statistics(
      samples, weights, resize_rule, batch_size, logits=want_is, progress=progress
  )
  result: dict[str, Any] = {"fid": fid.fid_from_statistics(pool, reference.pool, method=fid_method)}
  if reference.spatial is not None:
    result["sfid"] = fid.fid_from_statistics(spatial, reference.spatial, method=fid_method)
  if want_is:
    result["inception_score"], result["inception_score_std"] = inception_score_lib.inception_score(
        feats["logits"]
    )
  if precision_recall and reference.pool_features is not None:
    result["precision"], result["recall"] = precision_recall_lib.precision_recall(
        reference.pool_features, feats["pool"]
    )
  kid_record = {}
  if kid and reference.pool_features is not None:
    # torch-fidelity's order: input 1 = the samples (generated), input 2 = the reference; the
    # order fixes which set's subsets the RandomState draws first.
    subset_size = min(
        kid_lib.DEFAULT_SUBSET_SIZE, feats["pool"].shape[0], reference.pool_features.shape[0]
    )
    result["kid"], result["kid_std"] = kid_lib.kernel_inception_distance(
        feats["pool"], reference.pool_features, subset_size=subset_size
    )
    kid_record = dict(
        kid_subsets=kid_lib.DEFAULT_NUM_SUBSETS,
        kid_subset_size=subset_size,
        kid_seed=kid_lib.DEFAULT_SEED,
    )
  record = dict(mine)
  record.update(kid_record)
  record.update(
      frechet_method=fid_method,
      num_samples=int(feats["pool"].shape[0]),
      reference_count=reference.pool.count,
      reference_file=reference.provenance.get("reference_file"),
      reference_sha256=reference.provenance.get("reference_sha256"),
  )
  record.update(provenance or {})
  result["provenance"] = record
  if keep_features:
    result["pool_features"] = feats["pool"]
  return result
