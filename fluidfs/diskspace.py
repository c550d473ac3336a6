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

Peers' shards and records claim from the same reserve but leave ``PEER_RESERVE`` free
(``LOW_SPACE``): what partners store can never push our own metadata into committing
one request at a time, nor take the room our own data writers still have. A store
that would eat into it is refused (``over_quota`` on the wire, docs/protocol.md).

Room is the free space of the filesystem, or less where a process file-size limit
(RLIMIT_FSIZE) stops the file that grows sooner (``room``): LMDB's data file grows
page by page, and past that limit its commit fails as on a full disk.
"""

from __future__ import annotations

import errno
import os
import resource
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb

LOW_SPACE = 32 * 1024 * 1024  # more than one LMDB commit of a sealed block ever needs
DATA_RESERVE = 4 * 1024 * 1024  # free bytes data writers leave for metadata
PEER_RESERVE = LOW_SPACE  # free bytes peers' stores leave for all of our own writes
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer could still use on the filesystem holding *path*."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def room(path: Path, grows: Path | None = None) -> int:
    """Bytes that may still be written on the filesystem holding *path*: its free
    space, or less if this process's file-size limit (RLIMIT_FSIZE) stops the file
    *grows* sooner. Blocking but short (a statvfs, and a stat with *grows*)."""
    free = free_bytes(path)
    if grows is not None:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            try:
                size = os.stat(grows).st_size
            except FileNotFoundError:
                size = 0
            free = min(free, limit - size)
    return free


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
    def claim(self, size: int, keep: int | None = None) -> Iterator[None]:
        """Hold *size* bytes (the most the write in the block may add to the disk) while
        the block runs; raise ``OSError(ENOSPC)`` if they would leave less than *keep*
        bytes free (default: the reserve). Blocking but short (one statvfs): a worker
        thread, or the loop for a small write."""
        keep = self.reserve if keep is None else keep
        with self._lock:
            if free_bytes(self.path) - self.claimed - size < keep:
                raise OSError(
                    errno.ENOSPC, "no space left for data (the last MiB are kept for metadata)"
                )
            self.claimed += size
        try:
            yield
        finally:
            with self._lock:
                self.claimed -= size

    def room_for(self, grows: Path | None = None) -> int:
        """``room`` on the reserve's disk (for the file *grows*) less what the writes
        running now claimed. Blocking but short."""
        with self._lock:
            return room(self.path, grows) - self.claimed

    @contextmanager
    def claim_upto(self, wanted: int, keep: int, grows: Path | None = None) -> Iterator[int]:
        """Hold as much of *wanted* bytes as leaves *keep* bytes of ``room`` (for the
        file *grows*) beyond every other claim, while the block runs; yield the bytes
        held (0 when there is no room). For a write that stores what fits and refuses
        the rest (peers' shards)."""
        with self._lock:
            granted = max(0, min(wanted, room(self.path, grows) - self.claimed - keep))
            self.claimed += granted
        try:
            yield granted
        finally:
            with self._lock:
                self.claimed -= granted
