"""Multi-host start-up through JAX's own multi-controller runtime (`jax.distributed`).

Every process runs the same `main.py`; `jax.distributed.initialize` connects them, after which
`jax.devices()` lists the devices of all processes and one jit program spans them. Three ways in:
  * explicit: coordinator address, process count and id (flags, or the environment variables
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID);
  * automatic: `--multihost` alone lets JAX detect the cluster (Cloud TPU pods, SLURM,
    Open MPI, Kubernetes/GKE) and read everything from it;
  * neither: a single process (no coordination service is started).
"""

import os

from modes.errors import ConfigError


def _from_env(value, name: str, cast=str):
  if value not in (None, "", -1):
    return value
  raw = os.environ.get(name, "")
  return cast(raw) if raw else None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> bool:
  """Connects this process to the others; returns whether a multi-process runtime started.

  Must run before any other JAX call. Missing explicit values are read from the environment.
  """
  address = _from_env(coordinator_address, "JAX_COORDINATOR_ADDRESS")
  count = _from_env(num_processes, "JAX_NUM_PROCESSES", int)
  index = _from_env(process_id, "JAX_PROCESS_ID", int)
  import jax

  if address is None and count is None and index is None:
    if not auto:
      return False
    jax.distributed.initialize()  # cluster auto-detection (TPU, SLURM, Open MPI, k8s)
    return True
  missing = [
      name
      for name, value in (
          ("--coordinator_address", address),
          ("--num_processes", count),
          ("--process_id", index),
      )
      if value is None
  ]
  if missing:
    raise ConfigError(
        f"multi-host start-up needs {', '.join(missing)} as well (or the matching "
        "JAX_* environment variables); give all three, or --multihost alone on a "
        "TPU pod or SLURM cluster."
    )
  if not 0 <= index < count:
    raise ConfigError(
        f"--process_id = {index} is not allowed: it must be in [0, {count}) for "
        f"--num_processes = {count}."
    )
  jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=index)
  return True


def shutdown() -> None:
  """Leaves the multi-process runtime through its shutdown barrier while Python is fully alive.

  Without this, JAX shuts down from an `atexit` hook; process 0 (which hosts the coordination
  service) can then drop the service while a peer is still leaving, and the peer aborts.
  """
  import jax

  if jax.process_count() > 1:
    jax.distributed.shutdown()
