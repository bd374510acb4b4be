"""One-sentence checks of single config values (`modes.config_validation` applies them)."""

from typing import Any, Iterable

import ml_collections

from modes.errors import ConfigError


def fail(key: str, value: Any, allowed: str) -> None:
  """Raises ConfigError: config.KEY = VALUE is not allowed: ALLOWED."""
  raise ConfigError(f"config.{key} = {value!r} is not allowed: {allowed}.")


def check_choice(config: ml_collections.ConfigDict, key: str, choices: Iterable[str]) -> None:
  """`key` (dotted) must be one of `choices`."""
  value = get(config, key)
  choices = tuple(choices)
  if value not in choices:
    fail(key, value, "use one of " + ", ".join(repr(c) for c in choices))


def check_int(config: ml_collections.ConfigDict, key: str, minimum: int) -> None:
  """`key` must be an integer ≥ `minimum` (not a bool)."""
  value = get(config, key)
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    fail(key, value, f"use an integer ≥ {minimum}")


def check_float(
    config: ml_collections.ConfigDict,
    key: str,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
  """`key` must be a number in the interval [low, high] (ends open as asked)."""
  value = get(config, key)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    fail(key, value, "use a number")
  too_low = value <= low if low_open else value < low
  too_high = value >= high if high_open else value > high
  if too_low or too_high:
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    fail(key, value, f"use a number in {lo}{low}, {high}{hi}")


def get(config: ml_collections.ConfigDict, key: str) -> Any:
  """The value at dotted `key`."""
  node = config
  for part in key.split("."):
    node = node[part]
  return node
