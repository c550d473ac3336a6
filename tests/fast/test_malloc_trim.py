"""After a burst of allocations in a worker thread (a commit's listings, nodes and
shards), the mount's freed heap goes back to the system instead of staying in RssAnon.

Run in a fresh process, so that the figures are that burst's alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

BURST = """
import threading
from fluidfs.sysutil import trim_malloc, tune_malloc

def anon_mib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) // 1024 for l in f if l.startswith("RssAnon"))

tune_malloc()  # as every node does: keeps up to 256 MiB of freed heap per arena

def burst():
    junk = [bytes(2000) + bytes([i % 256]) for i in range(50_000)]  # ~100 MiB
    keep = junk[::97]  # a few survivors in the middle, as a real burst leaves
    junk.clear()
    return keep

kept = []
before = anon_mib()
worker = threading.Thread(target=lambda: kept.append(burst()))
worker.start()
worker.join()
freed = anon_mib()
trim_malloc()
print(before, freed, anon_mib())
"""


def test_a_freed_burst_leaves_rss_once_trimmed() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", BURST], capture_output=True, text=True,
                         env=env, check=True, timeout=60).stdout
    before, freed, trimmed = map(int, out.split())
    assert freed - before >= 50  # the thresholds keep the freed burst resident...
    assert trimmed - before <= 15  # ...until the trim a commit ends with gives it back


def test_the_c_library_opens_without_a_subprocess() -> None:
    """Every node opens libc at its start (tune_malloc). ctypes.util.find_library runs
    ldconfig as a subprocess for it (some 20 ms of each start); glibc's soname needs none.
    Before: find_library's ldconfig was spawned."""
    probe = """
import subprocess
spawned = []
class Watched(subprocess.Popen):
    def __init__(self, args, *rest, **kw):
        spawned.append(args)
        super().__init__(args, *rest, **kw)
subprocess.Popen = Watched
from fluidfs.sysutil import tune_malloc
print(tune_malloc(), spawned)
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            cwd=REPO, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.stdout.split() == ["True", "[]"], result.stdout + result.stderr
