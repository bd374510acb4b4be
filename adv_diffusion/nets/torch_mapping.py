"""The one parameter-name mapping between guided-diffusion's torch `UNetModel` and our Flax `UNet`.

Naming rule (both directions are derived from it):
  * module path: every Flax module name with trailing integer indices is split on those "_"s,
    e.g. ("input_blocks_4_1", "qkv") <-> "input_blocks.4.1.qkv",
    ("time_embed_0",) <-> "time_embed.0";
  * leaf: Flax `kernel`, `scale` (GroupNorm) and `embedding` (nn.Embed) <-> torch `weight`;
    `bias` <-> `bias`.
Layout rule, by leaf kind:
  * 4-D `kernel` = Conv2d: flax (kh, kw, I, O) <-> torch (O, I, kh, kw);
  * 2-D `kernel` of a module named `qkv` or `proj_out` = ADM's 1x1 Conv1d in AttentionBlock:
    flax Dense (I, O) <-> torch (O, I, 1);
  * any other 2-D `kernel` = Linear: flax (I, O) <-> torch (O, I);
  * everything else (biases, GroupNorm scale, Embedding table) is copied unchanged.
All transforms are transposes/reshapes, so round trips are bit-exact. torch is not imported:
tensors are converted by duck typing (`.detach().cpu().numpy()`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Path = tuple[str, ...]

_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_CONV1D_MODULES = frozenset({"qkv", "proj_out"})
_INDEXED_NAME = re.compile(r"^(.*?)((?:_\d+)*)$")
_SHOW = 5  # how many offending keys an error message lists per category


def torch_key(path: Path) -> str:
  """The torch state-dict key of a Flax parameter path (see the module docstring)."""
  *modules, leaf = path
  if leaf not in _TORCH_LEAF:
    raise ValueError(f"Flax parameter {'/'.join(path)} has no torch counterpart ({leaf!r}).")
  parts: list[str] = []
  for name in modules:
    base, indices = _INDEXED_NAME.match(name).groups()
    parts.append(base)
    parts.extend(indices.split("_")[1:])
  return ".".join(parts + [_TORCH_LEAF[leaf]])


def _kind(path: Path, flax_ndim: int) -> str:
  """Layout kind of a parameter: 'conv2d', 'conv1d', 'linear' or 'plain'."""
  if path[-1] != "kernel":
    return "plain"
  if flax_ndim == 4:
    return "conv2d"
  if len(path) >= 2 and path[-2] in _CONV1D_MODULES:
    return "conv1d"
  return "linear"


def _torch_shape(kind: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The torch shape that corresponds to a Flax shape."""
  if kind == "conv2d":
    kh, kw, i, o = flax_shape
    return (o, i, kh, kw)
  if kind == "conv1d":
    return (flax_shape[1], flax_shape[0], 1)
  if kind == "linear":
    return (flax_shape[1], flax_shape[0])
  return tuple(flax_shape)


def _to_torch_layout(kind: str, value: np.ndarray) -> np.ndarray:
  if kind == "conv2d":
    value = value.transpose(3, 2, 0, 1)
  elif kind == "conv1d":
    value = value.T[:, :, None]
  elif kind == "linear":
    value = value.T
  return np.array(value, order="C")  # an owned, writable copy (torch.from_numpy-friendly)


def _to_flax_layout(kind: str, value: np.ndarray) -> np.ndarray:
  if kind == "conv2d":
    return value.transpose(2, 3, 1, 0)
  if kind == "conv1d":
    return value[:, :, 0].T
  if kind == "linear":
    return value.T
  return value


def _to_numpy(value: Any) -> np.ndarray:
  """numpy view of a numpy array, jax array or (duck-typed) torch tensor."""
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16
      value = value.float()
    value = value.numpy()
  return np.asarray(value)


def _to_dict(tree: Mapping) -> dict:
  """Plain nested dicts from any nested Mapping (e.g. a FrozenDict)."""
  return {k: _to_dict(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _flatten(params: Mapping) -> dict[Path, Any]:
  return traverse_util.flatten_dict(_to_dict(params))


def _listing(items: list[str]) -> str:
  shown = ", ".join(items[:_SHOW])
  return shown + (f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else "")


class StateDictMismatchError(ValueError):
  """A state dict whose keys or shapes differ from the UNet's; names every offending key."""

  def __init__(
      self, unknown: list[str], missing: list[str], misshaped: list[str], num_expected: int
  ):
    self.unknown, self.missing, self.misshaped = unknown, missing, misshaped
    self.num_expected = num_expected
    super().__init__(
        "torch state dict does not match the Flax UNet parameters (expected exactly the "
        f"{num_expected} keys of guided-diffusion's UNetModel for this configuration, with torch "
        f"layouts): {self.problems()}."
    )

  def problems(self) -> str:
    """E.g. "1 unknown key(s) [a.weight]; 2 missing key(s) [b.bias, c.weight]"."""
    problems = []
    if self.unknown:
      problems.append(f"{len(self.unknown)} unknown key(s) [{_listing(self.unknown)}]")
    if self.missing:
      problems.append(f"{len(self.missing)} missing key(s) [{_listing(self.missing)}]")
    if self.misshaped:
      problems.append(f"{len(self.misshaped)} mis-shaped key(s) [{_listing(self.misshaped)}]")
    return "; ".join(problems)


def torch_to_flax_params(state_dict: Mapping[str, Any], params_template: Mapping) -> dict[str, Any]:
  """Convert a guided-diffusion UNetModel state dict into Flax params shaped like the template.

  `params_template` is the `params` collection of a UNet (arrays or `jax.eval_shape` structs);
  values are cast to the template's dtype. Unknown, missing or mis-shaped keys raise one
  `StateDictMismatchError` (a ValueError) listing them.
  """
  template = _flatten(params_template)
  expected = {torch_key(path): path for path in template}
  unknown = sorted(k for k in state_dict if k not in expected)
  missing = sorted(k for k in expected if k not in state_dict)
  misshaped, flat = [], {}
  for key, path in expected.items():
    if key not in state_dict:
      continue
    value = _to_numpy(state_dict[key])
    spec = template[path]
    kind = _kind(path, len(spec.shape))
    want = _torch_shape(kind, tuple(spec.shape))
    if value.shape != want:
      misshaped.append(f"{key}: got {tuple(value.shape)}, expected {want}")
      continue
    flat[path] = jnp.asarray(_to_flax_layout(kind, value), dtype=spec.dtype)
  if unknown or missing or misshaped:
    raise StateDictMismatchError(unknown, missing, misshaped, len(expected))
  return traverse_util.unflatten_dict(flat)


def flax_to_torch_state_dict(params: Mapping) -> dict[str, np.ndarray]:
  """Convert Flax UNet params into a guided-diffusion UNetModel state dict of numpy arrays."""
  state_dict = {}
  for path, value in _flatten(params).items():
    array = np.asarray(value)
    state_dict[torch_key(path)] = _to_torch_layout(_kind(path, array.ndim), array)
  return state_dict
