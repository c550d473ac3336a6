"""Reading the live tree for a commit, and writing it bottom-up (fs/commit.py).

``TreeReader`` reads everything a commit needs from one LMDB read transaction, in
worker threads (py-lmdb read transactions may move between threads as long as one
uses them at a time): the directories grouped by height, and each directory's
entries with their attributes, xattrs and block references (holders as public keys).
``write_tree`` writes the directories of height 0 first, then their parents, so that
a parent names its children's nodes with their final holders; lazy directories (not
loaded yet on a restored machine, fs/restore.py) are named by their committed nodes
as they are.
"""

from __future__ import annotations

import stat
import struct

import trio

from fluidfs.blocks.record import StoredBlock
from fluidfs.fs.inode import Inode
from fluidfs.fs.metaformat import MANIFEST_INLINE_BLOCKS, Entry, Ref
from fluidfs.fs.metaindex import Holders
from fluidfs.fs.tree import BLOCK_REF, INLINE, ROOT_INO
from fluidfs.store.db import Database

_U64 = struct.Struct(">Q")
DIRS_PER_BATCH = 64


class CommitAborted(Exception):
    """The tree changed under the commit in a way it cannot use; try again."""


class TreeReader:
    """Reads the live tree from one read transaction (runs in worker threads)."""

    def __init__(self, db: Database, holders: Holders) -> None:
        self.db = db
        self.holders = holders
        self._inodes = db["inodes"]
        self._dirents = db["dirents"]
        self._blockmap = db["blockmap"]
        self._xattrs = db["xattrs"]
        self._blocks = db["blocks"]
        self._lazy = db["lazy"]

    def _prefix(self, txn, table, ino: int):
        prefix = _U64.pack(ino)
        cursor = txn.cursor(db=table)
        if cursor.set_range(prefix):
            for key, value in cursor:
                if key[:8] != prefix:
                    return
                yield bytes(key[8:]), bytes(value)

    def inode(self, txn, ino: int) -> Inode | None:
        raw = txn.get(_U64.pack(ino), db=self._inodes)
        return None if raw is None else Inode.decode(ino, raw)

    def ref(self, txn, block_id: bytes) -> Ref:
        raw = txn.get(block_id, db=self._blocks)
        if raw is None:
            raise CommitAborted(f"block {block_id.hex()[:16]} has no record")
        return self.holders.ref(StoredBlock.decode(block_id, raw))

    def walk(self, txn) -> tuple[list[list[int]], dict[int, Ref]]:
        """Directories grouped by height (leaves first), and lazy directories' refs."""
        lazy = {
            _U64.unpack(k)[0]: self.ref(txn, bytes(v)) for k, v in txn.cursor(db=self._lazy)
        }
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

    def entry(self, txn, name: bytes, inode: Inode) -> Entry:
        entry = Entry.of_inode(name, inode)
        entry.xattrs = list(self._prefix(txn, self._xattrs, inode.ino))
        if inode.is_reg:
            for key, value in self._prefix(txn, self._blockmap, inode.ino):
                index = _U64.unpack(key)[0]
                if value[:1] == BLOCK_REF:
                    entry.blocks.append((index, self.ref(txn, value[1:])))
                elif value[:1] == INLINE:
                    entry.inline.append((index, value[1:]))
        return entry

    def directory(self, txn, ino: int, content: dict[int, Ref | None]) -> list[Entry]:
        """The entries of directory *ino*, sorted by name; subdirectories from *content*."""
        entries = []
        for name, value in self._prefix(txn, self._dirents, ino):
            child = _U64.unpack(value[:8])[0]
            inode = self.inode(txn, child)
            if inode is None:
                continue
            entry = self.entry(txn, name, inode)
            if inode.is_dir:
                entry.content = content.get(child)
            entries.append(entry)
        return entries

    def next_ino(self, txn) -> int:
        raw = txn.get(b"next_ino", db=self.db["counters"])
        return _U64.unpack(raw)[0] if raw else 2


async def write_tree(reader: TreeReader, writer, txn) -> Entry:
    """Write the tree seen by *txn*; return the root directory's entry (name empty)."""
    levels, lazy = await trio.to_thread.run_sync(reader.walk, txn)
    content: dict[int, Ref | None] = dict(lazy)
    for level in levels:
        for start in range(0, len(level), DIRS_PER_BATCH):
            batch = level[start : start + DIRS_PER_BATCH]
            listed = await trio.to_thread.run_sync(
                lambda b=batch: {ino: reader.directory(txn, ino, content) for ino in b}
            )

            async def one(ino: int, entries: list[Entry]) -> None:
                for entry in entries:
                    if len(entry.blocks) + len(entry.inline) > MANIFEST_INLINE_BLOCKS:
                        entry.chunks = await writer.manifest(entry.ino, entry.blocks, entry.inline)
                        entry.blocks, entry.inline = [], []
                writer.stats.files += sum(1 for e in entries if not stat.S_ISDIR(e.mode))
                content[ino] = await writer.write_list(entries)

            async with trio.open_nursery() as nursery:
                for ino, entries in listed.items():
                    nursery.start_soon(one, ino, entries)
            writer.stats.dirs += len(batch)
    root_inode = await trio.to_thread.run_sync(reader.inode, txn, ROOT_INO)
    root = await trio.to_thread.run_sync(reader.entry, txn, b"", root_inode)
    root.content = content.get(ROOT_INO)
    return root
