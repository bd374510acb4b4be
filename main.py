"""Entry point: python main.py --config=configs/<name>.py --workdir=DIR [--mode=MODE].

Any config key can be overridden, e.g. --config.train.batch_size=32.
"""

import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a configs/<name>.py file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "fid_stats", "eval"],
                 "What to run: train; sample (config.sampling from the workdir's checkpoint); "
                 "fid_stats (reference statistics of config.data); eval (FID of a sample set).")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-sentence errors for bad flags and unknown config keys."""
  try:
    return FLAGS(argv)
  except flags.Error as exc:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    print(f"Error: {' '.join(lines[:1] + lines[-1:]) if len(lines) > 1 else lines[0]}",
          file=sys.stderr)
  except (AttributeError, KeyError) as exc:
    found = re.search(r"'([A-Za-z0-9_]+)", str(exc))
    missing = found.group(1) if found else str(exc)
    culprit = next((a.split("=")[0] for a in argv
                    if a.startswith("--config.") and f".{missing}" in a.split("=")[0]),
                   f"--config...{missing}")
    print(f"Error: {culprit} names a config key that does not exist ({missing!r}); every key "
          "is listed with a comment in configs/default.py.", file=sys.stderr)
  sys.exit(1)


def _quiet_library_logs(record) -> bool:
  """Drops orbax's per-save INFO chatter; keeps its warnings and everything else."""
  return record.levelno >= 30 or "orbax" not in record.pathname  # 30 = std WARNING


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.get_absl_logger().addFilter(_quiet_library_logs)
  import jax

  from adv_diffusion import train
  from adv_diffusion.errors import UserFacingError
  from evaluation.errors import EvaluationError

  try:
    config = FLAGS.config
    config.keys()
  except OSError as exc:
    reason = [line.strip() for line in str(exc).splitlines() if line.strip()][-1]
    print(f"Error: the --config file could not be loaded ({reason}); pass a file such as "
          "configs/digits_adm.py.", file=sys.stderr)
    sys.exit(1)
  logging.info("JAX %s, process %d/%d, devices: %s", jax.__version__, jax.process_index(),
               jax.process_count(), jax.devices())
  try:
    if FLAGS.mode == "train":
      train.train_and_evaluate(config, FLAGS.workdir)
    elif FLAGS.mode == "sample":
      from sampling import generate
      generate.generate_from_config(config, FLAGS.workdir)
    elif FLAGS.mode in ("fid_stats", "eval"):
      from adv_diffusion import eval_modes
      run = eval_modes.fid_stats if FLAGS.mode == "fid_stats" else eval_modes.evaluate_samples
      run(config, FLAGS.workdir)
  except (UserFacingError, EvaluationError) as exc:
    print(f"Error: {exc}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
