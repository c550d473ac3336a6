"""Telling a full disk from other failures.

A full state disk shows up in two ways: ``OSError`` with ``ENOSPC`` (or ``EDQUOT``)
from plain file writes, and ``lmdb.Error("...: Input/output error")`` from an LMDB
commit, because LMDB reports a failed page write as EIO. For the second, the free space
of the state directory's filesystem decides: a commit that fails while less than
``LOW_SPACE`` is free is taken to have run out of room. Either way the caller can free
what it can (the plaintext cache) and answer ``ENOSPC``, which tells the user what to
do, instead of EIO, which suggests broken hardware.

Data writers (dirty blocks, the plaintext cache, local shards) stop ``DATA_RESERVE``
short of a full disk (``DiskReserve``), like ext4's reserved blocks: the last few MiB
stay for metadata transactions, so deleting a file — what a user does to make room —
still gets through on a full disk instead of failing for want of one LMDB page. Writers
run at once (two sealers, FUSE writes, cache inserts): each claims the bytes it may add
before it writes, and a claim is refused unless the free space less every claim still
being written leaves the reserve, so together they cannot eat into it.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb

LOW_SPACE = 32 * 1024 * 1024  # more than one LMDB commit of a sealed block ever needs
DATA_RESERVE = 4 * 1024 * 1024  # free bytes data writers leave for metadata
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer could still use on the filesystem holding *path*."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def is_disk_full(exc: BaseException, path: Path) -> bool:
    """Did *exc* come from the disk holding *path* running out of space?"""
    if isinstance(exc, OSError):
        return exc.errno in FULL_ERRNOS
    if isinstance(exc, lmdb.Error):
        try:
            return free_bytes(path) < LOW_SPACE
        except OSError:
            return False
    return False


class DiskReserve:
    """The metadata reserve of the disk holding *path*, kept by every data writer of
    one node (see the module docstring); thread-safe."""

    def __init__(self, path: Path, reserve: int = DATA_RESERVE) -> None:
        self.path = path
        self.reserve = reserve
        self.claimed = 0  # bytes claimed by writes still running
        self._lock = threading.Lock()

    @contextmanager
    def claim(self, size: int) -> Iterator[None]:
        """Hold *size* bytes (the most the write in the block may add to the disk) while
        the block runs; raise ``OSError(ENOSPC)`` if they would eat into the reserve.
        Blocking but short (one statvfs): a worker thread, or the loop for a small write."""
        with self._lock:
            if free_bytes(self.path) - self.claimed - size < self.reserve:
                raise OSError(
                    errno.ENOSPC, "no space left for data (the last MiB are kept for metadata)"
                )
            self.claimed += size
        try:
            yield
        finally:
            with self._lock:
                self.claimed -= size
