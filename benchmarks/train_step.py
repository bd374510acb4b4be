"""ms/step and images/s of the CIFAR-10 ADM train step (PAPER.md §6) in float32 and bfloat16.

  python -m benchmarks.train_step --batch_size=8 --steps=5            # CPU
  python -m benchmarks.train_step --batch_size=128 --steps=50         # one GPU
Prints JSON (and writes it with --out); record the figures in BENCHMARKS.md.
"""

import argparse
import statistics

from benchmarks.common import compiled_cifar10_step, machine_info, time_calls, write_json
from configs import cifar10_adm


def benchmark(compute_dtype: str, batch_size: int, steps: int) -> dict:
  config = cifar10_adm.get_config()
  config.model.compute_dtype = compute_dtype
  config.train.batch_size = batch_size
  one_step = compiled_cifar10_step(config)
  times = time_calls(one_step, steps)
  median = statistics.median(times)
  return {
      "compute_dtype": compute_dtype,
      "batch_size": batch_size,
      "steps_timed": steps,
      "ms_per_step": 1e3 * median,
      "images_per_sec": batch_size / median,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  results = [benchmark(d, args.batch_size, args.steps) for d in args.dtypes.split(",")]
  write_json(
      args.out,
      {
          "benchmark": "train_step",
          "model": "cifar10_adm (57.1M params)",
          "machine": machine_info(),
          "results": results,
      },
  )


if __name__ == "__main__":
  main()
