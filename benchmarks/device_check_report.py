"""The device check's output: the JSON file's path, its atomic writes and the table printed last."""

import datetime
import json
import math
import os
import re
from typing import Any

import jax


def output_path(out_dir: str, smoke: bool) -> str:
  """<out_dir>/device_check_<UTC date>_<device kind>[_smoke].json."""
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
  kind = re.sub(r"[^a-z0-9]+", "-", jax.devices()[0].device_kind.lower()).strip("-") or "unknown"
  return os.path.join(out_dir, f"device_check_{date}_{kind}{'_smoke' if smoke else ''}.json")


def fmt(value: Any, scale: float = 1.0, digits: int = 1) -> str:
  """`value` × `scale` with `digits` decimals; "-" for a missing or non-finite number."""
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
    return "-"
  return f"{value * scale:.{digits}f}"


def table(stages: dict) -> str:
  """The compact summary printed last: one row per measured program."""
  rows = [("stage", "item", "ms", "img/s", "TFLOP/s", "ratio", "note")]
  for name, stage in stages.items():
    if stage.get("status") in ("skipped", "error") and name != "fid":
      rows.append((name, "-", "", "", "", "", status_note(stage)))
      continue
    if name == "train_step":
      for dtype in ("float32", "bfloat16"):
        r = stage.get(dtype, {})
        rows.append(
            (
                name,
                dtype,
                fmt(r.get("ms_per_step")),
                fmt(r.get("images_per_sec")),
                fmt(r.get("flop_per_s"), 1e-12, 2),
                "",
                status_note(r),
            )
        )
    elif name == "loss_sanity":
      note = f"loss f32 {stage['loss_float32']:.5f} bf16 {stage['loss_bfloat16']:.5f}"
      rows.append((name, "bf16 vs f32", "", "", "", fmt(stage["relative_difference"], 1, 4), note))
    elif name == "sampling":
      for item in ("bare_loop", "ddim", "dpm_solver++"):
        r = stage.get(item, {})
        ratio = fmt(r.get("overhead_vs_bare_loop"), 100, 1)
        rows.append(
            (
                name,
                item,
                fmt(r.get("ms_per_batch")),
                fmt(r.get("samples_per_sec")),
                "",
                ratio + (" %" if ratio != "-" else ""),
                f"{fmt(r.get('ms_per_model_call'), 1, 2)} ms/call",
            )
        )
    elif name == "fid":
      note = stage.get("torch_reference", "") if stage.get("status") == "ok" else status_note(stage)
      rows.append(
          (
              name,
              "inception",
              "",
              fmt(stage.get("flax_images_per_sec")),
              "",
              f"50K: {fmt(stage.get('seconds_for_50k_at_flax_rate'))} s",
              note[:60],
          )
      )
    else:
      base = "none" if name == "at_cost" else "dpm"
      for item, r in stage.items():
        if not isinstance(r, dict):
          continue
        ratio = fmt(r.get(f"per_update_vs_{base}"), 1, 2)
        flops = fmt(r.get(f"flops_per_update_vs_{base}"), 1, 2)
        rows.append(
            (
                name,
                item,
                fmt(r.get("ms_per_update")),
                "",
                "",
                f"{ratio} (FLOPs {flops})",
                status_note(r) or "ms per update",
            )
        )
  widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows)


def status_note(record: dict) -> str:
  """A skipped record's reason or a failed one's error (at most 90 characters); else ""."""
  if record.get("status") == "skipped":
    return f"skipped: {record.get('reason', '')}"[:90]
  if record.get("status") == "error":
    return f"error: {record.get('error', '')}"[:90]
  return ""


def write(path: str, payload: dict) -> None:
  """Writes `payload` atomically (the JSON stays whole if the run is killed mid-stage)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(payload, f, indent=2, default=float)
    f.write("\n")
  os.replace(path + ".tmp", path)


def has_error(record: Any) -> bool:
  """True if `record` or any record nested in it has status "error"."""
  if not isinstance(record, dict):
    return False
  return record.get("status") == "error" or any(has_error(v) for v in record.values())
