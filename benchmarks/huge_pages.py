"""The CIFAR-10 train step with and without glibc's huge-page tunable (`modes/huge_pages.py`).

  python -m benchmarks.huge_pages --rounds=3 --steps=5 --out=benchmarks/results/huge_pages_cpu.json

glibc reads the tunable when a process starts, so each side runs in its own process
(`python -m benchmarks.train_step`, float32, GLIBC_TUNABLES=glibc.malloc.hugetlb=0 or 1); the
sides alternate round by round so that a change in the machine's speed falls on both. The
processes share one compilation cache: only the first compiles the step.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from benchmarks.common import machine_info, write_json

SIDES = {"off": "glibc.malloc.hugetlb=0", "on": "glibc.malloc.hugetlb=1"}


def run_side(tunables: str, batch_size: int, steps: int, workdir: str, name: str) -> dict:
  """One `benchmarks.train_step` process in float32 with GLIBC_TUNABLES=`tunables`; its result."""
  out = os.path.join(workdir, f"{name}.json")
  env = dict(os.environ, GLIBC_TUNABLES=tunables)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(workdir, "xla_cache"))
  command = [sys.executable, "-m", "benchmarks.train_step", "--dtypes=float32"]
  command += [f"--batch_size={batch_size}", f"--steps={steps}", f"--out={out}"]
  subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
  with open(out) as f:
    return json.load(f)["results"][0]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  keep = ("ms_per_step", "system_cpu_s_per_step", "minor_page_faults_per_step")
  rounds = []
  with tempfile.TemporaryDirectory() as workdir:
    for index in range(args.rounds):
      row = {}
      for side, tunables in SIDES.items():
        result = run_side(tunables, args.batch_size, args.steps, workdir, f"{index}_{side}")
        row[side] = {key: result[key] for key in keep}
      row["on_over_off"] = row["on"]["ms_per_step"] / row["off"]["ms_per_step"]
      rounds.append(row)
  summary = {
      side: {key: float(np.median([r[side][key] for r in rounds])) for key in keep}
      for side in SIDES
  }
  write_json(
      args.out,
      {
          "benchmark": "huge_pages",
          "model": "cifar10_adm (57.1M params), float32",
          "batch_size": args.batch_size,
          "steps_per_process": args.steps,
          "machine": machine_info(),
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "rounds": rounds,
          "median": summary,
          "on_over_off_per_round": [r["on_over_off"] for r in rounds],
      },
  )


if __name__ == "__main__":
  main()
