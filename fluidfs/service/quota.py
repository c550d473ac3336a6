"""Per-owner quota: one store at a time per owner, checked and counted in one place.

A ``StoreShard`` batch goes through these steps, in this order, holding its owner's lock:

1. the quota is read: what the owner's live agreement promises now (0 if it ended while
   the store waited for the lock);
2. shards whose bytes do not hash to their id are set aside (``bad_shard``);
3. the rest are written while they fit (``ShardStore.put_within``): the owner's usage and
   the donation pool are read, each shard counts only the bytes it adds (a shard already
   held, a dedup, adds nothing), and the new usage is written, all in one LMDB write
   transaction. What does not fit is refused (``over_quota``). So is what the disk
   cannot hold: the batch claims the disk it may take from the node's ``DiskReserve``
   (shared with our own data writers) and may leave no less than ``PEER_RESERVE`` free
   (diskspace.py), so partners never take the room our own metadata commits need,
   whatever the donation says.

Steps 2 and 3 run in one trip to a worker thread of the service's limiter.

The lock orders one owner's stores: an owner sending many batches at once, over several
connections, occupies one worker thread and not all of them, and each batch sees the usage
its predecessors counted. Owners are kept together within the donation by the write
transaction, which LMDB runs one at a time.

The lock table holds an entry only while a store of that owner runs or waits for it, and
entries for at most ``limit`` owners at once: a store for one more owner waits until an
entry is free. The service looks for a live agreement first, so only partners reach it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from fluidfs.blocks import merkle
from fluidfs.diskspace import PEER_RESERVE, DiskReserve
from fluidfs.store.shards import SHARD_OVERHEAD, ShardStore


@dataclass
class _Entry:
    lock: trio.Lock = field(default_factory=trio.Lock)
    users: int = 0  # tasks holding or waiting for the lock


class OwnerLocks:
    """A lock per owner, in a table bounded by the number of owners storing at once."""

    def __init__(self, limit: int) -> None:
        self._entries: dict[bytes, _Entry] = {}
        self._room = trio.Semaphore(limit)

    def __len__(self) -> int:
        return len(self._entries)

    @asynccontextmanager
    async def hold(self, owner: bytes) -> AsyncIterator[None]:
        """Hold *owner*'s lock (waiting for room in the table if it is full)."""
        entry = self._entries.get(owner)
        if entry is None:
            await self._room.acquire()
            entry = self._entries.get(owner)  # made while we waited for room
            if entry is None:
                entry = self._entries[owner] = _Entry()
            else:
                self._room.release()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if not entry.users:
                del self._entries[owner]
                self._room.release()


@dataclass
class ShardQuota:
    """Stores owners' shards within their quota and within the donation."""

    shards: ShardStore
    donate: int  # bytes held for all others together, at most
    self_key: bytes  # this node's own shards do not count against the donation
    limiter: trio.CapacityLimiter
    locks: OwnerLocks
    reserve: DiskReserve  # the state disk's, shared with our own data writers

    async def store(
        self, owner: bytes, items: list[tuple[bytes, bytes]], promised: Callable[[bytes], int]
    ) -> tuple[set[bytes], set[bytes]]:
        """Store (id, bytes) pairs for *owner* within ``promised(owner)`` bytes; return
        (ids whose bytes do not match, ids that do not fit)."""
        async with self.locks.hold(owner):
            quota = promised(owner)
            return await trio.to_thread.run_sync(
                self._check_and_write, owner, items, quota, limiter=self.limiter
            )

    def _check_and_write(
        self, owner: bytes, items: list[tuple[bytes, bytes]], quota: int
    ) -> tuple[set[bytes], set[bytes]]:
        good = [(sid, data) for sid, data in items if merkle.shard_id(data) == sid]
        bad = {sid for sid, _ in items} - {sid for sid, _ in good}
        wanted = sum(len(data) + SHARD_OVERHEAD for _, data in good)
        with self.reserve.claim_upto(wanted, PEER_RESERVE, self.shards.data_file) as disk:
            over = self.shards.put_within(
                owner, good, quota=quota, pool=self.donate, outside_pool=self.self_key,
                disk=disk,
            )
        return bad, set(over)
