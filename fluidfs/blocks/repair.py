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

Planning a pass (``plan``) reads the records of every block in ``under`` in worker
threads, PLAN_BATCH per read transaction, and keeps only block ids and their
shortfall: the loop stays free and memory stays small even when an agreement that
held a shard of every block has just ended. When one ends, ``holder_gone`` queues the
holder; the repairer forgets it in every record (``BlockStore.forget_holder``, in
batches in worker threads) and then repairs.

Blocks whose *reachable* shards fall to K+1 or fewer while their holders are still
inside the tolerance are repaired too, at once (``endangered``; blocks/emergency.py):
their shards on failing holders are placed anew and the old copies collected.
Danger is reachable shards: a pass starts with the fewest, and a repair's turn under the
upload limit is ``repair_priority`` of the reachable count.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import trio

from fluidfs.blocks.blockstore import BlockUnavailable
from fluidfs.blocks.codec import BlockError, CorruptBlock
from fluidfs.blocks.emergency import endangered_batch, is_endangered, stale_shards
from fluidfs.blocks.record import LOCAL_HOLDER, NO_HOLDER, StoredBlock
from fluidfs.net.bandwidth import repair_priority

log = logging.getLogger(__name__)

PLAN_BATCH = 2000  # block records read per transaction while planning a pass


@dataclass
class RepairPolicy:
    """When and how fast to repair."""

    interval: float = 5.0
    bandwidth: float = 64 * 1024 * 1024  # bytes of shards placed per second, at most
    parallel: int = 8  # blocks being repaired at once


def has_room(stored: StoredBlock, open_peers: dict[int, int]) -> bool:
    """True if some peer that takes shards now (*open_peers*: index -> room in bytes)
    holds nothing of the block and has room for one of its shards."""
    holding = set(stored.holders)
    return any(
        room >= stored.record.shard_size and index not in holding
        for index, room in open_peers.items()
    )


def plan(
    records: Iterable[StoredBlock],
    open_peers: dict[int, int],
    busy: frozenset[bytes],
    failing: frozenset[int] = frozenset(),
) -> list[tuple[int, bytes]]:
    """(shards not reachable, block id) of the blocks to repair, the most endangered
    first: a shard is not reachable when it has no holder or its holder is in *failing*.

    Blocks being uploaded (*busy*) are left to their upload, and blocks that no open
    peer could take a shard of wait for the next pass. Ties keep the input order.
    """
    found = [
        (stored.record.total - stored.reachable(failing), stored.record.block_id)
        for stored in records
        if stored.record.block_id not in busy and has_room(stored, open_peers)
    ]
    found.sort(key=lambda item: -item[0])
    return found


class Repairer:
    """Finds under-replicated blocks and repairs them."""

    def __init__(self, blocks, policy: RepairPolicy) -> None:
        self.blocks = blocks
        self.policy = policy
        self.repaired_blocks = 0
        self.repaired_bytes = 0
        self.rate = 0.0
        self.queue_length = 0
        self.endangered: set[bytes] = set()  # reachable shards at K+1 or fewer
        self.emergency_repairs = 0  # blocks repaired before their holders' tolerance ended
        self._failing_seen: frozenset[int] = frozenset()
        self._wakeup = trio.Event()
        self._gone_send, self._gone_recv = trio.open_memory_channel[tuple[int, str]](math.inf)

    def wake(self) -> None:
        """Shards were just lost: repair now rather than at the next interval."""
        self._wakeup.set()

    def holder_gone(self, holder: int, name: str = "") -> None:
        """The agreement with peer *holder* ended: its shards no longer count.

        Returns at once; ``run`` forgets the holder in the background and then repairs.
        """
        self._gone_send.send_nowait((holder, name))

    async def run(self) -> None:
        """Forget ended holders and repair every interval (or when woken), until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._forget_gone)
            while True:
                with trio.move_on_after(self.policy.interval):
                    await self._wakeup.wait()
                self._wakeup = trio.Event()
                if self.blocks.remote is not None:
                    await self.find_endangered()
                    await self.repair_pass()

    async def _forget_gone(self) -> None:
        async for holder, name in self._gone_recv:
            lost = await self.blocks.forget_holder(holder)
            self.wake()
            log.info("agreement with %s ended: %d shards to re-create elsewhere",
                     name or f"peer {holder}", lost)

    async def find_endangered(self) -> int:
        """If holders started failing since the last look, add the blocks that are now
        endangered and hold a shard on one of them to ``endangered``; return how many.

        The failing set is one walk of the ledger; the records are scanned only when it
        gained a member, in worker threads, a batch per read transaction."""
        failing = frozenset(self.blocks.remote.failing_holders())
        newly = failing - self._failing_seen
        self._failing_seen = failing
        if not newly:
            return 0
        found = 0
        after: bytes | None = b""
        while after is not None:
            ids, after = await trio.to_thread.run_sync(
                endangered_batch, self.blocks.meta, failing, newly, after,
                limiter=self.blocks.limiter,
            )
            self.endangered.update(ids)
            found += len(ids)
        if found:
            log.warning("%d blocks are down to %d reachable shards or fewer: repairing them "
                        "before their holders' tolerance ends", found,
                        self.blocks.codec.needed + 1)
        return found

    def _open_peers(self) -> dict[int, int]:
        remote = self.blocks.remote
        rooms = {agreement.peer: agreement.room for agreement in remote.ledger}
        return {remote.peers.get(key).index: rooms[key] for key in remote.usable_peers(1)}

    async def _candidates(self) -> list[tuple[int, bytes]]:
        """Plan a pass: records are read in worker threads, PLAN_BATCH at a time."""
        blocks = self.blocks
        open_peers = self._open_peers()
        busy = frozenset(blocks.uploading | blocks.queued)
        failing = frozenset(blocks.remote.failing_holders()) if blocks.remote else frozenset()
        ids = list(blocks.under | self.endangered)
        found: list[tuple[int, bytes]] = []
        for start in range(0, len(ids), PLAN_BATCH):
            batch = ids[start : start + PLAN_BATCH]
            planned, gone, safe = await trio.to_thread.run_sync(
                self._plan_batch, batch, open_peers, busy, failing, limiter=blocks.limiter
            )
            found += planned
            blocks.under.difference_update(gone)
            self.endangered.difference_update(safe)
        found.sort(key=lambda item: -item[0])  # stable: each batch is sorted already
        return found

    def _plan_batch(
        self,
        ids: list[bytes],
        open_peers: dict[int, int],
        busy: frozenset[bytes],
        failing: frozenset[int],
    ) -> tuple[list[tuple[int, bytes]], list[bytes], list[bytes]]:
        """(plan of these blocks, ids to leave ``under``: deleted, or no longer short of
        holders, ids to leave ``endangered``: deleted, or enough reachable shards again);
        in a worker thread."""
        records: list[StoredBlock] = []
        gone: list[bytes] = []
        safe: list[bytes] = []
        allowed = self.blocks.total_missing_allowed
        with self.blocks.meta.read() as txn:
            for block_id in ids:
                stored = self.blocks.load(block_id, txn)
                short = stored is not None and (stored.missing() > allowed or block_id in busy)
                danger = stored is not None and is_endangered(stored, failing)
                if not short:
                    gone.append(block_id)  # deleted, or whole again (as upload finds)
                if not danger:
                    safe.append(block_id)  # deleted, or its holders are back or replaced
                if short or danger:
                    records.append(stored)
        return plan(records, open_peers, busy, failing), gone, safe

    async def repair_pass(self) -> int:
        """Repair what can be repaired now; return the number of blocks repaired.

        Blocks start in order of danger; a few run at once so that fetching shards
        from peers overlaps with decoding and re-encoding.
        """
        todo = await self._candidates()
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
            for _missing, block_id in todo:
                await slots.acquire()
                stored = self.blocks.load(block_id)  # as it is now, not when planned
                if stored is None or (
                    block_id not in self.blocks.under and block_id not in self.endangered
                ):
                    slots.release()
                    self.queue_length -= 1
                    continue
                elapsed = time.monotonic() - started
                self.rate = totals["sent"] / max(elapsed, 1e-3)
                ahead = totals["sent"] / self.policy.bandwidth - elapsed
                if ahead > 0:
                    await trio.sleep(ahead)
                nursery.start_soon(one, stored)
        self.queue_length = 0
        return totals["done"]

    async def repair(self, stored: StoredBlock) -> int:
        """Recreate the block's missing shards and place them; return the bytes placed.

        Under an upload limit they go before new uploads, and the fewer reachable shards
        the block has left on peers, the sooner (net/bandwidth.py, ``repair_priority``).
        An endangered block (blocks/emergency.py) also gets its shards on failing holders
        placed anew; the old copies are collected once the new ones are recorded."""
        blocks = self.blocks
        failing = frozenset(blocks.remote.failing_holders())
        replacing = stale_shards(stored, failing) if is_endangered(stored, failing) else {}
        live = sum(
            h not in (NO_HOLDER, LOCAL_HOLDER) and h not in failing for h in stored.holders
        )
        priority = repair_priority(live)
        unknown = [i for i, h in enumerate(stored.holders) if h == NO_HOLDER]
        if unknown and not replacing:
            stored = await self._locate(stored, unknown)
        wanted = [
            i for i, h in enumerate(stored.holders) if h == NO_HOLDER or i in replacing
        ]
        if not wanted:
            return 0
        placed = await self._remake(stored, wanted, replacing, priority)
        if replacing and placed:
            self.emergency_repairs += 1
        return placed

    async def _locate(self, stored: StoredBlock, unknown: list[int]) -> StoredBlock:
        """Look for the shards no holder is recorded for on our peers (remote.py
        ``locate``) and record where they turned up; the block as it is now. A restored
        snapshot can name fewer holders than hold the shards (taken while the block was
        still being placed): rebuilding those would download K shards, upload the same
        shards again and leave the copies already there unaccounted."""
        blocks = self.blocks
        found = await blocks.remote.locate(stored.record, unknown)
        for index, key in sorted(found.items()):
            peer = blocks.remote.peers.get(key)
            if peer is not None:
                blocks.learn_holder(stored.record.block_id, index, peer.index)
        if found:
            log.info("block %s: %d of %d shards without a recorded holder found on peers",
                     stored.record.block_id.hex()[:16], len(found), len(unknown))
        return blocks.load(stored.record.block_id) or stored

    async def _remake(
        self, stored: StoredBlock, wanted: list[int], replacing: dict[int, int], priority: int
    ) -> int:
        """Recreate shards *wanted* and place them (see ``repair``)."""
        blocks = self.blocks
        record = stored.record
        data = await trio.to_thread.run_sync(
            blocks.cache.read_io, record.block_id, 0, record.size, limiter=blocks.limiter
        )
        if data is not None and len(data) == record.size:  # pinned or cached: reseal
            shards = await trio.to_thread.run_sync(
                blocks.codec.reseal, record, data, limiter=blocks.limiter
            )
            return await blocks.upload(record, shards, priority, replacing)
        if LOCAL_HOLDER in stored.holders:
            data = await blocks.rebuild(stored)
            shards = await trio.to_thread.run_sync(
                blocks.codec.reseal, record, data, limiter=blocks.limiter
            )
            return await blocks.upload(record, shards, priority, replacing)
        # From K shards on peers: only the missing shards are computed, nothing decrypted.
        # The inputs are not hashed one by one: recreate() checks every shard it makes
        # against its id, which a bad input would fail. Only then are the inputs fetched
        # again and verified singly, which finds (and penalises) the peer that lied.
        # Failing holders are asked only if the reachable ones cannot give K shards.
        source = stored
        if record.total - len(wanted) >= record.needed:
            masked = [NO_HOLDER if i in replacing else h for i, h in enumerate(stored.holders)]
            source = StoredBlock(record, stored.refcount, masked)
        try:
            made = await self._recreate(source, wanted, verify=False)
        except CorruptBlock:
            log.warning("block %s: a shard fetched for repair was bad; fetching verified",
                        record.block_id.hex()[:16])
            made = await self._recreate(source, wanted, verify=True)
        shards = [made.get(i, b"") for i in range(record.total)]
        return await blocks.upload(record, shards, priority, replacing)

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
