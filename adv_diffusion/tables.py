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
from typing import Any

import ml_collections
from absl import logging

from adv_diffusion import eval_modes
from adv_diffusion.config_validation import validate_config
from adv_diffusion.errors import ConfigError

# Published CIFAR-10 FIDs (50K samples) quoted in PAPER.md §7: (run label, method, NFE) → FID.
PUBLISHED: dict[tuple[str, str, int], float] = {
    ("ADM", "ddim", 10): 22.62, ("ADM", "ddim", 20): 10.52, ("ADM", "ddim", 50): 4.55,
    ("ADM-AT", "ddim", 10): 15.88, ("ADM-AT", "ddim", 20): 6.60, ("ADM-AT", "ddim", 50): 3.34,
    ("ADM", "ancestral", 20): 10.36, ("ADM", "ancestral_es", 20): 5.15,
    ("CD", "consistency", 1): 3.55, ("CD", "consistency", 2): 2.93,  # LPIPS distance
}
METRICS = ("fid", "sfid", "inception_score", "precision", "recall")


def parse_runs(spec: str) -> list[tuple[str, str]]:
  """"ADM=runs/a,ADM-AT=runs/b" → [("ADM", "runs/a"), ("ADM-AT", "runs/b")]."""
  runs = []
  for item in filter(None, (part.strip() for part in spec.split(","))):
    label, sep, workdir = item.partition("=")
    if not sep or not label or not workdir:
      raise ConfigError(f"config.table.runs = {spec!r} is not allowed: use LABEL=WORKDIR pairs "
                        "separated by commas, e.g. 'ADM=runs/cifar10_adm,ADM-AT=runs/cifar10_at'.")
    runs.append((label.strip(), workdir.strip()))
  if not runs:
    raise ConfigError("config.table.runs is empty: name the runs to tabulate as "
                      "'LABEL=WORKDIR,...'.")
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


def _cell_name(label: str, method: str, nfe: int) -> str:
  return f"{label}_{method}_nfe{nfe}".replace("/", "-").replace("+", "p")


def _write_json_atomic(path: str, payload: dict) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True, default=float)
  os.replace(tmp, path)


def _compute_cell(config: ml_collections.ConfigDict, label: str, workdir: str, method: str,
                  nfe: int, reference: str) -> dict[str, Any]:
  from sampling import generate

  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.sampling.method, cfg.sampling.nfe = method, nfe
  cfg.sampling.num_samples = config.table.num_samples
  cfg.evaluation.reference = reference
  cfg.evaluation.samples = generate.generate_from_config(cfg, workdir)
  result = eval_modes.evaluate_samples(cfg, workdir)
  return {"label": label, "workdir": os.path.abspath(workdir), "method": method, "nfe": nfe,
          "num_samples": config.table.num_samples,
          "published_fid": PUBLISHED.get((label, method, nfe)),
          **{m: result.get(m) for m in METRICS}, "provenance": result.get("provenance", {})}


def run_table(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Computes the missing cells, then writes table.md, table.csv and fid_vs_nfe.png; returns
  the markdown path."""
  validate_config(config)
  cells = cell_grid(config)
  out_dir = os.path.join(workdir, "table")
  cell_dir = os.path.join(out_dir, "cells")
  os.makedirs(cell_dir, exist_ok=True)
  ref_config = ml_collections.ConfigDict(config.to_dict())
  ref_config.evaluation.reference = os.path.join(workdir, "eval", "reference.npz")
  reference = eval_modes.fid_stats(ref_config, workdir)
  results = []
  for i, (label, run_dir, method, nfe) in enumerate(cells, start=1):
    path = os.path.join(cell_dir, _cell_name(label, method, nfe) + ".json")
    if os.path.isfile(path):
      logging.info("Cell %d/%d %s %s NFE %d: done before.", i, len(cells), label, method, nfe)
      with open(path) as f:
        results.append(json.load(f))
      continue
    logging.info("Cell %d/%d: %s %s NFE %d.", i, len(cells), label, method, nfe)
    result = _compute_cell(config, label, run_dir, method, nfe, reference)
    _write_json_atomic(path, result)
    results.append(result)
  write_outputs(results, out_dir)
  return os.path.join(out_dir, "table.md")


def write_outputs(results: list[dict], out_dir: str) -> None:
  """table.csv (one row per cell), table.md (FID: ours (published)) and fid_vs_nfe.png."""
  with open(os.path.join(out_dir, "table.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["run", "method", "nfe", "num_samples", *METRICS, "published_fid"])
    for r in results:
      writer.writerow([r["label"], r["method"], r["nfe"], r["num_samples"],
                       *("" if r.get(m) is None else f"{r[m]:.4f}" for m in METRICS),
                       "" if r["published_fid"] is None else r["published_fid"]])
  nfes = sorted({r["nfe"] for r in results})
  rows: dict[tuple[str, str], dict[int, dict]] = {}
  for r in results:
    rows.setdefault((r["label"], r["method"]), {})[r["nfe"]] = r
  counts = sorted({r["num_samples"] for r in results})
  lines = [f"FID (ours, {'/'.join(map(str, counts))} samples; published 50K in parentheses)", "",
           "| run | sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
           "| --- | --- |" + " --- |" * len(nfes)]
  for (label, method), by_nfe in rows.items():
    cells = []
    for n in nfes:
      r = by_nfe.get(n)
      if r is None:
        cells.append("")
        continue
      text = f"{r['fid']:.2f}"
      if r["published_fid"] is not None:
        text += f" ({r['published_fid']:.2f})"
      cells.append(text)
    lines.append(f"| {label} | {method} | " + " | ".join(cells) + " |")
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  _plot(rows, os.path.join(out_dir, "fid_vs_nfe.png"))


def _plot(rows: dict[tuple[str, str], dict[int, dict]], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  for (label, method), by_nfe in rows.items():
    nfes = sorted(by_nfe)
    ax.plot(nfes, [by_nfe[n]["fid"] for n in nfes], marker="o", label=f"{label} / {method}")
  ax.set_xscale("log")
  ax.set_xlabel("NFE")
  ax.set_ylabel("FID")
  ax.legend(fontsize=7)
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
