"""Orchestration: one module per --mode, and the infrastructure only the modes use.

Everything here reads a ConfigDict, touches the workdir or drives a loop; the library packages
below (`evaluation` ← `adv_diffusion` ← `sampling`) do none of that.
"""

import importlib
from typing import Callable

# --mode → "module:function"; every function is run(config, workdir) -> path of its main output
# (or None when a preempted run saved and stopped). Modules are imported on use: the evaluation
# modes pull in the Inception network.
MODES = {
    "train": "modes.train:run",
    "story": "modes.story:run",
    "study": "modes.study:run",
    "sample": "modes.sample:run",
    "fid_stats": "modes.evaluate:run_fid_stats",
    "eval": "modes.evaluate:run_eval",
    "table": "modes.table:run",
    "robustness": "modes.robustness:run",
    "import_torch": "modes.torch_io:run_import",
    "export_torch": "modes.torch_io:run_export",
    "export_weights": "modes.weights_file:run_export",
}


def runner(mode: str) -> Callable:
  """The run(config, workdir) function of `mode`."""
  module, function = MODES[mode].split(":")
  return getattr(importlib.import_module(module), function)
