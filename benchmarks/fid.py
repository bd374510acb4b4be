"""Images/s of FID feature extraction: our Flax Inception (resize + network, jit, all devices)
against the TorchScript reference network on the same device, with parity checked.

  python -m benchmarks.fid --num_images=64 --batch_size=32               # CPU
  python -m benchmarks.fid --num_images=10000 --batch_size=500           # one GPU (torch cuda)
Target (issue 5): 50K images in ≤ 60 s on one H200, parity kept.
"""

import argparse
import importlib.util
import math
import tempfile
import time

import numpy as np

from benchmarks.common import machine_info, write_json
from evaluation import convert_inception, features, inception, preprocess
from evaluation.errors import EvaluationError
from modes import huge_pages


def random_inception_weights(seed: int = 0) -> inception.InceptionWeights:
  """Weights of the network's exact shapes (He-normal kernels, identity batch norms, no
  classifier): the same program and speed as the real file, features meaningless."""
  rng = np.random.default_rng(seed)
  flat = {}
  for key, shape in inception.expected_shapes(False).items():
    leaf = key.rsplit("/", 1)[-1]
    if leaf == "kernel":
      std = math.sqrt(2.0 / math.prod(shape[:-1]))
      flat[key] = (std * rng.standard_normal(shape)).astype(np.float32)
    else:
      flat[key] = np.full(shape, 1.0 if leaf in ("bn_gamma", "bn_var") else 0.0, np.float32)
  params = {}
  for key, value in flat.items():
    *scopes, leaf = key.split("/")
    node = params
    for scope in scopes:
      node = node.setdefault(scope, {})
    node[leaf] = value
  return inception.InceptionWeights(params=params, path="random", sha256="")


def flax_features(
    images: np.ndarray,
    weights: inception.InceptionWeights,
    batch_size: int,
    budget_s: float | None = None,
    chunk: int = 2000,
) -> dict:
  """Pool features of (a prefix of) `images` and the rate: the program is compiled on the first
  batch, then chunks of about `chunk` images are timed until all are done or `budget_s` spent."""
  start = time.perf_counter()
  features.extract_features(images[:batch_size], weights, batch_size, progress=False)
  compile_s = time.perf_counter() - start
  chunk = max(batch_size, chunk // batch_size * batch_size)
  pools, seconds, done = [], 0.0, 0
  while done < len(images) and (budget_s is None or not pools or seconds < budget_s):
    t0 = time.perf_counter()
    out = features.extract_features(
        images[done : done + chunk], weights, batch_size, progress=False
    )
    seconds += time.perf_counter() - t0
    pools.append(out["pool"])
    done += len(out["pool"])
  return {
      "pool": np.concatenate(pools),
      "images_timed": done,
      "seconds": seconds,
      "compile_s": compile_s,
  }


def torchscript_features(images: np.ndarray, batch_size: int) -> tuple[np.ndarray, float]:
  """Pool features of the reference TorchScript network (same preprocessing) and seconds."""
  import torch

  device = "cuda" if torch.cuda.is_available() else "cpu"
  net = torch.jit.load(convert_inception.default_source(), map_location=device).eval()
  inputs = preprocess.preprocess(images, "tf1_bilinear")  # 299×299 scaled, NHWC float32
  outs, start = [], time.perf_counter()
  with torch.no_grad():
    for i in range(0, len(inputs), batch_size):
      x = torch.from_numpy(np.array(inputs[i : i + batch_size]).transpose(0, 3, 1, 2)).to(device)
      outs.append(net(x).reshape(x.shape[0], -1).cpu().numpy())
  return np.concatenate(outs), time.perf_counter() - start


def torch_reference_missing() -> str | None:
  """Why the TorchScript comparison cannot run here (torch or fid-helper's file absent), or None."""
  if importlib.util.find_spec("torch") is None:
    return "torch is not installed"
  try:
    convert_inception.default_source()
  except EvaluationError as e:
    return str(e)
  return None


def measure(
    num_images: int,
    batch_size: int,
    weights: inception.InceptionWeights,
    compare_torch: bool = True,
    torch_images: int | None = None,
    budget_s: float | None = None,
) -> dict:
  """Flax images/s on `num_images` random 32×32 images (and the 50K extrapolation); with
  `compare_torch`, the TorchScript rate and pool parity on the first `torch_images`."""
  images = np.random.default_rng(0).integers(0, 256, (num_images, 32, 32, 3), np.uint8)
  ours = flax_features(images, weights, batch_size, budget_s)
  rate = ours["images_timed"] / ours["seconds"]
  result = {
      "num_images": num_images,
      "images_timed": ours["images_timed"],
      "batch_size": batch_size,
      "weights": weights.path,
      "weights_sha256": weights.sha256,
      "compile_s": ours["compile_s"],
      "flax_images_per_sec": rate,
      "seconds_for_50k_at_flax_rate": 50_000 / rate,
  }
  if not compare_torch:
    return result
  n = min(torch_images or ours["images_timed"], ours["images_timed"])
  reference, reference_seconds = torchscript_features(images[:n], batch_size)
  pool = ours["pool"][:n]
  result["torch_images"] = n
  result["torchscript_images_per_sec"] = n / reference_seconds
  result["pool_relative_error_vs_torchscript"] = float(
      np.linalg.norm(pool - reference) / np.linalg.norm(reference)
  )
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--num_images", type=int, default=64)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    path, _ = convert_inception.convert(None, f"{tmp}/inception.npz")
    weights = inception.load_inception_weights(path)
  result = measure(args.num_images, args.batch_size, weights)
  write_json(
      args.out,
      {"benchmark": "fid_features", "machine": machine_info(), **result},
  )


if __name__ == "__main__":
  huge_pages.ensure()
  main()
