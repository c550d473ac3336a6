"""Hosted shards: the bytes this node keeps, for itself and for peers.

On-disk format, version 1, in ``shards.lmdb``:

- table ``shards``: key ``owner(32) || shard_id(32)`` → the shard bytes.
- table ``usage``:  key ``owner(32)`` → ``u64 big-endian`` bytes held for that owner.
- table ``unclaimed``: key ``owner(32) || shard_id(32)`` → empty: a shard kept from an
  ended agreement when a new one with the same owner began. Storing, retrieving or
  auditing it (the owner re-claims it) or deleting it removes the mark; what is still
  marked when the old agreement's keep period ends is dropped (marked in
  service/agreements.py, dropped in peers/lifecycle.py).

All methods do blocking LMDB I/O: call them from worker threads. ``release_pages``
gives back the mapped pages that shard traffic left in this process's RSS; it costs
nothing when no shard was touched since the last call. Sizes and presence are
read through buffer transactions (``buffers=True``): ``len()`` of a value found that way
is the size LMDB keeps beside it, so no shard is copied (or paged in) just to be measured.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

from fluidfs.store.db import Database
from fluidfs.sysutil import MappedFile

_U64 = struct.Struct(">Q")
SHARD_OVERHEAD = 2 * 4096  # disk a stored shard may take beyond its bytes (LMDB pages)


class ShardStore:
    """Shards keyed by (owner, shard id), with per-owner byte accounting."""

    def __init__(self, path: Path) -> None:
        # Shards are read whole and sequentially: kernel read-ahead makes cold reads
        # ~15x faster here (measured 70 vs 1,150 MB/s).
        self.path = path
        self.data_file = path / "data.mdb"  # the file that grows as shards are stored
        self.db = Database(path, ["shards", "usage", "unclaimed"], readahead=True)
        self._shards = self.db["shards"]
        self._unclaimed = self.db["unclaimed"]
        self._mapped = MappedFile(str(self.data_file))
        self._touched = True  # shard pages may be mapped since the last release_pages
        self._usage = self.db["usage"]

    def _write(self):
        self._touched = True
        return self.db.env.begin(write=True, buffers=True)

    def _read(self):
        self._touched = True
        return self.db.read()

    def put_many(self, owner: bytes, shards: Iterable[tuple[bytes, bytes]]) -> int:
        """Store shards for *owner* in one transaction; return the bytes newly added."""
        added = 0
        with self._write() as txn:
            for shard_id, data in shards:
                key = owner + shard_id
                old = txn.get(key, db=self._shards)
                if old is not None:
                    added -= len(old)
                txn.put(key, data, db=self._shards)
                txn.delete(key, db=self._unclaimed)
                added += len(data)
            self._add_usage(txn, owner, added)
        return added

    def put_within(
        self,
        owner: bytes,
        shards: Iterable[tuple[bytes, bytes]],
        *,
        quota: int,
        pool: int,
        outside_pool: bytes | None = None,
        disk: int | None = None,
    ) -> list[bytes]:
        """Store shards for *owner* as long as they fit; return the ids that did not.

        A shard fits if afterwards *owner* holds at most *quota* bytes and all owners
        together (except *outside_pool*) at most *pool*, and, given *disk*, the new
        shards take at most *disk* bytes of the disk (each its bytes and
        SHARD_OVERHEAD). The check and the write are one write transaction, so
        concurrent callers can never overshoot either limit.
        """
        over: list[bytes] = []
        added = 0
        taken = 0  # of *disk*
        with self._write() as txn:
            used = self._usage_of(txn, owner)
            pooled = sum(
                _U64.unpack(v)[0]
                for k, v in txn.cursor(db=self._usage)
                if bytes(k) != outside_pool
            )
            for shard_id, data in shards:
                key = owner + shard_id
                old = txn.get(key, db=self._shards)
                delta = len(data) - (len(old) if old is not None else 0)
                grows = len(data) + SHARD_OVERHEAD if old is None else max(0, delta)
                if delta > 0 and (used + delta > quota or pooled + delta > pool):
                    over.append(shard_id)
                    continue
                if disk is not None and grows and taken + grows > disk:
                    over.append(shard_id)
                    continue
                taken += grows
                txn.put(key, data, db=self._shards)
                txn.delete(key, db=self._unclaimed)
                used += delta
                pooled += delta
                added += delta
            self._add_usage(txn, owner, added)
        return over

    def get(self, owner: bytes, shard_id: bytes) -> bytes | None:
        """The shard's bytes, or None if not held."""
        with self._read() as txn:
            return txn.get(owner + shard_id, db=self._shards)

    def get_many(
        self, owner: bytes, shard_ids: Iterable[bytes], max_size: int, max_total: int
    ) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
        """Several of *owner*'s shards in one read transaction: (the held ones as
        (id, bytes), in order, each id once; the ids not held). A shard larger than
        *max_size*, and every shard once *max_total* bytes are taken, is in neither list
        (the caller asks for it again). Each shard is copied out of the map once."""
        found: list[tuple[bytes, bytes]] = []
        missing: list[bytes] = []
        total = 0
        with self._read() as txn:
            for shard_id in dict.fromkeys(shard_ids):
                data = txn.get(owner + shard_id, db=self._shards)
                if data is None:
                    missing.append(shard_id)
                elif len(data) <= max_size and total + len(data) <= max_total:
                    found.append((shard_id, bytes(data)))
                    total += len(data)
        return found, missing

    def claim_many(self, owner: bytes, shard_ids: Iterable[bytes]) -> None:
        """The owner uses these shards again: none of them is unclaimed any more."""
        with self._write() as txn:
            for shard_id in shard_ids:
                txn.delete(owner + shard_id, db=self._unclaimed)

    def delete_many(self, owner: bytes, shard_ids: Iterable[bytes]) -> int:
        """Delete shards of *owner*; return the bytes freed."""
        return self.delete_counted(owner, shard_ids)[1]

    def delete_counted(self, owner: bytes, shard_ids: Iterable[bytes]) -> tuple[int, int]:
        """Delete shards of *owner*; return (distinct shards deleted, bytes freed).

        An id listed twice counts once; no shard is read.
        """
        count = freed = 0
        with self._write() as txn:
            for shard_id in dict.fromkeys(shard_ids):
                key = owner + shard_id
                old = txn.get(key, db=self._shards)
                if old is not None:
                    count += 1
                    freed += len(old)
                    txn.delete(key, db=self._shards)
                    txn.delete(key, db=self._unclaimed)
            self._add_usage(txn, owner, -freed)
        return count, freed

    def release_pages(self) -> int:
        """Drop this process's mapped pages of the shard file (they stay in page cache),
        if shards were read or written since the last call; return the bytes covered."""
        if not self._touched:
            return 0
        self._touched = False  # before: traffic from now on is released next time
        return self._mapped.release()

    def used(self, owner: bytes) -> int:
        """Bytes held for *owner*."""
        with self.db.read() as txn:
            return self._usage_of(txn, owner)

    def owners(self) -> dict[bytes, int]:
        """Every owner with shards here, and the bytes held for each."""
        with self.db.read() as txn:
            return {bytes(k): _U64.unpack(v)[0] for k, v in txn.cursor(db=self._usage)}

    def ids(self, owner: bytes) -> Iterator[bytes]:
        """Shard ids held for *owner* (a snapshot taken when called)."""
        with self._read() as txn:
            cursor = txn.cursor(db=self._shards)
            found: list[bytes] = []
            if cursor.set_range(owner):
                for key in cursor.iternext(keys=True, values=False):
                    if key[:32] != owner:
                        break
                    found.append(bytes(key[32:]))
        return iter(found)

    def ids_after(self, owner: bytes, after: bytes, limit: int) -> tuple[list[bytes], bool]:
        """Up to *limit* shard ids held for *owner* above *after*, in order, and whether
        more follow (one page of ``ListShards``). No shard is read."""
        found: list[bytes] = []
        with self._read() as txn:
            cursor = txn.cursor(db=self._shards)
            if not cursor.set_range(owner + after):
                return found, False
            for key in cursor.iternext(keys=True, values=False):
                if key[:32] != owner:
                    return found, False
                shard_id = bytes(key[32:])
                if shard_id == after:
                    continue
                if len(found) == limit:
                    return found, True
                found.append(shard_id)
        return found, False

    def mark_unclaimed(self, owner: bytes, after: bytes, limit: int) -> bytes | None:
        """Mark up to *limit* of *owner*'s shards above *after* unclaimed; return the last
        id marked (to continue after), or None once every shard is marked."""
        ids, more = self.ids_after(owner, after, limit)
        with self._write() as txn:
            for shard_id in ids:
                txn.put(owner + shard_id, b"", db=self._unclaimed)
        return ids[-1] if more and ids else None

    def claim(self, owner: bytes, shard_id: bytes) -> None:
        """The owner uses the shard again: it is no longer unclaimed."""
        with self._write() as txn:
            txn.delete(owner + shard_id, db=self._unclaimed)

    def drop_unclaimed(self, owner: bytes, limit: int) -> tuple[int, int, bool]:
        """Delete up to *limit* of *owner*'s shards still marked unclaimed; return
        (shards deleted, bytes freed, whether more are marked)."""
        with self._read() as txn:
            cursor = txn.cursor(db=self._unclaimed)
            ids: list[bytes] = []
            more = False
            if cursor.set_range(owner):
                for key in cursor.iternext(keys=True, values=False):
                    if key[:32] != owner:
                        break
                    if len(ids) == limit:
                        more = True
                        break
                    ids.append(bytes(key[32:]))
        with self._write() as txn:
            for shard_id in ids:
                txn.delete(owner + shard_id, db=self._unclaimed)
        count, freed = self.delete_counted(owner, ids)
        return count, freed, more

    def _usage_of(self, txn, owner: bytes) -> int:
        raw = txn.get(owner, db=self._usage)
        return _U64.unpack(raw)[0] if raw is not None else 0

    def _add_usage(self, txn, owner: bytes, delta: int) -> None:
        if not delta:
            return
        total = max(0, self._usage_of(txn, owner) + delta)
        if total:
            txn.put(owner, _U64.pack(total), db=self._usage)
        else:
            txn.delete(owner, db=self._usage)

    def sync(self) -> None:
        """Flush to stable storage."""
        self.db.sync()

    def close(self) -> None:
        """Sync and close."""
        self.db.close()
