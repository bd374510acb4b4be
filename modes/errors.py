"""Exceptions whose message is one sentence meant for the user (printed without a traceback),
and the one check of a shipped file (exists, has the expected sha256) that raises them."""

import os


class UserFacingError(Exception):
  """An error the user can fix; `main.py` prints its message and exits with status 1."""


class ConfigError(UserFacingError):
  """A configuration key holds a value that is not allowed."""


class DatasetNotPreparedError(UserFacingError):
  """A TFDS dataset is missing from the data directory."""


class CheckpointError(UserFacingError):
  """A checkpoint needed by the run is missing or unreadable."""


class NonFiniteError(UserFacingError):
  """Training produced, or started from, non-finite numbers."""


def check_shipped_file(
    path: str, sha256: str, what: str, missing: str, damaged: str, error: type = UserFacingError
) -> None:
  """Raises one `error` sentence when the `what` file at `path` is missing (ending in advice
  `missing`) or its sha256 is not `sha256`, when given (ending in advice `damaged`)."""
  from evaluation.inception import file_sha256

  if not os.path.isfile(path):
    raise error(f"the {what} {path} does not exist; {missing}.")
  actual = file_sha256(path) if sha256 else ""
  if actual != sha256:
    raise error(
        f"the {what} {path} has sha256 {actual[:16]}… where {sha256[:16]}… is expected: it is "
        f"damaged or another file; {damaged}."
    )
