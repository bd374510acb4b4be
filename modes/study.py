"""`--mode=study`: the main job's AT − control comparison repeated over seeds, with robustness.

For each seed S of `config.study.seeds` the story runs in WORKDIR/seed<S> with `config.seed = S`
(data order, δ start, timestep draws of both fine-tunes) and `sampling.seed = S` (AT and control
share that seed's initial noise), then `--mode=robustness` over its AT and control runs, whose
cells are compared pairwise the same way (`story_report.compare_cell`). WORKDIR/study/study.md
and study.json hold, per cell, every seed's paired KID difference with its 95 % interval and the
mean over seeds with a Student-t 95 % interval on n − 1 degrees of freedom — the one that covers
training-seed variation as well as sample noise — beside the paper's CIFAR-10 DDIM numbers.
Every stage and cell resumes (`story`, `table.fill_cells`).
"""

from __future__ import annotations

import json
import math
import os

import ml_collections
import numpy as np
from absl import logging
from scipy import stats

from evaluation import fid as fid_lib
from modes import robustness, story, story_report
from modes import table as table_mode
from modes.config_validation import validate_config

KID_SCALE = story_report.KID_SCALE


def seed_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
  """The story config of one seed: training and sampling seeds both `seed`."""
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.mode = "story"
  cfg.seed, cfg.sampling.seed = seed, seed
  return cfg


def robustness_config(cfg: ml_collections.ConfigDict, seed_dir: str) -> ml_collections.ConfigDict:
  """The robustness config over the AT and control runs of one seed's story."""
  rcfg = ml_collections.ConfigDict(cfg.to_dict())
  rcfg.mode = "robustness"
  labels = story.TABULATED
  rcfg.robustness.runs = ",".join(
      f"{labels[name]}={os.path.join(seed_dir, name)}" for name in ("at", "control")
  )
  rcfg.evaluation.save_sample_features = True  # the paired comparison reads them
  return rcfg


def mean_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
  """(mean, low, high): the Student-t interval of the mean of `values` (n − 1 d.o.f.); the
  bounds are NaN for a single value."""
  x = np.asarray(values, np.float64)
  mean = float(x.mean())
  if x.size < 2:
    return mean, math.nan, math.nan
  half = float(stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
  return mean, mean - half, mean + half


def verdict(low: float, high: float) -> str:
  """ "better" / "worse" / "within noise" for an interval of AT − control (lower is better)."""
  return "better" if high < 0 else "worse" if low > 0 else "within noise"


def robustness_comparisons(results: list[dict], reference: str) -> list[dict]:
  """The paired KID comparison of every attacked robustness cell (AT vs control)."""
  features = fid_lib.load_statistics(reference).pool_features
  at_label, control_label = story.TABULATED["at"], story.TABULATED["control"]
  by_key = {(r["label"], r["kind"], r["rho"]): r for r in results}
  out = []
  for (label, kind, rho), at in by_key.items():
    control = by_key.get((control_label, kind, rho))
    if label != at_label or kind == "none" or control is None:
      continue
    name = f"ddim+{kind} ρ={rho:g}"
    out.append(
        story_report.compare_cell(dict(at, method=name), dict(control, method=name), features)
    )
  return out


def aggregate(per_seed: dict[int, list[dict]]) -> list[dict]:
  """One row per cell: each seed's comparison and the mean over seeds with its interval."""
  cells: dict[tuple[str, int], dict[int, dict]] = {}
  for seed, comparisons in per_seed.items():
    for c in comparisons:
      cells.setdefault((c["method"], c["nfe"]), {})[seed] = c
  rows = []
  for (method, nfe), by_seed in cells.items():
    mean, low, high = mean_interval([c["difference"] for c in by_seed.values()])
    rows.append(
        {
            "method": method,
            "nfe": nfe,
            "seeds": {str(s): c for s, c in by_seed.items()},
            "difference_mean": mean,
            "interval_95": [low, high],
            "verdict": verdict(low, high) if len(by_seed) > 1 else "one seed",
            "fid_at_mean": float(np.mean([c["fid_at"] for c in by_seed.values()])),
            "fid_control_mean": float(np.mean([c["fid_control"] for c in by_seed.values()])),
            "better_seeds": sum(c["verdict"] == "better" for c in by_seed.values()),
            "worse_seeds": sum(c["verdict"] == "worse" for c in by_seed.values()),
        }
    )
  return rows


def _published_lines() -> list[str]:
  paper = table_mode.PUBLISHED_CIFAR10
  lines = []
  for nfe in (10, 20, 50):
    adm, at = paper[("ADM", "ddim", nfe)], paper[("ADM-AT", "ddim", nfe)]
    lines.append(f"| DDIM NFE {nfe} | {adm:.2f} | {at:.2f} | {at - adm:+.2f} |")
  return lines


def closing(rows: list[dict]) -> str:
  """The closing sentence: the over-seeds verdicts, or each cell's own with a single seed."""
  if rows and all(r["verdict"] == "one seed" for r in rows):
    worse = sum(r["worse_seeds"] for r in rows)
    better = sum(r["better_seeds"] for r in rows)
    return (
        f"One seed so far: by its own paired 95 % intervals AT beats the equal-budget clean "
        f"control in {better} of {len(rows)} cells, loses in {worse}, and is within noise in "
        f"{len(rows) - better - worse}; a verdict over training seeds needs at least two."
    )
  counts = {v: sum(r["verdict"] == v for r in rows) for v in ("better", "worse")}
  noise = len(rows) - counts["better"] - counts["worse"]
  return (
      f"Verdict over {len(rows)} cell(s), each at 95 % over seeds: AT beats the equal-budget "
      f"clean control in {counts['better']}, loses in {counts['worse']}, and is within noise "
      f"in {noise}."
  )


def markdown(rows: list[dict], seeds: list[int], samples: int) -> str:
  """study.md: the per-seed and across-seed table, the paper's numbers and the verdict."""
  s = KID_SCALE
  head = " | ".join(f"seed {seed}" for seed in seeds)
  lines = [
      f"# AT − control over {len(seeds)} seed(s) ({samples} paired samples per cell)",
      "",
      "KID×10³ difference AT − control per seed (± paired jackknife s.e.; * = its own 95 % "
      "interval excludes 0), and the mean over seeds with a Student-t 95 % interval "
      f"({len(seeds) - 1} d.o.f.). Negative = AT closer to the data.",
      "",
      f"| cell | {head} | mean over seeds (95 %) | verdict | FID AT / control (mean) |",
      "|" + " --- |" * (len(seeds) + 4),
  ]
  for r in rows:
    cells = []
    for seed in seeds:
      c = r["seeds"].get(str(seed))
      star = "*" if c and c["verdict"] != "within noise" else ""
      cells.append(
          f"{c['difference'] * s:+.2f} ± {c['standard_error'] * s:.2f}{star}" if c else "—"
      )
    low, high = r["interval_95"]
    interval = "" if math.isnan(low) else f" ({low * s:+.2f} … {high * s:+.2f})"
    lines.append(
        f"| {r['method']} NFE {r['nfe']} | {' | '.join(cells)} | "
        f"{r['difference_mean'] * s:+.2f}{interval} | {r['verdict']} | "
        f"{r['fid_at_mean']:.2f} / {r['fid_control_mean']:.2f} |"
    )
  lines += [
      "",
      "The paper (CIFAR-10, 50K samples per FID, one training run each, no interval):",
      "",
      "| cell | ADM FID | ADM-AT FID | AT − ADM |",
      "| --- | --- | --- | --- |",
      *_published_lines(),
      "",
      closing(rows),
  ]
  return "\n".join(lines) + "\n"


def run(config: ml_collections.ConfigDict, workdir: str) -> str | None:
  """Runs every seed's story and robustness cells, then writes study.md/json; returns the
  markdown path (None if preempted)."""
  validate_config(config, "study")
  seeds = [int(s) for s in config.study.seeds]
  per_seed: dict[int, list[dict]] = {}
  for i, seed in enumerate(seeds, start=1):
    seed_dir = os.path.join(workdir, f"seed{seed}")
    logging.info("Study seed %d (%d/%d) in %s.", seed, i, len(seeds), seed_dir)
    cfg = seed_config(config, seed)
    if story.run(cfg, seed_dir) is None:
      return None
    with open(os.path.join(seed_dir, "story", "comparison.json")) as f:
      per_seed[seed] = json.load(f)
    if config.study.robustness:
      rcfg = robustness_config(cfg, seed_dir)
      results, reference = robustness.tabulate(rcfg, seed_dir)
      robustness.write_outputs(results, os.path.join(seed_dir, "robustness"))
      per_seed[seed] += robustness_comparisons(results, reference)
    path = write_study(per_seed, seeds, config.story.num_samples, workdir)
  with open(path) as f:
    print(f.read())
  return path


def write_study(
    per_seed: dict[int, list[dict]], seeds: list[int], samples: int, workdir: str
) -> str:
  """study.json and study.md over the seeds done so far (rewritten after every seed, so a long
  study shows its results as they come); returns the markdown path."""
  rows = aggregate(per_seed)
  out_dir = os.path.join(workdir, "study")
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "study.json"), "w") as f:
    json.dump(rows, f, indent=2, default=float)
  text = markdown(rows, list(per_seed), samples)
  if len(per_seed) < len(seeds):
    text = f"(Seeds done: {len(per_seed)} of {len(seeds)}; the study is still running.)\n\n" + text
  path = os.path.join(out_dir, "study.md")
  with open(path, "w") as f:
    f.write(text)
  return path
