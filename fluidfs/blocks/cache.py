"""The local plaintext cache: whole blocks as files, bounded, least recently used out.

Layout: ``<state>/cache/<first byte hex>/<block id hex>``. A block is evicted
only when the ``can_evict`` callback says its shards are safely stored.
Bookkeeping methods run on the trio loop; file I/O helpers (``*_io``) are plain
blocking functions meant for worker threads.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path


class BlockCache:
    """LRU set of plaintext blocks on local disk."""

    def __init__(self, root: Path, capacity: int, can_evict: Callable[[bytes], bool]) -> None:
        self.root = root
        self.capacity = capacity
        self.can_evict = can_evict
        self._entries: OrderedDict[bytes, int] = OrderedDict()
        self.used = 0
        root.mkdir(parents=True, exist_ok=True)

    def path(self, block_id: bytes) -> Path:
        """Where the block's plaintext lives when cached."""
        name = block_id.hex()
        return self.root / name[:2] / name

    def scan_io(self) -> list[tuple[bytes, int]]:
        """List cached blocks, oldest first (blocking; at startup)."""
        found: list[tuple[float, bytes, int]] = []
        for sub in self.root.iterdir():
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub):
                if entry.name.endswith(".tmp"):  # an insert cut short by a crash
                    os.unlink(entry.path)
                    continue
                try:
                    block_id = bytes.fromhex(entry.name)
                    st = entry.stat()
                except (ValueError, OSError):
                    continue
                found.append((st.st_mtime, block_id, st.st_size))
        found.sort()
        return [(bid, size) for _, bid, size in found]

    def load(self, entries: list[tuple[bytes, int]]) -> None:
        """Adopt the result of scan_io()."""
        for block_id, size in entries:
            self.note(block_id, size)

    def __contains__(self, block_id: bytes) -> bool:
        return block_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def note(self, block_id: bytes, size: int) -> None:
        """Record that the block's file now exists, as most recently used."""
        old = self._entries.pop(block_id, None)
        if old is not None:
            self.used -= old
        self._entries[block_id] = size
        self.used += size

    def touch(self, block_id: bytes) -> None:
        """Mark the block as just used."""
        if block_id in self._entries:
            self._entries.move_to_end(block_id)

    def forget(self, block_id: bytes) -> bool:
        """Drop the bookkeeping of a block (caller removes the file); True if it was cached."""
        size = self._entries.pop(block_id, None)
        if size is None:
            return False
        self.used -= size
        return True

    def victims(self, capacity: int | None = None) -> list[bytes]:
        """Blocks to evict, oldest first, to get back under *capacity* (default: the
        cache's own; 0 when the disk is full). Their bookkeeping is dropped."""
        limit = self.capacity if capacity is None else capacity
        chosen: list[bytes] = []
        if self.used <= limit:
            return chosen
        for block_id in list(self._entries):
            if self.used <= limit:
                break
            if self.can_evict(block_id):
                self.forget(block_id)
                chosen.append(block_id)
        return chosen

    # --- blocking helpers for worker threads -------------------------------------------

    def adopt_io(self, block_id: bytes, source: Path) -> None:
        """Move a finished file into the cache as the block's plaintext."""
        target = self.path(block_id)
        target.parent.mkdir(exist_ok=True)
        os.replace(source, target)

    def insert_io(self, block_id: bytes, data: bytes, durable: bool = False) -> None:
        """Write the block's plaintext into the cache (atomically; *durable*: synced to
        disk before this returns, for a copy that is about to be the only one)."""
        target = self.path(block_id)
        target.parent.mkdir(exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)  # a full disk must not keep the half-written copy
            raise
        if durable:
            fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def sync_io(self, block_ids: list[bytes]) -> int:
        """Make the cached files of *block_ids* durable: each file's data
        (``fdatasync``), then each directory holding one, for its name (a file moved in
        by ``adopt_io`` or renamed by ``insert_io``). A file gone meanwhile (evicted:
        its shards were placed) is skipped. Returns how many files were synced."""
        synced = 0
        folders: set[Path] = set()
        for block_id in block_ids:
            path = self.path(block_id)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
            synced += 1
            folders.add(path.parent)
        for folder in sorted(folders):
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return synced

    def read_io(self, block_id: bytes, offset: int, size: int) -> bytes | None:
        """Read part of a cached block; None if the file is gone (evicted meanwhile)."""
        try:
            fd = os.open(self.path(block_id), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    def remove_io(self, block_ids: list[bytes]) -> None:
        """Delete cached files."""
        for block_id in block_ids:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(block_id))
