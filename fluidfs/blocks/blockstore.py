"""The blockstore: sealed blocks, their records and references, and the cache.

``put`` turns plaintext into a stored block (deduplicated by block id) and
returns with one reference taken for the caller (or for the holder its ``bind``
records in the same transaction, so a crash never leaves a reference nobody holds).
``read`` serves bytes of a block from the plaintext cache, rebuilding it from shards
when it is not there.
CPU work and shard I/O run in worker threads under a capacity limiter; records
and reference counts live in ``meta.lmdb`` table ``blocks`` and change on the trio
loop, in the caller's transaction where a file map changes with them. The two scans
that visit every record (``forget_holder`` when an agreement ends, and
``find_under_replicated`` when the node gets peers) run in worker threads, SCAN_BATCH
records per transaction, so the loop never waits on them and a writer on the loop
waits at most for one batch to commit.

A holder caught returning a corrupt copy of a shard is dealt with in suspects.py.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from fluidfs.blocks.ahead import SmallAhead
from fluidfs.blocks.cache import BlockCache
from fluidfs.blocks.codec import BlockCodec, BlockError, BlockRecord, NotEnoughShards
from fluidfs.blocks.gc import Collector
from fluidfs.blocks.recent import RecentBlocks
from fluidfs.blocks.record import LOCAL_HOLDER, NO_HOLDER, StoredBlock
from fluidfs.blocks.recordwrites import JoinedWrites
from fluidfs.blocks.remote import RemoteShards, opened
from fluidfs.blocks.suspects import Suspects
from fluidfs.concurrency import ByteBudget
from fluidfs.diskspace import DiskReserve, is_disk_full
from fluidfs.net.bandwidth import UPLOAD
from fluidfs.net.messages import MAX_BATCH_SHARD
from fluidfs.store.db import SCAN_BATCH, Database, scan_batch
from fluidfs.store.shards import SHARD_OVERHEAD, ShardStore

log = logging.getLogger(__name__)

UPLOAD_QUEUE = 4  # sealed blocks waiting for upload (each N shards in memory)
UPLOADERS = 4  # blocks uploading at once
# Shard bytes of large blocks queued or uploading (small ones: SMALL_UPLOADS): what the
# queue and the uploaders held at most with 4 MiB blocks (8 x 12 x 512 KiB), so that
# larger blocks do not multiply the memory a large copy takes (fewer of them wait).
UPLOAD_BYTES = 48 << 20
# Small blocks (metadata nodes: every shard at most MAX_BATCH_SHARD) uploading at once,
# besides: their shards go to each peer together in StoreShard calls
# (blocks/storebatch.py), and the more are in flight the fuller those calls are. Their
# shards in memory stay under SMALL_UPLOADS x N x MAX_BATCH_SHARD (48 MiB at N = 12).
SMALL_UPLOADS = 64
PREFETCH_MAX = 3  # blocks rebuilt ahead of a sequential reader
SYNC_BATCH = 64  # cache files synced per worker-thread hop by ``make_durable``

# Records who holds a new reference, in the transaction that takes it (see ``put``):
# bind(txn, block_id) -> the blocks it left unreferenced.
Bind = Callable[[Any, bytes], list[StoredBlock]]
# Returns a block's plaintext; ``put`` calls it in a worker thread (a dirty file's read).
Load = Callable[[], bytes]


class BlockUnavailable(Exception):
    """A block cannot be rebuilt now (too few good shards reachable)."""


_UNPARSED = object()  # _fetch: the block was not parsed by this call


def _unwrap(parsed: Any) -> Any:
    """What a parse in a worker thread returned, raising what it raised."""
    if isinstance(parsed, Exception):
        raise parsed
    return parsed

def _upload_cost(record: BlockRecord, shards: list[bytes]) -> int:
    """Bytes of *shards* counted against UPLOAD_BYTES (0 for a small block's)."""
    return 0 if record.shard_size <= MAX_BATCH_SHARD else sum(len(s) for s in shards)


def _part(data: bytes, offset: int, size: int, view: bool) -> bytes | memoryview:
    """``data[offset : offset + size]``, as a view of *data* if *view*."""
    return memoryview(data)[offset : offset + size] if view else data[offset : offset + size]


class _Rebuild:
    """One block being rebuilt; callers that wait for it get its plaintext."""

    __slots__ = ("data", "done")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None  # set on success


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
        reserve: DiskReserve | None = None,
    ) -> None:
        self.meta = meta
        self.shards = shards
        self.codec = codec
        self.cache = cache
        # The state disk's, for every data write (shared with the peer service's stores).
        self.reserve = DiskReserve(cache.root) if reserve is None else reserve
        self.owner = owner
        self.limiter = limiter
        self._blocks = meta["blocks"]
        self._rebuilding: dict[bytes, _Rebuild] = {}
        self.remote: RemoteShards | None = None  # set when the node has peers
        self.under: set[bytes] = set()  # blocks with shards that have no holder yet
        # Blocks of ``under`` whose cached plaintext, their only copy until their shards
        # are placed, was written without a sync: ``make_durable`` (fsync) syncs them.
        self.unsynced: set[bytes] = set()
        self.synced_files = 0  # cache files ``make_durable`` synced (status --json)
        self.uploading: set[bytes] = set()
        # Sealed by ``put`` and handed to the uploaders, not yet uploading: repair leaves
        # them to their upload as it does ``uploading`` (else a commit's nodes waiting in
        # the queue were located on every peer and rebuilt, racing their first upload).
        self.queued: set[bytes] = set()
        self._upload_ended = trio.Event()  # set (and replaced) whenever an upload ends
        # Uploads that end in the same round of the loop record their holders in one
        # write transaction (blocks/recordwrites.py).
        self._records = JoinedWrites(meta)
        # Block id -> events of waiters for that block's upload to end (``upload_ended``).
        self._ended_for: dict[bytes, list[trio.Event]] = {}
        self._small_uploads = trio.Semaphore(SMALL_UPLOADS)
        self._upload_bytes = ByteBudget(UPLOAD_BYTES)  # large blocks' shards handed over
        self._upload_send, self._upload_recv = trio.open_memory_channel[
            tuple[BlockRecord, list[bytes]]
        ](UPLOAD_QUEUE)
        self.uploaded_bytes = 0
        self.putting = 0  # ``put`` calls running (their blocks may be new: uploads to come)
        self._running = False
        self._nursery: trio.Nursery | None = None
        self._prefetching = 0
        self.cache.can_evict = self.is_fully_stored
        self.recent = RecentBlocks()  # rebuilt plaintext, in memory (recent.py)
        self.ahead = SmallAhead(self.fetch, self.at_hand)  # small blocks before reads
        self.collector = Collector(meta, shards, owner, limiter)
        # Shards a block may lack and still count as stored (unpinned, not repaired).
        self.total_missing_allowed = 0
        # Local-only blocks (``local_only_ids``): those found by the one scan of every
        # record (None before it), and those saved with this machine as a holder since
        # it began. Blocks only stop being local-only once the node has peers, so after
        # the scan only these candidates need a look.
        self._local_found: set[bytes] | None = None
        self._local_saved: set[bytes] = set()
        self._local_lock = threading.Lock()  # save() on the loop, the look in a thread
        self._local_looking = threading.Lock()  # one look at a time: each hands on its set
        self.local_looked = 0  # records the last ``local_only_ids`` read (for tests)
        # Goes up whenever any block's holders change, so a commit can tell whether a
        # refresh would name anything new (fs/commit.py writes holders into the tree).
        self.holders_version = 0
        # Goes up whenever a record is saved with all its holders (within the allowance):
        # a commit re-reads directories naming short references only then (fs/dirstate.py).
        # The epoch tells this process's count from an earlier one's.
        self.placed_version = 0
        self.placed_epoch = os.urandom(8)
        self.suspects = Suspects(self)  # holders caught returning corrupt shards

    # --- records ---------------------------------------------------------------------

    def load(self, block_id: bytes, txn=None) -> StoredBlock | None:
        """The stored block's record, or None."""
        if txn is None:
            with self.meta.read() as own:
                raw = own.get(block_id, db=self._blocks)
        else:
            raw = txn.get(block_id, db=self._blocks)
        return None if raw is None else StoredBlock.decode(block_id, raw)

    def save(self, txn, stored: StoredBlock) -> None:
        """Write a block record whose holders are new or changed, inside *txn*."""
        txn.put(stored.record.block_id, stored.encode(), db=self._blocks)
        if LOCAL_HOLDER in stored.holders:
            with self._local_lock:
                self._local_saved.add(stored.record.block_id)
        self.holders_version += 1
        if stored.missing() <= self.total_missing_allowed:
            self.placed_version += 1

    def placement_stamp(self) -> bytes:
        """``placed_epoch ‖ u64 placed_version``: differs once another block is placed."""
        return self.placed_epoch + self.placed_version.to_bytes(8, "big")

    def local_only_ids(self) -> list[bytes]:
        """Blocks whose shards are all still on this machine (stored before it had peers),
        in id order. The first call scans every record, each SCAN_BATCH records in a
        transaction of their own (no reader stays open for the whole scan); later calls
        look again only at the blocks found then and those saved local since (every
        ``sync`` asks: a scan of a 1,000,000-file tree's records each time grew with the
        tree). Call it in a worker thread."""
        with self._local_looking:
            return self._local_only_ids()

    def _local_only_ids(self) -> list[bytes]:
        with self._local_lock:
            found = self._local_found
            self._local_saved, saved = set(), self._local_saved
        looked = 0
        still: set[bytes] = set()
        if found is None:  # the scan's findings are current: only what was saved since
            after: bytes | None = b""
            while after is not None:
                with self.meta.read() as txn:
                    records, after = scan_batch(txn, self._blocks, after, SCAN_BATCH)
                looked += len(records)
                still.update(
                    key for key, raw in records
                    if LOCAL_HOLDER in StoredBlock.decode(key, raw).holders
                )
            candidates = sorted(saved - still)
        else:
            candidates = sorted(found | saved)
        for start in range(0, len(candidates), SCAN_BATCH):
            with self.meta.read() as txn:
                for block_id in candidates[start : start + SCAN_BATCH]:
                    stored = self.load(block_id, txn)
                    if stored is not None and LOCAL_HOLDER in stored.holders:
                        still.add(block_id)
            looked += min(SCAN_BATCH, len(candidates) - start)
        with self._local_lock:
            self._local_found = set(still)
        self.local_looked = looked
        return sorted(still)

    def is_fully_stored(self, block_id: bytes) -> bool:
        """True when every shard of the block has a holder (so its plaintext may go)."""
        return block_id not in self.under

    def add_ref(self, txn, block_id: bytes) -> None:
        """Take one more reference to an existing block, inside *txn*."""
        stored = self.load(block_id, txn)
        if stored is None:
            raise KeyError(block_id.hex())
        stored.refcount += 1
        txn.put(block_id, stored.encode(), db=self._blocks)

    def drop_ref(self, txn, block_id: bytes) -> StoredBlock | None:
        """Drop one reference inside *txn*; return the block if it is now unreferenced.

        The record is deleted in *txn* and its shards are queued for deletion in the
        same transaction; pass the returned block to ``release`` after the
        transaction commits to drop its cached copy and start the deletes.
        """
        stored = self.load(block_id, txn)
        if stored is None:
            return None
        stored.refcount -= 1
        if stored.refcount > 0:
            txn.put(block_id, stored.encode(), db=self._blocks)
            return None
        txn.delete(block_id, db=self._blocks)
        self.collector.enqueue(txn, stored)
        return stored

    async def release(self, dead: list[StoredBlock]) -> None:
        """Delete the shards and cached plaintext of blocks no longer referenced."""
        if not dead:
            return
        gone = [s.record.block_id for s in dead if self.cache.forget(s.record.block_id)]
        for stored in dead:
            self.under.discard(stored.record.block_id)
            self.unsynced.discard(stored.record.block_id)
            self.recent.forget(stored.record.block_id)
        await self.collector.collect(local_only=True)  # this node's own shards: now
        self.collector.wake()  # peers' copies: by the collector, retried until done
        if gone:
            await trio.to_thread.run_sync(self.cache.remove_io, gone, limiter=self.limiter)

    # --- writing -----------------------------------------------------------------------

    async def put(
        self,
        data: bytes | Load,
        source: Path | None = None,
        bind: Bind | None = None,
        *,
        block_id: bytes | None = None,
    ) -> bytes:
        """Store *data* as a block and take a reference to it; return the block id.

        *data* is the plaintext, or a function returning it (``Load``: read from a file,
        say), called in the same worker thread that hashes and seals it. *block_id*, if
        the caller has it already (``codec.block_id(data)``), saves hashing it again.

        If *source* is a file holding exactly *data*, it is moved into the cache
        (no copy); otherwise the cache gets a fresh copy. With peers, the block's
        shards are queued for upload and its plaintext stays pinned in the cache
        until every shard has a holder; the queue is bounded, so a slow network
        slows sealing (never the writes to the mount, which land in dirty blocks).

        *bind*, if given, is called as ``bind(txn, block_id)`` inside the write
        transaction that takes the reference, to record who holds it (a file's block
        map): a crash leaves both or neither, never a reference nobody holds. It returns
        the blocks it left unreferenced, released once that transaction commits. *source*
        moves into the cache only after the commit, so until then it is still there to be
        stored again. The reference then belongs to what *bind* wrote: if caching fails,
        the error goes up, the reference stays and *source* stays where it was (putting
        it again finds the block, a dedup). Without *bind*, a failure gives the reference
        back.

        Loading, hashing, the dedup lookup and sealing take one worker-thread hop (a hop
        per step cost the event loop more than some of the steps, issue 16); the lookup
        is done again on the loop, in the one transaction that saves the record (or
        takes a reference to a block stored meanwhile, whose shards sealed here are then
        surplus) and runs *bind*.
        """
        self.putting += 1
        try:
            return await self._put(data, source, bind, block_id)
        finally:
            self.putting -= 1
            if self.remote is not None:  # a call gathering shards need not wait for ours
                self.remote.store_batches.poke()

    async def _put(
        self, data: bytes | Load, source: Path | None, bind: Bind | None,
        block_id: bytes | None,
    ) -> bytes:
        local = self.remote is None
        data, block_id, sealed, cached = await trio.to_thread.run_sync(
            self._prepare, data, block_id, local, source is None, limiter=self.limiter
        )
        if cached:  # evictable as soon as it is fully stored, or if it goes unreferenced
            self.cache.note(block_id, len(data))
        upload: tuple[BlockRecord, list[bytes]] | None = None
        surplus = False
        dead = self._ref_if_present(block_id, bind) if sealed is None else None
        if dead is None:
            if sealed is None:  # present when looked up, gone since: seal it after all
                seal = self._seal_and_store if local else self.codec.seal
                sealed = await trio.to_thread.run_sync(seal, data, block_id, limiter=self.limiter)
            record, shards = sealed
            holders = [LOCAL_HOLDER if local else NO_HOLDER] * record.total
            with self.meta.write() as txn:  # one transaction: present now, or saved
                present = txn.get(block_id, db=self._blocks) is not None
                if present:  # sealed concurrently by someone else
                    self.add_ref(txn, block_id)
                else:
                    self.save(txn, StoredBlock(record, 1, holders))
                dead = bind(txn, block_id) if bind is not None else []
            if not present:
                if not local:
                    self.under.add(block_id)
                    self.queued.add(block_id)
                    upload = (record, shards)
            elif local:
                surplus = True  # the local shards we wrote
        if surplus:
            assert sealed is not None
            await trio.to_thread.run_sync(
                self.shards.delete_many,
                self.owner,
                list(sealed[0].shard_ids),
                limiter=self.limiter,
            )
        try:
            await self.release(dead)
            await self._cache_put(block_id, data, source)
        except BaseException:
            if bind is None:
                with self.meta.write() as txn:  # give back the reference this call took
                    gone = self.drop_ref(txn, block_id)
                if gone is not None:
                    with trio.CancelScope(shield=True):
                        await self.release([gone])
            elif upload is not None and self._hand_over_nowait(*upload):
                upload = None  # mapped: its shards still go out (else repair's to place)
            if upload is not None:
                self.queued.discard(block_id)  # not queued after all: repair's to place
            raise
        # Cached now: a block read back from its dirty file is not held while its upload
        # waits its turn (two sealers waiting held two blocks' plaintext besides shards).
        del data
        if upload is not None:
            try:
                await self.queue_upload(*upload)
            except BaseException:
                self.queued.discard(block_id)
                raise
        return block_id

    def _prepare(
        self, data: bytes | Load, block_id: bytes | None, local: bool, cache: bool
    ) -> tuple[bytes, bytes, tuple[BlockRecord, list[bytes]] | None, bool]:
        """``put``'s worker-thread part: (plaintext, block id, its record and shards, or
        None if the block is stored already, whether its plaintext was written to the
        cache). With *cache*, a block sealed here is also written to the cache in this
        hop (a hop of its own per block was a sixth of a first sync's hops); a write that
        fails (a full disk) is left to ``_cache_put``, which makes room and tries again."""
        if callable(data):
            data = data()
        if block_id is None:
            block_id = self.codec.block_id(data)
        with self.meta.read() as txn:
            if txn.get(block_id, db=self._blocks) is not None:
                return data, block_id, None, False
        seal = self._seal_and_store if local else self.codec.seal
        sealed = seal(data, block_id)
        cached = False
        if cache:
            try:
                self._reserved(len(data), self.cache.insert_io, block_id, data)
                cached = True
            except OSError:
                pass  # put's ``_cache_put`` writes it, dropping cached blocks if need be
        return data, block_id, sealed, cached

    def _ref_if_present(self, block_id: bytes, bind: Bind | None) -> list[StoredBlock] | None:
        """Take a reference to the block (and run *bind*) if it is stored; None if not,
        else the blocks *bind* left unreferenced."""
        with self.meta.write() as txn:
            if txn.get(block_id, db=self._blocks) is None:
                return None
            self.add_ref(txn, block_id)
            return bind(txn, block_id) if bind is not None else []

    def _seal_and_store(self, data: bytes, block_id: bytes) -> tuple[BlockRecord, list[bytes]]:
        record, shards = self.codec.seal(data, block_id)
        size = sum(len(shard) + SHARD_OVERHEAD for shard in shards)
        with self.reserve.claim(size):
            self.shards.put_many(self.owner, zip(record.shard_ids, shards, strict=True))
        return record, shards

    # --- uploading (with peers) ----------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the uploaders and the top-up loop (idle until the node has peers)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._running = True
                for _ in range(UPLOADERS):
                    nursery.start_soon(self._uploader)
                if self.remote is not None:
                    nursery.start_soon(self.find_under_replicated)
                nursery.start_soon(self.collector.run)
                nursery.start_soon(self.ahead.run)
                task_status.started()
        finally:
            self._running = False
            self._nursery = None

    def start_soon(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Run *fn(*args)* in the blockstore's background; False if it is not running."""
        if self._nursery is None:
            return False
        self._nursery.start_soon(fn, *args)
        return True

    def use_network(self, remote: RemoteShards) -> None:
        """From now on, shards go to peers (called once the node has peers)."""
        if self.remote is None:
            self.remote = remote
            remote.journal = self.collector
            # Blocks being put (sealed, or about to be) and waiting for an uploader: their
            # shards join the StoreShard queues soon, so a call about to leave half empty
            # waits for them (storebatch.py GATHER_SHARDS).
            remote.store_batches.coming = lambda: self.putting + len(self.queued)
            remote.on_corrupt = self.suspects.caught
            remote.on_missing = self.mark_lost
            self.collector.remote_delete = remote.delete_ids
            self.start_soon(self.find_under_replicated)  # else run() starts it

    def recover_journal(self) -> int:
        """After a restart, shards sent but never recorded become garbage."""

        def holds(txn, block_id: bytes, holder: int, shard_id: bytes) -> bool:
            stored = self.load(block_id, txn)
            return (
                stored is not None
                and shard_id in stored.record.shard_ids
                and stored.holders[stored.record.shard_ids.index(shard_id)] == holder
            )

        return self.collector.recover(holds)

    async def drain(self) -> None:
        """Wait until every queued upload has been tried."""
        while self._running and (
            self._upload_send.statistics().current_buffer_used or self.uploading
            or self._small_uploads.value < SMALL_UPLOADS  # started, perhaps not running yet
        ):
            await self.upload_ended(0.05)

    async def upload_ended(self, timeout: float, ids: list[bytes] | None = None) -> None:
        """Return as soon as an upload ends (holders may have changed), at the latest
        after *timeout* seconds; with *ids*, an upload of one of those blocks. Waiters on
        placement wake the moment it happens instead of at their next poll: a small
        commit waits for a few nodes in turn, and polling cost each of them up to a whole
        interval. A commit's node writers each wait for their own node: woken by every
        upload's end, each re-read its record at every one of them (O(nodes in flight)
        per upload)."""
        if ids is None:
            with trio.move_on_after(timeout):
                await self._upload_ended.wait()
            return
        ended = trio.Event()
        for block_id in ids:
            self._ended_for.setdefault(block_id, []).append(ended)
        try:
            with trio.move_on_after(timeout):
                await ended.wait()
        finally:
            for block_id in ids:
                waiters = self._ended_for.get(block_id)
                if waiters is not None:
                    waiters.remove(ended)
                    if not waiters:
                        del self._ended_for[block_id]

    async def find_under_replicated(self) -> int:
        """Add every block short of holders to ``under`` (a scan in worker threads, in
        batches of SCAN_BATCH records); return how many were found."""
        found = 0
        after: bytes | None = b""
        while after is not None:
            under, after = await trio.to_thread.run_sync(
                self._under_batch, after, limiter=self.limiter
            )
            self.under.update(under)
            found += len(under)
        return found

    def _under_batch(self, after: bytes) -> tuple[list[bytes], bytes | None]:
        """Blocks short of holders among the SCAN_BATCH records after key *after*, and
        where the next batch starts (None at the end). Runs in a worker thread."""
        with self.meta.read() as txn:
            records, after = scan_batch(txn, self._blocks, after, SCAN_BATCH)
        return [
            key
            for key, raw in records
            if StoredBlock.decode(key, raw).missing() > self.total_missing_allowed
        ], after

    async def queue_upload(self, record: BlockRecord, shards: list[bytes]) -> None:
        """Hand a block's shards to the uploaders (waits while the queue is full, or
        for a large block while UPLOAD_BYTES of large blocks' shards are handed over)."""
        cost = _upload_cost(record, shards)
        await self._upload_bytes.take(cost)
        try:
            await self._upload_send.send((record, shards))
        except BaseException:
            self._upload_bytes.give(cost)
            raise

    def _hand_over_nowait(self, record: BlockRecord, shards: list[bytes]) -> bool:
        """``queue_upload`` if it need not wait; False (nothing handed over) if it must."""
        cost = _upload_cost(record, shards)
        if not self._upload_bytes.try_take(cost):
            return False
        try:
            self._upload_send.send_nowait((record, shards))
        except trio.WouldBlock:
            self._upload_bytes.give(cost)
            return False
        return True

    async def _uploader(self) -> None:
        async for record, shards in self._upload_recv:
            if record.shard_size <= MAX_BATCH_SHARD and self._nursery is not None:
                await self._small_uploads.acquire()  # released when that upload ends
                self._nursery.start_soon(self._upload_small, record, shards)
            else:
                cost = _upload_cost(record, shards)
                try:
                    await self._upload_queued(record, shards)
                finally:
                    del shards  # the budget is free once nothing here holds them
                    self._upload_bytes.give(cost)

    async def _upload_small(self, record: BlockRecord, shards: list[bytes]) -> None:
        try:
            await self._upload_queued(record, shards)
        finally:
            self._small_uploads.release()

    async def _upload_queued(self, record: BlockRecord, shards: list[bytes]) -> None:
        try:
            await self.upload(record, shards)
        except Exception:
            # A bug in one block's placement must not end the block store (and
            # with it the mount): the block stays short of holders, where the
            # top-up finds it again.
            log.exception("uploading block %s failed", record.block_id.hex()[:12])
            self.under.add(record.block_id)

    async def upload(
        self,
        record: BlockRecord,
        shards: list[bytes],
        priority: int = UPLOAD,
        replacing: dict[int, int] | None = None,
    ) -> int:
        """Place the shards of *record* that have no holder yet; return the bytes placed.

        *priority*: their turn under the upload limit (net/bandwidth.py); new data by
        default, repair passes the block's ``repair_priority``. *replacing* (emergency
        repair, blocks/emergency.py): shard index -> a failing holder whose copy is
        placed anew elsewhere; the old copy is queued for deletion only in the
        transaction that records the new holder, and only if the old holder is still
        failing then (otherwise its copy counts again and the new one is taken back)."""
        block_id = record.block_id
        self.queued.discard(block_id)  # from here on ``uploading``, or not due at all
        stored = self.load(block_id)
        if stored is None or block_id in self.uploading:
            return 0
        replacing = {
            i: old for i, old in (replacing or {}).items() if stored.holders[i] == old
        }
        self.uploading.add(block_id)
        try:
            wanted = [NO_HOLDER if i in replacing else h for i, h in enumerate(stored.holders)]
            holders = list(wanted)
            # An emergency avoids every failing holder, not only this block's: a silent
            # peer would hold the new copy back until the store times out.
            avoid = self.remote.failing_holders() | set(replacing.values()) if replacing else ()
            await self.remote.place(record, shards, holders, priority, avoid=frozenset(avoid))
            new = [
                i
                for i, h in enumerate(holders)
                if wanted[i] == NO_HOLDER and h != NO_HOLDER
            ]
            self.uploaded_bytes += len(new) * record.shard_size
            failing = self.remote.failing_holders() if replacing else set()

            def record_holders(txn) -> tuple[StoredBlock | None, bool, list[int],
                                             dict[int, int]]:
                surplus: list[int] = []
                recounted: dict[int, int] = {}  # holder -> bytes counted twice (reclaim)
                current = self.load(block_id, txn)
                same = current is not None and current.record.shard_ids == record.shard_ids
                for i in new:
                    if same and current.holders[i] == NO_HOLDER:
                        current.holders[i] = holders[i]
                    elif (
                        same
                        and i in replacing
                        and current.holders[i] == replacing[i]
                        and replacing[i] in failing
                    ):
                        self.collector.enqueue_one(
                            txn, replacing[i], record.shard_ids[i], record.shard_size
                        )
                        current.holders[i] = holders[i]
                    else:
                        surplus.append(i)
                        continue
                    # A copy left there by an earlier emergency may still wait for deletion.
                    back = self.collector.reclaim(txn, holders[i], record.shard_ids[i])
                    if back:
                        recounted[holders[i]] = recounted.get(holders[i], 0) + back
                if same:
                    self.save(txn, current)
                    self.collector.placed(txn, current.holders, record.shard_ids)
                return current, same, surplus, recounted

            current, same, surplus, recounted = await self._records.write(record_holders)
            for holder, size in recounted.items():
                self.remote.give_back(holder, size)
            for i in surplus:  # deleted (or filled) while uploading: take back what we sent
                self.collector.abandon(holders[i], record.shard_ids[i], record.shard_size)
            if replacing:
                self.collector.wake()
            if same and current.missing() <= self.total_missing_allowed:
                self.under.discard(block_id)
                self.unsynced.discard(block_id)  # its shards are out: the copy may go
                await self.evict()
        finally:
            self.uploading.discard(block_id)
            self._upload_ended.set()
            self._upload_ended = trio.Event()
            for ended in self._ended_for.get(block_id, ()):
                ended.set()
        return (len(new) - len(surplus)) * record.shard_size

    def mark_lost(self, block_id: bytes, index: int, holder: int) -> None:
        """A holder no longer has a good copy of shard *index*: forget it there.

        The holder is also asked to delete whatever it keeps under that id, so the
        space it counts for us is freed.
        """
        with self.meta.write() as txn:
            stored = self.load(block_id, txn)
            if stored is None or stored.holders[index] != holder:
                return
            stored.holders[index] = NO_HOLDER
            self.save(txn, stored)
            self.collector.enqueue_one(
                txn, holder, stored.record.shard_ids[index], stored.record.shard_size
            )
        if stored.missing() > self.total_missing_allowed:
            self.under.add(block_id)
        self.collector.wake()

    def learn_holder(self, block_id: bytes, index: int, holder: int) -> None:
        """Shard *index* of the block turned up on *holder*: record it there."""
        with self.meta.write() as txn:
            stored = self.load(block_id, txn)
            if stored is None or stored.holders[index] == holder:
                return
            old = stored.holders[index]
            if old not in (NO_HOLDER, LOCAL_HOLDER):  # whatever it still keeps is surplus
                self.collector.enqueue_one(
                    txn, old, stored.record.shard_ids[index], stored.record.shard_size
                )
            stored.holders[index] = holder
            # A delete still queued there (an old copy, say) must not take the copy
            # the record now names; our usage figure counted it once and still does.
            self.collector.reclaim(txn, holder, stored.record.shard_ids[index])
            self.save(txn, stored)
        if stored.missing() <= self.total_missing_allowed:
            self.under.discard(block_id)

    async def forget_holder(self, holder: int) -> int:
        """A peer's agreement ended: none of its shards count any more. Returns how many
        shards are now missing in the blocks it held.

        Every record is visited, in worker threads, SCAN_BATCH records per write
        transaction: the loop stays free, and a writer on the loop waits at most for
        one batch. Each batch commits on its own; if the process stops half way, the
        holder is simply forgotten again at the next end of that agreement (lifecycle)
        or repaired as lost when audits find its shards gone.
        """
        lost = 0
        after: bytes | None = b""
        while after is not None:
            missing, under, after = await trio.to_thread.run_sync(
                self._forget_batch, holder, after, limiter=self.limiter
            )
            lost += missing
            self.under.update(under)
            if under or missing:
                self.holders_version += 1
        return lost

    def _forget_batch(
        self, holder: int, after: bytes
    ) -> tuple[int, list[bytes], bytes | None]:
        """Forget *holder* in the SCAN_BATCH records after key *after*, in one write
        transaction (in a worker thread). Returns (shards now missing in the records
        changed, blocks now short of holders, last key visited or None at the end)."""
        lost = 0
        under: list[bytes] = []
        with self.meta.write() as txn:
            records, after = scan_batch(txn, self._blocks, after, SCAN_BATCH)
            for key, raw in records:
                stored = StoredBlock.decode(key, raw)
                if holder not in stored.holders:
                    continue
                stored.holders = [NO_HOLDER if h == holder else h for h in stored.holders]
                lost += stored.missing()
                txn.put(key, stored.encode(), db=self._blocks)
                if stored.missing() > self.total_missing_allowed:
                    under.append(key)
        return lost, under, after

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
        else:  # new bytes on the state disk: they leave the metadata reserve alone
            await self.write_to_disk(self.cache.insert_io, block_id, data, size=len(data))
            self.cache.note(block_id, len(data))
        if block_id in self.under and block_id in self.cache:
            self.unsynced.add(block_id)
        await self.evict()

    async def make_durable(self) -> int:
        """Sync to stable storage the cached plaintext of every block for which it is the
        only copy (sealed, its shards not all placed yet) and that was not synced since
        it was written; return how many files were synced. fsync calls it: the block map
        it commits names those blocks, and a power loss (unlike a crash: the kernel
        keeps what was written) could otherwise leave a name for bytes that are gone.
        Each file is synced once, SYNC_BATCH per worker-thread hop; a block placed
        meanwhile needs no sync."""
        self.unsynced &= self.under
        todo = sorted(self.unsynced)  # by name: files of one directory together
        synced = 0
        for start in range(0, len(todo), SYNC_BATCH):
            batch = todo[start : start + SYNC_BATCH]
            synced += await trio.to_thread.run_sync(
                self.cache.sync_io, batch, limiter=self.limiter
            )
            self.unsynced.difference_update(batch)
        self.synced_files += synced
        return synced

    async def evict(self, capacity: int | None = None) -> int:
        """Bring the cache back under *capacity* (default: its own); return the bytes
        freed. Blocks not yet safely stored elsewhere stay."""
        before = self.cache.used
        victims = self.cache.victims(capacity)
        if victims:
            await trio.to_thread.run_sync(self.cache.remove_io, victims, limiter=self.limiter)
        return before - self.cache.used

    async def write_to_disk(self, write: Callable[..., Any], *args: Any, size: int) -> Any:
        """Run a blocking write to the state disk in a worker thread, adding at most
        *size* bytes to it (claimed from the reserve's budget while it runs). If the
        disk is full, the cache gives back every block that is safely stored elsewhere
        and the write is tried once more; if it still fails, the OSError (ENOSPC) goes
        up."""
        reserved = functools.partial(self._reserved, size, write)
        try:
            return await trio.to_thread.run_sync(reserved, *args, limiter=self.limiter)
        except OSError as exc:
            if not is_disk_full(exc, self.cache.root):
                raise
            freed = await self.evict(0)
            if not freed:
                raise
            log.warning("disk full: dropped %d bytes of cached blocks to make room", freed)
        return await trio.to_thread.run_sync(reserved, *args, limiter=self.limiter)

    def _reserved(self, size: int, write: Callable[..., Any], *args: Any) -> Any:
        """Run a data write unless it would eat the metadata reserve (diskspace.py)."""
        with self.reserve.claim(size):
            return write(*args)

    # --- reading -----------------------------------------------------------------------

    async def read(
        self, block_id: bytes, offset: int, size: int, *, view: bool = False
    ) -> bytes | memoryview:
        """Bytes [offset, offset+size) of a block (short at the block's end). With
        *view*, bytes of a block held in memory come as a read-only view of it, not a
        copy (a FUSE read hands them straight to the kernel: issue 16)."""
        while True:
            recent = self.recent.get(block_id)
            if recent is not None:
                return _part(recent, offset, size, view)
            if block_id in self.cache:
                self.cache.touch(block_id)
                data = await trio.to_thread.run_sync(
                    self.cache.read_io, block_id, offset, size, limiter=self.limiter
                )
                if data is not None:
                    return data
                self.cache.forget(block_id)
            # Serve from the rebuilt plaintext itself: the cache may already have let it go
            # (a bound below one block, or other blocks fetched meanwhile), and looping on
            # the cache alone would rebuild it forever.
            rebuilt = await self.fetch(block_id)
            if rebuilt is not None:
                return _part(rebuilt, offset, size, view)

    async def read_parsed(self, block_id: bytes, parse: Callable[[bytes], Any]) -> Any:
        """The whole block as *parse* (run in a worker thread) makes it, in one
        worker-thread hop wherever the block is found: held, cached, or rebuilt (opened
        and parsed in the same hop). What *parse* raises goes up."""
        while True:
            recent = self.recent.get(block_id)
            if recent is not None:
                return await trio.to_thread.run_sync(parse, recent, limiter=self.limiter)
            if block_id in self.cache:
                self.cache.touch(block_id)
                data, parsed = await trio.to_thread.run_sync(
                    self._cached_parsed, block_id, self.block_size(block_id), parse,
                    limiter=self.limiter,
                )
                if data is not None:
                    return _unwrap(parsed)
                self.cache.forget(block_id)
            data, parsed = await self._fetch(block_id, parse)
            if data is not None:
                if parsed is _UNPARSED:  # another caller rebuilt it (without parsing)
                    return await trio.to_thread.run_sync(parse, data, limiter=self.limiter)
                return _unwrap(parsed)

    def _cached_parsed(
        self, block_id: bytes, size: int, parse: Callable[[bytes], Any]
    ) -> tuple[bytes | None, Any]:
        data = self.cache.read_io(block_id, 0, size)
        return (None, None) if data is None else opened(data, parse)

    def at_hand(self, block_id: bytes) -> bool:
        """Whether a read of the block would need no new rebuild (cached, held in
        memory, or being rebuilt)."""
        return block_id in self.cache or block_id in self.recent or block_id in self._rebuilding

    def prefetch(self, block_id: bytes) -> None:
        """Start rebuilding a block in the background if it is not cached (read-ahead)."""
        if (
            self._nursery is None
            or block_id in self.cache
            or block_id in self.recent
            or block_id in self._rebuilding
            or self._prefetching >= PREFETCH_MAX
        ):
            return
        self._prefetching += 1
        self._nursery.start_soon(self._prefetch_one, block_id)

    async def _prefetch_one(self, block_id: bytes) -> None:
        try:
            await self.fetch(block_id)
        except BlockUnavailable:
            pass  # the reader will hit it and report it
        finally:
            self._prefetching -= 1

    async def fetch(self, block_id: bytes) -> bytes | None:
        """Make sure the block's plaintext is at hand, rebuilding it from shards.

        Returns None if it is in the disk cache, else its plaintext: held in memory
        (``recent``), rebuilt by this call or by one it waited for. A rebuilt block is
        written to the disk cache only when it is rebuilt a second time (recent.py).
        """
        data, _ = await self._fetch(block_id, None)
        return data

    async def _fetch(
        self, block_id: bytes, parse: Callable[[bytes], Any] | None
    ) -> tuple[bytes | None, Any]:
        """``fetch``, and what *parse* made of the block if this call rebuilt it (in the
        same worker-thread hop; the exception it raised, if any), else _UNPARSED."""
        if block_id in self.cache:
            return None, _UNPARSED
        recent = self.recent.get(block_id)
        if recent is not None:
            return recent, _UNPARSED
        pending = self._rebuilding.get(block_id)
        if pending is not None:
            await pending.done.wait()
            if pending.data is None:
                raise BlockUnavailable(block_id.hex())
            return pending.data, _UNPARSED
        job = self._rebuilding[block_id] = _Rebuild()
        parsed: Any = _UNPARSED
        try:
            stored = self.load(block_id)
            if stored is None:
                raise BlockUnavailable(f"no record for block {block_id.hex()[:16]}")
            if parse is None:
                data = await self.rebuild(stored)
            else:
                data, parsed = await self._rebuild(stored, parse)
            if self.recent.keep(block_id, data) and await self._cache_rebuilt(block_id, data):
                self.cache.note(block_id, len(data))
            job.data = data
        finally:
            del self._rebuilding[block_id]
            job.done.set()
        await self.evict()
        return data, parsed

    async def _cache_rebuilt(self, block_id: bytes, data: bytes) -> bool:
        """Keep a rebuilt block in the cache if the disk has room; a full disk must not
        stop reads (the reader gets the rebuilt bytes either way)."""
        try:
            await self.write_to_disk(self.cache.insert_io, block_id, data, size=len(data))
        except OSError as exc:
            if not is_disk_full(exc, self.cache.root):
                raise
            return False
        return True

    async def rebuild(self, stored: StoredBlock) -> bytes:
        """The block's plaintext, rebuilt from its shards (not via the cache)."""
        data, _ = await self._rebuild(stored, None)
        return data

    async def _rebuild(
        self, stored: StoredBlock, parse: Callable[[bytes], Any] | None
    ) -> tuple[bytes, Any]:
        """``rebuild``, and what *parse* made of the plaintext in the same worker-thread
        hop (see ``remote.opened``)."""
        if LOCAL_HOLDER in stored.holders or self.remote is None:
            return await trio.to_thread.run_sync(
                lambda: opened(self._rebuild_local(stored.record), parse), limiter=self.limiter
            )
        block_id = stored.record.block_id
        try:
            return await self.remote.fetch_parsed(
                stored.record,
                stored.holders,
                parse,
                on_found=lambda index, holder: self.learn_holder(block_id, index, holder),
            )
        except BlockError as exc:
            log.error("block %s unrecoverable now: %s", stored.record.block_id.hex()[:16], exc)
            raise BlockUnavailable(str(exc)) from None

    def _rebuild_local(self, record: BlockRecord) -> bytes:
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
        self.shards.release_pages()  # the shards were read through LMDB's mapping
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
