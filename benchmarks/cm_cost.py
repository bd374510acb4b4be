"""Cost of one consistency-distillation update vs one DPM update, and CD's AT overhead.

  python -m benchmarks.cm_cost --batch_size=8 --steps=3            # CPU
  python -m benchmarks.cm_cost --batch_size=128 --steps=20         # one GPU
One CD minibatch = teacher forward + target forward (once per minibatch) + student
forward/backward per optimizer update. Target (issue 6): fast AT ≤ 1.05× plain CD per update.
"""

import argparse

from benchmarks.at_cost import add_ratios, measure_variant, variant_config
from benchmarks.common import machine_info, write_json
from configs import cifar10_adm, cifar10_cd
from modes import huge_pages

VARIANTS = {  # name: (config module, adversarial overrides, optimizer updates per minibatch)
    "dpm": (cifar10_adm, {"mode": "none"}, 1),
    "cd": (cifar10_cd, {"mode": "none"}, 1),
    "cd_fast_k3": (cifar10_cd, {"mode": "fast", "num_replays": 3}, 3),
    "cd_pgd_k1": (cifar10_cd, {"mode": "pgd", "pgd_steps": 1}, 1),
}


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
    module, overrides, updates = VARIANTS[name]
    config = variant_config(overrides, args.batch_size, args.compute_dtype, module)
    results[name] = measure_variant(config, updates, args.steps)
  add_ratios(results, "dpm", "dpm")
  add_ratios(results, "cd", "cd")
  write_json(
      args.out,
      {
          "benchmark": "cm_cost",
          "model": "cifar10_adm UNet (57.1M params)",
          "batch_size": args.batch_size,
          "compute_dtype": args.compute_dtype,
          "machine": machine_info(),
          "results": results,
      },
  )


if __name__ == "__main__":
  huge_pages.ensure()
  main()
