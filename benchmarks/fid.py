"""Images/s of FID feature extraction: our Flax Inception (resize + network, jit, all devices)
against the TorchScript reference network on the same device, with parity checked.

  python -m benchmarks.fid --num_images=64 --batch_size=32               # CPU
  python -m benchmarks.fid --num_images=10000 --batch_size=500           # one GPU (torch cuda)
Target (issue 5): 50K images in ≤ 60 s on one H200, parity kept.
"""

import argparse
import tempfile
import time

import numpy as np

from benchmarks.common import machine_info, write_json
from evaluation import convert_inception, features, inception, preprocess


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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--num_images", type=int, default=64)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  images = np.random.default_rng(0).integers(0, 256, (args.num_images, 32, 32, 3), np.uint8)
  with tempfile.TemporaryDirectory() as tmp:
    path, _ = convert_inception.convert(None, f"{tmp}/inception.npz")
    weights = inception.load_inception_weights(path)
    features.extract_features(
        images[: args.batch_size], weights, args.batch_size, progress=False
    )  # compile
    start = time.perf_counter()
    ours = features.extract_features(images, weights, args.batch_size, progress=False)["pool"]
    ours_seconds = time.perf_counter() - start
  reference, reference_seconds = torchscript_features(images, args.batch_size)
  rel = float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))
  write_json(
      args.out,
      {
          "benchmark": "fid_features",
          "num_images": args.num_images,
          "batch_size": args.batch_size,
          "machine": machine_info(),
          "flax_images_per_sec": args.num_images / ours_seconds,
          "torchscript_images_per_sec": args.num_images / reference_seconds,
          "pool_relative_error_vs_torchscript": rel,
          "seconds_for_50k_at_flax_rate": 50_000 * ours_seconds / args.num_images,
      },
  )


if __name__ == "__main__":
  main()
