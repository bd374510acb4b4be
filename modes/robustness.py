"""`--mode=robustness`: FID of samples whose DDIM trajectory is perturbed, against the budget.

For every run (`config.robustness.runs`, default `config.table.runs`), every perturbation kind
(`robustness.kinds`: random Gaussian direction, or PGD maximising the model's denoising error)
and every budget ρ (`robustness.budgets`, ‖δ‖₂ ≤ ρ·sqrt(d) per example), x_t is perturbed at the
sampler steps `robustness.attack_steps` of an `robustness.nfe`-step DDIM and the sampler goes on
from there (`sampling.perturbations.trajectory_perturbation`); ρ = 0 is the unattacked sampler.
The cells reuse `--mode=table`'s machinery (resumable, with provenance); at the end
`WORKDIR/robustness/robustness.md`, `.csv` and `fid_vs_budget.png` (one line per run and kind).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import ml_collections

from modes import table as table_mode
from modes.config_validation import validate_config
from adv_diffusion.diffusion import GaussianDiffusion
from sampling import perturbations
from modes import sample as sample_mode
from sampling.ddim import respaced_diffusion, sample_ddim
from sampling.registry import Sampler


def ddim_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with `config.sampling` set to the robustness DDIM sampler."""
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.sampling.method, cfg.sampling.nfe = "ddim", config.robustness.nfe
  return cfg


def attacked_sampler(config: ml_collections.ConfigDict, kind: str, rho: float) -> Sampler:
  """The DDIM sampler of `ddim_config(config)` with x_t perturbed at the attack steps."""
  r, diff = config.robustness, config.diffusion
  plain = sample_mode.build_sampler(ddim_config(config))
  steps = respaced_diffusion(
      diff.noise_schedule, diff.num_timesteps, r.nfe, plain.options["spacing"]
  )
  alphas_cumprod = GaussianDiffusion.create(diff.noise_schedule, diff.num_timesteps).alphas_cumprod

  def sample(model_fn, noise: jax.Array, keys: jax.Array | None = None) -> jax.Array:
    perturb = perturbations.trajectory_perturbation(
        model_fn,
        kind,
        rho,
        tuple(r.attack_steps),
        r.nfe,
        alphas_cumprod,
        keys,
        pgd_steps=r.pgd_steps,
    )
    return sample_ddim(
        model_fn,
        noise,
        steps,
        keys,
        eta=plain.options["eta"],
        clip_denoised=plain.options["clip_denoised"],
        perturb=perturb,
    )[0]

  sample.nfe, sample.method = plain.nfe, plain.method
  sample.options = dict(
      plain.options,
      attack=dict(
          kind=kind,
          rho=float(rho),
          steps=list(r.attack_steps),
          pgd_steps=r.pgd_steps if kind == "adversarial" else None,
      ),
  )
  return sample


def _attack_suffix(kind: str, rho: float, attack_steps: tuple[int, ...]) -> str:
  return f"_{kind}{rho:g}_at{'-'.join(map(str, attack_steps))}"


def cell_grid(config: ml_collections.ConfigDict) -> list[tuple[str, str, str, float]]:
  """(label, workdir, kind, ρ) of every cell; kind "none" with ρ = 0 is the clean sampler."""
  r = config.robustness
  cells = []
  for label, workdir in table_mode.parse_runs(r.runs or config.table.runs):
    cells.append((label, workdir, "none", 0.0))
    cells.extend((label, workdir, kind, float(rho)) for kind in r.kinds for rho in r.budgets)
  return cells


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Computes the missing cells, then writes the markdown, CSV and plot; returns the markdown
  path."""
  results, _ = tabulate(config, workdir)
  write_outputs(results, os.path.join(workdir, "robustness"))
  return os.path.join(workdir, "robustness", "robustness.md")


def tabulate(config: ml_collections.ConfigDict, workdir: str) -> tuple[list[dict], str]:
  """The result of every cell (computed or read back) and the reference statistics path."""
  validate_config(config, "robustness")
  r = config.robustness
  out_dir = os.path.join(workdir, "robustness")
  reference = table_mode.reference_statistics(config, workdir)
  attack_steps = tuple(r.attack_steps)

  def cell(label: str, run_dir: str, kind: str, rho: float) -> tuple[str, str, Callable]:
    def compute() -> dict[str, Any]:
      attacked = kind != "none"
      scores = table_mode.score_samples(
          ddim_config(config),
          run_dir,
          reference,
          r.num_samples,
          sampler=attacked_sampler(config, kind, rho) if attacked else None,
          tag_suffix=_attack_suffix(kind, rho, attack_steps) if attacked else "",
      )
      return {
          "label": label,
          "kind": kind,
          "rho": rho,
          "nfe": r.nfe,
          "attack_steps": list(attack_steps) if attacked else [],
          **scores,
      }

    return (f"{label}_{kind}_rho{rho:g}", f"{label} {kind} ρ = {rho:g}", compute)

  results = table_mode.fill_cells(
      [cell(*c) for c in cell_grid(config)], os.path.join(out_dir, "cells")
  )
  return results, reference


def write_outputs(results: list[dict], out_dir: str) -> None:
  """robustness.csv (one row per cell), robustness.md (run × kind by ρ) and fid_vs_budget.png."""
  table_mode.write_csv(
      os.path.join(out_dir, "robustness.csv"),
      ["run", "kind", "rho", "nfe", "attack_steps", "num_samples", *table_mode.METRICS],
      [
          [
              r["label"],
              r["kind"],
              r["rho"],
              r["nfe"],
              " ".join(map(str, r["attack_steps"])),
              r["num_samples"],
              *table_mode.metric_values(r),
          ]
          for r in results
      ],
  )
  clean = {r["label"]: r for r in results if r["kind"] == "none"}
  budgets = sorted({r["rho"] for r in results})
  by_row: dict[tuple[str, str], dict[float, dict]] = {}
  for r in results:
    if r["kind"] != "none":
      row = by_row.setdefault((r["label"], r["kind"]), {0.0: clean[r["label"]]})
      row[r["rho"]] = r
  steps = next((r["attack_steps"] for r in results if r["attack_steps"]), [])
  counts = "/".join(map(str, sorted({r["num_samples"] for r in results})))
  title = (
      f"FID under trajectory perturbation (DDIM NFE {results[0]['nfe']}, x_t perturbed "
      f"at steps {', '.join(map(str, steps))}; {counts} samples per cell; "
      "‖δ‖₂ ≤ ρ·sqrt(d))"
  )
  markdown = table_mode.markdown_grid(
      title,
      ["run", "perturbation"],
      [f"ρ = {b:g}" for b in budgets],
      {
          key: [f"{row[b]['fid']:.2f}" if b in row else "" for b in budgets]
          for key, row in by_row.items()
      },
  )
  with open(os.path.join(out_dir, "robustness.md"), "w") as f:
    f.write(markdown)
  table_mode.plot_lines(
      {
          f"{label} / {kind}": {b: r["fid"] for b, r in row.items()}
          for (label, kind), row in by_row.items()
      },
      "perturbation budget ρ (per-pixel RMS of δ)",
      os.path.join(out_dir, "fid_vs_budget.png"),
      log_x=False,
  )
