"""Sampler overhead: samples/s and ms per model call of each sampler against a bare loop of the
same number of CIFAR-10 UNet calls (issue 4 target: overhead ≤ 5 %).

  python -m benchmarks.sampling --batch_size=4 --nfe=10 --repeats=2          # CPU
  python -m benchmarks.sampling --batch_size=256 --nfe=10 --repeats=10       # one GPU
"""

import argparse
import statistics
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from modes import huge_pages, train_programs
from modes.factories import create_unet
from benchmarks.common import machine_info, time_calls, write_json
from configs import cifar10_adm
from sampling.registry import make_sampler

METHODS = ("ancestral", "ancestral_es", "ddim", "dpm_solver++")


def measure(
    config: ml_collections.ConfigDict,
    batch_size: int,
    nfe: int,
    repeats: int,
    methods: Sequence[str] = METHODS,
    warmup: int = 2,
    budget_s: float | None = None,
) -> dict:
  """{"bare_loop": ..., method: ...}: ms per batch and per model call, samples/s and (methods)
  the overhead against `nfe` bare network calls; `budget_s` caps the timed repeats of each."""
  model = create_unet(config)
  params = jax.jit(lambda k: train_programs.init_params(model, config, k))(jax.random.key(0))
  params = jax.tree.map(lambda p: p + 1e-3, params)  # leave the zero-initialised output layers
  size, channels = config.data.image_size, config.data.channels
  num_timesteps = config.diffusion.num_timesteps
  noise = jax.random.normal(jax.random.key(1), (batch_size, size, size, channels))
  keys = jax.random.split(jax.random.key(2), batch_size)

  def model_fn(p, x, t):
    return model.apply({"params": p}, x, t, train=False).astype(jnp.float32)

  @jax.jit
  def bare_loop(p, x):  # nfe network calls and nothing else
    def body(i, x):
      return model_fn(p, x, jnp.full((x.shape[0],), num_timesteps - 1 - i, jnp.int32))[
          ..., :channels
      ]

    return jax.lax.fori_loop(0, nfe, body, x)

  def timed(fn, *args) -> tuple[float, int, float]:
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - start
    times = time_calls(lambda: jax.block_until_ready(compiled(*args)), repeats, warmup, budget_s)
    return statistics.median(times), len(times), compile_s

  base, count, compile_s = timed(bare_loop, params, noise)
  results = {
      "bare_loop": {
          "nfe": nfe,
          "ms_per_batch": 1e3 * base,
          "ms_per_model_call": 1e3 * base / nfe,
          "samples_per_sec": batch_size / base,
          "repeats_timed": count,
          "compile_s": compile_s,
      }
  }
  for method in methods:
    sampler = make_sampler(method, nfe, config.diffusion.noise_schedule, num_timesteps)
    run = jax.jit(lambda p, x, k, s=sampler: s(lambda x, t: model_fn(p, x, t), x, k))
    seconds, count, compile_s = timed(run, params, noise, keys)
    results[method] = {
        "nfe": sampler.nfe,
        "ms_per_batch": 1e3 * seconds,
        "ms_per_model_call": 1e3 * seconds / sampler.nfe,
        "samples_per_sec": batch_size / seconds,
        "overhead_vs_bare_loop": seconds / base - 1.0,
        "repeats_timed": count,
        "compile_s": compile_s,
    }
  return results


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
  results = measure(config, args.batch_size, args.nfe, args.repeats)
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
  huge_pages.ensure()
  main()
