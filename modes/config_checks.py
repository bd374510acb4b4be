"""One-sentence checks of single config values (`modes.config_validation` applies them)."""

import math
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
  """`key` must be a finite number in the interval [low, high] (ends open as asked).

  NaN is never allowed, and neither is an infinity, even where `high` is inf: no float setting
  has a meaning for it (a learning rate, radius or scale of inf makes every update non-finite,
  and the "off" values are 0), so inf bounds only say "no upper limit".
  """
  value = get(config, key)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    fail(key, value, "use a number")
  if not math.isfinite(value):
    fail(key, value, f"use a finite number in {_interval(low, high, low_open, high_open)}")
  too_low = value <= low if low_open else value < low
  too_high = value >= high if high_open else value > high
  if too_low or too_high:
    fail(key, value, f"use a number in {_interval(low, high, low_open, high_open)}")


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
  """ "[low, high]" with the open ends as parentheses (an infinite end is always open)."""
  lo = "(" if low_open else "["
  hi = ")" if high_open or math.isinf(high) else "]"
  return f"{lo}{low}, {high}{hi}"


def get(config: ml_collections.ConfigDict, key: str) -> Any:
  """The value at dotted `key`."""
  node = config
  for part in key.split("."):
    node = node[part]
  return node
