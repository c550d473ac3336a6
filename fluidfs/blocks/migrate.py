"""Blocks stored before the node had peers move onto peers once it has them.

A node without peers keeps every shard of a block in its own shard store (holder
``LOCAL_HOLDER``), so the folder works from the first minute. Once it has enough peers,
each such block is turned into a block waiting for upload, the same state a freshly
written block is in:

1. its plaintext is rebuilt from the local shards (each checked against its id) and
   written to the cache, synced to disk; the block joins ``BlockStore.under``, which
   pins it there;
2. in one ``meta.lmdb`` transaction its holders become "none" and its local shards are
   queued for deletion (table ``gc``);
3. its shards are sealed again from the plaintext (same ids, the record keeps the nonce)
   and queued for upload; the uploader and repair place them like any other block's.

A crash between steps leaves either the old local block (the cache copy is then just a
cached copy) or a block waiting for upload with its plaintext safely in the cache,
which the next start finds and uploads. Only a bounded number of blocks wait in that
state at once, because each pins a block of cache space.
"""

from __future__ import annotations

import logging

import trio

from fluidfs.blocks.blockstore import BlockStore, BlockUnavailable
from fluidfs.blocks.codec import BlockError
from fluidfs.blocks.record import LOCAL_HOLDER, NO_HOLDER, StoredBlock

log = logging.getLogger(__name__)

MAX_WAITING = 32  # blocks pinned in the cache awaiting upload, counting new writes
INTERVAL = 5.0  # while the node has no peers
WAIT_FOR_ROOM = 0.5  # between looks for cache room and usable peers


class Migrator:
    """Moves local-only blocks onto peers, a bounded number at a time."""

    def __init__(self, blocks: BlockStore, max_waiting: int = MAX_WAITING) -> None:
        self.blocks = blocks
        self.max_waiting = max_waiting
        self.moved_blocks = 0
        self.done = trio.Event()  # every local-only block found has been dealt with
        self._wakeup = trio.Event()

    def wake(self) -> None:
        """Peers appeared: look again now."""
        self._wakeup.set()

    async def _nap(self, seconds: float) -> None:
        with trio.move_on_after(seconds):
            await self._wakeup.wait()
        self._wakeup = trio.Event()

    async def run(self) -> None:
        """Move every local-only block once the node has peers, then stop.

        Blocks become local-only only while the node has no peers, so one scan after it
        gets them finds all there will ever be.
        """
        while self.blocks.remote is None:
            await self._nap(INTERVAL)
        todo = await trio.to_thread.run_sync(
            self.blocks.local_only_ids, limiter=self.blocks.limiter
        )
        if todo:
            log.info("moving %d blocks stored before this node had peers onto peers", len(todo))
        for block_id in todo:
            stored = self.blocks.load(block_id)
            while stored is not None and not self._room_for(stored):
                await self._nap(WAIT_FOR_ROOM)
                stored = self.blocks.load(block_id)
            if stored is not None and LOCAL_HOLDER in stored.holders:
                try:
                    if await self.migrate(stored):
                        self.moved_blocks += 1
                except (BlockUnavailable, BlockError, OSError) as exc:
                    log.error("cannot move block %s to peers: %s", block_id.hex()[:16], exc)
        self.done.set()

    async def settle(self, stall: float) -> bool:
        """Wait until migration is done, or until no block has moved for *stall* seconds
        (too few peers with room). True if it is done."""
        while not self.done.is_set():
            before = self.moved_blocks
            with trio.move_on_after(stall):
                await self.done.wait()
            if self.moved_blocks == before:
                break
        return self.done.is_set()

    def _room_for(self, stored: StoredBlock) -> bool:
        """Cache room to pin one more block, and enough peers with space that the block
        will not depend on this machine once placed."""
        if len(self.blocks.under) >= self.max_waiting:
            return False
        remote = self.blocks.remote
        usable = remote.usable_peers(stored.record.shard_size) if remote is not None else []
        return len(usable) >= stored.record.needed

    async def migrate(self, stored: StoredBlock) -> bool:
        """Turn one local-only block into one waiting for upload (see the module doc)."""
        blocks = self.blocks
        record = stored.record
        block_id = record.block_id
        data = await blocks.rebuild(stored)  # from the local shards, each one checked
        blocks.under.add(block_id)  # pinned from the moment it is in the cache
        converted = gone = False
        try:
            await trio.to_thread.run_sync(
                blocks.cache.insert_io, block_id, data, True, limiter=blocks.limiter
            )
            blocks.cache.note(block_id, len(data))
            with blocks.meta.write() as txn:
                current = blocks.load(block_id, txn)
                gone = current is None
                if current is not None and current.holders == stored.holders:
                    blocks.collector.enqueue(txn, current)  # the local shards
                    current.holders = [NO_HOLDER] * record.total
                    blocks.save(txn, current)
                    converted = True
        finally:
            if not converted:
                blocks.under.discard(block_id)
        if gone and blocks.cache.forget(block_id):  # deleted meanwhile: no stray copy
            await trio.to_thread.run_sync(
                blocks.cache.remove_io, [block_id], limiter=blocks.limiter
            )
        if not converted:
            return False
        blocks.collector.wake()
        shards = await trio.to_thread.run_sync(
            blocks.codec.reseal, record, data, limiter=blocks.limiter
        )
        await blocks.queue_upload(record, shards)
        return True
