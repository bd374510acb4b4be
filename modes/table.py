"""`--mode=table`: the paper's result grid (PAPER.md §7) for named runs, one command per table.

For every run (`config.table.runs` = "LABEL=WORKDIR,..."), sampler (`table.methods`) and NFE
(`table.nfes`; consistency models: `table.cm_nfes`) one cell = generate `table.num_samples`
samples (`--mode=sample`'s resumable generation) + score them (`--mode=eval`: FID, sFID, IS,
precision, recall) against reference statistics computed once into the table's workdir. Each
finished cell is written atomically to `WORKDIR/table/cells/<cell>.json` with its provenance;
a rerun skips finished cells. At the end `table.md` and `table.csv` show our numbers beside the
published ones and `fid_vs_nfe.png` plots one line per run and sampler.
"""

from __future__ import annotations

import csv
import json
import os
import re
from typing import Any, Callable

import ml_collections
from absl import logging

from modes import evaluate as eval_modes
from modes.config_validation import validate_config
from modes.errors import ConfigError

# Published CIFAR-10 FIDs (50K samples) quoted in PAPER.md §7: (run label, method, NFE) → FID.
PUBLISHED_CIFAR10: dict[tuple[str, str, int], float] = {
    ("ADM", "ddim", 10): 22.62,
    ("ADM", "ddim", 20): 10.52,
    ("ADM", "ddim", 50): 4.55,
    ("ADM-AT", "ddim", 10): 15.88,
    ("ADM-AT", "ddim", 20): 6.60,
    ("ADM-AT", "ddim", 50): 3.34,
    ("ADM", "ancestral", 20): 10.36,
    ("ADM", "ancestral_es", 20): 5.15,
    ("CD", "consistency", 1): 3.55,
    ("CD", "consistency", 2): 2.93,  # LPIPS distance
}
PUBLISHED = {"cifar10": PUBLISHED_CIFAR10}  # dataset → published numbers
METRICS = ("fid", "sfid", "kid", "kid_std", "inception_score", "precision", "recall")


def published_fid(dataset: str, label: str, method: str, nfe: int) -> float | None:
  """The paper's FID for this dataset, run label, sampler and NFE, if it publishes one."""
  return PUBLISHED.get(dataset, {}).get((label, method, nfe))


def parse_published_labels(spec: str) -> dict[str, str]:
  """ "ADM (clean control)=ADM" → {"ADM (clean control)": "ADM"}: run label → the paper's label
  whose published numbers stand beside it (`config.table.published_labels`)."""
  aliases = {}
  for item in filter(None, (part.strip() for part in spec.split(","))):
    label, sep, paper = item.partition("=")
    if not sep or not label.strip() or not paper.strip():
      raise ConfigError(
          f"config.table.published_labels = {spec!r} is not allowed: use LABEL=PAPER_LABEL "
          "pairs separated by commas, e.g. 'ADM (clean control)=ADM'."
      )
    aliases[label.strip()] = paper.strip()
  return aliases


def parse_runs(spec: str) -> list[tuple[str, str]]:
  """ "ADM=runs/a,ADM-AT=runs/b" → [("ADM", "runs/a"), ("ADM-AT", "runs/b")]."""
  runs = []
  for item in filter(None, (part.strip() for part in spec.split(","))):
    label, sep, workdir = item.partition("=")
    if not sep or not label or not workdir:
      raise ConfigError(
          f"config.table.runs = {spec!r} is not allowed: use LABEL=WORKDIR pairs "
          "separated by commas, e.g. 'ADM=runs/cifar10_adm,ADM-AT=runs/cifar10_at'."
      )
    runs.append((label.strip(), workdir.strip()))
  if not runs:
    raise ConfigError(
        "config.table.runs is empty: name the runs to tabulate as " "'LABEL=WORKDIR,...'."
    )
  return runs


def cell_grid(config: ml_collections.ConfigDict) -> list[tuple[str, str, str, int]]:
  """(label, workdir, method, nfe) of every cell, in table order."""
  tab = config.table
  cells = []
  for label, workdir in parse_runs(tab.runs):
    consistency = _is_consistency_run(workdir)
    methods = ("consistency",) if consistency else tuple(tab.methods)
    for method in methods:
      for nfe in (tab.cm_nfes if consistency else tab.nfes):
        cells.append((label, workdir, method, int(nfe)))
  return cells


def _is_consistency_run(workdir: str) -> bool:
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return False
  with open(path) as f:
    return json.load(f).get("consistency", {}).get("mode", "none") != "none"


def _write_json_atomic(path: str, payload: dict) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True, default=float)
  os.replace(tmp, path)


def reference_statistics(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The reference statistics of `config.data`, computed once into `config.evaluation.reference`
  (default WORKDIR/eval/reference.npz) and reused while they describe the same images."""
  ref_config = ml_collections.ConfigDict(config.to_dict())
  ref_config.evaluation.reference = config.evaluation.reference or os.path.join(
      workdir, "eval", "reference.npz"
  )
  return eval_modes.run_fid_stats(ref_config, workdir)


def score_samples(
    config: ml_collections.ConfigDict,
    run_dir: str,
    reference: str,
    num_samples: int,
    *,
    sampler=None,
    tag_suffix: str = "",
) -> dict[str, Any]:
  """Generates `num_samples` samples of `config.sampling` from the run in `run_dir` (resumable)
  and scores them: the METRICS, the sample count and the provenance of the numbers."""
  from modes import sample as generate

  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.sampling.num_samples = num_samples
  cfg.evaluation.reference = reference
  cfg.evaluation.samples = generate.run(cfg, run_dir, sampler=sampler, tag_suffix=tag_suffix)
  result = eval_modes.evaluate_samples(cfg, run_dir)
  return {
      "workdir": os.path.abspath(run_dir),
      "num_samples": num_samples,
      **{m: result.get(m) for m in METRICS},
      "provenance": result.get("provenance", {}),
  }


def cell_name(label: str, method: str, nfe: int) -> str:
  return f"{label}_{method}_nfe{nfe}"


def cell_file(cell_dir: str, name: str) -> str:
  """Where `fill_cells` stores the finished cell `name`."""
  return os.path.join(cell_dir, re.sub(r"[^\w.-]+", "-", name.replace("+", "p")) + ".json")


def fill_cells(cells: list[tuple[str, str, Callable[[], dict]]], cell_dir: str) -> list[dict]:
  """Results of (name, description, compute) cells in order; each finished cell is stored as
  `cell_dir/<name>.json` and read back instead of recomputed on a rerun."""
  os.makedirs(cell_dir, exist_ok=True)
  results = []
  for i, (name, description, compute) in enumerate(cells, start=1):
    path = cell_file(cell_dir, name)
    if os.path.isfile(path):
      logging.info("Cell %d/%d %s: done before.", i, len(cells), description)
      with open(path) as f:
        results.append(json.load(f))
      continue
    logging.info("Cell %d/%d: %s.", i, len(cells), description)
    result = compute()
    _write_json_atomic(path, result)
    results.append(result)
  return results


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Computes the missing cells, then writes table.md, table.csv and fid_vs_nfe.png; returns
  the markdown path."""
  tabulate(config, workdir)
  return os.path.join(workdir, "table", "table.md")


def tabulate(config: ml_collections.ConfigDict, workdir: str) -> tuple[list[dict], str]:
  """`run`'s work; returns the cell results in table order and the reference statistics path."""
  validate_config(config, "table")
  grid = cell_grid(config)
  aliases = parse_published_labels(config.table.published_labels)
  out_dir = os.path.join(workdir, "table")
  reference = reference_statistics(config, workdir)

  def cell(label: str, run_dir: str, method: str, nfe: int) -> tuple[str, str, Callable]:
    def compute() -> dict[str, Any]:
      cfg = ml_collections.ConfigDict(config.to_dict())
      cfg.sampling.method, cfg.sampling.nfe = method, nfe
      scores = score_samples(cfg, run_dir, reference, config.table.num_samples)
      paper_label = aliases.get(label, label)
      published = published_fid(config.data.dataset, paper_label, method, nfe)
      # A run shown beside another label's published number says whose number it is.
      alias = (
          {"published_label": paper_label} if published is not None and paper_label != label else {}
      )
      return {
          "label": label,
          "method": method,
          "nfe": nfe,
          "published_fid": published,
          **alias,
          **scores,
      }

    return cell_name(label, method, nfe), f"{label} {method} NFE {nfe}", compute

  results = fill_cells([cell(*c) for c in grid], os.path.join(out_dir, "cells"))
  write_outputs(results, out_dir)
  return results, reference


def write_csv(path: str, header: list[str], rows: list[list[Any]]) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


DECIMALS = {"kid": 6, "kid_std": 6}  # KID is ~1e-3: six decimals; the others four


def metric_values(result: dict) -> list[str]:
  return ["" if result.get(m) is None else f"{result[m]:.{DECIMALS.get(m, 4)}f}" for m in METRICS]


def markdown_grid(
    title: str, row_header: list[str], columns: list[str], rows: dict[tuple, list[str]]
) -> str:
  """A markdown table: `title`, then one line per row key (its fields first, then the cells)."""
  lines = [
      title,
      "",
      "| " + " | ".join(row_header + columns) + " |",
      "|" + " --- |" * (len(row_header) + len(columns)),
  ]
  for key, cells in rows.items():
    lines.append("| " + " | ".join([*map(str, key), *cells]) + " |")
  return "\n".join(lines) + "\n"


def write_outputs(results: list[dict], out_dir: str) -> None:
  """table.csv (one row per cell), table.md (FID: ours (published)) and fid_vs_nfe.png."""
  write_csv(
      os.path.join(out_dir, "table.csv"),
      ["run", "method", "nfe", "num_samples", *METRICS, "published_fid"],
      [
          [
              r["label"],
              r["method"],
              r["nfe"],
              r["num_samples"],
              *metric_values(r),
              "" if r["published_fid"] is None else r["published_fid"],
          ]
          for r in results
      ],
  )
  nfes = sorted({r["nfe"] for r in results})
  by_row: dict[tuple[str, str], dict[int, dict]] = {}
  for r in results:
    by_row.setdefault((r["label"], r["method"]), {})[r["nfe"]] = r

  def text(r: dict | None) -> str:
    if r is None:
      return ""
    published = "" if r["published_fid"] is None else f" ({r['published_fid']:.2f})"
    return f"{r['fid']:.2f}{published}"

  counts = sorted({r["num_samples"] for r in results})
  published = (
      "; published 50K in parentheses"
      if any(r["published_fid"] is not None for r in results)
      else ""
  )
  title = f"FID (ours, {'/'.join(map(str, counts))} samples{published})"
  markdown = markdown_grid(
      title,
      ["run", "sampler"],
      [f"NFE {n}" for n in nfes],
      {key: [text(row.get(n)) for n in nfes] for key, row in by_row.items()},
  )
  beside = sorted({(r["label"], r["published_label"]) for r in results if "published_label" in r})
  for label, paper_label in beside:
    markdown += f"\nThe published numbers beside {label} are the paper's {paper_label} numbers.\n"
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(markdown)
  plot_lines(
      {
          f"{label} / {method}": {n: r["fid"] for n, r in row.items()}
          for (label, method), row in by_row.items()
      },
      "NFE",
      os.path.join(out_dir, "fid_vs_nfe.png"),
      log_x=True,
  )


def plot_lines(
    series: dict[str, dict[float, float]], xlabel: str, path: str, *, log_x: bool
) -> list[str]:
  """A PNG with one FID line per series (x → FID); returns the x tick labels it drew."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  for name, points in series.items():
    xs = sorted(points)
    ax.plot(xs, [points[x] for x in xs], marker="o", label=name)
  if log_x:
    ax.set_xscale("log")
  # Ticks at the measured x values, written as plain numbers (NFE 5, 10; not 5×10⁰).
  ticks = sorted({x for points in series.values() for x in points})
  ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
  ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
  ax.set_xlabel(xlabel)
  ax.set_ylabel("FID")
  ax.legend(fontsize=7)
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  labels = [t.get_text() for t in ax.get_xticklabels()]
  plt.close(fig)
  return labels
