"""ms/step and images/s of the CIFAR-10 ADM train step (PAPER.md §6) in float32 and bfloat16.

  python -m benchmarks.train_step --batch_size=8 --steps=5            # CPU
  python -m benchmarks.train_step --batch_size=128 --steps=50         # one GPU
Prints JSON (and writes it with --out); record the figures in BENCHMARKS.md. Each result also
has XLA's cost analysis of the compiled step (FLOPs, bytes accessed) and FLOP/s = FLOPs / time.
"""

import argparse
from typing import Callable

import ml_collections

from benchmarks.common import compile_cifar10_step, machine_info, step_record, write_json
from configs import cifar10_adm
from modes import huge_pages


def cifar10_config(
    compute_dtype: str,
    batch_size: int,
    model_overrides: dict | None = None,
    base: Callable[[], ml_collections.ConfigDict] = cifar10_adm.get_config,
) -> ml_collections.ConfigDict:
  """`base()` with the compute dtype, global batch and `config.model` overrides set."""
  config = base()
  config.model.compute_dtype = compute_dtype
  config.train.batch_size = batch_size
  config.model.update(model_overrides or {})
  return config


def measure(
    config: ml_collections.ConfigDict,
    steps: int,
    warmup: int = 2,
    budget_s: float | None = None,
    nondegenerate: bool = False,
) -> dict:
  """Times the train step of `config`: ms/step, images/s, XLA FLOPs and bytes, FLOP/s, and the
  loss of its first call (before any update; with `nondegenerate`, also the checksum of θ)."""
  step = compile_cifar10_step(config, nondegenerate=nondegenerate)
  first = step.run()
  batch_size = config.train.batch_size
  record = step_record(step, steps, 1, max(warmup - 1, 0), budget_s, batch_size)
  result = {
      "compute_dtype": config.model.compute_dtype,
      "batch_size": batch_size,
      "steps_timed": record["steps_timed"],
      "ms_per_step": record["ms_per_minibatch"],
      "images_per_sec": record["images_per_sec"],
      "flops_per_step": record["flops_per_minibatch"],
      "bytes_accessed_per_step": record["bytes_accessed_per_minibatch"],
      "flop_per_s": record["flop_per_s"],
      "compile_s": record["compile_s"],
      "system_cpu_s_per_step": record["system_cpu_s_per_minibatch"],
      "minor_page_faults_per_step": record["minor_page_faults_per_minibatch"],
      "first_step_loss": float(first["loss"]),
  }
  if nondegenerate:
    result["param_checksum"] = step.param_checksum
  return result


def benchmark(compute_dtype: str, batch_size: int, steps: int) -> dict:
  """`measure` of the CIFAR-10 ADM step in `compute_dtype` at `batch_size`."""
  return measure(cifar10_config(compute_dtype, batch_size), steps)


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
  huge_pages.ensure()
  main()
