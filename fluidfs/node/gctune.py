"""The cyclic garbage collector's settings for a process that is a node for life.

CPython collects its youngest generation every 700 net allocations of tracked objects
(tuples, lists, dicts, closures, coroutine frames: a fresh machine's walk makes
several for every entry it restores, every shard it asks for and every FUSE reply),
and every 10th of those collects the middle one, every 10th of those everything. The
full collections walk every tracked object the process holds: the modules, classes,
schemas and tables a node builds at start-up among them, none of which is ever
garbage. py-spy of a mount during a fresh machine's ``find`` put the collector at
~17 % of the trio thread's busy time (issue 15).

``tune`` is called once, after start-up and before the node runs: it moves everything
that exists then into the permanent generation (``gc.freeze``: never scanned again)
and collects the young generation every YOUNG_THRESHOLD allocations instead of 700.
Reference counting still frees everything that is not in a cycle at once; cycles
(closures that name each other, tasks and their frames) wait a little longer: at most
about YOUNG_THRESHOLD x OLDER_THRESHOLD objects more than with the defaults (a few MiB).

Only the command-line entry points call it (``fluidfs mount`` and ``fluidfs serve``):
a process that starts many nodes (the tests) would keep what it froze forever.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000  # tracked allocations between young collections (CPython: 700)
OLDER_THRESHOLD = 10  # young collections per middle one, middle ones per full (as CPython)


def tune() -> None:
    """Freeze what start-up made and space out young collections (see the module)."""
    gc.collect()  # start-up's own garbage is not kept frozen
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, OLDER_THRESHOLD, OLDER_THRESHOLD)
