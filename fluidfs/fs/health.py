"""How safe is each file? Redundancy per file, and the whole-tree check behind `fluidfs check`.

A block's *redundancy* is the number of its shards held on distinct peers; a
file's is the minimum over its blocks. Files small enough to live inline in the
metadata, and blocks kept on this node only (no peers yet), are reported as
such. The check can also probe which holders answer right now, and with
``read_data`` fetch *every* shard copy of every block from its recorded holder, verify
each against its id, and rebuild the block from the good ones.

With ``read_data`` a block is ``ok`` when every copy is good, ``degraded`` when some copy
is corrupt or missing (no holder, ``not_found``, or no answer) but K good ones rebuild it,
and ``unrecoverable`` otherwise; the bad copies are listed per block and counted per peer
(``CopyReport``). A corrupt copy catches its holder as a liar (blocks/suspects.py), as it
would on any read: that is the one thing the check changes.

The check walks the tree in worker threads (``TreeScan``), WALK_BATCH files per read
transaction, reading inodes, block maps and block records straight from the tables:
the loop stays free, and the walk leaves the inode cache as it found it. Batches are
separate snapshots, so a file moved during the check may be reported twice or not
at all; the check reports, it changes nothing.
"""

from __future__ import annotations

import stat
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from fluidfs.blocks.blockstore import BlockStore, BlockUnavailable
from fluidfs.blocks.codec import BlockError
from fluidfs.blocks.record import LOCAL_HOLDER, NO_HOLDER, StoredBlock
from fluidfs.blocks.remote import CORRUPT, GONE, GOOD
from fluidfs.fs.tree import BLOCK_REF, ROOT_INO, Tree
from fluidfs.keys import encode_peer_id

XATTR_REDUNDANCY = b"user.fluidfs.redundancy"
WALK_BATCH = 1000  # files per worker-thread trip of the check


@dataclass
class FileHealth:
    """One file's verdict."""

    path: str
    state: str  # "ok", "degraded", "unrecoverable", "inline", "local", "empty"
    redundancy: str  # e.g. "12/12"


NO_PEER = "-"  # the peer of a copy that has no holder


@dataclass
class CopyReport:
    """What ``check(read_data=True)`` found of every shard copy.

    *blocks*: one entry per block with a bad copy, ``{"block": hex id, "path": the first
    file naming it, "good": int, "total": int, "corrupt": [peer id], "missing": [peer id]}``
    (a copy with no holder is missing on peer ``"-"``). *peers*: per peer id, copies
    ``{"good": n, "corrupt": n, "missing": n}``.
    """

    blocks: list[dict] = field(default_factory=list)
    peers: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    good: dict[bytes, int] = field(default_factory=dict)  # good copies per block checked

    @property
    def bad_copies(self) -> int:
        """Corrupt and missing copies found, in all."""
        return sum(len(b["corrupt"]) + len(b["missing"]) for b in self.blocks)


def redundancy(tree: Tree, blocks: BlockStore, ino: int) -> str:
    """The file's redundancy as shown in the xattr: "12/12", "local", "inline", "empty".

    Agreed holders count until the lifecycle ends their agreement (the tolerance), so
    during an outage the agreed figure stays up; when fewer shards are reachable (their
    holder is failing now, see ``RemoteShards.failing_holders``) that is shown beside
    it: "12/12 (10 reachable)". Both are the minimum over the file's blocks.
    """
    values = tree.blocks_of(ino)
    refs = [v[1:] for _, v in values if v[:1] == BLOCK_REF]
    if not refs:
        return "inline" if values else "empty"
    worst = worst_reachable = None
    total = blocks.codec.total
    failing = blocks.remote.failing_holders() if blocks.remote is not None else set()
    for block_id in refs:
        stored = blocks.load(block_id)
        if stored is None:
            return f"0/{total}"
        if LOCAL_HOLDER in stored.holders:
            return "local"
        live = stored.record.total - stored.missing()
        reachable = stored.reachable(failing)
        worst = live if worst is None else min(worst, live)
        worst_reachable = reachable if worst_reachable is None else min(worst_reachable, reachable)
        total = stored.record.total
    if worst_reachable is not None and worst_reachable < worst:
        return f"{worst}/{total} ({worst_reachable} reachable)"
    return f"{worst}/{total}"


@dataclass
class ScannedFile:
    """A regular file as one batch of the scan saw it."""

    path: str
    ino: int
    values: list[bytes]  # its block map values (BLOCK_REF / INLINE prefixed)
    records: dict[bytes, StoredBlock | None]  # the blocks it names, by id


class TreeScan:
    """Every regular file, depth first from the root, a batch at a time.

    Each ``next_batch`` call reads from a read transaction of its own and bypasses the
    inode cache: call it from a worker thread.
    """

    def __init__(self, tree: Tree, blocks: BlockStore, batch: int = WALK_BATCH) -> None:
        self.tree = tree
        self.blocks = blocks
        self.batch = batch
        # Directories still to list: (path prefix, ino, cookie listed up to).
        self._stack: list[tuple[str, int, int]] = [("", ROOT_INO, 0)]

    @property
    def done(self) -> bool:
        """True once every file has been returned."""
        return not self._stack

    def next_batch(self) -> list[ScannedFile]:
        """The files among the next ``batch`` directory entries."""
        found: list[ScannedFile] = []
        visited = 0  # entries of any kind: a tree of empty directories is bounded too
        with self.tree.db.read() as txn:
            while self._stack and visited < self.batch:
                prefix, ino, after = self._stack.pop()
                subdirs: list[tuple[str, int, int]] = []
                resume = None
                for cookie, name, child in self.tree.entries_in(txn, ino, after):
                    if visited >= self.batch:
                        resume = (prefix, ino, after)
                        break
                    visited += 1
                    after = cookie
                    node = self.tree.inode_in(txn, child)
                    if node is None:
                        continue
                    path = f"{prefix}/{name.decode(errors='surrogateescape')}"
                    if node.is_dir:
                        subdirs.append((path, child, 0))
                    elif stat.S_ISREG(node.mode):
                        found.append(self._file(txn, path, child))
                self._stack.extend(subdirs)
                if resume is not None:
                    self._stack.append(resume)
        return found

    def _file(self, txn, path: str, ino: int) -> ScannedFile:
        values = [v for _, v in self.tree.blocks_in(txn, ino)]
        records = {
            v[1:]: self.blocks.load(v[1:], txn) for v in values if v[:1] == BLOCK_REF
        }
        return ScannedFile(path, ino, values, records)


async def _live(stored: StoredBlock, reachable: Callable[[int], Awaitable[bool]]) -> int:
    """Shards of the block whose recorded holder answers now."""
    live = 0
    for holder in set(stored.holders) - {NO_HOLDER}:
        if await reachable(holder):
            live += stored.holders.count(holder)
    return live


async def check(
    tree: Tree,
    blocks: BlockStore,
    *,
    reachable: Callable[[int], Awaitable[bool]],
    read_data: bool = False,
    copies: CopyReport | None = None,
) -> list[FileHealth]:
    """Check every file: can it be rebuilt from peers that answer now? With *read_data*,
    every shard copy is fetched and verified, and what was found goes to *copies*."""
    verified: dict[bytes, bool] = {}
    copies = CopyReport() if copies is None else copies
    results: list[FileHealth] = []
    needed = blocks.codec.needed
    tree.db.commit_batch()  # the scan reads in worker threads: what is committed
    scan = TreeScan(tree, blocks)
    while not scan.done:
        batch = await trio.to_thread.run_sync(scan.next_batch, limiter=blocks.limiter)
        for scanned in batch:
            if read_data:
                results.append(await _judge_copies(scanned, blocks, needed, verified, copies))
            else:
                results.append(
                    await _judge(scanned, blocks, reachable, read_data, needed, verified)
                )
    return results


def _block_refs(scanned: ScannedFile) -> list[bytes]:
    """The block ids a file's map names (inline pieces have none)."""
    return [v[1:] for v in scanned.values if v[:1] == BLOCK_REF]


def _without_blocks(scanned: ScannedFile) -> FileHealth:
    """The verdict of a file that names no block: inline data, or empty."""
    return FileHealth(scanned.path, "inline" if scanned.values else "empty", "-")


async def _judge_copies(
    scanned: ScannedFile,
    blocks: BlockStore,
    needed: int,
    verified: dict[bytes, bool],
    copies: CopyReport,
) -> FileHealth:
    """One file's verdict from every copy of every block (see the module docstring)."""
    path, refs = scanned.path, _block_refs(scanned)
    if not refs:
        return _without_blocks(scanned)
    state, worst, total = "ok", None, blocks.codec.total
    for block_id in refs:
        stored = scanned.records.get(block_id)
        if stored is None:
            state, worst = "unrecoverable", 0
            break
        total = stored.record.total
        if LOCAL_HOLDER in stored.holders or blocks.remote is None:
            if block_id not in verified:
                verified[block_id] = await _rebuilds(blocks, stored)
            good = total if verified[block_id] else 0
            state = "local" if state == "ok" and good else state
        else:
            if block_id not in copies.good:
                await _read_copies(scanned.path, stored, blocks, needed, verified, copies)
            good = copies.good[block_id]
        worst = good if worst is None else min(worst, good)
        if not verified[block_id]:
            state = "unrecoverable"
        elif state == "ok" and good < total:
            state = "degraded"
    return FileHealth(path, state, f"{worst}/{total}")


async def _rebuilds(blocks: BlockStore, stored: StoredBlock) -> bool:
    try:
        await blocks.rebuild(stored)
    except BlockUnavailable:
        return False
    return True


async def _read_copies(
    path: str,
    stored: StoredBlock,
    blocks: BlockStore,
    needed: int,
    verified: dict[bytes, bool],
    copies: CopyReport,
) -> None:
    """Fetch every copy of the block at once, each from its recorded holder with its own
    timeout; note what was found and whether the block rebuilds."""
    remote = blocks.remote
    record = stored.record
    outcomes: dict[int, str] = {}
    good: dict[int, bytes] = {}

    async def one(index: int, key: bytes) -> None:
        outcome, data = await remote.read_copy(key, record, index)
        outcomes[index] = outcome
        if data is not None:
            good[index] = data

    async with trio.open_nursery() as nursery:
        for index, holder in enumerate(stored.holders):
            key = remote.peers.key_of(holder) if holder != NO_HOLDER else None
            if key is None:
                outcomes[index] = GONE
            else:
                nursery.start_soon(one, index, key)
    corrupt, missing = [], []
    for index, holder in enumerate(stored.holders):
        key = remote.peers.key_of(holder) if holder != NO_HOLDER else None
        peer = encode_peer_id(key) if key is not None else NO_PEER
        outcome = outcomes[index]
        if outcome == GOOD:
            copies.peers[peer]["good"] += 1
            continue
        kind = "corrupt" if outcome == CORRUPT else "missing"
        copies.peers[peer][kind] += 1
        (corrupt if outcome == CORRUPT else missing).append(peer)
        if outcome == CORRUPT:
            remote.on_corrupt(record.block_id, index, holder)
    copies.good[record.block_id] = len(good)
    if corrupt or missing:
        copies.blocks.append({"block": record.block_id.hex(), "path": path, "good": len(good),
                              "total": record.total, "corrupt": corrupt, "missing": missing})
    if len(good) >= needed:
        try:
            await trio.to_thread.run_sync(
                lambda: blocks.codec.open(record, good, verified=True), limiter=blocks.limiter
            )
            verified[record.block_id] = True
        except BlockError:
            verified[record.block_id] = False
    else:
        # Shards may sit where the record does not say (repair moved them after the
        # commit this record came from): rebuilding looks on every peer.
        verified[record.block_id] = await _rebuilds(blocks, stored)


async def _judge(
    scanned: ScannedFile,
    blocks: BlockStore,
    reachable: Callable[[int], Awaitable[bool]],
    read_data: bool,
    needed: int,
    verified: dict[bytes, bool],
) -> FileHealth:
    """One file's verdict (*verified*: blocks rebuilt so far, shared across files)."""
    path, refs = scanned.path, _block_refs(scanned)
    if not refs:
        return _without_blocks(scanned)
    state, worst, total = "ok", None, blocks.codec.total
    for block_id in refs:
        stored = scanned.records.get(block_id)
        if stored is None:
            state, worst = "unrecoverable", 0
            break
        total = stored.record.total
        if LOCAL_HOLDER in stored.holders:
            live = total
            state = "local" if state == "ok" else state
        else:
            live = await _live(stored, reachable)
            if live < needed:
                # The record may be out of date (repair moved shards after the commit
                # it came from): rebuilding looks for them on every peer and records
                # where they turn up, so count again before calling the block lost.
                try:
                    await blocks.rebuild(stored)
                except BlockUnavailable:
                    pass
                else:
                    verified[block_id] = True
                    stored = blocks.load(block_id) or stored
                    live = await _live(stored, reachable)
        worst = live if worst is None else min(worst, live)
        if live < needed:
            state = "unrecoverable"
        elif read_data:
            if block_id not in verified:
                try:
                    await blocks.rebuild(stored)
                    verified[block_id] = True
                except BlockUnavailable:
                    verified[block_id] = False
            if not verified[block_id]:
                state = "unrecoverable"
        if state == "ok" and live < total:
            state = "degraded"
    return FileHealth(path, state, f"{worst}/{total}")
