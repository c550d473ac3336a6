"""Keeping an LMDB file near the size of what it holds: usage figures and compaction.

LMDB never gives file space back: pages freed by a write go to its free list and are
reused only once no reader older than the write is left, and the file keeps its
high-water mark for good. A long read transaction (the old commit held one across
every await) or a burst of churn leaves a file several times its live tables.

``usage`` measures the file against the pages every table's B-tree uses (cheap: one
``stat`` per table). ``compact`` rewrites the environment with
``env.copy(compact=True)`` (live pages only, free list dropped) into a sibling
directory, fsyncs it and renames its ``data.mdb`` over the old one, which is atomic:
a crash leaves either file whole, and a leftover copy is removed next time. It runs
only while this process holds the environment and runs no transaction: when a node
closes its metadata store (unmount) and before it opens it (mount), when the file
passes ``COMPACT_RATIO`` times its live tables and wastes at least ``COMPACT_MIN_BYTES``.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import lmdb

log = logging.getLogger(__name__)

COMPACT_RATIO = 2.0  # file / live tables above which a compaction is due
COMPACT_MIN_BYTES = 8 << 20  # and at least this much of the file is free pages
_COPY = "compact.tmp"


@dataclass(frozen=True)
class StoreUsage:
    """An environment's file size and the bytes its tables' pages take."""

    file_bytes: int
    live_bytes: int

    @property
    def due(self) -> bool:
        """True when compaction would give back enough to be worth it."""
        waste = self.file_bytes - self.live_bytes
        return waste >= COMPACT_MIN_BYTES and self.file_bytes > COMPACT_RATIO * self.live_bytes


def _pages(st: dict) -> int:
    return st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]


def usage(env: lmdb.Environment, path: Path) -> StoreUsage:
    """The file size of *env* (at *path*) against its tables' pages (blocking: small)."""
    psize = env.stat()["psize"]
    pages = _pages(env.stat()) + 2  # the main table and the two meta pages
    with env.begin() as txn:
        names = [bytes(k) for k in txn.cursor().iternext(values=False)]
        for name in names:
            pages += _pages(txn.stat(env.open_db(name, txn=txn, create=False)))
    try:
        size = (path / "data.mdb").stat().st_size
    except OSError:
        size = 0
    return StoreUsage(size, pages * psize)


def compact(env: lmdb.Environment, path: Path) -> Path:
    """Write a compact copy of *env* beside *path*; return the copy's data file.

    The caller closes *env* and then calls ``swap``. No transaction of this process may be
    open (a reader's pages would be copied as they are, but a writer's would be lost)."""
    tmp = path / _COPY
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    env.copy(str(tmp), compact=True)
    copied = tmp / "data.mdb"
    with open(copied, "rb") as f:
        os.fsync(f.fileno())
    return copied


def swap(copied: Path, path: Path) -> None:
    """Put the compact copy in place of *path*'s data file (atomic rename), and tidy up."""
    os.replace(copied, path / "data.mdb")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    shutil.rmtree(path / _COPY, ignore_errors=True)


def compact_closed(path: Path, max_dbs: int) -> StoreUsage | None:
    """Before opening: compact the environment at *path* if it is due; the usage before,
    or None if nothing was done (no file, or not due)."""
    shutil.rmtree(path / _COPY, ignore_errors=True)
    if not (path / "data.mdb").exists():
        return None
    env = lmdb.open(str(path), max_dbs=max_dbs, readonly=False, map_size=1 << 40)
    try:
        before = usage(env, path)
        if not before.due:
            return None
        copied = compact(env, path)
    finally:
        env.close()
    swap(copied, path)
    log.info(
        "compacted %s: %.1f MiB → about %.1f MiB",
        path, before.file_bytes / 2**20, before.live_bytes / 2**20,
    )
    return before
