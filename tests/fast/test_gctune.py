"""The collector settings of a node process (fluidfs/node/gctune.py)."""

from __future__ import annotations

import subprocess
import sys

# Run in a child: freezing would keep this test process's objects for good.
CHILD = """
import gc
from fluidfs.node import gctune

def collections(n):
    started = [0]
    def seen(phase, info):
        started[0] += phase == "start"
    gc.callbacks.append(seen)
    kept = [[] for _ in range(n)]  # tracked allocations that stay alive
    gc.callbacks.remove(seen)
    return started[0], kept

before, _ = collections(100_000)
gctune.tune()
after, _ = collections(100_000)
print(before, after, gc.get_freeze_count())
"""


def test_a_node_process_collects_less_often_and_never_scans_start_up() -> None:
    """After ``tune`` (what ``fluidfs mount`` and ``fluidfs serve`` call before the
    node runs), 100,000 tracked allocations start a handful of collections, not one
    per 700 (CPython's default: ~140), and what start-up made is frozen: no collection
    walks it again. Before: no such settings (py-spy put the collector at ~17 % of a
    fresh machine's find on the trio thread, issue 15)."""
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         check=True).stdout.split()
    before, after, frozen = map(int, out)
    assert before >= 100
    assert after <= 10
    assert frozen > 1_000  # modules, classes, functions: none of them garbage
