"""Exceptions whose message is one sentence meant for the user (printed without a traceback)."""


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
