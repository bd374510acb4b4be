"""The story's verdict: AT − control per table cell, with its uncertainty, in plain words.

Both runs sample from the same initial noise (sample i uses fold_in(sampling.seed, i) in every
run), so cell by cell the two sample sets are pairs. The decision statistic is KID over all
pairs against the whole reference (unbiased, unlike FID at a few hundred samples) and its paired
jackknife standard error (`evaluation.kid.paired_mmd2_difference`), reference held fixed. A
difference counts as real when the 95 % interval (± 1.96 s.e.) excludes zero.
"""

from __future__ import annotations

import json
import os

import numpy as np

from evaluation import fid as fid_lib
from evaluation import kid as kid_lib
from modes import evaluate as eval_modes
from modes import images as image_lib
from modes.errors import UserFacingError

Z_95 = 1.959964  # two-sided 95 % normal quantile
KID_SCALE = 1e3  # KID is reported ×10³, as torch-fidelity's users usually print it
GRID_SAMPLES = 64  # samples per side of a side-by-side grid


def _pool_features(samples_file: str, run_dir: str) -> np.ndarray:
  path = eval_modes.features_path(samples_file, run_dir)
  if not os.path.isfile(path):
    raise UserFacingError(
        f"the sample features {path} are missing; delete the table's cell files "
        "(WORKDIR/table/cells) and run the story again with "
        "config.evaluation.save_sample_features = True."
    )
  with np.load(path, allow_pickle=False) as data:
    return data["pool_features"]


def compare_cell(at: dict, control: dict, reference: np.ndarray) -> dict:
  """The paired KID comparison of one (method, NFE) cell from the two table results."""
  features = [_pool_features(r["provenance"]["samples_file"], r["workdir"]) for r in (at, control)]
  paired = kid_lib.paired_mmd2_difference(features[0], features[1], reference)
  low = paired["difference"] - Z_95 * paired["standard_error"]
  high = paired["difference"] + Z_95 * paired["standard_error"]
  verdict = "better" if high < 0 else "worse" if low > 0 else "within noise"
  return {
      "method": at["method"],
      "nfe": at["nfe"],
      "fid_at": at["fid"],
      "fid_control": control["fid"],
      **paired,
      "interval_95": [low, high],
      "verdict": verdict,
  }


def sentence(c: dict) -> str:
  """One line in plain words for one compared cell."""
  s = KID_SCALE
  head = (
      f"{c['method']} NFE {c['nfe']}: KID×10³ AT {c['mmd2_a'] * s:.2f}, control "
      f"{c['mmd2_b'] * s:.2f}; AT − control = {c['difference'] * s:+.2f} ± "
      f"{c['standard_error'] * s:.2f} (s.e.; 95 % interval {c['interval_95'][0] * s:+.2f} to "
      f"{c['interval_95'][1] * s:+.2f}; {c['pairs']} paired samples, {c['reference_rows']} "
      f"reference images) — FID {c['fid_at']:.2f} vs {c['fid_control']:.2f}."
  )
  tail = {
      "better": "AT is closer to the data than the control by more than its uncertainty.",
      "worse": "AT is further from the data than the control by more than its uncertainty.",
      "within noise": "the difference is within its uncertainty: this cell cannot tell AT "
      "from the control.",
  }[c["verdict"]]
  return f"{head} {tail}"


def summary(comparisons: list[dict]) -> str:
  """The closing sentence over all cells."""
  counts = {v: sum(c["verdict"] == v for c in comparisons) for v in ("better", "worse")}
  n = len(comparisons)
  noise = n - counts["better"] - counts["worse"]
  return (
      f"Verdict over {n} cell(s), each at 95 %: AT beats the equal-budget clean control in "
      f"{counts['better']}, loses in {counts['worse']}, and is within noise in {noise}."
  )


def side_by_side(at: dict, control: dict, path: str) -> str:
  """A PNG with the AT grid (left) and the control grid (right) of the same initial noise."""
  grids = []
  for r in (at, control):
    with np.load(r["provenance"]["samples_file"], allow_pickle=False) as data:
      grids.append(image_lib.make_grid(data["arr_0"][:GRID_SAMPLES]))
  gap = np.full((grids[0].shape[0], 8, 3), 255, np.uint8)
  image_lib.save_png(path, np.concatenate([grids[0], gap, grids[1]], axis=1), upscale=3)
  return path


def write_report(
    results: list[dict], at_label: str, control_label: str, reference: str, out_dir: str
) -> str:
  """Compares every cell that both runs have; writes comparison.json, comparison.md and the
  side-by-side grids to `out_dir`; returns the markdown text (cell lines, then the verdict)."""
  reference_features = fid_lib.load_statistics(reference).pool_features
  if reference_features is None:
    raise UserFacingError(
        f"the reference statistics {reference} keep no pool features, which KID needs; delete "
        "the file and run again with config.evaluation.reference_features = True."
    )
  by_key = {(r["label"], r["method"], r["nfe"]): r for r in results}
  comparisons, lines = [], []
  for (label, method, nfe), at in by_key.items():
    control = by_key.get((control_label, method, nfe))
    if label != at_label or control is None:
      continue
    c = compare_cell(at, control, reference_features)
    c["grid"] = side_by_side(
        at, control, os.path.join(out_dir, f"at_vs_control_{method}_nfe{nfe}.png")
    )
    comparisons.append(c)
    lines.append(f"- {sentence(c)}")
  text = "\n".join(lines + ["", summary(comparisons)]) + "\n"
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "comparison.json"), "w") as f:
    json.dump(comparisons, f, indent=2, default=float)
  with open(os.path.join(out_dir, "comparison.md"), "w") as f:
    f.write(text)
  return text
