"""Transparent huge pages for XLA:CPU's large per-run buffers (glibc's `glibc.malloc.hugetlb=1`).

XLA:CPU allocates a program's temporary buffer when a run of the program starts and frees it when
the run ends. For the CIFAR-10 train step that buffer holds every activation of the backward pass,
gigabytes, and glibc serves a block that large with a fresh mmap each time: the kernel then faults
it in and zeroes it 4 KiB at a time, on every step. With the tunable, glibc asks the kernel for
transparent huge pages on such maps (madvise), which fault in 2 MiB at a time. glibc reads its
tunables once, when the process starts, so `ensure` re-executes the process with the tunable
added. The figures are in BENCHMARKS.md ("Huge pages for XLA:CPU's buffers").
"""

import os
import platform
import sys
from typing import Mapping, MutableMapping

TUNABLE = "glibc.malloc.hugetlb"
# The first glibc release with the tunable; older ones ignore it.
GLIBC_SINCE = (2, 35)
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> tuple[int, ...]:
  library, version = platform.libc_ver()
  if library != "glibc" or not version:
    return ()
  return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


def _transparent_huge_pages_allowed() -> bool:
  """False where the kernel has no transparent huge pages or they are off ("[never]")."""
  try:
    with open(THP_SETTING) as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def applicable(environ: Mapping[str, str] = os.environ) -> bool:
  """True on a glibc ≥ 2.35 host with transparent huge pages whose GLIBC_TUNABLES does not name
  the tunable yet (a user's own value, also `=0`, wins)."""
  if TUNABLE in environ.get("GLIBC_TUNABLES", ""):
    return False
  return _glibc_version() >= GLIBC_SINCE and _transparent_huge_pages_allowed()


def add_tunable(environ: MutableMapping[str, str]) -> None:
  """Appends `TUNABLE=1` to GLIBC_TUNABLES in `environ` (for processes started from it) where
  `applicable`."""
  if applicable(environ):
    current = environ.get("GLIBC_TUNABLES", "")
    environ["GLIBC_TUNABLES"] = ":".join(filter(None, (current, f"{TUNABLE}=1")))


def ensure() -> None:
  """Re-executes this process (same interpreter and arguments) with the tunable where
  `applicable`; returns at once where it is set or does not apply. Call it first thing in an
  entry point, never on import."""
  environ = dict(os.environ)
  add_tunable(environ)
  if environ != os.environ:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environ)
