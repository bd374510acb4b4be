"""`--mode=table` end to end on digits: a tiny grid fills every cell, writes markdown, CSV and a
PNG plot, and an interrupted table resumes without recomputing finished cells."""

import csv
import os

import pytest
from PIL import Image

from evaluation import convert_inception
from tests import run_utils


@pytest.fixture(scope="module")
def table_args(tmp_path_factory):
  weights, _ = convert_inception.convert(
      None, str(tmp_path_factory.mktemp("w") / "inception.npz"))
  trained = str(tmp_path_factory.mktemp("adm"))
  run_utils.run_main(trained, "--config.train.num_steps=2",
                     "--config.train.async_checkpointing=False")
  return ("--mode=table", f"--config.table.runs=ADM={trained}",
          "--config.table.methods=('ddim','dpm_solver++')", "--config.table.nfes=(2,10)",
          "--config.table.num_samples=8", "--config.sampling.batch_size=8",
          f"--config.evaluation.inception_weights={weights}",
          "--config.evaluation.max_reference_images=8", "--config.evaluation.batch_size=8",
          "--config.evaluation.fid_method=eigh", "--config.evaluation.precision_recall=False")


def test_tiny_grid_fills_every_cell_and_resumes(tmp_path, table_args):
  workdir = str(tmp_path / "table")
  run_utils.run_main(workdir, *table_args)
  out = os.path.join(workdir, "table")
  with open(os.path.join(out, "table.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [(r["method"], r["nfe"]) for r in rows] == [
      ("ddim", "2"), ("ddim", "10"), ("dpm_solver++", "2"), ("dpm_solver++", "10")]
  assert all(float(r["fid"]) > 0 and r["num_samples"] == "8" for r in rows)
  assert rows[1]["published_fid"] == "22.62"  # ADM, DDIM, NFE 10 (PAPER.md §7)
  markdown = open(os.path.join(out, "table.md")).read().splitlines()
  assert markdown[2] == "| run | sampler | NFE 2 | NFE 10 |"
  body = [line for line in markdown[4:] if line]
  assert len(body) == 2 and all(line.count("|") == 5 and "|  |" not in line for line in body)
  assert "(22.62)" in body[0] and "8 samples" in markdown[0]
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


def test_bad_runs_spec_is_one_sentence(tmp_path, table_args):
  args = [a for a in table_args if not a.startswith("--config.table.runs")]
  result = run_utils.run_main(str(tmp_path / "t"), *args, "--config.table.runs=nolabel",
                              check=False)
  run_utils.assert_one_sentence_error(result, "config.table.runs", "LABEL=WORKDIR")
