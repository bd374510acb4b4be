"""Device mesh and shardings: the batch is split over a `data` axis, parameters replicated."""

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh() -> Mesh:
  """A 1-D mesh over every device of every process."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`, other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_divisible(global_batch_size: int, mesh: Mesh) -> None:
  if global_batch_size % mesh.size:
    from modes.errors import ConfigError

    raise ConfigError(
        f"config.train.batch_size = {global_batch_size} is not allowed: it must be divisible by "
        f"the {mesh.size} devices of the mesh."
    )


def global_batch_from_local(local_batch: Any, mesh: Mesh) -> Any:
  """Assembles each process's rows into global arrays sharded over `data`."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
  )
