"""The paper in one command (configs/paper_cifar10.py) end to end on 2 CPU cores: preempted in
the middle of the clean stage, rerun to the end, rerun again to do nothing; each cell's FID
and sFID and the verdict's paired KID difference recomputed directly from the files.

What stays the paper's config: --mode=story with its stages (clean → ADM-AT with fast AT,
K = 3, η = ρ = 0.1, target ε + sg[δ]/σ_t → the equal-update clean control → ADM-IP with
γ = 0.15 from the same clean start), the diffusion (cosine, learned σ, hybrid loss,
importance-sampled t), the optimizer and EMA rule, the sampling preset, dataset "cifar10"
(through TFDS, mocked by `tfds.testing.mock_data`: random 32×32×3 images of CIFAR-10's feature
spec, as CIFAR-10 is not available offline), the published-numbers column and the estimate.
What is overridden to fit a test: the network (one level of 32 channels without residual
blocks, no attention, float32), the step counts (40 clean steps, 2 AT minibatches), the batch
sizes, the grid (DDIM at NFE 10 only: one cell the paper publishes) and the sample counts (8
samples, 8 reference images).
"""

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

from evaluation import convert_inception, fid
from modes import checkpoint as ckpt_lib
from tests import direct_fid, run_utils

PAPER_CIFAR10 = os.path.join(run_utils.REPO, "configs", "paper_cifar10.py")
CLEAN_STEPS = 40
ESTIMATE = re.compile(
    r"^Expected: (\S+) accelerator-hours on (\d+) x (.+?) \((\S+) h wall; (.*)\)\.$"
)


def _command(workdir: str, weights: str) -> list[str]:
  overrides = (
      "--config.model.num_channels=32",
      "--config.model.channel_mult=(1,)",
      "--config.model.num_res_blocks=0",
      "--config.model.attention_resolutions=()",
      "--config.model.num_head_channels=32",
      "--config.model.compute_dtype=float32",
      f"--config.story.clean_steps={CLEAN_STEPS}",
      "--config.story.clean_batch_size=4",
      "--config.train.num_steps=2",
      "--config.train.batch_size=4",
      "--config.train.log_every=1",
      "--config.train.checkpoint_every=1000",
      "--config.train.sample_every=0",
      "--config.train.ema_rates=(0.9,)",
      "--config.train.async_checkpointing=False",
      "--config.train.preemption_grace_seconds=120",
      "--config.story.methods=('ddim',)",
      "--config.story.nfes=(10,)",
      "--config.story.num_samples=8",
      "--config.sampling.batch_size=8",
      f"--config.evaluation.inception_weights={weights}",
      "--config.evaluation.max_reference_images=8",
      "--config.evaluation.batch_size=8",
      "--config.evaluation.fid_method=eigh",
      "--config.evaluation.precision_recall=False",
  )
  return [
      sys.executable,
      "-m",
      "tests.mock_tfds_main",
      f"--config={PAPER_CIFAR10}",
      f"--workdir={workdir}",
      *overrides,
  ]


def _run(workdir: str, weights: str) -> subprocess.CompletedProcess:
  return run_utils.run_python(_command(workdir, weights))


def _estimate(stdout: str) -> re.Match:
  (line,) = [line for line in stdout.splitlines() if line.startswith("Expected: ")]
  match = ESTIMATE.match(line)
  assert match, line
  return match


def _positive(text: str) -> float:
  value = float(text.replace(",", ""))
  assert math.isfinite(value) and value > 0, text
  return value


def _preempt_in_clean_stage(workdir: str, weights: str, log: str) -> tuple[int, str]:
  """Starts the story, sends SIGTERM once the clean stage has logged its first step; returns
  the exit status and stdout."""
  with open(log, "w") as err:
    proc = subprocess.Popen(
        _command(workdir, weights),
        cwd=run_utils.REPO,
        env=run_utils.subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
    )
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
      text = open(log).read()
      if "Story stage 1/6 (clean)" in text and "optimizer_updates=" in text:
        break
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout = proc.communicate(timeout=300)[0]
  return proc.returncode, stdout


def test_paper_cifar10_story_resumes_after_preemption_and_runs_every_stage(tmp_path):
  weights, _ = convert_inception.convert(None, str(tmp_path / "inception.npz"))
  workdir = str(tmp_path / "paper")
  clean_dir = os.path.join(workdir, "clean")

  # 1. Preempted in the middle of the clean stage: it saves, the story stops, exit 0.
  log = str(tmp_path / "preempted.txt")
  returncode, stdout = _preempt_in_clean_stage(workdir, weights, log)
  assert returncode == 0, open(log).read()[-3000:]
  assert "Preempted: saved the checkpoint of step" in open(log).read()
  (stopped,) = ckpt_lib.checkpoint_steps(ckpt_lib.checkpoint_dir(clean_dir))
  assert 1 <= stopped < CLEAN_STEPS
  assert not os.path.exists(os.path.join(clean_dir, "train_done.json"))
  assert not os.path.exists(os.path.join(workdir, "at"))
  first = _estimate(stdout)
  assert f"clean {CLEAN_STEPS} steps at" in first.group(5)
  assert "at 2 steps at" in first.group(5) and "control 6 steps" in first.group(5)
  assert "ip 6 steps" in first.group(5) and "table 3 cells" in first.group(5)
  assert first.group(2) == "1" and first.group(3) == "cpu"
  _positive(first.group(1)), _positive(first.group(4))
  for per_step in re.findall(r"at (\S+) s/step", first.group(5)):
    _positive(per_step)

  # 2. The rerun resumes the clean stage at the saved step and runs the rest.
  result = _run(workdir, weights)
  assert f"Resuming from {ckpt_lib.checkpoint_dir(clean_dir)} at step {stopped}." in result.stderr
  resumed = _estimate(result.stdout)
  assert f"clean {CLEAN_STEPS - stopped} steps at" in resumed.group(5)
  _positive(resumed.group(1))
  runs = {
      name: run_utils.read_checkpoint(os.path.join(workdir, name))
      for name in ("clean", "at", "control", "ip")
  }
  assert int(runs["clean"]["train"]["step"]) == CLEAN_STEPS
  # Fast AT with the paper's K = 3: 2 minibatches = 6 updates; control and ADM-IP make 6 too.
  assert int(runs["at"]["train"]["step"]) == 2
  assert int(runs["control"]["train"]["step"]) == int(runs["ip"]["train"]["step"]) == 6
  for name in ("at", "control", "ip"):
    assert int(runs[name]["train"]["num_updates"]) == 6
  assert result.stderr.count(f"Initialised params and EMA from {clean_dir} step {CLEAN_STEPS}") == 3
  configs = {}
  for name in ("at", "control", "ip"):
    with open(os.path.join(workdir, name, "config.json")) as f:
      configs[name] = json.load(f)
  assert configs["ip"]["diffusion"]["input_perturbation"] == 0.15  # PAPER.md §5, CIFAR-10
  assert configs["ip"]["adversarial"]["mode"] == "none"
  assert configs["control"]["diffusion"]["input_perturbation"] == 0.0
  assert configs["at"]["adversarial"]["num_replays"] == 3
  # Same start, same updates, same data and keys: only the input perturbation differs.
  assert (
      run_utils.max_abs_diff(runs["ip"]["model"]["params"], runs["control"]["model"]["params"]) > 0
  )

  with open(os.path.join(workdir, "table", "table.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [(r["run"], r["method"], r["nfe"], r["published_fid"]) for r in rows] == [
      ("ADM-AT", "ddim", "10", "15.88"),
      ("ADM (clean control)", "ddim", "10", "22.62"),
      ("ADM-IP", "ddim", "10", ""),
  ]
  assert all(float(r["fid"]) > 0 and r["num_samples"] == "8" for r in rows)
  with open(os.path.join(workdir, "table", "table.md")) as f:
    markdown = f.read()
  assert "| ADM (clean control) | ddim | " in markdown and "(22.62) |" in markdown
  assert "beside ADM (clean control) are the paper's ADM numbers" in markdown
  assert "| ADM-IP | ddim |" in result.stdout
  assert "Verdict over 1 cell(s)" in result.stdout
  # Each cell's FID and sFID equal those of its stage's samples computed directly against the
  # story's reference statistics (tests/direct_fid.py).
  reference_file = os.path.join(workdir, "eval", "reference.npz")
  scored = direct_fid.assert_cells_match_direct(
      os.path.join(workdir, "table", "table.csv"),
      os.path.join(workdir, "table", "cells"),
      {"run": "label", "method": "method", "nfe": "nfe"},
      weights=weights,
      reference_file=reference_file,
      batch_size=8,
  )
  for cell, stage in zip(scored, ("at", "control", "ip"), strict=True):
    samples = os.path.join(workdir, stage, "samples")
    assert os.path.dirname(cell["provenance"]["samples_file"]) == samples
  # The verdict: the paired KID difference of the AT and control cells' saved features,
  # recomputed here.
  with open(os.path.join(workdir, "story", "comparison.json")) as f:
    (comparison,) = json.load(f)
  assert fid.load_statistics(reference_file).pool_features.shape == (8, 2048)
  direct = direct_fid.story_kid_difference(workdir, "ddim*_nfe10_*_pool.npz")
  assert comparison["difference"] == direct["difference"] != 0
  assert comparison["standard_error"] == direct["standard_error"] > 0
  assert comparison["pairs"] == 8 and comparison["reference_rows"] == 8
  assert os.path.isfile(os.path.join(workdir, "story", "at_vs_control_ddim_nfe10.png"))

  # 3. Everything done: the rerun trains, samples and scores nothing.
  again = _run(workdir, weights)
  assert again.stderr.count("done before") == 4 + 3  # four stages, three cells
  assert "Initialised" not in again.stderr and "Resuming" not in again.stderr
  assert "Expected: 0 accelerator-hours" in again.stdout and "nothing left to run" in again.stdout
