"""Records this node keeps for the peers it serves: their root pointer and writer lease.

On-disk format, version 1: one file per owner and kind,
``<state>/records/<owner public key, hex>.<kind>``, holding the record's envelope
exactly as received (see peers/rootrecord.py). Each write goes to a temporary file
that is synced and renamed into place, so a crash leaves the old or the new record,
never a torn one. Records are small (at most 64 KiB) and change at most every few
seconds per owner. There is at most one record per owner and kind; the service keeps
them only for owners with a live agreement, and they are deleted with the agreement
(peers/lifecycle.py), so the directory holds at most two files per agreement. Given the
node's ``DiskReserve``, a record is kept only if the disk still has ``PEER_RESERVE``
free after it (diskspace.py): else ``OSError(ENOSPC)``, which the service answers with
``over_quota``.

All methods do blocking file I/O: call them from worker threads.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fluidfs.diskspace import PEER_RESERVE, DiskReserve

KINDS = ("root", "lease")
RECORD_OVERHEAD = 2 * 4096  # disk a record's file may take beyond its bytes


@dataclass
class RecordStore:
    """Owners' records, one file each, in the directory *root*."""

    root: Path
    # Serialises compare-and-replace: two PutRecords of one owner handled by two worker
    # threads must not both read the old seq and then race their writes.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    # The state disk's (None: unchecked); peers' records leave it PEER_RESERVE free.
    reserve: DiskReserve | None = field(default=None, repr=False, compare=False)

    def path(self, owner: bytes, kind: str) -> Path:
        """Where the record of *owner* of *kind* lives."""
        if kind not in KINDS or len(owner) != 32:
            raise ValueError("bad record key")
        return self.root / f"{owner.hex()}.{kind}"

    def get(self, owner: bytes, kind: str) -> bytes | None:
        """The stored record, or None."""
        try:
            return self.path(owner, kind).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, owner: bytes) -> int:
        """Forget every record of *owner*; return how many there were."""
        gone = 0
        for kind in KINDS:
            with contextlib.suppress(FileNotFoundError):
                self.path(owner, kind).unlink()
                gone += 1
        return gone

    def owners(self) -> set[bytes]:
        """Every owner with a record here."""
        found: set[bytes] = set()
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return found
        for name in names:
            stem, _, kind = name.partition(".")
            try:
                owner = bytes.fromhex(stem)
            except ValueError:
                continue
            if kind in KINDS and len(owner) == 32:
                found.add(owner)
        return found

    def put_if_newer(
        self,
        owner: bytes,
        kind: str,
        raw: bytes,
        seq: int,
        read_held: Callable[[bytes], tuple[int, int]],
        *,
        fence: int = 0,
        expect: int | None = None,
    ) -> tuple[bool, int]:
        """Store *raw* (at *seq*, written under *fence*) unless a rule below refuses it.

        *read_held* reads a held record's (seq, fence) ((-1, 0) for an unreadable one,
        which is replaced). Refused: a *fence* below the highest fence of any record held
        for *owner* (its writer was replaced); with *expect* (compare-and-swap), a held
        record of this kind whose seq is not *expect* (0: none held) or a *seq* not above
        *expect*; otherwise a held record that is newer or differs at that seq. The read
        and the write happen under one lock, so of two concurrent puts the rules hold
        between them. Returns (stored, seq now held; -1 for none). Raises
        ``OSError(ENOSPC)`` if the record would eat into the disk's reserve.
        """
        with self._lock:
            held: dict[str, tuple[int, int]] = {}
            for k in KINDS:
                held_raw = self.get(owner, k)
                if held_raw is not None:
                    held[k] = read_held(held_raw)
            same = held.get(kind)
            now = same[0] if same is not None else -1
            if fence < max((f for _, f in held.values()), default=0):
                return False, now
            if expect is not None:
                if now != (expect if expect else -1) or seq <= expect:
                    return False, now
            elif same is not None:
                held_raw = self.get(owner, kind)
                if now > seq or (now == seq and held_raw != raw):
                    return False, now
            if self.reserve is None:
                self.put(owner, kind, raw)
            else:
                with self.reserve.claim(len(raw) + RECORD_OVERHEAD, keep=PEER_RESERVE):
                    self.put(owner, kind, raw)
            return True, seq

    def put(self, owner: bytes, kind: str, raw: bytes) -> None:
        """Replace the stored record, durably."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = self.path(owner, kind)
        # A name of its own per write: concurrent writers never share a temporary file.
        tmp = target.with_name(f"{target.name}.{os.getpid()}.{os.urandom(6).hex()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
