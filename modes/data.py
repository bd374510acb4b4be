"""Training data: the embedded digits set and TFDS datasets, as a deterministic batch stream.

Every dataset is held in host memory as uint8 NHWC. The global batch of step s is a pure
function of (seed, s): each epoch is a fresh permutation drawn from (seed, epoch), so a run
resumed at step s reads exactly the batches an uninterrupted run would, whatever the number
of processes. Each process materialises only its own rows of the global batch.
"""

import dataclasses
import functools
import gzip
import importlib.util
import os
from typing import Iterator, NamedTuple

import numpy as np

from modes.errors import DatasetNotPreparedError


class DatasetSpec(NamedTuple):
  image_size: int
  channels: int
  num_classes: int
  tfds_name: str  # "" for datasets embedded in a package
  train_examples: int  # images in the "train" split (the story's cost estimate reads it)


DATASETS = {
    # scikit-learn's 1,797 handwritten digits (8×8, 17 grey levels), upsampled to 16×16 so a
    # three-level UNet has room; one channel. Ships with scikit-learn: no download.
    "digits": DatasetSpec(16, 1, 10, "", 1797),
    "cifar10": DatasetSpec(32, 3, 10, "cifar10", 50_000),
    "imagenet64": DatasetSpec(64, 3, 1000, "imagenet_resized/64x64", 1_281_167),
}


@dataclasses.dataclass(frozen=True)
class InMemoryDataset:
  images: np.ndarray  # uint8 (N, H, W, C)
  labels: np.ndarray  # int32 (N,)

  def __post_init__(self):
    if self.images.dtype != np.uint8 or self.images.ndim != 4:
      raise ValueError(f"images must be uint8 NHWC, got {self.images.dtype} {self.images.shape}")
    if len(self.labels) != len(self.images):
      raise ValueError("images and labels differ in length")


def _digits_table() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits as (images (N, 8, 8) float64, labels (N,)): its own CSV read as its
  `load_digits` reads it, without importing scikit-learn (and SciPy) when the file is found."""
  spec = importlib.util.find_spec("sklearn")  # locates the package; runs none of it
  roots = spec.submodule_search_locations if spec else None
  path = os.path.join(roots[0], "datasets", "data", "digits.csv.gz") if roots else ""
  if not os.path.isfile(path):
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    return bunch.images, bunch.target
  with gzip.open(path, mode="rt", encoding="utf-8") as f:
    data = np.loadtxt(f, delimiter=",")
  return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def load_digits() -> InMemoryDataset:
  """scikit-learn's digits as uint8 16×16×1 (grey levels 0..16 scaled to 0..255, bilinear ×2)."""
  from PIL import Image

  images, labels = _digits_table()
  small = np.round(images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
  big = np.stack(
      [
          np.asarray(Image.fromarray(img).resize((16, 16), Image.Resampling.BILINEAR))
          for img in small
      ]
  )
  return InMemoryDataset(big[..., None], labels.astype(np.int32))


def load_tfds(name: str, split: str, data_dir: str) -> InMemoryDataset:
  """Reads a prepared TFDS split into memory; one-sentence error when it is not prepared."""
  import tensorflow as tf
  import tensorflow_datasets as tfds

  tf.config.set_visible_devices([], "GPU")  # keep TF off the accelerators JAX uses
  builder = tfds.builder(name, data_dir=data_dir or None)
  try:
    ds = builder.as_dataset(split=split, shuffle_files=False)
  except AssertionError as exc:
    where = data_dir or "the default TFDS directory (~/tensorflow_datasets)"
    raise DatasetNotPreparedError(
        f"TFDS dataset {name!r} is not prepared in {where}; prepare it once on a machine with "
        f"internet access with `tfds build {name}"
        + (f" --data_dir={data_dir}" if data_dir else "")
        + "` and copy the directory here."
    ) from exc
  images, labels = [], []
  for batch in tfds.as_numpy(ds.batch(4096)):
    images.append(batch["image"])
    labels.append(batch["label"])
  return InMemoryDataset(
      np.concatenate(images).astype(np.uint8), np.concatenate(labels).astype(np.int32)
  )


def load_dataset(name: str, split: str = "train", data_dir: str = "") -> InMemoryDataset:
  """Loads the named dataset of `DATASETS` into host memory."""
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; use one of {sorted(DATASETS)}")
  spec = DATASETS[name]
  dataset = load_digits() if name == "digits" else load_tfds(spec.tfds_name, split, data_dir)
  expected = (spec.image_size, spec.image_size, spec.channels)
  if dataset.images.shape[1:] != expected:
    raise ValueError(
        f"dataset {name!r} has images of shape {dataset.images.shape[1:]}, " f"expected {expected}"
    )
  return dataset


@functools.lru_cache(maxsize=2)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  perm.flags.writeable = False
  return perm


def global_batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Example indices of the global batch of `step`: a stream of per-epoch permutations."""
  start = step * batch_size
  indices = np.empty(batch_size, dtype=np.int64)
  filled = 0
  while filled < batch_size:
    epoch, offset = divmod(start + filled, num_examples)
    perm = _epoch_permutation(num_examples, seed, epoch)
    take = min(batch_size - filled, num_examples - offset)
    indices[filled : filled + take] = perm[offset : offset + take]
    filled += take
  return indices


def batch_iterator(
    dataset: InMemoryDataset,
    global_batch_size: int,
    start_step: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """Yields this process's rows {"image": uint8, "label": int32} of each global batch."""
  if global_batch_size % process_count:
    raise ValueError(
        f"global batch {global_batch_size} is not divisible by {process_count} processes"
    )
  local = global_batch_size // process_count
  rows = slice(process_index * local, (process_index + 1) * local)
  step = start_step
  while True:
    idx = global_batch_indices(len(dataset.images), global_batch_size, step, seed)[rows]
    yield {"image": dataset.images[idx], "label": dataset.labels[idx]}
    step += 1
