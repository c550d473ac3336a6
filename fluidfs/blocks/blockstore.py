"""The blockstore: sealed blocks, their records and references, and the cache.

``put`` turns plaintext into a stored block (deduplicated by block id) and
returns with one reference taken for the caller. ``read`` serves bytes of a
block from the plaintext cache, rebuilding it from shards when it is not there.
CPU work and shard I/O run in worker threads under a capacity limiter; records
and reference counts live in ``meta.lmdb`` table ``blocks`` and change only on
the trio loop, in the caller's transaction where a file map changes with them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import trio

from fluidfs.blocks.cache import BlockCache
from fluidfs.blocks.codec import BlockCodec, BlockError, BlockRecord, NotEnoughShards
from fluidfs.blocks.record import LOCAL_HOLDER, NO_HOLDER, StoredBlock
from fluidfs.store.db import Database
from fluidfs.store.shards import ShardStore

log = logging.getLogger(__name__)


class BlockUnavailable(Exception):
    """A block cannot be rebuilt now (too few good shards reachable)."""


class BlockStore:
    """Stores blocks as N shards (locally until peers exist) and caches plaintext."""

    def __init__(
        self,
        meta: Database,
        shards: ShardStore,
        codec: BlockCodec,
        cache: BlockCache,
        owner: bytes,
        limiter: trio.CapacityLimiter,
    ) -> None:
        self.meta = meta
        self.shards = shards
        self.codec = codec
        self.cache = cache
        self.owner = owner
        self.limiter = limiter
        self._blocks = meta["blocks"]
        self._rebuilding: dict[bytes, trio.Event] = {}
        self.cache.can_evict = self.is_fully_stored

    # --- records ---------------------------------------------------------------------

    def load(self, block_id: bytes, txn=None) -> StoredBlock | None:
        """The stored block's record, or None."""
        if txn is None:
            with self.meta.read() as own:
                raw = own.get(block_id, db=self._blocks)
        else:
            raw = txn.get(block_id, db=self._blocks)
        return None if raw is None else StoredBlock.decode(block_id, raw)

    def is_fully_stored(self, block_id: bytes) -> bool:
        """True when every shard of the block has a holder (so its plaintext may go)."""
        stored = self.load(block_id)
        return stored is None or NO_HOLDER not in stored.holders

    def add_ref(self, txn, block_id: bytes) -> None:
        """Take one more reference to an existing block, inside *txn*."""
        stored = self.load(block_id, txn)
        if stored is None:
            raise KeyError(block_id.hex())
        stored.refcount += 1
        txn.put(block_id, stored.encode(), db=self._blocks)

    def drop_ref(self, txn, block_id: bytes) -> StoredBlock | None:
        """Drop one reference inside *txn*; return the block if it is now unreferenced.

        The record is deleted in *txn*; pass the returned block to ``release``
        after the transaction commits to delete its shards and cached copy.
        """
        stored = self.load(block_id, txn)
        if stored is None:
            return None
        stored.refcount -= 1
        if stored.refcount > 0:
            txn.put(block_id, stored.encode(), db=self._blocks)
            return None
        txn.delete(block_id, db=self._blocks)
        return stored

    async def release(self, dead: list[StoredBlock]) -> None:
        """Delete the shards and cached plaintext of blocks no longer referenced."""
        if not dead:
            return
        gone = [s.record.block_id for s in dead if self.cache.forget(s.record.block_id)]
        ids = [sid for s in dead for sid in s.record.shard_ids]
        await trio.to_thread.run_sync(
            self.shards.delete_many, self.owner, ids, limiter=self.limiter
        )
        if gone:
            await trio.to_thread.run_sync(self.cache.remove_io, gone, limiter=self.limiter)

    # --- writing -----------------------------------------------------------------------

    async def put(self, data: bytes, source: Path | None = None) -> bytes:
        """Store *data* as a block and take a reference to it; return the block id.

        If *source* is a file holding exactly *data*, it is moved into the cache
        (no copy); otherwise the cache gets a fresh copy.
        """
        block_id = await trio.to_thread.run_sync(self.codec.block_id, data, limiter=self.limiter)
        if not self._ref_if_present(block_id):
            record, _shards = await trio.to_thread.run_sync(
                self._seal_and_store, data, block_id, limiter=self.limiter
            )
            if not self._ref_if_present(block_id):
                stored = StoredBlock(record, 1, [LOCAL_HOLDER] * record.total)
                with self.meta.write() as txn:
                    txn.put(block_id, stored.encode(), db=self._blocks)
            else:  # sealed concurrently by someone else: ours is surplus
                await trio.to_thread.run_sync(
                    self.shards.delete_many,
                    self.owner,
                    list(record.shard_ids),
                    limiter=self.limiter,
                )
        try:
            await self._cache_put(block_id, data, source)
        except BaseException:
            with self.meta.write() as txn:  # give back the reference this call took
                dead = self.drop_ref(txn, block_id)
            if dead is not None:
                with trio.CancelScope(shield=True):
                    await self.release([dead])
            raise
        return block_id

    def _ref_if_present(self, block_id: bytes) -> bool:
        with self.meta.write() as txn:
            if txn.get(block_id, db=self._blocks) is None:
                return False
            self.add_ref(txn, block_id)
        return True

    def _seal_and_store(self, data: bytes, block_id: bytes) -> tuple[BlockRecord, list[bytes]]:
        record, shards = self.codec.seal(data, block_id)
        self.shards.put_many(self.owner, zip(record.shard_ids, shards, strict=True))
        return record, shards

    async def _cache_put(self, block_id: bytes, data: bytes, source: Path | None) -> None:
        if block_id in self.cache:
            self.cache.touch(block_id)
            if source is not None:
                await trio.to_thread.run_sync(source.unlink, limiter=self.limiter)
        elif source is not None:
            await trio.to_thread.run_sync(
                self.cache.adopt_io, block_id, source, limiter=self.limiter
            )
            self.cache.note(block_id, len(data))
        else:
            await trio.to_thread.run_sync(
                self.cache.insert_io, block_id, data, limiter=self.limiter
            )
            self.cache.note(block_id, len(data))
        await self.evict()

    async def evict(self) -> None:
        """Bring the cache back under its capacity."""
        victims = self.cache.victims()
        if victims:
            await trio.to_thread.run_sync(self.cache.remove_io, victims, limiter=self.limiter)

    # --- reading -----------------------------------------------------------------------

    async def read(self, block_id: bytes, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of a block (short at the block's end)."""
        while True:
            if block_id in self.cache:
                self.cache.touch(block_id)
                data = await trio.to_thread.run_sync(
                    self.cache.read_io, block_id, offset, size, limiter=self.limiter
                )
                if data is not None:
                    return data
                self.cache.forget(block_id)
            await self.fetch(block_id)

    async def fetch(self, block_id: bytes) -> None:
        """Make sure the block's plaintext is in the cache, rebuilding it from shards."""
        if block_id in self.cache:
            return
        pending = self._rebuilding.get(block_id)
        if pending is not None:
            await pending.wait()
            if block_id not in self.cache:
                raise BlockUnavailable(block_id.hex())
            return
        done = self._rebuilding[block_id] = trio.Event()
        try:
            stored = self.load(block_id)
            if stored is None:
                raise BlockUnavailable(f"no record for block {block_id.hex()[:16]}")
            data = await trio.to_thread.run_sync(self._rebuild, stored.record, limiter=self.limiter)
            await trio.to_thread.run_sync(
                self.cache.insert_io, block_id, data, limiter=self.limiter
            )
            self.cache.note(block_id, len(data))
        finally:
            del self._rebuilding[block_id]
            done.set()
        await self.evict()

    def _rebuild(self, record: BlockRecord) -> bytes:
        good: dict[int, bytes] = {}
        for index, shard_id in enumerate(record.shard_ids):
            data = self.shards.get(self.owner, shard_id)
            if data is None:
                log.warning("block %s: shard %d missing", record.block_id.hex()[:16], index)
                continue
            if not self.codec.check_shard(record, index, data):
                log.warning(
                    "block %s: shard %d corrupt, using another", record.block_id.hex()[:16], index
                )
                continue
            good[index] = data
            if len(good) == record.needed:
                break
        try:
            return self.codec.open(record, good, verified=True)
        except NotEnoughShards as exc:
            log.error("block %s unrecoverable: %s", record.block_id.hex()[:16], exc)
            raise BlockUnavailable(str(exc)) from None
        except BlockError as exc:
            log.error("block %s: %s", record.block_id.hex()[:16], exc)
            raise BlockUnavailable(str(exc)) from None

    def block_size(self, block_id: bytes) -> int:
        """Plaintext length of a stored block (0 if unknown)."""
        stored = self.load(block_id)
        return 0 if stored is None else stored.record.size

    def count(self) -> int:
        """Number of distinct stored blocks."""
        with self.meta.read() as txn:
            return txn.stat(self._blocks)["entries"]


__all__ = ["BlockStore", "BlockUnavailable"]
