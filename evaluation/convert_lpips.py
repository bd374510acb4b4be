"""Converts LPIPS-VGG v0.1 weights (two PyTorch files) into the torch-free npz `evaluation.lpips`
loads.

    python -m evaluation.convert_lpips --vgg=PATH/vgg16-397923af.pth [--lin=PATH] [--out=PATH]

Sources (nothing is downloaded; both files must be on disk):
- --vgg: torchvision's VGG16 ImageNet state dict `vgg16-397923af.pth`
  (VGG16_Weights.IMAGENET1K_V1, what `lpips` loads through `tv.vgg16(pretrained=True)`); keys
  `features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.weight` (OIHW) / `.bias`; the classifier is
  ignored. No pip package ships it: copy it from a torch hub cache (~/.cache/torch/hub/checkpoints).
- --lin: the lpips package's `weights/v0.1/vgg.pth` (default: the one of the installed `lpips`
  wheel), keys `lin{0..4}.model.1.weight` of shape (1, C, 1, 1).

The output (default `$ADV_DIFFUSION_LPIPS` or ~/.cache/adv_diffusion/lpips_vgg.npz) is written
byte-for-byte deterministically and records the sha256 of both source files
(`source_sha256/vgg`, `source_sha256/lin`). torch is needed here only.
"""

import argparse
import importlib.util
import os
import sys

import numpy as np

from evaluation import lpips
from evaluation.convert_inception import write_npz_deterministic
from evaluation.errors import EvaluationError
from evaluation.inception import file_sha256

LIN_FILE = os.path.join("weights", "v0.1", "vgg.pth")


def default_lin_source() -> str:
  """Path of weights/v0.1/vgg.pth in the installed lpips package (found without importing it:
  importing lpips imports torchvision)."""
  spec = importlib.util.find_spec("lpips")
  if spec is None or not spec.submodule_search_locations:
    raise EvaluationError(
        "the lpips package is not installed; run `pip install --no-deps "
        "lpips==0.1.4` (it ships the LPIPS linear layers) or pass --lin."
    )
  path = os.path.join(list(spec.submodule_search_locations)[0], LIN_FILE)
  if not os.path.isfile(path):
    raise EvaluationError(
        f"the installed lpips package lacks {path}; reinstall lpips==0.1.4 or " "pass --lin."
    )
  return path


def read_state_dict(path: str, what: str) -> dict[str, np.ndarray]:
  """A torch state dict file as numpy arrays; one sentence when missing or unreadable."""
  import torch  # Only the converter needs torch.

  if not os.path.isfile(path):
    raise EvaluationError(f"{what} file {path} does not exist.")
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise EvaluationError(
        f"{what} file {path} is not a readable torch state dict "
        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})."
    ) from None
  if not isinstance(state, dict):
    raise EvaluationError(
        f"{what} file {path} does not hold a state dict (got " f"{type(state).__name__})."
    )
  return {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, "detach")}


def _take(
    state: dict[str, np.ndarray], key: str, shape: tuple[int, ...], source: str
) -> np.ndarray:
  if key not in state:
    raise EvaluationError(f"{source} lacks {key!r}; it is not the expected LPIPS-VGG source.")
  value = np.asarray(state[key], np.float32)
  if value.shape != shape:
    raise EvaluationError(f"{source} has {key!r} of shape {value.shape}, expected {shape}.")
  return value


def to_flat_params(
    vgg: dict[str, np.ndarray], lin: dict[str, np.ndarray], vgg_source: str, lin_source: str
) -> dict[str, np.ndarray]:
  """Flat npz arrays (the layout of `evaluation.lpips`) from the two torch state dicts."""
  flat = {}
  for name, shape in lpips.expected_shapes().items():
    if name.startswith("features_"):
      layer, leaf = name.split("/")
      index = layer.split("_")[1]
      if leaf == "kernel":  # HWIO here, OIHW in torch
        torch_shape = (shape[3], shape[2], shape[0], shape[1])
        w = _take(vgg, f"features.{index}.weight", torch_shape, vgg_source)
        flat[name] = np.ascontiguousarray(w.transpose(2, 3, 1, 0))
      else:
        flat[name] = _take(vgg, f"features.{index}.bias", shape, vgg_source)
    else:  # linK: 1x1 conv weight (1, C, 1, 1) without bias
      k = name[len("lin") :]
      flat[name] = _take(lin, f"lin{k}.model.1.weight", (1, shape[0], 1, 1), lin_source).reshape(
          shape
      )
  return flat


def convert(vgg: str, lin: str | None = None, out: str | None = None) -> tuple[str, str]:
  """Converts the two sources to `out`; returns (out path, its sha256)."""
  lin = lin or default_lin_source()
  out = lpips.resolve_weights_path(out)
  flat = to_flat_params(read_state_dict(vgg, "VGG16"), read_state_dict(lin, "LPIPS lin"), vgg, lin)
  flat[f"{lpips.SOURCE_PREFIX}vgg"] = np.asarray([file_sha256(vgg)])  # shape (1,), a str
  flat[f"{lpips.SOURCE_PREFIX}lin"] = np.asarray([file_sha256(lin)])
  write_npz_deterministic(out, flat)
  return out, file_sha256(out)


def main(argv: list[str] | None = None) -> int:
  """CLI entry point; prints the output path and sha256s, or one sentence on failure."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--vgg", required=True, help=f"torchvision's VGG16 ImageNet state dict ({lpips.VGG16_FILE})"
  )
  parser.add_argument(
      "--lin", default=None, help=f"lpips' {LIN_FILE} (default: the installed lpips package's)"
  )
  parser.add_argument(
      "--out",
      default=None,
      help=f"output npz (default ${lpips.WEIGHTS_ENV} or " f"{lpips.DEFAULT_WEIGHTS_PATH})",
  )
  args = parser.parse_args(argv)
  try:
    out, sha = convert(args.vgg, args.lin, args.out)
  except EvaluationError as e:
    print(f"Error: {e}", file=sys.stderr)
    return 1
  with np.load(out) as data:
    sources = {k: str(data[f"{lpips.SOURCE_PREFIX}{k}"][0]) for k in ("vgg", "lin")}
  print(
      f"wrote {out}\nsha256 {sha}\nvgg source sha256 {sources['vgg']}\n"
      f"lin source sha256 {sources['lin']}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
