"""Repair: blocks short of shards get them back, the most endangered first.

A block is *under-replicated* when more of its shards lack a live holder than
``BlockStore.total_missing_allowed``: with the repair threshold T (default N-1),
a block is repaired once its live shards fall to T or fewer, so by default any
lost shard is re-created; a lower T trades safety margin for repair traffic. Freshly written
blocks that could not be fully placed count too; their plaintext is pinned in
the cache, so they are topped up without any download. Otherwise the block is
rebuilt from K shards. Either way the exact missing shards are recreated (the
record keeps the nonce) and placed on peers that hold nothing of the block.
Repair traffic is held under ``bandwidth`` bytes per second.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import trio

from fluidfs.blocks.blockstore import BlockUnavailable
from fluidfs.blocks.codec import BlockError, CorruptBlock
from fluidfs.blocks.record import LOCAL_HOLDER, NO_HOLDER, StoredBlock

log = logging.getLogger(__name__)


@dataclass
class RepairPolicy:
    """When and how fast to repair."""

    interval: float = 5.0
    bandwidth: float = 64 * 1024 * 1024  # bytes of shards placed per second, at most
    parallel: int = 8  # blocks being repaired at once


class Repairer:
    """Finds under-replicated blocks and repairs them."""

    def __init__(self, blocks, policy: RepairPolicy) -> None:
        self.blocks = blocks
        self.policy = policy
        self.repaired_blocks = 0
        self.repaired_bytes = 0
        self.rate = 0.0
        self.queue_length = 0
        self._wakeup = trio.Event()

    def wake(self) -> None:
        """Shards were just lost: repair now rather than at the next interval."""
        self._wakeup.set()

    async def run(self) -> None:
        """Repair every interval (or when woken) until cancelled."""
        while True:
            with trio.move_on_after(self.policy.interval):
                await self._wakeup.wait()
            self._wakeup = trio.Event()
            if self.blocks.remote is not None:
                await self.repair_pass()

    def _candidates(self) -> list[StoredBlock]:
        found = []
        for block_id in list(self.blocks.under):
            stored = self.blocks.load(block_id)
            if stored is None:
                self.blocks.under.discard(block_id)
            elif block_id not in self.blocks.uploading and self._has_room(stored):
                found.append(stored)
        found.sort(key=lambda s: -s.missing())  # fewest live shards first
        return found

    def _has_room(self, stored: StoredBlock) -> bool:
        remote = self.blocks.remote
        holding = set(stored.holders)
        return any(
            remote.peers.get(key).index not in holding
            for key in remote.usable_peers(stored.record.shard_size)
        )

    async def repair_pass(self) -> int:
        """Repair what can be repaired now; return the number of blocks repaired.

        Blocks start in order of danger; a few run at once so that fetching shards
        from peers overlaps with decoding and re-encoding.
        """
        todo = self._candidates()
        self.queue_length = len(todo)
        started = time.monotonic()
        slots = trio.Semaphore(self.policy.parallel)
        totals = {"sent": 0, "done": 0}

        async def one(stored: StoredBlock) -> None:
            try:
                placed = await self.repair(stored)
            except Exception as exc:  # one bad block must not stop the others
                log.error("repairing block %s failed: %s", stored.record.block_id.hex()[:16], exc)
                placed = 0
            finally:
                slots.release()
                self.queue_length -= 1
            totals["sent"] += placed
            if placed:
                totals["done"] += 1
                self.repaired_blocks += 1
                self.repaired_bytes += placed

        async with trio.open_nursery() as nursery:
            for stored in todo:
                await slots.acquire()
                elapsed = time.monotonic() - started
                self.rate = totals["sent"] / max(elapsed, 1e-3)
                ahead = totals["sent"] / self.policy.bandwidth - elapsed
                if ahead > 0:
                    await trio.sleep(ahead)
                nursery.start_soon(one, stored)
        self.queue_length = 0
        return totals["done"]

    async def repair(self, stored: StoredBlock) -> int:
        """Recreate the block's missing shards and place them; return the bytes placed."""
        blocks = self.blocks
        record = stored.record
        data = await trio.to_thread.run_sync(
            blocks.cache.read_io, record.block_id, 0, record.size, limiter=blocks.limiter
        )
        if data is not None and len(data) == record.size:  # pinned or cached: reseal
            shards = await trio.to_thread.run_sync(
                blocks.codec.reseal, record, data, limiter=blocks.limiter
            )
            return await blocks.upload(record, shards)
        if LOCAL_HOLDER in stored.holders:
            data = await blocks.rebuild(stored)
            shards = await trio.to_thread.run_sync(
                blocks.codec.reseal, record, data, limiter=blocks.limiter
            )
            return await blocks.upload(record, shards)
        # From K shards on peers: only the missing shards are computed, nothing decrypted.
        # The inputs are not hashed one by one: recreate() checks every shard it makes
        # against its id, which a bad input would fail. Only then are the inputs fetched
        # again and verified singly, which finds (and penalises) the peer that lied.
        wanted = [i for i, h in enumerate(stored.holders) if h == NO_HOLDER]
        try:
            made = await self._recreate(stored, wanted, verify=False)
        except CorruptBlock:
            log.warning("block %s: a shard fetched for repair was bad; fetching verified",
                        record.block_id.hex()[:16])
            made = await self._recreate(stored, wanted, verify=True)
        shards = [made.get(i, b"") for i in range(record.total)]
        return await blocks.upload(record, shards)

    async def _recreate(
        self, stored: StoredBlock, wanted: list[int], *, verify: bool
    ) -> dict[int, bytes]:
        blocks = self.blocks
        try:
            good = await blocks.remote.fetch_shards(
                stored.record, stored.holders, extra=0, verify=verify
            )
        except BlockError as exc:
            raise BlockUnavailable(str(exc)) from None
        return await trio.to_thread.run_sync(
            blocks.codec.recreate, stored.record, good, wanted, limiter=blocks.limiter
        )
