"""modes.huge_pages: the tunable it adds, what it leaves alone, and that a re-executed process
backs a large malloc block with transparent huge pages where the kernel gives them on request."""

import json
import os
import subprocess
import sys

import pytest

from modes import huge_pages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocates and touches a 64 MiB block with glibc's malloc after `ensure`, and reports the
# process's tunables, arguments and the growth of its anonymous huge pages.
CHILD = """
import ctypes, json, os, sys
from modes import huge_pages
huge_pages.ensure()

def anon_huge_kib():
  with open("/proc/self/smaps_rollup") as f:
    return sum(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:"))

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
before = anon_huge_kib()
block = libc.malloc(64 << 20)
ctypes.memset(block, 1, 64 << 20)
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES"), "args": sys.argv[1:],
                  "huge_kib": anon_huge_kib() - before}))
"""


@pytest.fixture
def modern_host(monkeypatch):
  monkeypatch.setattr(huge_pages, "_glibc_version", lambda: (2, 36))
  monkeypatch.setattr(huge_pages, "_transparent_huge_pages_allowed", lambda: True)


def test_add_tunable_appends_it_once_and_keeps_the_users(modern_host):
  env = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
  huge_pages.add_tunable(env)
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  huge_pages.add_tunable(env)
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  empty = {}
  huge_pages.add_tunable(empty)
  assert empty == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  own = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}  # the user's own value wins
  huge_pages.add_tunable(own)
  assert own == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}


def test_add_tunable_leaves_old_glibc_and_hosts_without_huge_pages_alone(monkeypatch):
  monkeypatch.setattr(huge_pages, "_transparent_huge_pages_allowed", lambda: True)
  for version in [(2, 31), ()]:  # before the tunable; not glibc (musl, macOS)
    monkeypatch.setattr(huge_pages, "_glibc_version", lambda version=version: version)
    env = {}
    huge_pages.add_tunable(env)
    assert env == {}
  monkeypatch.setattr(huge_pages, "_glibc_version", lambda: (2, 36))
  monkeypatch.setattr(huge_pages, "_transparent_huge_pages_allowed", lambda: False)
  env = {}
  huge_pages.add_tunable(env)
  assert env == {}


def _environ_without_tunables() -> dict[str, str]:
  return {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}


def _run_child(tunables: str | None) -> dict:
  env = _environ_without_tunables()
  if tunables is not None:
    env["GLIBC_TUNABLES"] = tunables
  out = subprocess.run(
      [sys.executable, "-c", CHILD, "first", "--second=2"],
      env=env,
      cwd=REPO,
      capture_output=True,
      text=True,
      check=True,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_ensure_reexecutes_with_the_tunable_and_huge_pages_back_large_blocks():
  child = _run_child(None)
  assert child["args"] == ["first", "--second=2"]  # the same arguments after the re-exec
  if not huge_pages.applicable(
      _environ_without_tunables()
  ):  # old glibc or no transparent huge pages: no re-exec
    assert child["tunables"] is None
    return
  assert child["tunables"] == "glibc.malloc.hugetlb=1"
  # A 64 MiB block holds at least 30 whole, aligned 2 MiB pages.
  assert child["huge_kib"] >= 30 * 2048
  declined = _run_child("glibc.malloc.hugetlb=0")  # the user's own value: no re-exec
  assert declined["tunables"] == "glibc.malloc.hugetlb=0"
  with open(huge_pages.THP_SETTING) as f:
    on_request_only = "[madvise]" in f.read()
  if on_request_only:  # without the tunable nobody asks for huge pages
    assert declined["huge_kib"] == 0
