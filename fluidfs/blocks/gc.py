"""Garbage collection: shards nobody references are deleted from their holders, for sure.

Two tables in ``meta.lmdb`` (format version 1) make this crash-safe:

- ``gc``: key ``holder(u32) || shard_id(32)`` → ``u32`` shard size, optionally followed
  by one byte ``0``: *uncounted*, a shard the holder may have although our usage figure
  for it never counted it (a store whose answer never came). Written in the same
  transaction that drops a block's last reference (or that finds a shard orphaned),
  removed once the holder confirms the delete (or cancelled, in the transaction that
  records that holder for that shard again: ``reclaim``). Retried until done. A confirmed delete
  gives back only the counted bytes of what the holder's usage figure holds.
- ``placing``: same key; value ``u32 size || block id(32) || outcome(1)``: the attempt,
  journalled just before a shard is sent, and its outcome: ``0`` sent, no answer yet;
  ``1`` stored (the holder confirmed it and its usage counts it). A store the holder
  refused is taken out at once (nothing to collect, nothing to give back); one whose
  answer never came (timeout, lost connection) moves to ``gc`` uncounted at once. The
  entry is cleared once the block record names that peer as the shard's holder. After a
  crash, any entry left here is a shard a peer may hold without our record knowing: it
  moves to ``gc`` (counted if the holder had confirmed it), unless the record names that
  holder after all. Entries without the outcome byte (written before it existed) read
  as ``0``.

Either way no promised space leaks for longer than it takes a holder to come back.

``collect`` walks ``gc`` in key order (so holder by holder), BATCH entries of one
holder at a time, each read and each removal in a short transaction in a worker
thread: a long backlog never holds the loop, and memory stays at one batch.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Awaitable, Callable

import trio

from fluidfs.blocks.record import LOCAL_HOLDER, NO_HOLDER, StoredBlock
from fluidfs.blocks.recordwrites import JoinedWrites
from fluidfs.store.db import Database
from fluidfs.store.shards import ShardStore

log = logging.getLogger(__name__)

_HOLDER = struct.Struct(">I")
_SIZE = struct.Struct(">I")
UNCOUNTED = b"\x00"  # gc value suffix: our usage figure never counted this shard
SENT, STORED = b"\x00", b"\x01"  # placing outcomes
GC_INTERVAL = 10.0
BATCH = 1024

# Deletes shard ids on one remote holder; returns True when the holder confirmed.
RemoteDelete = Callable[[int, list[bytes], int], Awaitable[bool]]


def _key(holder: int, shard_id: bytes) -> bytes:
    return _HOLDER.pack(holder) + shard_id


class Collector:
    """Deletes unreferenced shards from wherever they are held, surviving crashes."""

    def __init__(
        self,
        meta: Database,
        shards: ShardStore,
        owner: bytes,
        limiter: trio.CapacityLimiter,
    ) -> None:
        self.meta = meta
        self.shards = shards
        self.owner = owner
        self.limiter = limiter
        self._gc = meta["gc"]
        self._placing = meta["placing"]
        self.remote_delete: RemoteDelete | None = None
        self._wakeup = trio.Event()
        # Keys (holder || shard id) whose remote delete is on its way: a store of the same
        # shard to the same holder waits for it (``wait_deletes``), or the delete could
        # land after the store and take the copy the record is about to name.
        self._deleting: set[bytes] = set()
        self._deletes_ended = trio.Event()
        # The journal writes of StoreShard calls leaving or answered in the same round of
        # the loop share a write transaction (``placing_joined``, ``outcomes_joined``).
        self.joined = JoinedWrites(meta)

    # --- writers (inside the caller's transaction) -------------------------------------

    def enqueue(self, txn, stored: StoredBlock) -> None:
        """Schedule deletion of every held shard of an unreferenced block."""
        size = _SIZE.pack(stored.record.shard_size)
        for shard_id, holder in zip(stored.record.shard_ids, stored.holders, strict=True):
            if holder != NO_HOLDER:
                txn.put(_key(holder, shard_id), size, db=self._gc)

    def enqueue_one(self, txn, holder: int, shard_id: bytes, size: int) -> None:
        """Schedule deletion of one shard on one holder."""
        txn.put(_key(holder, shard_id), _SIZE.pack(size), db=self._gc)

    def reclaim(self, txn, holder: int, shard_id: bytes) -> int:
        """The record names *holder* for this shard again: a deletion still queued there
        must not run. Cancel it; return the bytes our usage figure counted for the old
        copy (counted twice now that the shard was stored again), 0 if none."""
        key = _key(holder, shard_id)
        value = txn.get(key, db=self._gc)
        if value is None:
            return 0
        txn.delete(key, db=self._gc)
        value = bytes(value)
        return 0 if value[4:5] == UNCOUNTED else _SIZE.unpack(value[:4])[0]

    def placing(self, holder: int, shard_id: bytes, size: int, block_id: bytes) -> None:
        """Journal a shard of *block_id* about to be sent to *holder*."""
        with self.meta.write() as txn:
            txn.put(_key(holder, shard_id), _SIZE.pack(size) + block_id + SENT,
                    db=self._placing)

    def placing_many(self, shards: list[tuple[int, bytes, int, bytes]]) -> None:
        """Journal several shards about to be sent, (holder, shard id, size, block id)
        each, in one transaction (a block's first attempts: one commit, not N)."""
        if not shards:
            return
        with self.meta.write() as txn:
            self._placing_in(txn, shards)

    async def placing_joined(self, shards: list[tuple[int, bytes, int, bytes]]) -> None:
        """``placing_many`` in a transaction shared with the journal writes handed in in
        the same round of the loop (blocks/recordwrites.py): the StoreShard calls of a
        commit's level leave to every peer together, each journalled in one of its own."""
        if shards:
            await self.joined.write(lambda txn: self._placing_in(txn, shards))

    def _placing_in(self, txn, shards: list[tuple[int, bytes, int, bytes]]) -> None:
        for holder, shard_id, size, block_id in shards:
            txn.put(_key(holder, shard_id), _SIZE.pack(size) + block_id + SENT,
                    db=self._placing)

    def stored(self, holder: int, shard_id: bytes) -> None:
        """The holder confirmed the shard (our usage figure for it now counts it)."""
        key = _key(holder, shard_id)
        with self.meta.write() as txn:
            value = txn.get(key, db=self._placing)
            if value is not None:
                txn.put(key, bytes(value)[:36] + STORED, db=self._placing)

    def refused(self, holder: int, shard_id: bytes) -> None:
        """The holder answered that it did not store the shard: nothing to take back."""
        with self.meta.write() as txn:
            txn.delete(_key(holder, shard_id), db=self._placing)

    def unanswered(self, holder: int, shard_id: bytes, size: int) -> None:
        """No answer came: the holder may have the shard, uncounted. Collect it."""
        with self.meta.write() as txn:
            txn.delete(_key(holder, shard_id), db=self._placing)
            txn.put(_key(holder, shard_id), _SIZE.pack(size) + UNCOUNTED, db=self._gc)
        self.wake()

    async def outcomes_joined(self, ended: list[tuple[int, bytes, int, str]]) -> None:
        """How several journalled stores ended, (holder, shard id, size, outcome) each
        with outcome ``"stored"``, ``"refused"`` or ``"unanswered"``: the shards of one
        batched ``StoreShard`` call, in a transaction shared with the journal writes
        handed in in the same round of the loop (answers of several calls read together)."""
        if ended and await self.joined.write(lambda txn: self._outcomes_in(txn, ended)):
            self.wake()

    def _outcomes_in(self, txn, ended: list[tuple[int, bytes, int, str]]) -> bool:
        """``outcomes_joined`` inside *txn*; whether some shard is to be collected."""
        lost = False
        for holder, shard_id, size, outcome in ended:
            key = _key(holder, shard_id)
            if outcome == "stored":
                value = txn.get(key, db=self._placing)
                if value is not None:
                    txn.put(key, bytes(value)[:36] + STORED, db=self._placing)
                continue
            txn.delete(key, db=self._placing)
            if outcome != "refused":
                txn.put(key, _SIZE.pack(size) + UNCOUNTED, db=self._gc)
                lost = True
        return lost

    def placed(self, txn, holders: list[int], shard_ids: tuple[bytes, ...]) -> None:
        """Clear journal entries now that the record names these holders."""
        for holder, shard_id in zip(holders, shard_ids, strict=True):
            if holder not in (NO_HOLDER, LOCAL_HOLDER):
                txn.delete(_key(holder, shard_id), db=self._placing)

    def abandon(self, holder: int, shard_id: bytes, size: int) -> None:
        """A stored shard will not be recorded (its block went away): collect it."""
        with self.meta.write() as txn:
            txn.delete(_key(holder, shard_id), db=self._placing)
            self.enqueue_one(txn, holder, shard_id, size)
        self.wake()

    def recover(self, holds: Callable[..., bool]) -> int:
        """After a restart: journal entries become garbage unless a record names them.

        *holds(txn, block_id, holder, shard_id)* says whether the block's record
        lists that holder for that shard.
        """
        moved = 0
        with self.meta.write() as txn:
            for key, value in list(txn.cursor(db=self._placing)):
                key, value = bytes(key), bytes(value)
                holder, shard_id = _HOLDER.unpack(key[:4])[0], key[4:]
                txn.delete(key, db=self._placing)
                if not holds(txn, value[4:36], holder, shard_id):
                    counted = value[36:37] == STORED
                    txn.put(key, value[:4] + (b"" if counted else UNCOUNTED), db=self._gc)
                    moved += 1
        return moved

    def in_flight(self, holder: int) -> set[bytes]:
        """Shard ids journalled as sent to *holder* and not yet recorded (reconcile.py).
        Bounded by the uploads in flight; a short read."""
        prefix = _HOLDER.pack(holder)
        found: set[bytes] = set()
        with self.meta.read() as txn:
            cursor = txn.cursor(db=self._placing)
            if cursor.set_range(prefix):
                for key in cursor.iternext(keys=True, values=False):
                    if key[:4] != prefix:
                        break
                    found.add(bytes(key[4:]))
        return found

    # --- the collector -----------------------------------------------------------------

    def pending(self) -> tuple[int, int]:
        """(shards, bytes) waiting to be deleted."""
        count = total = 0
        with self.meta.read() as txn:
            for size in txn.cursor(db=self._gc).iternext(keys=False, values=True):
                count += 1
                total += _SIZE.unpack(size[:4])[0]
        return count, total

    def wake(self) -> None:
        """Run a collection soon."""
        self._wakeup.set()

    async def run(self) -> None:
        """Collect every GC_INTERVAL seconds, or sooner when woken."""
        while True:
            await self.collect()
            with trio.move_on_after(GC_INTERVAL):
                await self._wakeup.wait()
            self._wakeup = trio.Event()

    async def collect(self, *, local_only: bool = False) -> int:
        """Try to delete everything pending (or only this node's own); return how many."""
        done = 0
        after = b""
        while True:
            holder, ids = await trio.to_thread.run_sync(
                self._next_run, after, limiter=self.limiter
            )
            if holder is None or (local_only and holder != LOCAL_HOLDER):
                return done
            after = _key(holder, ids[-1])
            if holder == LOCAL_HOLDER:
                await trio.to_thread.run_sync(
                    self.shards.delete_many, self.owner, ids, limiter=self.limiter
                )
            elif self.remote_delete is None:
                after = _key(holder, b"\xff" * 32)  # nothing can reach it yet
                continue
            else:
                ids = await self._delete_remote(holder, ids)
                if ids is None:
                    after = _key(holder, b"\xff" * 32)  # unreachable: try again next round
                    continue
            await trio.to_thread.run_sync(self._forget, holder, ids, limiter=self.limiter)
            done += len(ids)

    async def _delete_remote(self, holder: int, ids: list[bytes]) -> list[bytes] | None:
        """Delete *ids* on *holder*, except those being stored there again; the ids
        deleted (None if the holder did not confirm).

        The ids are marked before the journal is read again: a store journalled before
        the mark is seen in ``placing`` and its shard is left alone (it is reclaimed
        once recorded), and a store journalled after it waits in ``wait_deletes``
        until this delete has ended."""
        keys = [_key(holder, sid) for sid in ids]
        self._deleting.update(keys)
        try:
            ids, size = await trio.to_thread.run_sync(
                self._collectable, holder, ids, limiter=self.limiter
            )
            if ids and not await self.remote_delete(holder, ids, size):
                return None
            return ids
        finally:
            self._deleting.difference_update(keys)
            self._deletes_ended.set()
            self._deletes_ended = trio.Event()

    def _collectable(self, holder: int, ids: list[bytes]) -> tuple[list[bytes], int]:
        """(the ids still queued for deletion on *holder* and not being stored there
        again, their counted bytes); in a worker thread."""
        kept: list[bytes] = []
        total = 0
        with self.meta.read() as txn:
            for sid in ids:
                key = _key(holder, sid)
                size = txn.get(key, db=self._gc)
                if size is None or txn.get(key, db=self._placing) is not None:
                    continue
                kept.append(sid)
                if bytes(size[4:5]) != UNCOUNTED:
                    total += _SIZE.unpack(bytes(size[:4]))[0]
        return kept, total

    async def wait_deletes(self, stores: list[tuple[int, bytes]]) -> None:
        """Return once no delete of these (holder, shard id) pairs is on its way. Call
        after journalling the stores (``placing``) and before sending them."""
        keys = [_key(holder, sid) for holder, sid in stores]
        while any(key in self._deleting for key in keys):
            await self._deletes_ended.wait()

    def _next_run(self, after: bytes) -> tuple[int | None, list[bytes]]:
        """(holder, up to BATCH of its shard ids) of the first entries with keys above
        *after*, all of one holder; holder None when none are left."""
        ids: list[bytes] = []
        first: int | None = None
        with self.meta.read() as txn:
            cursor = txn.cursor(db=self._gc)
            if not cursor.set_range(after):
                return None, ids
            if bytes(cursor.key()) == after and not cursor.next():
                return None, ids
            for key in cursor.iternext(keys=True, values=False):
                holder = _HOLDER.unpack(key[:4])[0]
                if first is None:
                    first = holder
                elif holder != first or len(ids) >= BATCH:
                    break
                ids.append(bytes(key[4:]))
        return first, ids

    def _forget(self, holder: int, ids: list[bytes]) -> None:
        with self.meta.write() as txn:
            for sid in ids:
                txn.delete(_key(holder, sid), db=self._gc)
