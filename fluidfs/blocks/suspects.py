"""Holders caught returning corrupt shards: what they hold for us is counted lost.

A host can pass every audit (it answers challenges from the good copy it keeps) and still
corrupt what it sends back on ``RetrieveShard``. Reads verify every shard against its id,
so such a copy is never used, but unless something else happens its shards stay counted
as held, and the block keeps relying on a holder that would fail a restore.

So when a holder our records name returns a bad copy (remote.py, ``on_corrupt``):

- that shard is counted lost at once (repair re-creates it on another peer, and the
  holder is asked to delete its copy);
- up to ``SUSPECT_SAMPLES`` more of the shards it holds for us are fetched and verified.
  If any of them is bad too, the holder is *dropped*: every shard it holds for us is
  counted lost and deleted there, and nothing more is placed on it while this node runs
  (``RemoteShards.caught``), so repair moves all of them. If they are all good, it was
  one bad copy (bit rot) and only that shard moves.

The check costs at most ``SUSPECT_SAMPLES`` shard downloads per holder at a time; a
holder is checked again only after its last check ended without dropping it.
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING

import trio

from fluidfs.blocks.record import NO_HOLDER, StoredBlock
from fluidfs.blocks.remote import BAD, GOOD

if TYPE_CHECKING:
    from fluidfs.blocks.blockstore import BlockStore

log = logging.getLogger(__name__)

SUSPECT_SAMPLES = 4  # more shards fetched from a holder caught returning a corrupt one
DROP_BATCH = 256  # block records rewritten per transaction when a holder is dropped


class Suspects:
    """Checks and drops holders caught returning corrupt shards (see the module docstring)."""

    def __init__(self, blocks: BlockStore) -> None:
        self.blocks = blocks
        self.checking: set[int] = set()  # holders whose shards are being checked
        self.dropped: set[int] = set()  # caught twice: all their shards counted lost

    def caught(self, block_id: bytes, index: int, holder: int) -> None:
        """A holder our records name returned a corrupt copy of shard *index*."""
        blocks = self.blocks
        log.warning(
            "shard %d of block %s is corrupt on holder %d: counting it lost",
            index,
            block_id.hex()[:16],
            holder,
        )
        blocks.mark_lost(block_id, index, holder)
        if holder in self.checking or holder in self.dropped:
            return
        if blocks.start_soon(self._check, holder):
            self.checking.add(holder)

    async def _check(self, holder: int) -> None:
        blocks = self.blocks
        remote = blocks.remote
        try:
            key = remote.peers.key_of(holder) if remote is not None else None
            if key is None:
                return
            sample = await trio.to_thread.run_sync(
                self._sample, holder, SUSPECT_SAMPLES, limiter=blocks.limiter
            )
            outcomes = [await remote.check_shard(key, s.record, i) for s, i in sample]
            bad = outcomes.count(BAD)
            if not bad:
                log.info(
                    "holder %d: %d more of its shards checked, %d good: one bad copy",
                    holder,
                    len(outcomes),
                    outcomes.count(GOOD),
                )
                return
            remote.caught.add(key)
            self.dropped.add(holder)
            dropped = await self._drop(holder)
            log.warning(
                "peer %s (holder %d) served corrupt shards again (%d of %d checked): all %d "
                "shards it holds for us are counted lost, and it gets no more",
                key.hex()[:12],
                holder,
                bad,
                len(outcomes),
                dropped,
            )
        finally:
            self.checking.discard(holder)

    def _sample(self, holder: int, count: int) -> list[tuple[StoredBlock, int]]:
        """Up to *count* (block, shard index) that *holder* keeps, at random. A scan of
        every record: run it in a worker thread."""
        chosen: list[tuple[StoredBlock, int]] = []
        seen = 0
        blocks = self.blocks
        with blocks.meta.read() as txn:
            for key, raw in txn.cursor(db=blocks.meta["blocks"]):
                stored = StoredBlock.decode(bytes(key), raw)
                for index, h in enumerate(stored.holders):
                    if h != holder:
                        continue
                    seen += 1
                    if len(chosen) < count:
                        chosen.append((stored, index))
                    elif (slot := random.randrange(seen)) < count:
                        chosen[slot] = (stored, index)
        return chosen

    async def _drop(self, holder: int) -> int:
        """Count every shard *holder* keeps for us lost and queue its deletion there;
        return how many. Worker threads, DROP_BATCH records per transaction."""
        blocks = self.blocks
        ids = await trio.to_thread.run_sync(self._held_by, holder, limiter=blocks.limiter)
        dropped = 0
        for start in range(0, len(ids), DROP_BATCH):
            lost, under = await trio.to_thread.run_sync(
                self._drop_batch, ids[start : start + DROP_BATCH], holder, limiter=blocks.limiter
            )
            dropped += lost
            blocks.under.update(under)
        blocks.collector.wake()
        return dropped

    def _held_by(self, holder: int) -> list[bytes]:
        blocks = self.blocks
        with blocks.meta.read() as txn:
            return [
                bytes(key)
                for key, raw in txn.cursor(db=blocks.meta["blocks"])
                if holder in StoredBlock.decode(bytes(key), raw).holders
            ]

    def _drop_batch(self, ids: list[bytes], holder: int) -> tuple[int, list[bytes]]:
        blocks = self.blocks
        lost = 0
        under = []
        with blocks.meta.write() as txn:
            for block_id in ids:
                stored = blocks.load(block_id, txn)
                if stored is None or holder not in stored.holders:
                    continue
                for index, h in enumerate(stored.holders):
                    if h == holder:
                        stored.holders[index] = NO_HOLDER
                        blocks.collector.enqueue_one(
                            txn, holder, stored.record.shard_ids[index], stored.record.shard_size
                        )
                        lost += 1
                blocks.save(txn, stored)
                if stored.missing() > blocks.total_missing_allowed:
                    under.append(block_id)
        return lost, under
