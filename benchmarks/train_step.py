"""ms/step and images/s of the CIFAR-10 ADM train step (PAPER.md §6) in float32 and bfloat16.

  python -m benchmarks.train_step --batch_size=8 --steps=5            # CPU
  python -m benchmarks.train_step --batch_size=128 --steps=50         # one GPU
Prints JSON (and writes it with --out); record the figures in BENCHMARKS.md.
"""

import argparse
import statistics

import jax
import numpy as np

from adv_diffusion import parallel, train
from adv_diffusion.nets.factory import create_unet
from benchmarks.common import machine_info, time_calls, write_json
from configs import cifar10_adm


def benchmark(compute_dtype: str, batch_size: int, steps: int) -> dict:
  config = cifar10_adm.get_config()
  config.model.compute_dtype = compute_dtype
  config.train.batch_size = batch_size
  mesh = parallel.make_mesh()
  model = create_unet(config)
  diffusion = train.create_diffusion(config)
  tx = train.create_optimizer(config.optim)
  repl = parallel.replicated(mesh)
  state = train.create_train_state(model, tx, config, jax.random.key(0), mesh)
  step_fn = train.compile_train_step(model, diffusion, tx, config, mesh, state)
  rng = np.random.default_rng(0)
  batch = parallel.global_batch_from_local(
      {"image": rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8),
       "label": np.zeros((batch_size,), np.int32)}, mesh)
  key = jax.device_put(jax.random.key(1), repl)
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = step_fn(holder["state"], batch, key)
    jax.block_until_ready(metrics)

  times = time_calls(one_step, steps)
  median = statistics.median(times)
  return {"compute_dtype": compute_dtype, "batch_size": batch_size, "steps_timed": steps,
          "ms_per_step": 1e3 * median, "images_per_sec": batch_size / median}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  results = [benchmark(d, args.batch_size, args.steps) for d in args.dtypes.split(",")]
  write_json(args.out, {"benchmark": "train_step", "model": "cifar10_adm (57.1M params)",
                        "machine": machine_info(), "results": results})


if __name__ == "__main__":
  main()
