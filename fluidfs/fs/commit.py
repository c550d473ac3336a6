"""Commits: the live tree written into metadata nodes, unchanged parts reused.

A commit describes the tree as it was at one moment, even while the mount keeps
changing, and writes it bottom-up (fs/treewalk.py): the directories of height 0 first,
then their parents, so that each parent can name its children's nodes with their
final holders.

Reading at one moment used to mean one LMDB read transaction held for the whole
commit, across every await of writing nodes and waiting for their placement on peers:
meanwhile no page freed in meta.lmdb could be reused, so uploads, repair and GC grew
the file. Now the tree is first read in short snapshots, one per batch of directories,
none open while the loop waits (treewalk ``Snapshots``). The tree's change counter
(``tree_gen``, fs/tree.py, bumped by every change to the tree tables) is read in each:
if it never moved, no tree table changed between the first and the last snapshot, so
the commit is exactly what one snapshot would have given. If it moved, the short
snapshots may disagree (a file moved between two directories read at different times
could appear twice or not at all), so the commit starts over from a consistent copy
of the directories it reads, made in short read transactions (fs/treecopy.py); the
nodes already written are reused by content. A full commit reads from such a copy
from the start: the walk that finds every directory would otherwise hold one reader for
as long as the tree takes to read. Holders come from the block records as each batch
reads them: newer holders only make the references better, and a block that went away
meanwhile aborts the commit (CommitAborted) as it always could when registering.

A commit reads and serialises only the directories marked changed since the last
commit, those last committed naming blocks short of holders once some block was placed
whole since (``dir_short``: so the holders found after a commit are written by a later
one), and the path from each to the root (fs/dirstate.py); every other directory is
named by the node it was last committed as, so the work of a commit, not only the bytes
it writes, grows with what changed rather than with the tree. A node whose bytes did
not change still has the same block id and is reused. Every ``FULL_EVERY``-th commit
(and one asked for with ``full=True``, or when the dirty-directory tables cannot be
trusted: ``StaleDirState``) reads every directory, as all commits once did.

The ``commits`` table of meta.lmdb (format version 1) holds the commit heads this
machine keeps: key ``u64 seq`` → CBOR ``{"v": 1, "node": commit node id, "time": ns,
"tree": top node id of the tree or absent, "snaps": top node id of the snapshot list
or absent, "published": bool}``. Each head holds one reference to its commit node.
Older heads are released once a newer one is published (and, on a machine that
restored from the network, once the index is complete). Two more keys:
``b"dirty"`` (present while the tree has changes not yet committed) and
``b"index"`` (``b"partial"`` from a restore until every node of every kept commit
is registered; absent means complete).
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import cbor2
import trio

from fluidfs.blocks.blockstore import BlockStore
from fluidfs.concurrency import map_limited
from fluidfs.fs.dirstate import FULL_EVERY, DirState, LeafRecord, StaleDirState
from fluidfs.fs.filedata import FileData
from fluidfs.fs.metaformat import (
    MANIFEST_CHUNK_BLOCKS,
    REF_SIZE_ESTIMATE,
    CommitInfo,
    Entry,
    Ref,
    cut_points,
    encode_commit,
    encode_index,
    encode_leaf,
    encode_manifest,
    manifest_ranges,
    open_cut_points,
)
from fluidfs.fs.metaindex import Holders, MetaIndex
from fluidfs.fs.tree import Tree
from fluidfs.fs.treecopy import CopiedSnapshot
from fluidfs.fs.treewalk import (
    CommitAborted,
    KeptLeaf,
    Snapshots,
    TreeChanged,
    TreeReader,
    Written,
    write_tree,
)
from fluidfs.store.db import Database

log = logging.getLogger(__name__)

VERSION = 1
_U64 = struct.Struct(">Q")
DIRTY_KEY = b"dirty"
INDEX_KEY = b"index"
WEAK_STALL = 10.0  # seconds without progress while blocks lack K holders
NODE_WRITERS = 64  # nodes in flight: their small shards share StoreShard calls (storebatch.py)
# Nodes up to this size are hashed on the loop: BLAKE3 takes ~30 us for 64 KiB, a
# worker-thread hop costs the loop more than that (and a first sync makes one per node).
HASH_ON_LOOP = 64 * 1024
QUICK_WAKE = 64  # wait_placed for at most this many blocks wakes as each upload ends
# ... of one of them, and looks again at least this often (holders learnt otherwise).
PLACED_POLL = 0.25
KEEP_PIECE = 256  # kept leaves named again per write transaction (on the loop)


@dataclass
class CommitStats:
    """What one commit wrote."""

    nodes_written: int = 0
    bytes_written: int = 0  # plaintext bytes of new metadata nodes
    shard_bytes: int = 0  # what those cost on the network (N shards each)
    nodes_reused: int = 0
    leaves_kept: int = 0  # committed leaves of written directories named again unread
    dirs: int = 0
    files: int = 0
    incomplete_refs: int = 0  # references naming fewer holders than shards
    weak_refs: int = 0  # references to blocks fewer than K peers hold (not restorable)
    seconds: float = 0.0
    full: bool = False  # every directory was read (not only the changed ones)

    def add(self, other: CommitStats) -> None:
        """Add what another commit wrote (several commits for one sync)."""
        self.nodes_written += other.nodes_written
        self.bytes_written += other.bytes_written
        self.shard_bytes += other.shard_bytes


@dataclass
class Head:
    """One kept commit."""

    seq: int
    node: bytes
    time_ns: int
    tree: bytes | None
    snaps: bytes | None
    published: bool

    def encode(self) -> bytes:
        body = {"v": VERSION, "node": self.node, "time": self.time_ns, "published": self.published}
        if self.tree is not None:
            body["tree"] = self.tree
        if self.snaps is not None:
            body["snaps"] = self.snaps
        return cbor2.dumps(body)

    @classmethod
    def decode(cls, seq: int, raw: bytes) -> Head:
        body = cbor2.loads(raw)
        if body.get("v") != VERSION:
            raise ValueError("unknown commit head version")
        return cls(
            seq, body["node"], body["time"], body.get("tree"), body.get("snaps"), body["published"]
        )


async def wait_placed(
    blocks: BlockStore,
    ids: list[bytes] | None,
    *,
    stall: float,
    limit: float,
    weak_stall: float = WEAK_STALL,
) -> bool:
    """Wait until the blocks (default: every under-replicated one) have all their holders.

    While none of them is being uploaded, gives up when nothing improved for *stall*
    seconds if every block is at least recoverable (K holders), or for *weak_stall*
    seconds if some are not; after *limit* seconds in any case. True if all are full.
    """
    pending = list(blocks.under) if ids is None else list(ids)
    started = last_change = time.monotonic()
    last = None
    while True:
        missing = weak = 0
        busy = False
        still = []
        for block_id in pending:
            if block_id not in blocks.under:
                continue
            stored = blocks.load(block_id)
            if stored is None:
                continue
            still.append(block_id)
            gap = stored.missing()
            missing += gap
            if stored.record.total - gap < stored.record.needed:
                weak += 1
            busy = busy or block_id in blocks.uploading or block_id in blocks.queued
        pending = still
        if not pending:
            return True
        now = time.monotonic()
        if missing != last or busy:
            last, last_change = missing, now
        quiet = now - last_change
        if now - started >= limit or quiet >= (weak_stall if weak else stall):
            return False
        if len(pending) <= QUICK_WAKE:  # woken when one of these blocks' uploads ends
            await blocks.upload_ended(PLACED_POLL, pending)
        else:  # re-reading many records at every upload's end would cost more than it saves
            await trio.sleep(0.05)


class TreeWriter:
    """Writes metadata nodes for one commit; every node it returns is held until ``finish``."""

    def __init__(
        self,
        blocks: BlockStore,
        index: MetaIndex,
        holders: Holders,
        chunk_key: bytes,
        *,
        stall: float,
        limit: float,
    ) -> None:
        self.blocks = blocks
        self.index = index
        self.holders = holders
        self.chunk_key = chunk_key
        self.stall = stall
        self.limit = limit
        self.holds: list[bytes] = []
        self.stats = CommitStats()
        self._writers = trio.CapacityLimiter(NODE_WRITERS)
        self._locks: dict[bytes, trio.Lock] = {}
        self._manifests: dict[int, list[tuple[int, Ref]]] = {}
        self._manifest_short: dict[int, int] = {}  # file ino → short block refs in it
        # Directory ino → references its nodes name with fewer holders than shards
        # (fs/dirstate.py ``dir_short``).
        self.short: dict[int, int] = {}
        self.leaves: dict[int, list[LeafRecord]] = {}  # directory ino → its leaves
        self.degraded = False  # some node has fewer than K holders

    async def store_node(self, plain: bytes, children: list[tuple[bytes, bool]]) -> Ref:
        """Store (or reuse) a node naming *children*; return its reference (held)."""
        async with self._writers:
            if len(plain) <= HASH_ON_LOOP:
                block_id = self.blocks.codec.block_id(plain)
            else:
                block_id = await trio.to_thread.run_sync(self.blocks.codec.block_id, plain)
            lock = self._locks.setdefault(block_id, trio.Lock())
            new = False
            async with lock:
                # Looked up first in a read transaction: most nodes of a commit are new, and
                # a write transaction that writes nothing was one more per node. Taking
                # the reference is then checked again in one transaction (a drain may run).
                reused = self.index.registered(block_id)
                if reused:
                    with self.index.meta.write() as txn:
                        reused = self.index.registered(block_id, txn)
                        if reused:
                            self.blocks.add_ref(txn, block_id)
                if reused:
                    self.holds.append(block_id)
                    self.stats.nodes_reused += 1
                else:
                    def register(txn, _block_id: bytes) -> list:
                        self.index.register(txn, block_id, list(children))
                        return []

                    # The node's children are held in the transaction that saves it.
                    try:
                        await self.blocks.put(plain, bind=register, block_id=block_id)
                    except KeyError as exc:  # nothing saved: the transaction was undone
                        raise CommitAborted(f"block {exc} went away during the commit") from None
                    except BaseException:
                        if self.index.registered(block_id):  # put's reference is ours
                            self.holds.append(block_id)
                        raise
                    self.holds.append(block_id)
                    new = True
            stored = self.blocks.load(block_id)
            if new:
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("new node %s: %s", block_id.hex()[:12], _describe(plain))
                self.stats.nodes_written += 1
                self.stats.bytes_written += len(plain)
                self.stats.shard_bytes += stored.record.shard_size * stored.record.total
                # Once one node could not reach K peers this commit will not be published:
                # the others need not wait long for their holders either.
                weak_stall = self.stall if self.degraded else WEAK_STALL
                await wait_placed(
                    self.blocks,
                    [block_id],
                    stall=self.stall,
                    limit=self.limit,
                    weak_stall=weak_stall,
                )
                stored = self.blocks.load(block_id)
                placed = stored.record.total - stored.missing()
                if placed < stored.record.needed and self.blocks.remote is not None:
                    self.degraded = True
            return self.holders.ref(stored)

    def note_ref(self, ref: Ref, owner: int | None = None) -> None:
        """Count a reference that names fewer holders than shards, or fewer than K peers;
        one of the first kind is counted against the directory *owner* too (``short``).

        Blocks held only by this machine (stored before it had peers) are not counted:
        they are reported on their own and would otherwise hold every commit back.
        """
        incomplete, weak = _ref_flaws(ref, self.holders.self_key)
        self.stats.incomplete_refs += incomplete
        self.stats.weak_refs += weak
        self._note_short(owner, incomplete)

    def _note_short(self, owner: int | None, incomplete: int) -> None:
        if owner is not None and incomplete:
            self.short[owner] = self.short.get(owner, 0) + incomplete

    def _flaws(self, refs: list[Ref]) -> tuple[int, int]:
        """(short, weak) references among *refs* (``note_ref``); in a worker thread."""
        incomplete = weak = 0
        for ref in refs:
            flaws = _ref_flaws(ref, self.holders.self_key)
            incomplete += flaws[0]
            weak += flaws[1]
        return incomplete, weak

    def _cut(
        self, carry: list[Entry], fresh: list[Entry], final: bool
    ) -> tuple[list[list[Entry]], list[Entry]]:
        """Cut *carry* + *fresh* into leaves: (whole leaves, what to carry into the next
        slice). Unless *final*, a last leaf that ends only because the slice does is
        carried: it may go on in the next slice. Carried entries start right after a cut,
        where cutting starts afresh, so the leaves come out as if the directory had been
        cut whole. Grows with the slice: runs in a worker thread."""
        pending = carry + fresh
        ends, closed = open_cut_points(
            [e.name for e in pending], [e.size_estimate() for e in pending], self.chunk_key, 0
        )
        groups = []
        start = 0
        for end in ends:
            groups.append(pending[start:end])
            start = end
        carry = [] if final or closed or not groups else groups.pop()
        return groups, carry

    def _cut_and_encode(
        self, carry: list[Entry], fresh: list[Entry], final: bool
    ) -> tuple[list[list[Entry]], list[Entry], list[tuple[bytes, int, int]]]:
        """``_cut``, and each whole leaf encoded (``_encode_leaf``), in one worker-thread
        hop: a hop per leaf was a third of a first sync's hops."""
        groups, carry = self._cut(carry, fresh, final)
        return groups, carry, [self._encode_leaf(group) for group in groups]

    async def write_list(self, entries: list[Entry]) -> Ref | None:
        """Write sorted *entries* as a chunked tree of nodes; return its top (None if empty)."""

        async def whole():
            yield entries, True

        return await self.write_slices(whole())

    async def write_slices(
        self, slices: AsyncIterator[tuple[list[Entry], bool]], owner: int | None = None
    ) -> Ref | None:
        """``write_list`` for entries that come in sorted slices of (entries, last slice?):
        leaves are written slice by slice, so only one slice is in memory at a time.
        Short references in the nodes written count against directory *owner*, and
        its leaves are kept in ``leaves``.

        A slice may be a ``KeptLeaf`` instead: a committed leaf, named again as it is
        when the entries before it were cut right before its first one (nothing
        carried), and read like any slice otherwise. Cutting restarts afresh at each cut
        (``open_cut_points``), so the leaves come out as if the whole were cut again."""
        items: list[tuple[bytes, Ref, int]] = []
        records: list[LeafRecord] = []
        carry: list[Entry] = []
        run: list[KeptLeaf] = []  # kept leaves in a row: named again in one transaction

        async def cut(fresh: list[Entry], final: bool) -> None:
            nonlocal carry
            groups, carry, encoded = await trio.to_thread.run_sync(
                self._cut_and_encode, carry, fresh, final)
            items.extend(await self._leaves(groups, owner, records, encoded))

        async def take(run: list[KeptLeaf]) -> None:
            i = 0
            while i < len(run):
                if not carry:
                    await trio.sleep(0)  # a directory of a million entries keeps thousands
                    refs = self.keep_nodes([k.block_id for k in run[i : i + KEEP_PIECE]])
                    for k, ref in zip(run[i:], refs, strict=False):
                        items.append((k.first, ref, k.count))
                        records.append(LeafRecord(k.first, k.block_id, k.count, False))
                    self.stats.leaves_kept += len(refs)
                    i += len(refs)
                    if i == len(run):
                        return
                    if len(refs) == KEEP_PIECE:
                        continue
                await cut(await run[i].read(), False)  # cut elsewhere now, or gone
                i += 1

        async for part in slices:
            if isinstance(part, KeptLeaf):
                run.append(part)
                continue
            if run:
                await take(run)
                run = []
            await cut(*part)
        if run:
            await take(run)
        if carry:  # the slices ended without a last one
            items += await self._leaves([carry], owner, records)
        if owner is not None and len(records) > 1:  # one leaf is the top node itself
            self.leaves[owner] = records
        if not items:
            return None
        return await self._index(items, owner)

    def keep_nodes(self, block_ids: list[bytes]) -> list[Ref]:
        """Name committed nodes again unread, in one transaction: hold each for this
        commit and return the references of those before the first one no longer
        registered (that one is written again instead)."""
        refs: list[Ref] = []
        with self.index.meta.write() as txn:
            for block_id in block_ids:
                stored = self.blocks.load(block_id, txn)
                if stored is None or not self.index.registered(block_id, txn):
                    break
                self.blocks.add_ref(txn, block_id)
                refs.append(self.holders.ref(stored))
        self.holds += [ref.record.block_id for ref in refs]
        return refs

    def _encode_leaf(self, group: list[Entry]) -> tuple[bytes, int, int]:
        """A leaf's bytes and its (short, weak) references (``note_ref``); in a worker."""
        incomplete = weak = 0
        for entry in group:
            for ref, _ in entry.refs():
                flaws = _ref_flaws(ref, self.holders.self_key)
                incomplete += flaws[0]
                weak += flaws[1]
        return encode_leaf(group), incomplete, weak

    async def _leaves(
        self,
        groups: list[list[Entry]],
        owner: int | None = None,
        records: list[LeafRecord] | None = None,
        encoded: list[tuple[bytes, int, int]] | None = None,
    ) -> list[tuple[bytes, Ref, int]]:
        """Write one leaf node per group, concurrently; (first name, ref, entries) each,
        also added to *records*. Their short references count against *owner*.
        *encoded*: each group's ``_encode_leaf`` already (else encoded here)."""
        refs: list[Ref | None] = [None] * len(groups)
        flawed = [False] * len(groups)

        async def leaf(i: int, group: list[Entry]) -> None:
            children = [(ref.block_id, is_node) for e in group for ref, is_node in e.refs()]
            if encoded is not None:
                plain, incomplete, weak = encoded[i]
            else:
                plain, incomplete, weak = await trio.to_thread.run_sync(
                    self._encode_leaf, group)
            self.stats.incomplete_refs += incomplete
            self.stats.weak_refs += weak
            self._note_short(owner, incomplete)
            flawed[i] = bool(incomplete or weak)
            refs[i] = await self.store_node(plain, children)

        async with trio.open_nursery() as nursery:
            for i, group in enumerate(groups):
                nursery.start_soon(leaf, i, group)
        done = [(g[0].name, r, len(g)) for g, r in zip(groups, refs, strict=True)]
        if records is not None:
            records += [
                LeafRecord(first, ref.block_id, count, bad)
                for (first, ref, count), bad in zip(done, flawed, strict=True)
            ]
        return done

    async def _index(self, items: list[tuple[bytes, Ref, int]], owner: int | None = None) -> Ref:
        """Index nodes over the leaves *items*, level by level; the top's reference."""
        height = 1
        while len(items) > 1:
            ends = cut_points(
                [first for first, _, _ in items],
                [REF_SIZE_ESTIMATE + len(first) for first, _, _ in items],
                self.chunk_key,
                height,
            )
            groups = []
            start = 0
            for end in ends:
                groups.append(items[start:end])
                start = end
            for group in groups:
                for _, ref, _ in group:
                    self.note_ref(ref, owner)
            refs = await self._index_level(groups, height)
            items = [
                (group[0][0], ref, sum(c for _, _, c in group))
                for group, ref in zip(groups, refs, strict=True)
            ]
            height += 1
        return items[0][1]

    async def _index_level(
        self, groups: list[list[tuple[bytes, Ref, int]]], height: int
    ) -> list[Ref]:
        """Store the index nodes of one level (one per group) at once; their references
        in order. One after another, each waited for its placement before the next
        began: a directory of 10,000 small files waited ~25 placements in a row.
        Encoded only once a node writer is free (at most NODE_WRITERS in memory). The
        first error is raised as itself, not in a group (callers catch CommitAborted)."""
        async def store(group: list[tuple[bytes, Ref, int]]) -> Ref:
            return await self.store_node(
                encode_index(group, height), [(r.block_id, True) for _, r, _ in group]
            )

        return await map_limited(store, groups, NODE_WRITERS)

    async def manifest(
        self, ino: int, blocks: list[tuple[int, Ref]], inline, owner: int | None = None
    ) -> list:
        """Store a large file's block list as manifest chunks (once per inode per commit);
        its short block references count against directory *owner* (``note_ref``)."""
        done = self._manifests.get(ino)
        if done is not None:
            self._note_short(owner, self._manifest_short[ino])
            return done
        incomplete, weak = await trio.to_thread.run_sync(self._flaws, [r for _, r in blocks])
        self.stats.incomplete_refs += incomplete
        self.stats.weak_refs += weak
        self._manifest_short[ino] = incomplete
        self._note_short(owner, incomplete)
        indexes = sorted({i for i, _ in blocks} | {i for i, _ in inline})
        chunks = []
        for first, _count in manifest_ranges(indexes):
            last = first + MANIFEST_CHUNK_BLOCKS
            part = [(i, r) for i, r in blocks if first <= i < last]
            part_inline = [(i, d) for i, d in inline if first <= i < last]
            ref = await self.store_node(
                encode_manifest(part, part_inline), [(r.block_id, False) for _, r in part]
            )
            chunks.append((first, ref))
        self._manifests[ino] = chunks
        return chunks

    async def finish(self, keep: bytes | None = None) -> None:
        """Drop the references held while writing (all but one hold of *keep*)."""
        holds = list(self.holds)
        self.holds.clear()
        if keep is not None:
            holds.remove(keep)
        await self.index.drop_and_release(holds)


def _ref_flaws(ref: Ref, self_key: bytes) -> tuple[bool, bool]:
    """(names fewer holders than shards, held by fewer than K peers) for ``note_ref``."""
    held = [h for h in ref.holders if h is not None]
    incomplete = len(held) < len(ref.holders)
    peers = [h for h in held if h != self_key]
    if held and not peers:
        return incomplete, False
    return incomplete, len(peers) < ref.record.needed


def _describe(plain: bytes) -> str:
    from fluidfs.fs.metaformat import decode_node

    node = decode_node(plain)
    names = [e.name[:20] for e in node.entries][:3]
    return f"type {node.type}, {len(plain)} bytes, {len(node.entries)} entries {names}"


class Heads:
    """The ``commits`` table: kept commit heads and the two flags beside them."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._table = db["commits"]

    def all(self) -> list[Head]:
        """Every kept head, oldest first."""
        with self.db.read() as txn:
            return [
                Head.decode(_U64.unpack(k)[0], bytes(v))
                for k, v in txn.cursor(db=self._table)
                if len(k) == 8
            ]

    def latest(self) -> Head | None:
        """The newest head, or None before the first commit."""
        heads = self.all()
        return heads[-1] if heads else None

    def put(self, txn, head: Head) -> None:
        """Record a head (its reference to the commit node is the caller's)."""
        txn.put(_U64.pack(head.seq), head.encode(), db=self._table)

    def delete(self, txn, seq: int) -> None:
        """Forget a head (the caller drops its reference)."""
        txn.delete(_U64.pack(seq), db=self._table)

    def flag(self, key: bytes) -> bytes | None:
        """A flag's value."""
        with self.db.read() as txn:
            return txn.get(key, db=self._table)

    def set_flag(self, key: bytes, value: bytes | None) -> None:
        """Set (or clear, with None) a flag."""
        with self.db.write() as txn:
            if value is None:
                txn.delete(key, db=self._table)
            else:
                txn.put(key, value, db=self._table)


@dataclass
class CommitResult:
    """The outcome of one commit."""

    head: Head
    info: CommitInfo
    ref: Ref
    stats: CommitStats
    snapshot: str | None  # name of the snapshot added (or refreshed)
    expired: list[str] = field(default_factory=list)


class Committer:
    """Commits the live tree: nodes, snapshot list and commit node; keeps the heads."""

    def __init__(
        self,
        db: Database,
        tree: Tree,
        data: FileData,
        blocks: BlockStore,
        index: MetaIndex,
        holders: Holders,
        chunk_key: bytes,
        machine: bytes,
    ) -> None:
        self.db = db
        self.tree = tree
        self.data = data
        self.blocks = blocks
        self.index = index
        self.holders = holders
        self.chunk_key = chunk_key
        self.machine = machine
        self.heads = Heads(db)
        self.reader = TreeReader(db, holders, blocks.placement_stamp)
        self.dirs = DirState(db)
        self.lock = trio.Lock()
        self.stall = 1.0  # seconds without placement progress before moving on
        self.limit = 120.0  # longest wait for one node's placement
        self.last: CommitResult | None = None

    def writer(self) -> TreeWriter:
        """A writer for one commit."""
        return TreeWriter(
            self.blocks,
            self.index,
            self.holders,
            self.chunk_key,
            stall=self.stall,
            limit=self.limit,
        )

    def index_complete(self) -> bool:
        """False while a restored state has not registered every kept node yet."""
        return self.heads.flag(INDEX_KEY) is None

    async def commit(
        self,
        *,
        min_seq: int,
        snapshots,  # fs/snapshots.SnapshotStore
        retention,  # fs/snapshots.Retention
        user_changed: bool,
        prune: bool,
        force: bool = False,
        full: bool = False,
        now_ns: int | None = None,
        on_written: Callable[[CommitResult], None] | None = None,
    ) -> CommitResult | None:
        """Write a commit of the tree as it is now; None if nothing would change.

        With *full*, every directory is read and serialised, not only changed ones."""
        async with self.lock:
            started = time.monotonic()
            now_ns = now_ns or time.time_ns()
            # Its snapshots are read in worker threads, which see only what is committed.
            self.db.commit_batch()
            writer = self.writer()
            try:
                result = await self._commit(
                    writer, min_seq, snapshots, retention, user_changed, prune, force, full,
                    now_ns,
                )
            except BaseException:
                with trio.CancelScope(shield=True):
                    await writer.finish()
                raise
            if result is None:
                await writer.finish()
                return None
            await writer.finish(keep=result.head.node)
            # What the commit read stays mapped (RSS) though it is page cache: give it back.
            await trio.to_thread.run_sync(self.db.release_pages)
            result.stats.seconds = time.monotonic() - started
            self.last = result
            if on_written is not None:
                on_written(result)
            return result

    async def _full_due(self) -> bool:
        """Whether this commit must read every directory (see the module docstring)."""

        def due() -> bool:
            with self.db.read() as txn:
                if self.dirs.indexed(txn):
                    return self.dirs.since_full(txn) + 1 >= FULL_EVERY
            self.dirs.build_index()
            return True

        return await trio.to_thread.run_sync(due)

    async def _write_tree(self, writer: TreeWriter, full: bool) -> Written:
        full = full or await self._full_due()
        try:
            return await self._write_tree_once(writer, full)
        except (StaleDirState, BaseExceptionGroup) as exc:
            stale = exc if isinstance(exc, StaleDirState) else exc.subgroup(StaleDirState)
            if full or stale is None:
                raise
            log.warning("reading every directory: %s", stale)
            writer.stats.dirs = writer.stats.files = 0
            return await self._write_tree_once(writer, True)

    async def _write_tree_once(self, writer: TreeWriter, full: bool) -> Written:
        writer.stats.full = full
        if not full:  # a full walk of the tree would hold one reader for O(tree)
            try:
                return await write_tree(self.reader, writer, Snapshots(self.db), full=False)
            except TreeChanged:
                log.debug("the tree changed during the commit: reading it from a copy")
                writer.stats.dirs = writer.stats.files = 0
        copy = await trio.to_thread.run_sync(CopiedSnapshot, self.db, self.reader)
        try:
            plan = await copy.fill(self.reader, full)
            return await write_tree(copy.reader, writer, copy, full=full, plan=plan)
        finally:
            await trio.to_thread.run_sync(copy.close)

    async def _commit(
        self,
        writer: TreeWriter,
        min_seq,
        snapshots,
        retention,
        user_changed,
        prune,
        force,
        full,
        now_ns,
    ) -> CommitResult | None:
        written = await self._write_tree(writer, full)
        root, next_ino = written.root, written.next_ino
        tree_id = root.content.block_id if root.content is not None else None
        previous = self.heads.latest()
        seq = max(min_seq, previous.seq if previous else 0) + 1
        plan = snapshots.plan(
            root,
            tree_id,
            now_ns,
            seq=seq,
            new=user_changed or previous is None,
            retention=retention if prune else None,
        )
        if (
            previous is not None
            and not force
            and not user_changed
            and tree_id == previous.tree
            and not plan.changed()
        ):
            # The same tree as the newest head's: the nodes just named are held by it.
            await self._record_dirs(written)
            return None
        kept = plan.entries()
        snaps_ref = await writer.write_list(kept)
        info = CommitInfo(
            seq=seq,
            time_ns=now_ns,
            machine=self.machine,
            root=root,
            snaps=snaps_ref,
            nsnaps=len(kept),
            next_ino=next_ino,
            block_size=self.data.block_size,
        )
        children = [(ref.block_id, is_node) for ref, is_node in root.refs()]
        if snaps_ref is not None:
            children.append((snaps_ref.block_id, True))
        for ref in (root.content, snaps_ref):
            if ref is not None:
                writer.note_ref(ref)
        ref = await writer.store_node(encode_commit(info), children)
        writer.note_ref(ref)
        head = Head(
            seq,
            ref.block_id,
            now_ns,
            tree_id,
            snaps_ref.block_id if snaps_ref else None,
            published=False,
        )
        with self.db.write() as wtxn:
            self.heads.put(wtxn, head)
            snapshots.apply(wtxn, plan)
        await self._record_dirs(written)
        return CommitResult(head, info, ref, writer.stats, plan.name, plan.expired_names())

    async def _record_dirs(self, written: Written) -> None:
        """Remember the directories' nodes once a head holds them (fs/dirstate.py)."""
        plan = written.plan
        await trio.to_thread.run_sync(
            self.dirs.record,
            written.dirs,
            plan.marks,
            plan.full,
            written.short,
            plan.stamp,
            written.leaves,
            plan.generation,
        )

    async def mark_published(self, seq: int) -> None:
        """The head *seq* reached the network: older heads can go (once the index is whole)."""
        with self.db.write() as txn:
            raw = txn.get(_U64.pack(seq), db=self.heads._table)
            if raw is None:
                return
            head = Head.decode(seq, bytes(raw))
            head.published = True
            self.heads.put(txn, head)
        await self.release_old()

    async def release_old(self) -> int:
        """Drop heads older than the newest published one; return how many blocks died."""
        if not self.index_complete():
            return 0
        async with self.lock:
            heads = self.heads.all()
            published = [h for h in heads if h.published]
            if not published:
                return 0
            newest = published[-1].seq
            old = [h for h in heads if h.seq < newest]
            if not old:
                return 0
            with self.db.write() as txn:
                for head in old:
                    self.heads.delete(txn, head.seq)
                self.index.journal_drops(txn, [h.node for h in old])
            return await self.index.drain()

    def held_nodes(self) -> list[bytes]:
        """Commit nodes held by kept heads."""
        return [h.node for h in self.heads.all()]
