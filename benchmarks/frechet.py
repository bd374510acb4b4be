"""Seconds per Fréchet distance (`evaluation.fid.frechet_distance`) of 2048-d statistics, each
method ("sqrtm": pytorch-fid's numerics, "eigh": the numerical-range path), for sample sets of a
few rows (the tests' and small evaluations' rank-deficient covariance) and of more rows than
dimensions (a full evaluation), against a full-rank reference. Host NumPy/SciPy only.

  python -m benchmarks.frechet --out benchmarks/results/frechet_cpu.json
"""

import argparse

import numpy as np

from benchmarks.common import machine_info, time_calls, write_json
from evaluation import fid


def gaussian_statistics(rows: int, dim: int, seed: int) -> fid.FIDStatistics:
  """Statistics of `rows` random feature rows with per-dimension scales spread over 0.01–3."""
  rng = np.random.default_rng(seed)
  scales = rng.uniform(0.01, 3.0, dim)
  return fid.compute_statistics(rng.standard_normal((rows, dim)) * scales)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--dim", type=int, default=2048)
  parser.add_argument("--sample_rows", default="8,4096", help="comma-separated sample set sizes")
  parser.add_argument("--reference_rows", type=int, default=4096)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()

  reference = gaussian_statistics(args.reference_rows, args.dim, seed=1)
  rows = []
  for count in (int(n) for n in args.sample_rows.split(",")):
    samples = gaussian_statistics(count, args.dim, seed=2)
    values = {}
    for method in fid.FRECHET_METHODS:
      call = lambda: fid.fid_from_statistics(samples, reference, method=method)  # noqa: E731
      values[method] = call()
      times = time_calls(call, args.repeats, warmup=0)
      rows.append(
          dict(
              sample_rows=count,
              method=method,
              seconds_median=float(np.median(times)),
              seconds=times,
              fid=values[method],
              rel_diff_to_sqrtm=abs(values[method] - values["sqrtm"]) / abs(values["sqrtm"]),
          )
      )
  write_json(
      args.out,
      dict(
          machine=machine_info(),
          dim=args.dim,
          reference_rows=args.reference_rows,
          repeats=args.repeats,
          rows=rows,
      ),
  )


if __name__ == "__main__":
  main()
