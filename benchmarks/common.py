"""Shared helpers of the benchmarks: machine description, timing, XLA costs and JSON output."""

import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from modes import xla_cpu_flags

xla_cpu_flags.apply()  # the project's XLA:CPU flags, as main.py runs (before JAX starts)


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (Linux), else `platform.processor()`."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def machine_info() -> dict:
  """Date, platform, CPU model and count, Python, jax version, backend, device kinds and the
  process's glibc tunables."""
  devices = jax.devices()
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "cpu_model": cpu_model(),
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "devices": [d.device_kind for d in devices],
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),  # modes/huge_pages.py
  }


def time_calls(
    fn: Callable[[], object], repeats: int, warmup: int = 2, budget_s: float | None = None
) -> list[float]:
  """Seconds per call of `fn` (which must block until its result is ready).

  With `budget_s`, timed repeats stop once the calls (warm-up included) have taken that long;
  at least one call is always timed.
  """
  start = time.perf_counter()
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    if times and budget_s is not None and time.perf_counter() - start > budget_s:
      break
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def write_json(path: str | None, payload: dict) -> None:
  """Prints `payload` as JSON and writes it to `path` when given."""
  text = json.dumps(payload, indent=2)
  print(text)
  if path:
    with open(path, "w") as f:
      f.write(text + "\n")


def xla_cost(compiled: Any) -> dict[str, float]:
  """FLOPs and bytes accessed of a compiled program from XLA's cost analysis (NaN if absent)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  cost = cost or {}
  return {
      "flops": float(cost.get("flops", math.nan)),
      "bytes_accessed": float(cost.get("bytes accessed", math.nan)),
  }


def fill_zero_kernels(params: Any, key: jax.Array) -> Any:
  """`params` with every all-zero kernel (ADM's zero-initialised output layers) drawn from
  N(0, 1/fan_in), so that the network's output depends on its input."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))

  def fill(p, k):
    if p.ndim < 2:
      return p
    noise = jax.random.normal(k, p.shape, p.dtype) / math.sqrt(math.prod(p.shape[:-1]))
    return jnp.where(jnp.all(p == 0), noise, p)

  return jax.tree.unflatten(treedef, [fill(p, k) for p, k in zip(leaves, keys)])


@dataclasses.dataclass
class CompiledStep:
  """One compiled train step of a config with its own state and a fixed random batch."""

  run: Callable[[], dict]  # one step on the held state; blocks; returns the step's metrics
  cost: dict[str, float]  # xla_cost of the compiled step
  compile_seconds: float  # lowering + XLA compilation
  param_checksum: float  # nondegenerate: sum of |θ| at the start (same θ ⇒ same number); else NaN
  param_count: int  # number of network parameters


def compile_cifar10_step(
    config: ml_collections.ConfigDict,
    nondegenerate: bool = False,
    compiler_options: dict | None = None,
) -> CompiledStep:
  """The train step of `config` compiled ahead of time on a random uint8 batch (seed 0, key 1).

  `nondegenerate` fills the zero-initialised kernels (`fill_zero_kernels`, key 2) so that the
  first step's loss depends on the whole network. `compiler_options` (XLA DebugOptions fields,
  e.g. {"xla_cpu_enable_fast_math": True}) apply to this program only, on top of XLA_FLAGS.
  """
  from modes import parallel, train_programs
  from modes.factories import create_diffusion, create_optimizer, create_unet

  batch_size = config.train.batch_size
  mesh = parallel.make_mesh()
  model = create_unet(config)
  diffusion = create_diffusion(config)
  tx = create_optimizer(config.optim)
  state = train_programs.create_train_state(model, tx, config, jax.random.key(0), mesh)
  checksum = math.nan
  if nondegenerate:
    fill = jax.jit(
        lambda s: s.replace(params=fill_zero_kernels(s.params, jax.random.key(2))),
        out_shardings=train_programs.state_shardings(state, mesh),
    )
    state = fill(state)
    checksum = float(
        jax.jit(lambda p: sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(p)))(state.params)
    )
  rng = np.random.default_rng(0)
  size, channels = config.data.image_size, config.data.channels
  batch = parallel.global_batch_from_local(
      {
          "image": rng.integers(0, 256, (batch_size, size, size, channels), dtype=np.uint8),
          "label": np.zeros((batch_size,), np.int32),
      },
      mesh,
  )
  key = jax.device_put(jax.random.key(1), parallel.replicated(mesh))
  # Consistency distillation: the (random) teacher is a copy, so it survives the donation.
  teacher = (
      jax.tree.map(lambda p: p.copy(), state.params)
      if config.consistency.mode == "distill"
      else None
  )
  start = time.perf_counter()
  step_fn = train_programs.compile_train_step(model, diffusion, tx, config, mesh, state)
  compiled = step_fn.lower(state, batch, key, teacher, None).compile(compiler_options)
  compile_seconds = time.perf_counter() - start
  param_count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  holder = {"state": state}

  def one_step() -> dict:
    holder["state"], metrics = compiled(holder["state"], batch, key, teacher, None)
    return jax.block_until_ready(metrics)

  return CompiledStep(one_step, xla_cost(compiled), compile_seconds, checksum, param_count)


def compiled_cifar10_step(config: ml_collections.ConfigDict) -> Callable[[], None]:
  """A closure running one jit-compiled train step of `config` on a fixed random batch."""
  return compile_cifar10_step(config).run


def step_record(
    step: CompiledStep,
    steps: int,
    updates: int = 1,
    warmup: int = 2,
    budget_s: float | None = None,
    batch_size: int | None = None,
) -> dict:
  """Times `step` (median of up to `steps` calls after `warmup`) and adds its XLA costs and the
  process's system CPU time and minor page faults per call (warm-up calls included)."""
  usage_before = resource.getrusage(resource.RUSAGE_SELF)
  times = time_calls(step.run, steps, warmup, budget_s)
  usage = resource.getrusage(resource.RUSAGE_SELF)
  calls = warmup + len(times)
  seconds = float(np.median(times))
  flops = step.cost["flops"]
  record = {
      "ms_per_minibatch": 1e3 * seconds,
      "ms_per_update": 1e3 * seconds / updates,
      "updates_per_minibatch": updates,
      "steps_timed": len(times),
      "steps_requested": steps,
      "compile_s": step.compile_seconds,
      "flops_per_minibatch": flops,
      "flops_per_update": flops / updates,
      "bytes_accessed_per_minibatch": step.cost["bytes_accessed"],
      "flop_per_s": flops / seconds,
      "system_cpu_s_per_minibatch": (usage.ru_stime - usage_before.ru_stime) / calls,
      "minor_page_faults_per_minibatch": (usage.ru_minflt - usage_before.ru_minflt) / calls,
  }
  if batch_size:
    record["images_per_sec"] = batch_size / seconds
  return record
