"""Time per optimizer update of the CIFAR-10 ADM step: plain, fast AT (K replays), PGD-k.

  python -m benchmarks.at_cost --batch_size=8 --steps=3            # CPU
  python -m benchmarks.at_cost --batch_size=128 --steps=20         # one GPU
Targets (issue 3): fast ≤ 1.05× plain per update; pgd-k ≤ (k + 1)·1.05× plain. Each result also
has XLA's FLOPs per update and its ratio to plain (deterministic, unlike the timings).
"""

import argparse
import statistics
from types import ModuleType

import ml_collections

from benchmarks.common import (
    compile_cifar10_step,
    compiled_cifar10_step,
    machine_info,
    step_record,
    time_calls,
    write_json,
)
from configs import cifar10_adm
from modes import huge_pages

VARIANTS = {  # name: (adversarial overrides, optimizer updates per minibatch)
    "none": ({"mode": "none"}, 1),
    "fast_k3": ({"mode": "fast", "num_replays": 3}, 3),
    "pgd_k1": ({"mode": "pgd", "pgd_steps": 1}, 1),
    "pgd_k3": ({"mode": "pgd", "pgd_steps": 3}, 1),
}


def variant_config(
    overrides: dict,
    batch_size: int,
    compute_dtype: str,
    base: ModuleType = cifar10_adm,
    model_overrides: dict | None = None,
) -> ml_collections.ConfigDict:
  """`base`'s config with `overrides` of config.adversarial, the batch, dtype and model keys."""
  config = base.get_config()
  config.model.compute_dtype = compute_dtype
  config.train.batch_size = batch_size
  config.model.update(model_overrides or {})
  for key, value in overrides.items():
    config.adversarial[key] = value
  return config


def time_variant(
    overrides: dict, batch_size: int, steps: int, compute_dtype: str, base=cifar10_adm
) -> float:
  """Median seconds per minibatch iteration of `base`'s config with `overrides` of
  config.adversarial."""
  config = variant_config(overrides, batch_size, compute_dtype, base)
  one_step = compiled_cifar10_step(config)
  return statistics.median(time_calls(one_step, steps))


def measure_variant(
    config: ml_collections.ConfigDict,
    updates: int,
    steps: int,
    warmup: int = 2,
    budget_s: float | None = None,
) -> dict:
  """ms per minibatch and per optimizer update of `config`'s step, with its XLA FLOPs."""
  return step_record(compile_cifar10_step(config), steps, updates, warmup, budget_s)


def add_ratios(results: dict, base_name: str, suffix: str) -> None:
  """Adds per_update_vs_<suffix> (time) and flops_per_update_vs_<suffix> relative to
  `results[base_name]` to every result, when the base was measured."""
  if base_name not in results:
    return
  base = results[base_name]
  for r in results.values():
    r[f"per_update_vs_{suffix}"] = r["ms_per_update"] / base["ms_per_update"]
    if "flops_per_update" in r and "flops_per_update" in base:
      r[f"flops_per_update_vs_{suffix}"] = r["flops_per_update"] / base["flops_per_update"]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--compute_dtype", default="float32")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  results = {}
  for name in args.variants.split(","):
    overrides, updates = VARIANTS[name]
    config = variant_config(overrides, args.batch_size, args.compute_dtype)
    results[name] = measure_variant(config, updates, args.steps)
  add_ratios(results, "none", "none")
  write_json(
      args.out,
      {
          "benchmark": "at_cost",
          "model": "cifar10_adm (57.1M params)",
          "batch_size": args.batch_size,
          "compute_dtype": args.compute_dtype,
          "machine": machine_info(),
          "results": results,
      },
  )


if __name__ == "__main__":
  huge_pages.ensure()
  main()
