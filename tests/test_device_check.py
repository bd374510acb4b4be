"""benchmarks.device_check: `--smoke` end to end (every stage with finite numbers or a reason, the
table printed last) and its imports (nothing the GPU image lacks but ml_collections)."""

import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks import device_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _numbers(record, path=""):
  """(path, value) of every number in a nested JSON record."""
  if isinstance(record, dict):
    for key, value in record.items():
      yield from _numbers(value, f"{path}.{key}")
  elif isinstance(record, list):
    for i, value in enumerate(record):
      yield from _numbers(value, f"{path}[{i}]")
  elif isinstance(record, (int, float)) and not isinstance(record, bool):
    yield path, record


def _statuses(record, path=""):
  """(path, record) of every nested dict that has a status."""
  if isinstance(record, dict):
    if "status" in record:
      yield path, record
    for key, value in record.items():
      yield from _statuses(value, f"{path}.{key}")


def test_importing_it_pulls_in_no_clu_tensorflow_or_tfds():
  code = (
      "import json, sys; import benchmarks.device_check; "
      "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & "
      "{'clu', 'tensorflow', 'tensorflow_datasets'})))"
  )
  result = subprocess.run(
      [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
  )
  assert json.loads(result.stdout.strip().splitlines()[-1]) == []


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("device_check")
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.device_check", "--smoke", f"--out_dir={out}"],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=1200,
  )
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
  (path,) = out.glob("device_check_*_cpu_smoke.json")
  return json.loads(path.read_text()), result.stdout


def test_smoke_has_every_stage_with_finite_numbers_or_a_reason(smoke):
  payload, _ = smoke
  assert payload["smoke"] and payload["machine"]["backend"] == "cpu"
  assert list(payload["stages"]) == list(device_check.STAGES)
  assert payload["forbidden_modules_imported"] == []
  bad = [(p, v) for p, v in _numbers(payload) if not math.isfinite(v)]
  assert bad == []
  for path, record in _statuses(payload["stages"]):
    assert record["status"] in ("ok", "partial", "skipped"), (path, record)
    if record["status"] == "skipped":
      assert record["reason"], path
  stages = payload["stages"]
  assert {s["status"] for s in stages.values()} == {"ok"}  # nothing skipped with tiny sizes
  for dtype in ("float32", "bfloat16"):
    step = stages["train_step"][dtype]
    assert step["flops_per_step"] > 0 and step["bytes_accessed_per_step"] > 0
    assert step["flop_per_s"] == pytest.approx(step["flops_per_step"] / step["ms_per_step"] * 1e3)
  sanity = stages["loss_sanity"]
  assert sanity["same_params"] and sanity["relative_difference"] < 0.05
  for method in ("ddim", "dpm_solver++"):
    assert stages["sampling"][method]["nfe"] == 2
  assert stages["fid"]["flax_images_per_sec"] > 0
  assert "per_update_vs_none" in stages["at_cost"]["fast_k1"]
  assert stages["at_cost"]["fast_k1"]["flops_per_update_vs_none"] > 0.9
  assert "per_update_vs_dpm" in stages["cm_cost"]["cd_fast_k1"]


def test_smoke_prints_the_table_last(smoke):
  _, stdout = smoke
  lines = stdout.strip().splitlines()
  header = max(i for i, line in enumerate(lines) if line.startswith("stage "))
  items = {line.split()[0] for line in lines[header + 1 :]}
  assert items == set(device_check.STAGES)


def test_a_stage_without_its_inputs_is_skipped_with_the_reason(tmp_path, monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # --smoke sets it: restored after the test
  assert device_check.main(["--smoke", "--stages=loss_sanity", f"--out_dir={tmp_path}"]) == 0
  (path,) = tmp_path.glob("*.json")
  stage = json.loads(path.read_text())["stages"]["loss_sanity"]
  assert stage["status"] == "skipped" and "train_step" in stage["reason"]


def test_the_budget_skips_a_program_that_would_not_fit():
  budget = device_check.Budget(10.0)
  budget.observe(1.0, 60.0)  # one plain step took a minute to compile
  record = device_check.guarded(budget, "fast_k3", 1.0, lambda: {"compile_s": 0.0})
  assert record["status"] == "skipped" and "time budget" in record["reason"]
  failed = device_check.guarded(device_check.Budget(1e9), "step", 0.0, lambda: 1 / 0)
  assert failed["status"] == "error" and "ZeroDivisionError" in failed["error"]
