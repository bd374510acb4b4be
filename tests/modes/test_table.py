"""`--mode=table` end to end on digits: a tiny grid fills every cell, writes markdown, CSV and a
PNG plot, and an interrupted table resumes without recomputing finished cells; `--mode=robustness`
fills its budget grid the same way."""

import csv
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from modes import table as tables
from evaluation import convert_inception
from tests import direct_fid, run_utils


@pytest.fixture(scope="module")
def table_args(trained_tiny, tmp_path_factory):
  weights, _ = convert_inception.convert(None, str(tmp_path_factory.mktemp("w") / "inception.npz"))
  trained = str(tmp_path_factory.mktemp("adm") / "run")
  shutil.copytree(trained_tiny, trained)
  return (
      "--mode=table",
      f"--config.table.runs=ADM={trained}",
      "--config.table.methods=('ddim','dpm_solver++')",
      "--config.table.nfes=(2,10)",
      "--config.table.num_samples=8",
      "--config.sampling.batch_size=8",
      f"--config.evaluation.inception_weights={weights}",
      "--config.evaluation.max_reference_images=8",
      "--config.evaluation.batch_size=8",
      "--config.evaluation.fid_method=eigh",
      "--config.evaluation.precision_recall=False",
  )


def _value(args: tuple[str, ...], flag: str) -> str:
  """The value of `--flag=value` in `args`."""
  return next(a for a in args if a.startswith(f"{flag}=")).split("=", 1)[1]


def test_tiny_grid_fills_every_cell_and_resumes(tmp_path, table_args):
  workdir = str(tmp_path / "table")
  run_utils.run_main(workdir, *table_args)
  out = os.path.join(workdir, "table")
  with open(os.path.join(out, "table.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [(r["method"], r["nfe"]) for r in rows] == [
      ("ddim", "2"),
      ("ddim", "10"),
      ("dpm_solver++", "2"),
      ("dpm_solver++", "10"),
  ]
  assert all(float(r["fid"]) > 0 and r["num_samples"] == "8" for r in rows)
  # The paper's CIFAR-10 numbers are not shown beside digits results.
  assert all(r["published_fid"] == "" for r in rows)
  markdown = open(os.path.join(out, "table.md")).read().splitlines()
  assert markdown[2] == "| run | sampler | NFE 2 | NFE 10 |"
  body = [line for line in markdown[4:] if line]
  assert len(body) == 2 and all(line.count("|") == 5 and "|  |" not in line for line in body)
  assert "(" not in "".join(body) and "8 samples" in markdown[0]
  with Image.open(os.path.join(out, "fid_vs_nfe.png")) as png:
    assert png.format == "PNG" and png.size[0] >= 300

  cells = os.path.join(out, "cells")
  names = sorted(os.listdir(cells))
  assert len(names) == 4
  stamps = {n: os.path.getmtime(os.path.join(cells, n)) for n in names}
  os.remove(os.path.join(cells, names[0]))  # as if the run had been killed during that cell
  result = run_utils.run_main(workdir, *table_args)
  assert result.stderr.count("done before.") == 3
  assert sorted(os.listdir(cells)) == names
  for name in names[1:]:
    assert os.path.getmtime(os.path.join(cells, name)) == stamps[name]
  # Each cell's FID and sFID, in table.csv and in its JSON, is that of its own sample file
  # computed directly against the table's reference statistics (tests/direct_fid.py).
  scored = direct_fid.assert_cells_match_direct(
      os.path.join(out, "table.csv"),
      cells,
      {"run": "label", "method": "method", "nfe": "nfe"},
      weights=_value(table_args, "--config.evaluation.inception_weights"),
      reference_file=os.path.join(workdir, "eval", "reference.npz"),
      batch_size=8,
  )
  assert len({c["provenance"]["samples_file"] for c in scored}) == 4


def test_published_numbers_belong_to_their_dataset():
  assert tables.published_fid("cifar10", "ADM", "ddim", 10) == 22.62  # PAPER.md §7
  assert tables.published_fid("cifar10", "ADM-AT", "ddim", 10) == 15.88
  assert tables.published_fid("digits", "ADM", "ddim", 10) is None
  assert tables.published_fid("cifar10", "ADM", "ddim", 7) is None


def test_bad_runs_spec_is_one_sentence(tmp_path, table_args):
  args = [a for a in table_args if not a.startswith("--config.table.runs")]
  result = run_utils.run_main(
      str(tmp_path / "t"), *args, "--config.table.runs=nolabel", check=False
  )
  run_utils.assert_one_sentence_error(result, "config.table.runs", "LABEL=WORKDIR")


def test_robustness_mode_fills_a_budget_table_and_attacks_the_trajectory(tmp_path, table_args):
  workdir = str(tmp_path / "robust")
  trained = _value(table_args, "--config.table.runs").split("=", 1)[1]
  args = [a for a in table_args if not a.startswith(("--mode", "--config.table."))]
  run_utils.run_main(
      workdir,
      "--mode=robustness",
      f"--config.robustness.runs=ADM={trained}",
      "--config.robustness.nfe=4",
      "--config.robustness.budgets=(0.1,)",
      "--config.robustness.attack_steps=(0,2)",
      "--config.robustness.pgd_steps=2",
      "--config.robustness.num_samples=8",
      *args,
  )
  out = os.path.join(workdir, "robustness")
  with open(os.path.join(out, "robustness.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [(r["kind"], r["rho"]) for r in rows] == [
      ("none", "0.0"),
      ("random", "0.1"),
      ("adversarial", "0.1"),
  ]
  assert all(float(r["fid"]) > 0 and r["num_samples"] == "8" for r in rows)
  assert rows[0]["attack_steps"] == "" and rows[2]["attack_steps"] == "0 2"
  markdown = open(os.path.join(out, "robustness.md")).read().splitlines()
  assert markdown[2] == "| run | perturbation | ρ = 0 | ρ = 0.1 |"
  assert [line.split("|")[2].strip() for line in markdown[4:6]] == ["random", "adversarial"]
  assert "8 samples per cell" in markdown[0] and "steps 0, 2" in markdown[0]
  with Image.open(os.path.join(out, "fid_vs_budget.png")) as png:
    assert png.format == "PNG"
  scored = direct_fid.assert_cells_match_direct(
      os.path.join(out, "robustness.csv"),
      os.path.join(out, "cells"),
      {"run": "label", "kind": "kind", "rho": "rho"},
      weights=_value(table_args, "--config.evaluation.inception_weights"),
      reference_file=os.path.join(workdir, "eval", "reference.npz"),
      batch_size=8,
  )
  files = [os.path.basename(c["provenance"]["samples_file"]) for c in scored]
  assert len(set(files)) == 3 and all(
      f"_{c['kind']}0.1_" in f for c, f in zip(scored[1:], files[1:])
  )

  samples = sorted(
      f
      for f in os.listdir(os.path.join(trained, "samples"))
      if f.startswith("ddim_nfe4") and f.endswith(".npz")
  )
  assert len(samples) == 3  # clean, random and adversarial sets, told apart by their tags
  sets = {name: np.load(os.path.join(trained, "samples", name))["arr_0"] for name in samples}
  clean = next(v for k, v in sets.items() if "rho" not in k and "0.1" not in k)
  assert all(not np.array_equal(v, clean) for k, v in sets.items() if "0.1" in k)


def test_plot_axes_read_as_the_measured_numbers(tmp_path):
  series = {"ADM-AT / ddim": {5: 250.0, 10: 220.0}, "ADM / ddim": {5: 249.0, 10: 221.0}}
  path = str(tmp_path / "fid_vs_nfe.png")
  assert tables.plot_lines(series, "NFE", path, log_x=True) == ["5", "10"]
  assert os.path.getsize(path) > 0
