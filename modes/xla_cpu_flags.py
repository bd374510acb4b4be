"""The XLA:CPU flags of this project: one home, applied to XLA_FLAGS before JAX starts.

XLA reads XLA_FLAGS once, when the first backend starts, so `apply` must run before the first
computation (importing jax is fine). Callers: `modes/cli.py` (main.py), `benchmarks/common.py`
and `tests/conftest.py`. The figures behind each flag are in BENCHMARKS.md ("CPU peer").
"""

import importlib.metadata
import importlib.util
import os
from typing import MutableMapping

# jaxlib 0.10 hands every convolution to YNNPACK by default
# (xla_cpu_experimental_ynn_fusion_type contains individual_convolution); XLA's own Eigen
# convolutions run the ADM UNet's train step faster on x86 (same results to float rounding).
# Removing that one type leaves the rest of the default list as it is.
# LLVM at optimisation level 1 instead of XLA's default: the train steps compile faster and run
# no slower, the FID Inception runs faster, and the float32 parity tests hold.
FLAGS = (
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
    "--xla_backend_optimization_level=1",
)
# The jaxlib releases whose XLA:CPU defaults these flags were measured against; a new release
# may change the defaults (or reject the value), so it gets them only after a new measurement.
JAXLIB_RELEASES = ("0.10.",)
# Accelerator plugins: where one is installed, XLA_FLAGS is left alone (the flags only touch
# the CPU compiler, but an accelerator host must not fail on a value its jaxlib does not know).
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin", "libtpu")


def _jaxlib_version() -> str:
  try:
    return importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return ""


def applicable(environ: MutableMapping[str, str] = os.environ) -> bool:
  """True on a CPU-only host (or JAX_PLATFORMS=cpu) with a jaxlib of JAXLIB_RELEASES."""
  if not _jaxlib_version().startswith(JAXLIB_RELEASES):
    return False
  if environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
    return True
  return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)


def apply(environ: MutableMapping[str, str] = os.environ) -> str:
  """Appends each of FLAGS to XLA_FLAGS in `environ` where `applicable` and the user has not set
  that option already; returns the resulting XLA_FLAGS."""
  current = environ.get("XLA_FLAGS", "")
  if applicable(environ):
    for flag in FLAGS:
      if flag.split("=")[0] not in current:
        current = f"{current} {flag}".strip()
    environ["XLA_FLAGS"] = current
  return current
