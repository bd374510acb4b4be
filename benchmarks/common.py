"""Shared helpers of the benchmarks: machine description and JSON output."""

import datetime
import json
import os
import platform
import time
from typing import Callable

import jax


def machine_info() -> dict:
  devices = jax.devices()
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "devices": [d.device_kind for d in devices],
  }


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 2) -> list[float]:
  """Seconds per call of `fn` (which must block until its result is ready)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def write_json(path: str | None, payload: dict) -> None:
  text = json.dumps(payload, indent=2)
  print(text)
  if path:
    with open(path, "w") as f:
      f.write(text + "\n")
