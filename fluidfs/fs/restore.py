"""Bringing a committed tree back into the live tables, a directory at a time.

On a fresh state directory the commit found on the network is adopted without
copying anything: the root directory gets its attributes and becomes *lazy* — its
entries are still only in metadata nodes. Any operation that needs a directory's
entries (lookup, readdir, create, unlink, rename, ...) first *loads* it: fetches its
nodes, writes its entries into the live tables (inodes, dirents, xattrs, block maps
with one reference per block), and marks its subdirectories lazy in turn. Inode
numbers are the committed ones, so hard links are hard links again. File contents
are never fetched ahead: reads rebuild blocks from their holders as usual.

Loading a directory queues its subdirectories to be fetched *ahead* of the walk
(``prefetch``: PREFETCHERS at once, newest first, so a depth-first walk such as
``find`` finds the next directories loaded or in flight instead of paying one round
trip each; started in waves, so that their shard reads to one peer share calls).
The queue keeps at most PREFETCH_QUEUE directory numbers, dropping the oldest (the
furthest from where the walk is now); those are loaded by the background task or on
demand. So what prefetching holds is bounded: PREFETCHERS directories being
fetched and decoded (decoding in worker threads) plus the queue of inode numbers.

A background task loads the remaining directories (metadata only) so that walking
the tree soon needs no network, then registers every node of every kept commit so
that reference counts are exact again; until that is done, nothing older than the
restored commit is released (fs/commit.py, ``index`` flag).

Table ``lazy`` of meta.lmdb (format version 1): key ``u64 directory inode`` → block
id (32) of the top node of its committed contents.
"""

from __future__ import annotations

import functools
import logging
import stat
import struct
from collections import deque

import trio

from fluidfs.blocks.blockstore import BlockStore
from fluidfs.concurrency import start_in_waves
from fluidfs.fs.metaformat import CommitInfo, Entry, TreeNode
from fluidfs.fs.metaindex import MetaError, MetaIndex
from fluidfs.fs.tree import BLOCK_REF, INLINE, ROOT_INO, Tree
from fluidfs.store.db import Database

log = logging.getLogger(__name__)

_U64 = struct.Struct(">Q")
BACKGROUND_LOADERS = 16  # directories loaded in the background at once (a wave)
RETRY_SECONDS = 5.0
PREFETCHERS = 64  # directories fetched ahead of a walk at once
PREFETCH_WAVE = 16  # started together, once this many are free: their shard reads share calls
PREFETCH_QUEUE = 65536  # directories waiting to be fetched ahead; beyond it the oldest go
MATERIALISE_BATCH = 1000  # entries of a loaded directory per write transaction (loop step)


class Restorer:
    """Loads lazy directories on demand and in the background."""

    def __init__(self, db: Database, tree: Tree, blocks: BlockStore, index: MetaIndex) -> None:
        self.db = db
        self.tree = tree
        self.blocks = blocks
        self.index = index
        self._lazy = db["lazy"]
        # Whether the lazy table may hold rows: None until looked at, False once seen
        # empty (then requests skip the per-directory look-up), True once a row is
        # written. Only this class writes rows into it.
        self._maybe_lazy: bool | None = None
        self._locks: dict[int, trio.Lock] = {}
        self.loaded_dirs = 0
        self.loaded_entries = 0
        self.prefetched_dirs = 0
        self._ahead: deque[int] = deque(maxlen=PREFETCH_QUEUE)
        self._queued = trio.Event()

    # --- state ---------------------------------------------------------------------------

    def lazy_top(self, ino: int) -> bytes | None:
        """The top node of a lazy directory's contents, or None if it is loaded."""
        with self.db.view() as txn:  # every request asks: it must not end the batch
            raw = txn.get(_U64.pack(ino), db=self._lazy)
        return None if raw is None else bytes(raw)

    def _any_lazy(self) -> bool:
        """False when no directory is lazy (every request asks ``ensure``: a fully
        loaded tree answers from memory)."""
        if self._maybe_lazy is None:
            with self.db.view() as txn:
                self._maybe_lazy = txn.stat(self._lazy)["entries"] > 0
        return self._maybe_lazy

    def pending(self) -> list[int]:
        """Directories not loaded yet."""
        with self.db.read() as txn:
            return [_U64.unpack(k)[0] for k in txn.cursor(db=self._lazy).iternext(values=False)]

    def adopt_root(self, info: CommitInfo) -> None:
        """Make the live tree the committed one: root attributes now, the rest lazily."""
        root = info.root
        with self.db.write() as txn:
            inode = self.tree.get(ROOT_INO)
            fresh = root.inode(ROOT_INO)
            inode.mode, inode.uid, inode.gid = fresh.mode, fresh.uid, fresh.gid
            inode.nlink, inode.atime_ns = fresh.nlink, fresh.atime_ns
            inode.mtime_ns, inode.ctime_ns = fresh.mtime_ns, fresh.ctime_ns
            self.tree.put(txn, inode)
            self._put_xattrs(txn, ROOT_INO, root.xattrs)
            if root.content is not None:
                txn.put(_U64.pack(ROOT_INO), root.content.block_id, db=self._lazy)
                self._maybe_lazy = True
            txn.put(b"next_ino", _U64.pack(info.next_ino), db=self.db["counters"])

    def _put_xattrs(self, txn, ino: int, xattrs: list[tuple[bytes, bytes]]) -> None:
        table = self.db["xattrs"]
        for name, value in xattrs:
            txn.put(_U64.pack(ino) + name, value, db=table)

    # --- loading -------------------------------------------------------------------------

    async def ensure(self, ino: int) -> None:
        """Load directory *ino* if it is lazy (raises MetaError if it cannot be fetched)."""
        if not self._any_lazy() or self.lazy_top(ino) is None:
            return
        lock = self._locks.setdefault(ino, trio.Lock())
        async with lock:
            top = self.lazy_top(ino)
            if top is None:
                return
            fetched: list[tuple[bytes, TreeNode]] = []  # registered with the entries
            entries = await self.index.entries(top, fetched)
            files = {}
            if any(entry.chunks for entry in entries):
                # Registering the leaves records the manifest chunks they name, which
                # are fetched next (only files of many blocks have them).
                self.index.learn_fetched(fetched)
                with self.db.write() as txn:
                    self.index.register_fetched(txn, fetched)
                fetched = []
            for entry in entries:
                if entry.chunks:
                    files[entry.ino] = await self.index.file_blocks(entry)
            subdirs = await self._materialise(ino, top, entries, files, fetched)
        self._locks.pop(ino, None)
        self._fetch_ahead(subdirs)

    async def _materialise(
        self, parent: int, top: bytes, entries: list[Entry], files: dict, fetched: list
    ) -> list[int]:
        """Register the *fetched* nodes of *parent*'s contents (whose top node is *top*)
        and write its entries into the live tables as committed (a commit names *top*
        again until the directory changes); return the subdirectories it marked lazy, in
        name order.

        A directory of any size is written MATERIALISE_BATCH entries per transaction,
        with a checkpoint between them, so the loop is never held for all of it; the
        first also registers the nodes, the last clears the lazy mark, so a directory
        of up to MATERIALISE_BATCH entries (most) is one transaction (a transaction
        costs the loop far more than the rows of a small directory). The
        directory stays lazy until the last one (every request that needs its entries
        waits in ``ensure``, and commits name it by its committed node), and the first
        raises ``next_ino`` past every entry, so nothing created meanwhile takes one of
        their numbers. A crash half way leaves it lazy: loading it again rewrites what
        was written (each entry is written the same way twice)."""
        self.index.learn_fetched(fetched)
        for entry in entries:
            blocks = files[entry.ino][0] if entry.ino in files else entry.blocks
            if blocks:  # most entries (small files, directories) name no block
                self.index.holders.learn(ref for _, ref in blocks)
        counters = self.db["counters"]
        highest = max((entry.ino for entry in entries), default=0)
        subdirs: list[int] = []
        last = max(len(entries) - 1, 0) // MATERIALISE_BATCH * MATERIALISE_BATCH
        for start in range(0, last + 1, MATERIALISE_BATCH):
            if start:
                await trio.lowlevel.checkpoint()
            with self.db.write() as txn:
                if start == 0:
                    self.index.register_fetched(txn, fetched)
                if txn.get(_U64.pack(parent), db=self._lazy) is None:
                    return []
                if start == 0:
                    raw = txn.get(b"next_ino", db=counters)
                    if raw is None or _U64.unpack(raw)[0] <= highest:
                        txn.put(b"next_ino", _U64.pack(highest + 1), db=counters)
                subdirs += self._write_entries(
                    txn, parent, entries[start : start + MATERIALISE_BATCH], files
                )
                if start == last:
                    txn.delete(_U64.pack(parent), db=self._lazy)
                    self.tree.dirs.adopted(txn, parent, top)
        self._maybe_lazy = None  # perhaps the last one: look again at the next request
        self.loaded_dirs += 1
        self.loaded_entries += len(entries)
        return subdirs

    def _write_entries(
        self, txn, parent: int, entries: list[Entry], files: dict
    ) -> list[int]:
        """Write entries of *parent* (each inode only if new) as committed: no dirty
        marks (``Tree.adopt_entries``); return the directories among them left lazy."""
        written = self.tree.adopt_inodes(txn, [entry.inode() for entry in entries])
        lazy: list[int] = []
        linked: list[tuple[bytes, int, bool]] = []
        blockmap: list[tuple[int, int, bytes]] = []
        for entry, new in zip(entries, written, strict=True):
            ino = entry.ino
            linked.append((entry.name, ino, not new))
            if not new:
                continue
            if entry.xattrs:
                self._put_xattrs(txn, ino, entry.xattrs)
            blocks, inline = files.get(ino, (entry.blocks, entry.inline))
            for index, ref in blocks:
                self.index.adopt(txn, ref)  # the block map's own reference
                blockmap.append((ino, index, BLOCK_REF + ref.block_id))
            for index, data in inline:
                blockmap.append((ino, index, INLINE + data))
            if entry.content is not None:
                txn.put(_U64.pack(ino), entry.content.block_id, db=self._lazy)
                self._maybe_lazy = True
                lazy.append(ino)
            elif stat.S_ISDIR(entry.mode):
                self.tree.dirs.adopted(txn, ino, b"")  # committed empty: nothing to load
        self.tree.adopt_blocks(txn, blockmap)
        self.tree.adopt_entries(txn, parent, linked)
        return lazy

    # --- ahead of the walk ---------------------------------------------------------------

    def _fetch_ahead(self, subdirs: list[int]) -> None:
        """Queue *subdirs* for ``prefetch``, the first one to be taken first."""
        if subdirs:
            self._ahead.extend(reversed(subdirs))
            self._queued.set()

    async def prefetch(self) -> None:
        """Until cancelled (unmount): load the directories queued by loads, at most
        PREFETCHERS at once, the most recently queued first. A failure is left to the
        on-demand load or the background task, which retry.

        They start in waves of PREFETCH_WAVE (or all that are queued, if fewer): loads
        started in one step ask for their nodes' shards in the same step, so the
        requests to each peer go out together in one ``RetrieveShards`` call
        (blocks/shardbatch.py) instead of one call for each directory's few shards there."""

        async def one(ino: int) -> None:
            try:
                if self.lazy_top(ino) is not None:
                    await self.ensure(ino)
                    self.prefetched_dirs += 1
            except MetaError as exc:
                log.debug("fetching directory %d ahead failed: %s", ino, exc)

        async def queued() -> None:
            self._queued = trio.Event()
            await self._queued.wait()

        await start_in_waves(lambda: len(self._ahead),
                             lambda: functools.partial(one, self._ahead.pop()),
                             queued, PREFETCHERS, PREFETCH_WAVE)

    # --- in the background ---------------------------------------------------------------

    async def load_all(self) -> None:
        """Load every lazy directory, retrying what fails: BACKGROUND_LOADERS started
        together, the next ones once all of those are done (a wave, as the prefetcher's:
        their shard reads to one peer share calls; one started whenever another ended
        went alone)."""
        while True:
            pending = self.pending()
            if not pending:
                return
            failed = 0

            async def one(ino: int) -> None:
                nonlocal failed
                try:
                    await self.ensure(ino)
                except MetaError as exc:
                    failed += 1
                    log.warning("loading directory %d failed (will retry): %s", ino, exc)

            for start in range(0, len(pending), BACKGROUND_LOADERS):
                async with trio.open_nursery() as nursery:
                    for ino in pending[start : start + BACKGROUND_LOADERS]:
                        nursery.start_soon(one, ino)
            if failed:
                await trio.sleep(RETRY_SECONDS)

    async def register_all(self, tops: list[bytes]) -> int:
        """Fetch and register every node reachable from *tops*; return how many were fetched."""
        seen: set[bytes] = set()
        stack = list(tops)
        fetched = 0
        limiter = trio.CapacityLimiter(BACKGROUND_LOADERS)

        async def one(out: list, i: int, node: bytes) -> None:
            nonlocal fetched
            children = self.index.children(node)
            if children is None:
                async with limiter:
                    await self.index.load(node)
                fetched += 1
                children = self.index.children(node) or []
            out[i] = children

        while stack:
            batch = []
            while stack and len(batch) < 64:
                node = stack.pop()
                if node not in seen:
                    seen.add(node)
                    batch.append(node)
            found: list[list[tuple[bytes, bool]]] = [[] for _ in batch]
            async with trio.open_nursery() as nursery:
                for i, node in enumerate(batch):
                    nursery.start_soon(one, found, i, node)
            for children in found:
                stack.extend(bid for bid, is_node in children if is_node and bid not in seen)
        return fetched
