"""One set of UNet weights in a single .npz file: what a run ships or starts from.

A checkpoint directory holds params, EMA params and the optimizer state in many files; a
weights file holds one parameter tree (`params/<module>/.../<leaf>` arrays, float32) and a JSON
`provenance` (source run, step, EMA or raw, command), so it can be published with its sha256.
`--mode=export_weights` writes one from a run; `train.init_from` and `story.clean_weights`
read one (params and EMA params both start from it, as a fine-tune of a released checkpoint).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from evaluation.inception import file_sha256
from modes.errors import CheckpointError, check_shipped_file

PREFIX = "params/"


def _named_leaves(tree: Any) -> dict[str, Any]:
  """`params/<module>/.../<leaf>` → leaf, in the tree's flattening order."""
  return {
      PREFIX + "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def save_weights(path: str, params: Any, provenance: dict) -> str:
  """Writes `params` and `provenance` to `path` atomically; returns the file's sha256."""
  arrays = {k: np.asarray(v, np.float32) for k, v in _named_leaves(jax.device_get(params)).items()}
  arrays["provenance"] = np.asarray(json.dumps(provenance, sort_keys=True, default=str))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:  # a file object keeps np.savez from appending ".npz"
    np.savez(f, **arrays)
  os.replace(tmp, path)
  return file_sha256(path)


def is_weights_file(path: str) -> bool:
  """Whether `path` names a weights file (an .npz) rather than a run directory."""
  return path.endswith(".npz")


def check_file(path: str, sha256: str = "", how: str = "") -> str:
  """Raises one CheckpointError sentence when `path` is missing or its sha256 is not `sha256`
  (when given); returns the advice the errors end with."""
  how = how or "export it again with --mode=export_weights or fix the path"
  check_shipped_file(
      path,
      sha256,
      "weights file",
      how,
      f"restore it (git checkout {path}) or {how}",
      CheckpointError,
  )
  return how


def load_weights(path: str, target: Any, sha256: str = "", how: str = "") -> Any:
  """The parameter tree of `path`, shaped like `target` (arrays or ShapeDtypeStructs), after
  checking the file's sha256 (when given) and that its leaves are exactly `target`'s; any
  mismatch is one CheckpointError sentence ending in `how`."""
  how = check_file(path, sha256, how)
  try:
    with np.load(path, allow_pickle=False) as data:
      stored = {k: data[k] for k in data.files if k.startswith(PREFIX)}
  except Exception as exc:  # noqa: BLE001 - a text file, a pickle, a truncated zip
    raise CheckpointError(
        f"the weights file {path} is not a readable numpy .npz ({type(exc).__name__}); {how}."
    ) from exc
  wanted = _named_leaves(target)
  missing, extra = sorted(set(wanted) - set(stored)), sorted(set(stored) - set(wanted))
  wrong = [k for k in wanted if k in stored and stored[k].shape != tuple(wanted[k].shape)]
  if missing or extra or wrong:
    first = (missing or extra or wrong)[0][len(PREFIX) :]
    raise CheckpointError(
        f"the weights file {path} does not fit this config's UNet ({len(missing)} missing, "
        f"{len(extra)} unexpected, {len(wrong)} differently shaped arrays, e.g. {first}); use "
        "the model config the weights were trained with."
    )
  arrays = [stored[name].astype(leaf.dtype) for name, leaf in wanted.items()]
  return jax.tree_util.tree_unflatten(jax.tree.structure(target), arrays)


def placed_like(params: Any, target: Any) -> Any:
  """Host arrays `params` as global arrays with the shardings of `target`'s leaves (also across
  processes: every process holds the same file)."""
  return jax.tree.map(
      lambda a, t: jax.make_array_from_callback(a.shape, t.sharding, lambda index: a[index]),
      params,
      target,
  )


def weights_provenance(path: str) -> dict:
  """The JSON provenance stored in a weights file ({} when it has none)."""
  with np.load(path, allow_pickle=False) as data:
    return json.loads(str(data["provenance"])) if "provenance" in data.files else {}


def run_export(config: ml_collections.ConfigDict, workdir: str) -> str:
  """--mode=export_weights: the EMA (`sampling.use_ema`, `sampling.ema_index`) or raw params of
  the run's checkpoint `sampling.checkpoint_step` (-1 = newest) →
  WORKDIR/export/<ema<i>|raw>_step<step>.npz; prints the file's sha256."""
  from modes import parallel
  from modes.config_validation import validate_config
  from modes.sample import load_params, resolve_checkpoint

  validate_config(config, "export_weights")
  s = config.sampling
  step = resolve_checkpoint(workdir, s.checkpoint_step)
  params = load_params(config, workdir, step, parallel.make_mesh())
  which = f"ema{s.ema_index}" if s.use_ema else "raw"
  path = os.path.join(workdir, "export", f"{which}_step{step}.npz")
  provenance = dict(
      source_workdir=os.path.abspath(workdir),
      step=step,
      weights="EMA rate %g" % config.train.ema_rates[s.ema_index] if s.use_ema else "raw",
      model=config.model.to_dict(),
  )
  if jax.process_index() == 0:
    digest = save_weights(path, params, provenance)
    print(f"sha256 {digest}  {path}")
  return path
