"""Sampler overhead: samples/s and ms per model call of each sampler against a bare loop of the
same number of CIFAR-10 UNet calls (issue 4 target: overhead ≤ 5 %).

  python -m benchmarks.sampling --batch_size=4 --nfe=10 --repeats=2          # CPU
  python -m benchmarks.sampling --batch_size=256 --nfe=10 --repeats=10       # one GPU
"""

import argparse
import statistics

import jax
import jax.numpy as jnp

from modes import train
from modes.factories import create_unet
from benchmarks.common import machine_info, time_calls, write_json
from configs import cifar10_adm
from sampling.registry import make_sampler

METHODS = ("ancestral", "ancestral_es", "ddim", "dpm_solver++")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch_size", type=int, default=4)
  parser.add_argument("--nfe", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--compute_dtype", default="float32")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()

  config = cifar10_adm.get_config()
  config.model.compute_dtype = args.compute_dtype
  model = create_unet(config)
  params = jax.jit(lambda k: train.init_params(model, config, k))(jax.random.key(0))
  params = jax.tree.map(lambda p: p + 1e-3, params)  # leave the zero-initialised output layers
  noise = jax.random.normal(jax.random.key(1), (args.batch_size, 32, 32, 3))
  keys = jax.random.split(jax.random.key(2), args.batch_size)

  def model_fn(x, t):
    return model.apply({"params": params}, x, t, train=False).astype(jnp.float32)

  @jax.jit
  def bare_loop(x):  # nfe network calls and nothing else
    def body(i, x):
      return model_fn(x, jnp.full((x.shape[0],), 999 - i, jnp.int32))[..., :3]

    return jax.lax.fori_loop(0, args.nfe, body, x)

  def timed(fn) -> float:
    return statistics.median(time_calls(lambda: jax.block_until_ready(fn()), args.repeats))

  base = timed(lambda: bare_loop(noise))
  results = {
      "bare_loop": {
          "ms_per_batch": 1e3 * base,
          "ms_per_model_call": 1e3 * base / args.nfe,
          "samples_per_sec": args.batch_size / base,
      }
  }
  for method in METHODS:
    sampler = make_sampler(method, args.nfe, "cosine", 1000)
    run = jax.jit(lambda x, k, s=sampler: s(model_fn, x, k))
    seconds = timed(lambda: run(noise, keys))
    results[method] = {
        "nfe": sampler.nfe,
        "ms_per_batch": 1e3 * seconds,
        "ms_per_model_call": 1e3 * seconds / sampler.nfe,
        "samples_per_sec": args.batch_size / seconds,
        "overhead_vs_bare_loop": seconds / base - 1.0,
    }
  write_json(
      args.out,
      {
          "benchmark": "sampling",
          "model": "cifar10_adm (57.1M params)",
          "batch_size": args.batch_size,
          "compute_dtype": args.compute_dtype,
          "machine": machine_info(),
          "results": results,
      },
  )


if __name__ == "__main__":
  main()
