"""Start-up checks of the run directory: writable, and room for at least one checkpoint."""

import errno
import os
import shutil
import uuid

from modes.errors import UserFacingError


def check_workdir_writable(workdir: str) -> None:
  """Creates `workdir` and writes a probe file into it, or raises one sentence."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test_{uuid.uuid4().hex}")
    with open(probe, "wb") as f:
      f.write(b"\0" * 4096)
      f.flush()
      os.fsync(f.fileno())
    os.remove(probe)
  except OSError as exc:
    if exc.errno == errno.ENOSPC:
      raise UserFacingError(
          f"the workdir {workdir} is on a full disk; free space or pass " "another --workdir."
      ) from exc
    raise UserFacingError(
        f"the workdir {workdir} cannot be written ({exc.strerror or exc}); "
        "pass a --workdir this user can create and write."
    ) from exc


def check_free_space(workdir: str, needed_bytes: int) -> None:
  """Raises one sentence when `workdir`'s disk has less than `needed_bytes` free."""
  free = shutil.disk_usage(workdir).free
  if free < needed_bytes:
    raise UserFacingError(
        f"the workdir {workdir} has {free / 2**20:.1f} MiB free but one checkpoint of this run "
        f"needs about {needed_bytes / 2**20:.1f} MiB; free space or pass another --workdir."
    )
