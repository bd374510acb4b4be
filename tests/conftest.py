"""Shared pytest setup: CPU only, the XLA:CPU flags and glibc tunable of main.py
(`modes/xla_cpu_flags.py`, `modes/huge_pages.py`), and a persistent XLA compilation cache.

The cache lets the many small training runs of the suite (in this process and in the
`main.py` subprocesses of `tests/run_utils.py`) compile each distinct program once.
"""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "adv_diffusion_test_jax_cache")
)
# Every program, also those that compile in under JAX's default 1 s: each main.py subprocess
# compiles a few dozen of them (PRNG seeding, initialisers, small sampler and metric pieces).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

from modes import huge_pages, xla_cpu_flags  # noqa: E402

xla_cpu_flags.apply()  # the XLA:CPU flags main.py runs with, before JAX starts
# The glibc tunable main.py re-executes itself with, here for the processes pytest starts: the
# xdist workers (this module is imported first in the controller) and the main.py subprocesses.
huge_pages.add_tunable(os.environ)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory) -> str:
  """Workdir of the tiny digits config trained for 2 steps (one checkpoint, at step 2), shared
  by every module that needs a trained run: read it, or copy it before writing into it.

  Under pytest-xdist the workers share one run: the first to need it trains it (under a file
  lock in the session's common temporary directory), the others wait and read it."""
  import filelock

  from tests import run_utils

  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # <session temp>/popen-gwN -> <session temp>, common to the workers
  workdir = os.path.join(root, "trained_tiny", "run")
  with filelock.FileLock(os.path.join(root, "trained_tiny.lock")):
    if not os.path.exists(os.path.join(workdir, "train_done.json")):
      shutil.rmtree(workdir, ignore_errors=True)  # a run another worker left unfinished
      run_utils.run_main(
          workdir, "--config.train.num_steps=2", "--config.train.async_checkpointing=False"
      )
  return workdir


def pytest_sessionfinish(session, exitstatus):
  """Under CI=true a skipped test fails the run: CI installs every dependency, so a skip there
  means a test that did not run (issue 16)."""
  reporter = session.config.pluginmanager.get_plugin("terminalreporter")
  skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
  if os.environ.get("CI") == "true" and skipped and exitstatus == 0:
    reporter.write_line(f"CI: {skipped} test(s) skipped; every test must run in CI.", red=True)
    session.exitstatus = 1
