"""Our CIFAR-10 ADM train step side by side with PyTorch guided-diffusion's, in one process.

  python -m benchmarks.torch_peer --batch_size=8 --steps=7 --out=benchmarks/results/torch_peer_cpu.json
  python -m benchmarks.torch_peer --xla_flags=--xla_cpu_enable_fast_math=true   # one XLA variant

Same model (`config.model` of configs/cifar10_adm.py, float32), same batch, same schedule and
hybrid loss, AdamW and one EMA on both sides. JAX: the jitted train step of
benchmarks/train_step.py (with its non-finite guard and metrics); torch: `benchmarks.torch_step`.
After `--warmup` calls of each, the timed calls alternate (JAX, torch, JAX, torch, ...) so that
the load of a shared machine falls on both alike; the figures are medians, and the ratios are
medians of per-round ratios. `--jax_variants` times several XLA compiler settings of the JAX
step in the same rounds (A/B under the same load). Prints JSON (written with --out) and a table.
torch is imported only by this benchmark's run, not by importing the module.
"""

import argparse
import os
import time

import numpy as np

from benchmarks.common import compile_cifar10_step, machine_info, write_json
from benchmarks.train_step import cifar10_config
from modes import huge_pages

# A tiny model of the same architecture family, for the CPU smoke test (--tiny).
TINY = {
    "num_channels": 32,
    "channel_mult": (1,),
    "num_res_blocks": 0,
    "attention_resolutions": (32,),
    "num_head_channels": 32,
}


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def _summary(seconds: list[float], batch_size: int) -> dict:
  ms = [1e3 * s for s in seconds]
  median = float(np.median(ms))
  return {
      "ms_per_step": median,
      "ms_min": min(ms),
      "ms_max": max(ms),
      "images_per_sec": batch_size / median * 1e3,
      "ms_each": ms,
  }


def versions() -> dict:
  """Versions of the libraries on both sides (torch only once this benchmark imported it)."""
  import importlib.metadata as md

  names = ("jax", "jaxlib", "flax", "optax", "torch", "guided-diffusion", "numpy")
  found = {}
  for name in names:
    try:
      found[name] = md.version(name)
    except md.PackageNotFoundError:
      found[name] = None
  return found


def parse_variants(text: str) -> dict[str, dict]:
  """`name:option=value,option=value;name2:...` → {name: XLA compiler options}; values true /
  false become bools, digits ints, anything else (the empty string too) stays a string."""
  variants = {}
  for item in filter(None, (part.strip() for part in text.split(";"))):
    name, _, options = item.partition(":")
    parsed = {}
    for pair in filter(None, options.split(",")):
      key, _, value = pair.partition("=")
      parsed[key] = {"true": True, "false": False}.get(
          value, int(value) if value.isdigit() else value
      )
    variants[name] = parsed
  return variants


def interleaved(steps: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
  """Seconds of each of `steps` {name: call} over `rounds` rounds, each calling every step once
  in order, after `warmup` such untimed rounds."""
  for _ in range(warmup):
    for fn in steps.values():
      fn()
  times = {name: [] for name in steps}
  for _ in range(rounds):
    for name, fn in steps.items():
      times[name].append(_timed(fn))
  return times


def run(
    batch_size: int = 8,
    steps: int = 5,
    warmup: int = 1,
    tiny: bool = False,
    variants: dict[str, dict] | None = None,
    torch_threads: int = 0,
    seed: int = 0,
) -> dict:
  """Both steps of the CIFAR-10 ADM config in float32 at `batch_size`, timed interleaved.

  `variants` {name: XLA compiler options} are JAX programs of the same step, each compiled on
  its own and timed in the same rounds (the first is "jax" in the JSON; default: one, no options).
  `torch_threads` > 0 sets torch's intra-op threads (0: torch's default).
  """
  import torch

  from benchmarks.torch_step import create_torch_step

  if torch_threads > 0:
    torch.set_num_threads(torch_threads)

  variants = variants or {"default": {}}
  config = cifar10_config("float32", batch_size, TINY if tiny else None)
  load_before = os.getloadavg()
  jax_steps = {
      name: compile_cifar10_step(config, compiler_options=o) for name, o in variants.items()
  }
  torch_step = create_torch_step(config, seed)
  first = {name: float(step.run()["loss"]) for name, step in jax_steps.items()}  # before updates
  torch_loss = torch_step.run()["loss"]
  calls = {name: step.run for name, step in jax_steps.items()}
  times = interleaved({**calls, "torch": torch_step.run}, steps, max(warmup - 1, 0))
  torch_times = times.pop("torch")
  main_name = next(iter(variants))
  jax_records = {}
  for name, step in jax_steps.items():
    jax_records[name] = {
        **_summary(times[name], batch_size),
        "compiler_options": variants[name],
        "param_count": step.param_count,
        "compile_s": step.compile_seconds,
        "first_step_loss": first[name],
        "ratio_vs_torch": _median_ratio(times[name], torch_times),
        "ratio_vs_first_variant": _median_ratio(times[name], times[main_name]),
        "what": "jit train step: hybrid loss, AdamW, EMA, grad norm, non-finite guard",
    }
  return {
      "benchmark": "torch_peer",
      "model": "cifar10_adm" + (f" with {TINY}" if tiny else " (57.1M params)"),
      "compute_dtype": "float32",
      "batch_size": batch_size,
      "steps_timed": steps,
      "warmup": warmup,
      "order": "per round: " + ", ".join([*variants, "torch"]),
      "machine": machine_info(),
      "versions": versions(),
      "threads": {
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "torch": torch_step.threads,
          "cpu_affinity": len(os.sched_getaffinity(0)),
          "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
      },
      "loadavg_1_5_15": {"before": list(load_before), "after": list(os.getloadavg())},
      "jax": jax_records[main_name],
      "jax_variants": jax_records,
      "torch": {
          **_summary(torch_times, batch_size),
          "param_count": torch_step.param_count,
          "first_step_loss": torch_loss,
          "what": "guided-diffusion UNetModel + training_losses, backward, grad norm, "
          "torch.optim.AdamW, update_ema",
      },
      "ratio_jax_over_torch": jax_records[main_name]["ratio_vs_torch"],
  }


def _median_ratio(a: list[float], b: list[float]) -> float:
  """Median over rounds of a[i] / b[i]."""
  return float(np.median([x / y for x, y in zip(a, b)]))


def table(payload: dict) -> str:
  """The side-by-side figures of `payload` as a text table."""
  rows = ["side                 ms/step  min      max      images/s  × torch  params"]
  sides = {f"jax {name}": r for name, r in payload["jax_variants"].items()}
  for side, r in {**sides, "torch": payload["torch"]}.items():
    ratio = r.get("ratio_vs_torch", 1.0)
    rows.append(
        f"{side:<20} {r['ms_per_step']:<8.0f} {r['ms_min']:<8.0f} {r['ms_max']:<8.0f} "
        f"{r['images_per_sec']:<9.2f} {ratio:<8.2f} {r['param_count']:,}"
    )
  rows.append(f"JAX / torch (median of per-round ratios): {payload['ratio_jax_over_torch']:.2f}")
  return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
  """Parses flags, runs the benchmark, prints JSON and the table; returns the payload."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--steps", type=int, default=5, help="timed calls of each side")
  parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each side")
  parser.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke test)")
  parser.add_argument("--xla_flags", default="", help="appended to XLA_FLAGS before jax starts")
  parser.add_argument(
      "--torch_threads", type=int, default=0, help="torch intra-op threads (0: its default)"
  )
  parser.add_argument(
      "--jax_variants",
      default="default:",
      help="JAX programs to time, 'name:option=value,...;name2:...' (XLA compiler options)",
  )
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  if args.xla_flags:  # read when the CPU backend starts, i.e. at the first compile below
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
  variants = parse_variants(args.jax_variants)
  payload = run(args.batch_size, args.steps, args.warmup, args.tiny, variants, args.torch_threads)
  write_json(args.out, payload)
  print(table(payload))
  return payload


if __name__ == "__main__":
  huge_pages.ensure()
  main()
