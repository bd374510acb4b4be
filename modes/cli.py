"""The command line: python main.py (or adv-diffusion) --config=configs/<name>.py --workdir=DIR
[--mode=MODE].

Any config key can be overridden, e.g. --config.train.batch_size=32.
"""

import os
import re
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from modes import huge_pages, xla_cpu_flags  # noqa: E402

xla_cpu_flags.apply()  # before JAX starts: XLA reads XLA_FLAGS once

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from modes import MODES, runner  # noqa: E402

FLAGS = flags.FLAGS
COMPILATION_CACHE = "~/.cache/adv_diffusion/xla"
config_flags.DEFINE_config_file(
    "config", None, "Path to a configs/<name>.py file.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_enum(
    "mode",
    None,
    list(MODES),
    "What to run (default: config.mode): train; story (clean run → AT fine-tune and "
    "an equal-budget clean control → table, config.story); study (the story over "
    "config.study.seeds, with robustness); sample (config.sampling "
    "from the workdir's checkpoint); fid_stats (reference statistics of "
    "config.data); eval (FID of a sample set); table (config.table's grid of runs × "
    "samplers × NFE); robustness (FID against the budget of trajectory "
    "perturbations, config.robustness); import_torch / export_torch "
    "(guided-diffusion .pt files <-> the workdir, config.torch_io).",
)
flags.DEFINE_string(
    "coordinator_address",
    None,
    "Multi-host: host:port of process 0's coordinator (or JAX_COORDINATOR_ADDRESS).",
)
flags.DEFINE_integer(
    "num_processes", None, "Multi-host: number of processes (or JAX_NUM_PROCESSES)."
)
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index (or JAX_PROCESS_ID).")
flags.DEFINE_bool(
    "multihost",
    False,
    "Multi-host with the cluster detected by JAX (TPU pods, "
    "SLURM, Open MPI, Kubernetes) when no coordinator is given.",
)
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-sentence errors for bad flags and unknown config keys."""
  try:
    return FLAGS(argv)
  except Exception as exc:  # noqa: BLE001 - anything the --config file itself raised
    message = _config_file_error(exc, argv)
    if message is None:
      _print_flag_error(exc, argv)
    else:
      print(f"Error: {message}", file=sys.stderr)
  sys.exit(1)


def _config_file_error(exc: BaseException, argv: list[str]) -> str | None:
  """One sentence when `exc` came from running the --config file, else None."""
  given = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
  if not given:
    return None
  path = os.path.abspath(given.split(":")[0])  # config_flags passes "FILE.py:ARG" on as ARG
  if isinstance(exc, SyntaxError) and exc.filename and os.path.abspath(exc.filename) == path:
    line = exc.lineno
  else:
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__) if os.path.abspath(f.filename) == path
    ]
    if not frames:
      return None
    line = frames[-1].lineno
  text = exc.msg if isinstance(exc, SyntaxError) else str(exc)
  detail = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
  return (
      f"the --config file {given} raised {type(exc).__name__} at line {line}"
      f"{f' ({detail})' if detail else ''}; fix that file (configs/default.py lists every key)."
  )


def _print_flag_error(exc: BaseException, argv: list[str]) -> None:
  """One sentence for a bad flag or an unknown config key; other errors propagate."""
  try:
    raise exc
  except flags.Error as exc:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    print(
        f"Error: {' '.join(lines[:1] + lines[-1:]) if len(lines) > 1 else lines[0]}",
        file=sys.stderr,
    )
  except (AttributeError, KeyError) as exc:
    found = re.search(r"'([A-Za-z0-9_]+)", str(exc))
    missing = found.group(1) if found else str(exc)
    culprit = next(
        (
            a.split("=")[0]
            for a in argv
            if a.startswith("--config.") and f".{missing}" in a.split("=")[0]
        ),
        f"--config...{missing}",
    )
    print(
        f"Error: {culprit} names a config key that does not exist ({missing!r}); every key "
        "is listed with a comment in configs/default.py.",
        file=sys.stderr,
    )


def _quiet_library_logs(record) -> bool:
  """Drops orbax's per-save INFO chatter; keeps its warnings and everything else."""
  return record.levelno >= 30 or "orbax" not in record.pathname  # 30 = std WARNING


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.get_absl_logger().addFilter(_quiet_library_logs)
  from modes import distributed
  from modes.errors import UserFacingError

  try:
    distributed.initialize(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, auto=FLAGS.multihost
    )
  except UserFacingError as exc:
    print(f"Error: {exc}", file=sys.stderr)
    sys.exit(1)
  import jax

  # Reuse compiled programs across runs and stages (a CPU compile of a train step takes a
  # minute); JAX_COMPILATION_CACHE_DIR, when set, wins.
  if jax.process_count() > 1:
    # A program one process loads from the cache while its peer compiles it times out the
    # peers' collective set-up (Gloo's 30 s key exchange on CPU): multi-process runs compile.
    jax.config.update("jax_enable_compilation_cache", False)
  elif not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(COMPILATION_CACHE))
  from evaluation.errors import EvaluationError

  try:
    config = FLAGS.config
    config.keys()
  except OSError as exc:
    reason = [line.strip() for line in str(exc).splitlines() if line.strip()][-1]
    print(
        f"Error: the --config file could not be loaded ({reason}); pass a file such as "
        "configs/digits_adm.py.",
        file=sys.stderr,
    )
    sys.exit(1)
  logging.info(
      "JAX %s, process %d/%d, devices: %s",
      jax.__version__,
      jax.process_index(),
      jax.process_count(),
      jax.devices(),
  )
  mode = FLAGS.mode or config.get("mode", "train")
  if mode not in MODES:
    print(
        f"Error: config.mode = {mode!r} is not a mode; use one of {', '.join(MODES)}.",
        file=sys.stderr,
    )
    sys.exit(1)
  try:
    output = runner(mode)(config, FLAGS.workdir)
    if output:
      print(f"{mode}: {output}")
    distributed.shutdown()
  except (UserFacingError, EvaluationError) as exc:
    print(f"Error: {exc}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # The code that raised has closed its checkpointers and writers. Skipping interpreter
    # shutdown keeps the message last: after a failed checkpoint read, TensorStore's leftover
    # futures are otherwise reported with tracebacks when they are garbage-collected.
    os._exit(1)


def run() -> None:
  """Parses the flags and runs the mode (the console script `adv-diffusion` and main.py)."""
  huge_pages.ensure()
  app.run(main, flags_parser=parse_flags)
