"""Time per optimizer update of the CIFAR-10 ADM step: plain, fast AT (K replays), PGD-k.

  python -m benchmarks.at_cost --batch_size=8 --steps=3            # CPU
  python -m benchmarks.at_cost --batch_size=128 --steps=20         # one GPU
Targets (issue 3): fast ≤ 1.05× plain per update; pgd-k ≤ (k + 1)·1.05× plain.
"""

import argparse
import statistics

from benchmarks.common import compiled_cifar10_step, machine_info, time_calls, write_json
from configs import cifar10_adm

VARIANTS = {  # name: (adversarial overrides, optimizer updates per minibatch)
    "none": ({"mode": "none"}, 1),
    "fast_k3": ({"mode": "fast", "num_replays": 3}, 3),
    "pgd_k1": ({"mode": "pgd", "pgd_steps": 1}, 1),
    "pgd_k3": ({"mode": "pgd", "pgd_steps": 3}, 1),
}


def time_variant(
    overrides: dict, batch_size: int, steps: int, compute_dtype: str, base=cifar10_adm
) -> float:
  """Median seconds per minibatch iteration of `base`'s config with `overrides` of
  config.adversarial."""
  config = base.get_config()
  config.model.compute_dtype = compute_dtype
  config.train.batch_size = batch_size
  for key, value in overrides.items():
    config.adversarial[key] = value
  one_step = compiled_cifar10_step(config)
  return statistics.median(time_calls(one_step, steps))


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
    seconds = time_variant(overrides, args.batch_size, args.steps, args.compute_dtype)
    results[name] = {
        "ms_per_minibatch": 1e3 * seconds,
        "ms_per_update": 1e3 * seconds / updates,
        "updates_per_minibatch": updates,
    }
  if "none" in results:
    base = results["none"]["ms_per_update"]
    for r in results.values():
      r["per_update_vs_none"] = r["ms_per_update"] / base
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
  main()
