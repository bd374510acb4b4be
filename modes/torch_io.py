"""guided-diffusion (PyTorch) UNet checkpoints in and out of this codebase's orbax checkpoints.

Import (`--mode=import_torch`) writes the train state of a fresh run whose params and EMA params
are the given weights (new optimizer state and sampler history) at one step of an empty workdir,
so `init_from`, `--mode=sample` and `--mode=eval` read it like any trained run. Export
(`--mode=export_torch`) writes guided-diffusion's files, `model{step:06d}.pt` and
`ema_{rate}_{step:06d}.pt`, each a `torch.save`d state dict. Names and layouts come from the one
mapping, `adv_diffusion.nets.torch_mapping`; both directions are bit-exact. torch is imported
only here, when one of these modes runs.
"""

import json
import os
import re
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from modes import checkpoint as ckpt_lib
from modes import parallel
from modes import train_programs
from modes.config_validation import validate_config
from modes.errors import CheckpointError, UserFacingError
from modes.factories import create_optimizer, create_unet
from adv_diffusion.nets.torch_mapping import (
    StateDictMismatchError,
    flax_to_torch_state_dict,
    torch_to_flax_params,
)
from adv_diffusion.train_step import TrainState

# guided-diffusion's TrainLoop.save names: model{step:06d}.pt, ema_{rate}_{step:06d}.pt.
_STEP_IN_NAME = re.compile(r"^(?:model|ema_[0-9.]+_)(\d+)\.pt$")


def _torch() -> Any:
  try:
    import torch
  except ImportError as exc:
    raise UserFacingError(
        "reading and writing PyTorch checkpoints needs torch, which is not "
        "installed; install it with `pip install torch`."
    ) from exc
  return torch


def _first_line(exc: BaseException) -> str:
  lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
  return (lines[0] if lines else type(exc).__name__)[:200]


def _unreadable_reason(path: str, exc: BaseException) -> str:
  """Why torch.load refused `path`, in a few words (torch's own text runs over many lines)."""
  if "Weights only load failed" in str(exc):
    return "it holds Python objects besides tensors, which are not unpickled for safety"
  if not zipfile.is_zipfile(path):
    return "it is neither a torch.save zip archive nor a tensor pickle"
  return _first_line(exc)


def step_from_filename(path: str) -> int:
  """The training step in a guided-diffusion file name (`model250000.pt` → 250000), else 0."""
  found = _STEP_IN_NAME.match(os.path.basename(path))
  return int(found.group(1)) if found else 0


def load_state_dict(path: str) -> Mapping[str, Any]:
  """A `torch.save`d state dict (CPU tensors), or a one-sentence CheckpointError."""
  torch = _torch()
  if not os.path.isfile(path):
    raise CheckpointError(
        f"the torch checkpoint {path} does not exist; pass the path of a "
        "guided-diffusion model or EMA .pt file."
    )
  try:
    with warnings.catch_warnings():  # torch warns about pickle protocols of files it then refuses
      warnings.simplefilter("ignore")
      state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as exc:  # noqa: BLE001 - pickle, zip and torch errors all mean "unreadable"
    raise CheckpointError(
        f"the torch checkpoint {path} could not be read ({_unreadable_reason(path, exc)}); "
        "pass a guided-diffusion state dict saved with torch.save."
    ) from exc
  if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
    raise CheckpointError(
        f"the torch checkpoint {path} holds a {type(state).__name__}, not a "
        "state dict of tensors; pass a guided-diffusion model or EMA .pt file."
    )
  return state


def params_template(config: ml_collections.ConfigDict) -> Any:
  """Shapes and dtypes of the UNet params of `config` (no compute)."""
  model = create_unet(config)
  return jax.eval_shape(
      lambda key: train_programs.init_params(model, config, key), jax.random.key(0)
  )


def _to_flax(path: str, template: Any) -> Any:
  try:
    return torch_to_flax_params(load_state_dict(path), template)
  except StateDictMismatchError as exc:
    raise CheckpointError(
        f"the torch checkpoint {path} does not fit the UNet of this --config "
        f"({exc.problems()}); pass the --config whose model settings it was trained with."
    ) from exc


def _fresh_train_state(
    config: ml_collections.ConfigDict, params: Any, ema_params: tuple[Any, ...], step: int
) -> TrainState:
  """The train state a new run would start from, with these weights, counters at `step`."""
  model = create_unet(config)
  tx = create_optimizer(config.optim)

  def build(key: jax.Array, params: Any, ema_params: tuple[Any, ...]) -> TrainState:
    # The random init inside is dead code once replaced: XLA drops it.
    state = train_programs.init_train_state(model, tx, config, key)
    count = jnp.asarray(step, jnp.int32)
    return state.replace(
        step=count,
        num_updates=count,
        params=params,
        ema_params=ema_params,
        opt_state=tx.init(params),
    )

  return jax.jit(build)(jax.random.key(config.seed), params, ema_params)


def import_torch_checkpoint(
    config: ml_collections.ConfigDict,
    workdir: str,
    model_path: str,
    ema_paths: Sequence[str] = (),
    step: int = -1,
) -> int:
  """Writes guided-diffusion weights as `workdir`'s checkpoint; returns its step.

  `ema_paths`: one file per rate of `config.train.ema_rates`, in order; none = every EMA is the
  model weights. `step` = -1: the step in the model's file name (`model250000.pt`), else 0.
  """
  validate_config(config, "import_torch")
  rates = tuple(config.train.ema_rates)
  if not model_path:
    raise UserFacingError(
        "--mode=import_torch needs --config.torch_io.checkpoint=PATH, a "
        "guided-diffusion model .pt file (and optionally "
        "--config.torch_io.ema=PATH,... for its EMAs)."
    )
  ema_paths = list(ema_paths)
  if ema_paths and len(ema_paths) != len(rates):
    raise UserFacingError(
        f"config.torch_io.ema names {len(ema_paths)} file(s) but config.train.ema_rates "
        f"has {len(rates)} rate(s) {list(rates)}; pass one EMA file per rate, "
        "in order, or none."
    )
  directory = ckpt_lib.checkpoint_dir(workdir)
  existing = ckpt_lib.checkpoint_steps(directory)
  if existing:
    raise CheckpointError(
        f"{directory} already holds checkpoints (steps {existing}); import " "into a new --workdir."
    )
  step = step_from_filename(model_path) if step < 0 else step
  template = params_template(config)
  params = _to_flax(model_path, template)
  if ema_paths:
    ema_params = tuple(_to_flax(path, template) for path in ema_paths)
  else:
    logging.info(
        "No config.torch_io.ema files: every EMA of %s starts as the model weights.", list(rates)
    )
    ema_params = tuple(params for _ in rates)
  state = _fresh_train_state(config, params, ema_params, step)
  checkpointer = ckpt_lib.Checkpointer(directory, save_every=1, keep=1, async_save=False)
  try:
    checkpointer.save(step, state, force=True)
    checkpointer.wait()
  finally:
    checkpointer.close()
  if jax.process_index() == 0:
    record = dict(
        step=step,
        model=os.path.abspath(model_path),
        ema={str(r): os.path.abspath(p) for r, p in zip(rates, ema_paths)} or None,
    )
    with open(os.path.join(workdir, "torch_import.json"), "w") as f:
      json.dump(record, f, indent=2)
  logging.info("Imported %s as step %d in %s.", model_path, step, directory)
  return step


def export_torch_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, out_dir: str = "", step: int = -1
) -> list[str]:
  """Writes `workdir`'s checkpoint `step` (-1: latest) as guided-diffusion .pt files in
  `out_dir` (default `workdir/torch`); returns their paths (model first, then one per EMA)."""
  validate_config(config, "export_torch")
  torch = _torch()
  step = ckpt_lib.require_checkpoint(
      workdir,
      step,
      how="train or import a run there first",
      purpose="export",
      step_key="config.torch_io.step",
  )
  repl = parallel.replicated(parallel.make_mesh())
  params = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), params_template(config)
  )
  rates = tuple(config.train.ema_rates)
  target = {"params": params, "ema_params": tuple(params for _ in rates)}
  model, step = ckpt_lib.load_model_weights(workdir, step, target)
  out_dir = out_dir or os.path.join(workdir, "torch")
  files = {f"model{step:06d}.pt": model["params"]}
  files.update({f"ema_{rate}_{step:06d}.pt": ema for rate, ema in zip(rates, model["ema_params"])})
  paths = []
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    for name, tree in files.items():
      state_dict = {k: torch.from_numpy(v) for k, v in flax_to_torch_state_dict(tree).items()}
      path = os.path.join(out_dir, name)
      torch.save(state_dict, f"{path}.tmp{os.getpid()}")
      os.replace(f"{path}.tmp{os.getpid()}", path)
      paths.append(path)
    logging.info("Exported step %d of %s to %s.", step, workdir, ", ".join(paths))
  return paths


def _ema_files(spec: str) -> list[str]:
  return [path.strip() for path in spec.split(",") if path.strip()]


def run_import(config: ml_collections.ConfigDict, workdir: str) -> str:
  """--mode=import_torch: config.torch_io.checkpoint (+ .ema) as `workdir`'s checkpoint;
  returns the checkpoint directory."""
  t = config.torch_io
  step = import_torch_checkpoint(config, workdir, t.checkpoint, _ema_files(t.ema), t.step)
  return os.path.join(ckpt_lib.checkpoint_dir(workdir), str(step))


def run_export(config: ml_collections.ConfigDict, workdir: str) -> str:
  """--mode=export_torch: `workdir`'s checkpoint config.torch_io.step as .pt files in
  config.torch_io.out; returns the output directory."""
  paths = export_torch_checkpoint(config, workdir, config.torch_io.out, config.torch_io.step)
  return os.path.dirname(paths[0])
