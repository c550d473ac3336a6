"""Holders caught returning corrupt shards: liars, dealt with for good.

A host can pass every audit (it answers challenges from the good copy it keeps) and still
corrupt what it sends back on ``RetrieveShard``. Reads verify every shard against its id,
so such a copy is never used; sampled retrieval audits (audit.py) fetch whole shards to
catch such a host without waiting for a read.

A host verified each shard against its id when it stored it (``bad_shard``), so an
honest host never serves different bytes: one corrupt copy from a holder our records name
is proof enough (remote.py, ``on_corrupt``). Then:

- that shard, and every other shard the holder keeps for us, is counted lost at once and
  its deletion there queued, so repair re-creates all of them on other peers;
- the holder is *caught*: its trust drops to the floor and grows back only slowly for
  the caught period, and no agreement is made with it meanwhile (peers/peerlist.py,
  ``mark_caught``; peers/trust.py), nothing more is placed on it (``RemoteShards.caught``);
- once they are, ``RemoteShards.on_liar`` is told, so the node ends the agreement
  (peers/lifecycle.py).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from fluidfs.blocks.record import NO_HOLDER, StoredBlock
from fluidfs.store.db import SCAN_BATCH

if TYPE_CHECKING:
    from fluidfs.blocks.blockstore import BlockStore

log = logging.getLogger(__name__)

DROP_BATCH = 256  # block records rewritten per transaction when a holder is dropped


class Suspects:
    """Drops holders caught returning corrupt shards (see the module docstring)."""

    def __init__(self, blocks: BlockStore) -> None:
        self.blocks = blocks
        self.dropped: set[int] = set()  # caught: all their shards counted lost

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
        remote = blocks.remote
        key = remote.peers.key_of(holder) if remote is not None else None
        if key is None:
            return
        if holder in self.dropped and key in remote.caught:
            return
        self.dropped.add(holder)
        remote.caught.add(key)
        remote.peers.mark_caught(key)
        if not blocks.start_soon(self._drop_all, holder, key):
            remote.on_liar(key)

    async def _drop_all(self, holder: int, key: bytes) -> None:
        # Dropped (deletion queued) before the agreement ends: once it has ended, its
        # shards would only be forgotten, and left on the liar for its keep period.
        try:
            dropped = await self._drop(holder)
        finally:
            self.blocks.remote.on_liar(key)
        log.warning(
            "peer %s (holder %d) served a corrupt shard: all %d more shards it holds for us "
            "are counted lost, and it gets no more",
            key.hex()[:12],
            holder,
            dropped,
        )

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
        return [
            key
            for key, raw in self.blocks.meta.records("blocks", SCAN_BATCH)
            if holder in StoredBlock.decode(key, raw).holders
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
