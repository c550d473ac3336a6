"""Reading the live tree for a commit, and writing it bottom-up (fs/commit.py).

``TreeReader`` reads what a commit needs, in worker threads: the directories grouped
by height, and each directory's entries with their attributes, xattrs and block
references (holders as public keys). Where it reads from is a ``Reads``:

- ``Snapshots``: every batch (the walk, DIRS_PER_BATCH directories, the root) opens a
  read transaction of its own and closes it before the loop gets the result back, so
  no reader stays open while nodes are written and placed on peers (an open LMDB
  reader keeps every page freed after it began from being reused: the file grows).
  Each transaction also reads the tree's change counter (``tree_gen``, fs/tree.py);
  if it differs from the first one's, the tree changed and ``TreeChanged`` is raised.
  When it never differs, no tree table changed between the first and the last batch,
  so the batches saw exactly what one snapshot would have.
- ``HeldSnapshot``: one read transaction for the whole walk. Commits hold one only on
  their private scratch copy of the tree (fs/treecopy.py, the fallback when the tree
  keeps changing), never on meta.lmdb.

A commit either reads every directory (``full``) or only those the dirty-directory
tables (fs/dirstate.py) say changed, and the path from each to the root, deepest first;
a directory it does not read is named by the node it was last committed as
(``dir_nodes``), which the new parent node references again without reading it.

``write_tree`` writes the directories of height 0 first, then their parents, so that
a parent names its children's nodes with their final holders; lazy directories (not
loaded yet on a restored machine, fs/restore.py) are named by their committed nodes
as they are. A directory is read SLICE entries at a time and its leaves are written
slice by slice (``TreeWriter.write_slices``), so a huge directory never sits in memory
whole (its objects would make every garbage collection pass long); whatever grows
with a slice (building entries, deciding which files need manifests, freeing them)
runs in worker threads. Within a level, the next batch of DIRS_PER_BATCH directories is
read while the one before it is written (``BATCHES_IN_FLIGHT``, so two batches' first
slices are in memory at most): the uploads never pause for a read, nor for the last
node of a batch.
"""

from __future__ import annotations

import stat
import struct
from bisect import bisect_right
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import lmdb
import trio

from fluidfs.blocks.record import StoredBlock
from fluidfs.fs.dirstate import DirState, LeafRecord, StaleDirState
from fluidfs.fs.inode import Inode
from fluidfs.fs.metaformat import MANIFEST_INLINE_BLOCKS, Entry, Ref
from fluidfs.fs.metaindex import Holders
from fluidfs.fs.tree import BLOCK_REF, INLINE, ROOT_INO, tree_generation
from fluidfs.store.db import Database

_U64 = struct.Struct(">Q")
DIRS_PER_BATCH = 64
BATCHES_IN_FLIGHT = 2  # batches of directories read and being written at once
SLICE = 2000  # entries of one directory read (and cut into leaves) at a time
FREE_PIECE = 500  # entries freed at once (see _free)


class CommitAborted(Exception):
    """The tree changed under the commit in a way it cannot use; try again."""


class TreeChanged(Exception):
    """The tree changed between two of the short snapshots of one commit."""


class Snapshots:
    """Each read in a fresh, short read transaction; the tree must not change meanwhile."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.generation: int | None = None
        db.commit_batch()  # worker threads read what is committed: all the mount did

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(txn, *args)`` in a new read transaction (call from a worker thread)."""
        with self.db.read() as txn:
            seen = tree_generation(self.db, txn)
            if self.generation is None:
                self.generation = seen
            elif seen != self.generation:
                raise TreeChanged
            return fn(txn, *args)


class HeldSnapshot:
    """Every read from one read transaction, held until ``close``."""

    def __init__(self, db: Database) -> None:
        self.txn: lmdb.Transaction = db.read()

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(txn, *args)`` in the held transaction (py-lmdb read transactions may move
        between threads as long as one uses them at a time)."""
        return fn(self.txn, *args)

    def close(self) -> None:
        """End the transaction."""
        self.txn.abort()


class TreeReader:
    """Reads the live tree inside given read transactions (runs in worker threads)."""

    def __init__(
        self, db: Database, holders: Holders, stamp: Callable[[], bytes] | None = None
    ) -> None:
        self.db = db
        self.holders = holders
        self.stamp = stamp  # the block store's placement stamp (fs/dirstate.py dir_short)
        self._inodes = db["inodes"]
        self._dirents = db["dirents"]
        self._blockmap = db["blockmap"]
        self._xattrs = db["xattrs"]
        self._blocks = db["blocks"]
        self._lazy = db["lazy"]
        self.dirs = DirState(db)

    def _prefix(
        self,
        txn,
        table,
        ino: int,
        after: bytes = b"",
        stop: bytes | None = None,
        start: bytes = b"",
    ):
        """Rows of *ino* with keys above *after* (from *start* on, if there is no
        *after*) and below *stop*."""
        return _scan(txn.cursor(db=table), ino, after, stop, start)

    def inode(self, txn, ino: int) -> Inode | None:
        raw = txn.get(_U64.pack(ino), db=self._inodes)
        return None if raw is None else Inode.decode(ino, raw)

    def ref(self, txn, block_id: bytes) -> Ref:
        raw = txn.get(block_id, db=self._blocks)
        if raw is None:
            raise CommitAborted(f"block {block_id.hex()[:16]} has no record")
        return self.holders.ref(StoredBlock.decode(block_id, raw))

    def lazy(self, txn) -> dict[int, Ref]:
        """Lazy directories' committed refs (fs/restore.py)."""
        return {
            _U64.unpack(k)[0]: self.ref(txn, bytes(v)) for k, v in txn.cursor(db=self._lazy)
        }

    def plan(self, txn, full: bool) -> Plan:
        """What a commit writes, as *txn* sees the tree (see ``Plan``)."""
        gen = tree_generation(self.db, txn)
        stamp = self.stamp() if self.stamp is not None else b""
        if full:
            levels, lazy = self.walk(txn)
            marks = {
                _U64.unpack(k)[0]: _U64.unpack(v)[0]
                for k, v in txn.cursor(db=self.db["dir_dirty"])
            }
            names: dict[int, list[bytes]] = {}
        else:
            lazy = self.lazy(txn)
            levels, marks, names = self.dirs.changed_in(txn, set(lazy), stamp)
        return Plan(levels, lazy, marks, gen, full, stamp, names)

    def committed(self, txn, ino: int) -> Ref | None:
        """The committed top node of a directory this commit does not write."""
        top = self.dirs.committed_in(txn, ino)
        if top is None:
            raise StaleDirState(f"directory {ino} has no committed node")
        if not top:
            return None
        raw = txn.get(top, db=self._blocks)
        if raw is None:
            raise StaleDirState(f"the committed node of directory {ino} is gone")
        return self.holders.ref(StoredBlock.decode(top, raw))

    def walk(self, txn) -> tuple[list[list[int]], dict[int, Ref]]:
        """Directories grouped by height (leaves first), and lazy directories' refs."""
        lazy = self.lazy(txn)
        heights: dict[int, int] = {}
        subdirs: dict[int, list[int]] = {}
        stack: list[tuple[int, bool]] = [(ROOT_INO, False)]
        while stack:
            ino, expanded = stack.pop()
            if expanded:
                heights[ino] = max((heights[c] + 1 for c in subdirs.pop(ino)), default=0)
                continue
            if ino in lazy:
                heights[ino] = 0
                continue
            children = []
            for _name, value in self._prefix(txn, self._dirents, ino):
                child = _U64.unpack(value[:8])[0]
                inode = self.inode(txn, child)
                if inode is not None and inode.is_dir and child not in heights:
                    children.append(child)
            subdirs[ino] = children
            stack.append((ino, True))
            stack.extend((c, False) for c in children)
        levels: dict[int, list[int]] = {}
        for ino, height in heights.items():
            if ino not in lazy:
                levels.setdefault(height, []).append(ino)
        return [levels[h] for h in sorted(levels)], lazy

    def entry(self, txn, name: bytes, inode: Inode, cursors: tuple | None = None) -> Entry:
        """The entry for *inode* named *name*, with its xattrs and block references.
        *cursors*: an (xattrs, blockmap) cursor pair of *txn* to reuse (``cursors``):
        a slice of many entries opens two cursors, not two per entry."""
        xattrs, blockmap = cursors if cursors is not None else self.cursors(txn)
        entry = Entry.of_inode(name, inode)
        entry.xattrs = list(_scan(xattrs, inode.ino))
        if inode.is_reg:
            for key, value in _scan(blockmap, inode.ino):
                index = _U64.unpack(key)[0]
                if value[:1] == BLOCK_REF:
                    entry.blocks.append((index, self.ref(txn, value[1:])))
                elif value[:1] == INLINE:
                    entry.inline.append((index, value[1:]))
        return entry

    def cursors(self, txn) -> tuple:
        """An (xattrs, blockmap) cursor pair of *txn* for ``entry``."""
        return txn.cursor(db=self._xattrs), txn.cursor(db=self._blockmap)

    def directory(self, txn, ino: int, content: dict[int, Ref | None]) -> list[Entry]:
        """The entries of directory *ino*, sorted by name; subdirectories from *content*."""
        return self.directory_slice(txn, ino, content)[0]

    def directory_slice(
        self,
        txn,
        ino: int,
        content: dict[int, Ref | None],
        after: bytes = b"",
        limit: int | None = None,
        start: bytes = b"",
        stop: bytes | None = None,
    ) -> tuple[list[Entry], bool]:
        """Up to *limit* entries of directory *ino* named after *after* (or from *start*
        on, if *after* is empty) and before *stop*, sorted by name, and whether more
        follow."""
        entries = []
        cursors = self.cursors(txn)
        for name, value in self._prefix(txn, self._dirents, ino, after, stop, start):
            if limit is not None and len(entries) >= limit:
                return entries, True
            child = _U64.unpack(value[:8])[0]
            inode = self.inode(txn, child)
            if inode is None:
                continue
            entry = self.entry(txn, name, inode, cursors)
            if inode.is_dir:
                entry.content = (
                    content[child] if child in content else self.committed(txn, child)
                )
            entries.append(entry)
        return entries, False

    def next_ino(self, txn) -> int:
        raw = txn.get(b"next_ino", db=self.db["counters"])
        return _U64.unpack(raw)[0] if raw else 2


def _scan(
    cursor, ino: int, after: bytes = b"", stop: bytes | None = None, start: bytes = b""
):
    """(key after the inode number, value) of *cursor*'s table for inode *ino*, in
    order, from the first key after *after* (from *start* on, if there is no *after*)
    and below *stop* (copies: the cursor moves on)."""
    prefix = _U64.pack(ino)
    if cursor.set_range(prefix + (after or start)):
        for key, value in cursor:
            if key[:8] != prefix:
                return
            if after and key[8:] == after:
                continue
            if stop is not None and key[8:] >= stop:
                return
            yield bytes(key[8:]), bytes(value)


@dataclass
class Plan:
    """The directories one commit writes, grouped so each comes after its children;
    the lazy directories' refs; the dirty marks seen (ino → generation, fs/dirstate.py)
    and the tree generation the plan was read at; whether every directory is written;
    the block store's placement stamp when it was read (b"" if unknown); for the
    directories that may keep committed leaves, the names to read again
    (fs/dirstate.py ``changed_in``)."""

    levels: list[list[int]]
    lazy: dict[int, Ref]
    marks: dict[int, int]
    generation: int
    full: bool
    stamp: bytes = b""
    names: dict[int, list[bytes]] = field(default_factory=dict)


@dataclass
class Written:
    """What ``write_tree`` wrote: the root's entry, the next inode number, the top node
    id of each directory it wrote (None if empty), the plan it followed, and the
    directories written whose nodes name references with fewer holders than shards,
    and the leaves of each directory written."""

    root: Entry
    next_ino: int
    dirs: dict[int, bytes | None]
    plan: Plan
    short: set[int]
    leaves: dict[int, list[LeafRecord]] = field(default_factory=dict)


@dataclass
class Listed:
    """A slice of one directory as read for a commit, prepared in the worker thread."""

    entries: list[Entry]
    big: list[Entry]  # files whose block lists go to manifest chunks
    files: int  # entries that are not directories
    more: bool  # the directory goes on after the last of these entries
    # For a directory that keeps some committed leaves: those leaves (and no entries).
    leaves: list[LeafRecord] | None = None

    @classmethod
    def of(cls, entries: list[Entry], more: bool) -> Listed:
        return cls(
            entries,
            [e for e in entries if len(e.blocks) + len(e.inline) > MANIFEST_INLINE_BLOCKS],
            sum(1 for e in entries if not stat.S_ISDIR(e.mode)),
            more,
        )


def _list_batch(
    txn,
    reader: TreeReader,
    inos: list[int],
    content: dict[int, Ref | None],
    reuse: frozenset[int] | set[int] = frozenset(),
) -> dict[int, Listed]:
    """The first slice of each directory of a batch (its committed leaves instead, for
    one in *reuse* that has them)."""
    listed = {}
    for ino in inos:
        leaves = reader.dirs.leaves_in(txn, ino) if ino in reuse else []
        if leaves:
            listed[ino] = Listed([], [], 0, False, leaves)
        else:
            listed[ino] = Listed.of(*reader.directory_slice(txn, ino, content, limit=SLICE))
    return listed


def _list_slice(
    txn,
    reader: TreeReader,
    ino: int,
    content: dict[int, Ref | None],
    after: bytes,
    start: bytes = b"",
    stop: bytes | None = None,
) -> Listed:
    return Listed.of(
        *reader.directory_slice(txn, ino, content, after, limit=SLICE, start=start, stop=stop)
    )


@dataclass
class KeptLeaf:
    """A committed leaf of a directory, named again unread if the leaves before it were
    cut where they were last time (``TreeWriter.write_slices``); ``read`` gives its
    entries otherwise."""

    first: bytes
    block_id: bytes
    count: int
    read: Callable[[], Any]  # async () -> list[Entry]


async def write_tree(
    reader: TreeReader, writer, reads, *, full: bool = True, plan: Plan | None = None
) -> Written:
    """Write the tree as *reads* sees it: every directory if *full*, else those marked
    changed and the paths above them. May raise TreeChanged (see ``Snapshots``), and
    StaleDirState when a directory it does not write has no usable committed node.
    A *plan* given is followed instead of reading one (fs/treecopy.py)."""
    if plan is None:
        plan = await trio.to_thread.run_sync(reads.run, reader.plan, full)
    writer.short.clear()  # from an attempt given up (TreeChanged)
    writer.leaves.clear()
    content: dict[int, Ref | None] = dict(plan.lazy)

    async def slices(
        ino: int,
        part: Listed | None,
        start: bytes = b"",
        stop: bytes | None = None,
        last: bool = True,
    ) -> AsyncIterator[tuple[list[Entry], bool]]:
        """The entries of *ino* from *start* to *stop* slice by slice, beginning with
        *part* if it was read already; the last slice says it is the last if *last*."""
        if part is None:
            part = await trio.to_thread.run_sync(
                reads.run, _list_slice, reader, ino, content, b"", start, stop
            )
        while True:
            for entry in part.big:
                entry.chunks = await writer.manifest(
                    entry.ino, entry.blocks, entry.inline, owner=ino
                )
                entry.blocks, entry.inline = [], []
            writer.stats.files += part.files
            yield part.entries, last and not part.more
            if not part.more:
                return
            after = part.entries[-1].name
            await trio.to_thread.run_sync(_free, [part])
            part = await trio.to_thread.run_sync(
                reads.run, _list_slice, reader, ino, content, after, start, stop
            )

    async def kept(ino: int, leaves: list[LeafRecord]) -> AsyncIterator[Any]:
        """Committed leaves as ``KeptLeaf``s, the ranges holding a changed name (and the
        flawed leaves) as entries: a leaf's range runs from its first name to the next
        leaf's (from the start for the first leaf, to the end for the last)."""
        firsts = [leaf.first for leaf in leaves]
        touched = {max(bisect_right(firsts, name) - 1, 0) for name in plan.names[ino]}
        for i, leaf in enumerate(leaves):
            start = leaf.first if i else b""
            stop = firsts[i + 1] if i + 1 < len(leaves) else None
            if i in touched or leaf.flawed:
                async for part in slices(ino, None, start, stop, last=False):
                    yield part
                continue

            async def read(start=start, stop=stop) -> list[Entry]:
                entries: list[Entry] = []
                async for part, _ in slices(ino, None, start, stop, last=False):
                    entries += part
                return entries

            yield KeptLeaf(leaf.first, leaf.block_id, leaf.count, read)

    async def one(ino: int, first: Listed) -> None:
        parts = kept(ino, first.leaves) if first.leaves else slices(ino, first)
        content[ino] = await writer.write_slices(parts, owner=ino)

    async def write_batch(listed: dict[int, Listed], room: trio.Semaphore) -> None:
        try:
            async with trio.open_nursery() as nursery:
                for ino, first in listed.items():
                    nursery.start_soon(one, ino, first)
            writer.stats.dirs += len(listed)
            # Freeing a big directory's entries takes as long as making them: not here.
            dropped = list(listed.values())
            listed.clear()
            await trio.to_thread.run_sync(_free, dropped)
        finally:
            room.release()

    for level in plan.levels:
        # The next batch of a level is read while the one before it is written (their
        # subdirectories are all in lower levels, written already), and its nodes join
        # those in flight: no pause in the uploads to read a batch, or to wait for the
        # last node of the one before.
        room = trio.Semaphore(BATCHES_IN_FLIGHT)
        try:
            async with trio.open_nursery() as nursery:
                for start in range(0, len(level), DIRS_PER_BATCH):
                    batch = level[start : start + DIRS_PER_BATCH]
                    await room.acquire()
                    try:
                        listed = await trio.to_thread.run_sync(
                            reads.run, _list_batch, reader, batch, content, set(plan.names)
                        )
                    except BaseException:
                        room.release()
                        raise
                    nursery.start_soon(write_batch, listed, room)
        except BaseExceptionGroup as group:  # the caller starts over on TreeChanged alone
            changed, rest = group.split(TreeChanged)
            if changed is not None and rest is None:
                raise TreeChanged from group
            raise
    root, next_ino = await trio.to_thread.run_sync(reads.run, _root, reader, content)
    lazy = plan.lazy
    dirs = {
        ino: (ref.block_id if ref is not None else None)
        for ino, ref in content.items()
        if ino not in lazy
    }
    short = {ino for ino in dirs if writer.short.get(ino)}
    leaves = {ino: writer.leaves[ino] for ino in dirs if ino in writer.leaves}
    return Written(root, next_ino, dirs, plan, short, leaves)


def _free(dropped: list[Listed]) -> None:
    """Let go of listed directories a few hundred entries at a time (in a worker thread;
    the pauses between the pieces let other threads have the GIL)."""
    while dropped:
        entries = dropped[-1].entries
        dropped[-1].big.clear()
        while entries:
            del entries[-FREE_PIECE:]
        dropped.pop()


def _root(txn, reader: TreeReader, content: dict[int, Ref | None]) -> tuple[Entry, int]:
    root = reader.entry(txn, b"", reader.inode(txn, ROOT_INO))
    root.content = content[ROOT_INO] if ROOT_INO in content else reader.committed(txn, ROOT_INO)
    return root, reader.next_ino(txn)
