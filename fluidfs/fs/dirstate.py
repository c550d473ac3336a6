"""What a commit needs to write only what changed: directories' parents, dirty marks
and committed nodes (fs/commit.py, fs/treewalk.py).

Five tables of meta.lmdb (format version 1; integers are big-endian u64):

- ``dir_parents``: child ‖ parent ‖ name → empty. One row per directory entry, kept by
  ``Tree.link``/``unlink`` in the transaction that changes the entry: the reverse of
  ``dirents``, so a change to an inode finds the directories that name it (several for a
  hard-linked file; exactly one for a directory other than the root).
- ``dir_dirty``: directory ino → u64 ``tree_gen`` of the change that marked it. A
  directory is marked when one of its entries changes (a name added or removed, or an
  attribute, block or xattr of an inode it names). A commit that read the tree at
  generation G clears only the marks ≤ G: a change made while it ran stays marked.
- ``dir_nodes``: directory ino → ``u8 1 ‖ block id (32)`` of the top metadata node
  of its contents in the last commit, or ``u8 1`` alone for an empty directory. Every id
  here is reachable from the newest commit head, so a commit may name it again. A
  restore (fs/restore.py) writes the committed node of each directory it loads, and
  writes the loaded entries without dirty marks: a fresh machine's first commit after
  a full walk reads only what changed since.
- ``dir_state``: ``b"index"`` → u8 1 once ``dir_parents`` covers every directory entry
  (built in batches by ``DirState.build_index``: stores from before this table have none);
  ``b"since_full"`` → u64 commits since the last full one. A new store is indexed from
  the start (``DirState.start``: no entries, nothing to index).

- ``dir_short``: directory ino → empty. The directory's last committed node names a
  reference with fewer holders than shards (a file's block, a manifest chunk or the
  block refs inside it, a subdirectory's node, one of its own leaves). ``dir_state``'s
  ``b"short_stamp"`` holds the block store's placement stamp (``BlockStore.
  placement_stamp``: 8-byte process epoch ‖ u64 count of records saved with all their
  holders) as the last commit read it. A commit whose stamp differs re-reads every
  ``dir_short`` directory (and its path to the root), so that holders found since are
  written; with the same stamp no block was placed since and none is re-read, so a
  directory that can never be complete (fewer peers than shards) costs nothing. A stamp
  from an earlier process counts as the same while this process has placed nothing.

- ``dir_dirty_names``: directory ino ‖ entry name → u64 ``tree_gen`` of the change.
  Written beside the ``dir_dirty`` mark whenever the change is to one named entry (every
  mark but that of a new directory's own listing); cleared with the mark. A marked
  directory without rows here is read whole.
- ``dir_leaves``: directory ino ‖ first name of a leaf → ``u8 1 ‖ leaf node id (32) ‖
  u32 entries ‖ u8 flawed``, for each leaf of a directory last committed as more than one
  leaf; flawed: the leaf named a reference with fewer holders than shards or fewer than K
  peers. A commit that writes such a directory re-reads only the leaves holding a dirty
  name (or the name of a subdirectory on the path of a change) and the flawed ones; every
  other leaf is named again as it is (``TreeWriter.write_slices``), so a one-file change
  under a directory of 10,000 entries encodes one leaf of it, not all.

A commit writes the marked directories and every directory on the path from each of
them to the root, deepest first; every other directory is named by its ``dir_nodes``
node, unread. A full commit (the first after the index is built on a store from before
these tables, every ``FULL_EVERY``-th, or on request) reads every directory and rewrites
``dir_nodes`` whole.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from fluidfs.store.db import Database, scan_batch

VERSION = 1
TABLES = [
    "dir_parents", "dir_dirty", "dir_nodes", "dir_state", "dir_short", "dir_dirty_names",
    "dir_leaves",
]
ROOT_INO = 1
FULL_EVERY = 100  # commits between two full ones (the safety net: docs/decisions.md)
BATCH = 5000  # rows per write transaction when rebuilding or recording
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_INDEX = b"index"
_SINCE_FULL = b"since_full"
_SHORT_STAMP = b"short_stamp"


class StaleDirState(Exception):
    """The dirty-directory tables do not describe the tree: commit it whole instead."""


def _u64(n: int) -> bytes:
    return _U64.pack(n)


@dataclass(frozen=True)
class LeafRecord:
    """One leaf of a directory as last committed (``dir_leaves``)."""

    first: bytes  # the name of its first entry
    block_id: bytes
    count: int  # entries
    flawed: bool  # names a short or weak reference (never named again unread)

    def encode(self) -> bytes:
        return bytes([VERSION]) + self.block_id + _U32.pack(self.count) + bytes([self.flawed])

    @classmethod
    def decode(cls, first: bytes, raw: bytes) -> LeafRecord:
        if len(raw) != 38 or raw[0] != VERSION:
            raise StaleDirState("unknown dir_leaves record")
        return cls(first, bytes(raw[1:33]), _U32.unpack(raw[33:37])[0], raw[37] != 0)


class DirState:
    """The tables above; the ``*_in`` calls take the caller's transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._parents = db["dir_parents"]
        self._dirty = db["dir_dirty"]
        self._nodes = db["dir_nodes"]
        self._state = db["dir_state"]
        self._short = db["dir_short"]
        self._dirents = db["dirents"]
        self._names = db["dir_dirty_names"]
        self._leaves = db["dir_leaves"]

    # --- kept by Tree, inside the transaction of the change ----------------------------

    def linked(self, txn, parent: int, name: bytes, child: int, gen: int) -> None:
        """*parent* got the entry *name* → *child*."""
        txn.put(_u64(child) + _u64(parent) + name, b"", db=self._parents)
        self.mark(txn, parent, gen)
        txn.put(_u64(parent) + name, _u64(gen), db=self._names)

    def unlinked(self, txn, parent: int, name: bytes, child: int, gen: int) -> None:
        """*parent* lost the entry *name* → *child*."""
        txn.delete(_u64(child) + _u64(parent) + name, db=self._parents)
        self.mark(txn, parent, gen)
        txn.put(_u64(parent) + name, _u64(gen), db=self._names)

    def adopted_entry(self, txn, parent: int, name: bytes, child: int) -> None:
        """A restore wrote *parent*'s committed entry *name* → *child*: indexed, not
        marked (the committed node of *parent* holds it)."""
        txn.put(_u64(child) + _u64(parent) + name, b"", db=self._parents)

    def adopted_entries(self, txn, rows: list[tuple[bytes, bytes]]) -> None:
        """``adopted_entry`` for many: *rows* of (child ‖ parent ‖ name, b"")."""
        if rows:
            txn.cursor(db=self._parents).putmulti(rows, dupdata=False)

    def adopted(self, txn, ino: int, top: bytes) -> None:
        """A restore loaded directory *ino* from its committed node *top* (b"": an
        empty directory): commits name that node again until the directory changes. It
        is reachable from the newest commit head, which names it (lazily) too."""
        txn.put(_u64(ino), bytes([VERSION]) + top, db=self._nodes)

    def mark(self, txn, ino: int, gen: int) -> None:
        """Directory *ino*'s contents changed at generation *gen*."""
        txn.put(_u64(ino), _u64(gen), db=self._dirty)

    def mark_parents(self, txn, ino: int, gen: int) -> None:
        """An inode's attributes, blocks or xattrs changed: mark each directory naming it."""
        prefix = _u64(ino)
        cursor = txn.cursor(db=self._parents)
        if not cursor.set_range(prefix):
            return
        for key in cursor.iternext(values=False):
            if key[:8] != prefix:
                return
            txn.put(bytes(key[8:16]), _u64(gen), db=self._dirty)
            txn.put(bytes(key[8:]), _u64(gen), db=self._names)

    def is_new_dir(self, txn, ino: int) -> bool:
        """True if directory *ino* was never committed (a new one must be written)."""
        return txn.get(_u64(ino), db=self._nodes) is None

    def forget(self, txn, ino: int) -> None:
        """The inode is gone."""
        txn.delete(_u64(ino), db=self._nodes)
        txn.delete(_u64(ino), db=self._dirty)
        txn.delete(_u64(ino), db=self._short)
        for table in (self._names, self._leaves):
            _delete_prefix(txn, table, _u64(ino))

    # --- read by commits, in their read transactions ------------------------------------

    def indexed(self, txn) -> bool:
        """True once ``dir_parents`` covers the whole tree."""
        return txn.get(_INDEX, db=self._state) is not None

    def since_full(self, txn) -> int:
        """Commits since the last full one."""
        raw = txn.get(_SINCE_FULL, db=self._state)
        return _U64.unpack(raw)[0] if raw else 0

    def parent_in(self, txn, ino: int) -> int | None:
        """The directory naming directory *ino* (None for the root or an unlinked one)."""
        prefix = _u64(ino)
        cursor = txn.cursor(db=self._parents)
        if cursor.set_range(prefix) and cursor.key()[:8] == prefix:
            return _U64.unpack(cursor.key()[8:16])[0]
        return None

    def parent_name_in(self, txn, ino: int) -> tuple[int, bytes] | None:
        """(the directory naming directory *ino*, the name) as ``parent_in``."""
        prefix = _u64(ino)
        cursor = txn.cursor(db=self._parents)
        if cursor.set_range(prefix) and cursor.key()[:8] == prefix:
            key = cursor.key()
            return _U64.unpack(key[8:16])[0], bytes(key[16:])
        return None

    def dirty_names_in(self, txn, ino: int) -> list[bytes]:
        """The names of directory *ino* changed since they were last committed."""
        return [name for name, _ in _prefix_rows(txn, self._names, _u64(ino))]

    def leaves_in(self, txn, ino: int) -> list[LeafRecord]:
        """The leaves directory *ino* was last committed as (empty: one leaf, or unknown)."""
        return [LeafRecord.decode(f, raw) for f, raw in _prefix_rows(txn, self._leaves, _u64(ino))]

    def has_leaves_in(self, txn, ino: int) -> bool:
        """True if ``dir_leaves`` has rows for *ino*."""
        prefix = _u64(ino)
        cursor = txn.cursor(db=self._leaves)
        return cursor.set_range(prefix) and cursor.key()[:8] == prefix

    def committed_in(self, txn, ino: int) -> bytes | None:
        """``dir_nodes``'s top node id of *ino* (b"" if it was empty); None if unknown."""
        raw = txn.get(_u64(ino), db=self._nodes)
        if raw is None:
            return None
        if raw[:1] != bytes([VERSION]):
            raise StaleDirState(f"unknown dir_nodes record for {ino}")
        return bytes(raw[1:])

    def short_due(self, txn, stamp: bytes) -> list[int]:
        """The ``dir_short`` directories to re-read at placement *stamp* (see above)."""
        seen = txn.get(_SHORT_STAMP, db=self._state)
        if seen is None or bytes(seen) == stamp:
            return []
        if seen[:8] != stamp[:8] and stamp[8:] == _u64(0):
            return []  # a new process that placed nothing yet
        return [_U64.unpack(k)[0] for k in txn.cursor(db=self._short).iternext(values=False)]

    def changed_in(
        self, txn, lazy: set[int], stamp: bytes = b""
    ) -> tuple[list[list[int]], dict[int, int], dict[int, list[bytes]]]:
        """The directories to write, deepest first, grouped by depth; the dirty marks
        seen (ino → generation); and for each directory to write that may keep some of
        its committed leaves (``dir_leaves``), the sorted names whose entries may differ
        from them. Marks of directories that no longer hang from the root (removed, or
        open but unlinked) are returned but their directories not written. With a
        placement *stamp*, short directories due (``short_due``) are written too, whole."""
        marks = {
            _U64.unpack(k)[0]: _U64.unpack(v)[0] for k, v in txn.cursor(db=self._dirty)
        }
        short = self.short_due(txn, stamp) if stamp else []
        depth: dict[int, int] = {ROOT_INO: 0}
        # The name under which each directory on a path hangs from its parent: the
        # parent's entry for it changes with the node written for it.
        below: dict[int, set[bytes]] = {}
        for start in [*marks, *short]:
            path: list[tuple[int, tuple[int, bytes] | None]] = []
            ino: int | None = start
            while ino is not None and ino not in depth:
                if len(path) > 1_000_000:
                    raise StaleDirState("a loop in dir_parents")
                up = self.parent_name_in(txn, ino)
                path.append((ino, up))
                ino = None if up is None else up[0]
            if ino is None:
                continue  # not under the root
            base = depth[ino]
            for i, (node, up) in enumerate(reversed(path)):
                depth[node] = base + i + 1
                if up is not None:
                    below.setdefault(up[0], set()).add(up[1])
        if not marks and not short:
            return [], marks, {}
        levels: dict[int, list[int]] = {}
        for ino, d in depth.items():
            if ino not in lazy:
                levels.setdefault(d, []).append(ino)
        whole = set(short)
        names: dict[int, list[bytes]] = {}
        for ino in depth:
            if ino in whole or ino in lazy or not self.has_leaves_in(txn, ino):
                continue
            dirty = self.dirty_names_in(txn, ino)
            if ino in marks and not dirty:
                continue  # marked as a whole (a new directory's listing)
            names[ino] = sorted(below.get(ino, set()).union(dirty))
        return [levels[d] for d in sorted(levels, reverse=True)], marks, names

    # --- after a commit ------------------------------------------------------------------

    def record(
        self,
        written: dict[int, bytes | None],
        marks: dict[int, int],
        full: bool,
        short: set[int] | frozenset[int] = frozenset(),
        stamp: bytes = b"",
        leaves: dict[int, list[LeafRecord]] | None = None,
        generation: int | None = None,
    ) -> None:
        """Remember the nodes a commit wrote for each directory and clear the marks it
        took (those not renewed since); with *full*, forget every other directory's.
        *short*: the written directories whose nodes name short references, as of the
        placement *stamp* the commit read. *leaves*: each written directory's leaves
        (kept for those of more than one). *generation*: the tree generation the commit
        read, whose dirty names it cleans. Runs in a worker thread, BATCH rows per
        transaction."""
        leaves = leaves or {}
        if full:
            for table in (self._nodes, self._short, self._leaves):
                while True:
                    with self.db.write() as txn:
                        found, more = scan_batch(txn, table, b"", BATCH)
                        for key, _ in found:
                            txn.delete(key, db=table)
                    if more is None:
                        break
        items = list(written.items())
        for start in range(0, len(items), BATCH):
            with self.db.write() as txn:
                for ino, top in items[start : start + BATCH]:
                    txn.put(_u64(ino), bytes([VERSION]) + (top or b""), db=self._nodes)
                    if not full:
                        _delete_prefix(txn, self._leaves, _u64(ino))
                    kept = leaves.get(ino, [])
                    if len(kept) > 1:
                        for leaf in kept:
                            txn.put(_u64(ino) + leaf.first, leaf.encode(), db=self._leaves)
                    if ino in short:
                        txn.put(_u64(ino), b"", db=self._short)
                    else:
                        txn.delete(_u64(ino), db=self._short)
        if stamp:
            with self.db.write() as txn:
                txn.put(_SHORT_STAMP, stamp, db=self._state)
        pending = list(marks.items())
        for start in range(0, len(pending), BATCH):
            with self.db.write() as txn:
                for ino, gen in pending[start : start + BATCH]:
                    raw = txn.get(_u64(ino), db=self._dirty)
                    if raw is not None and _U64.unpack(raw)[0] <= gen:
                        txn.delete(_u64(ino), db=self._dirty)
                    for name, seen in _prefix_rows(txn, self._names, _u64(ino)):
                        if _U64.unpack(seen)[0] <= (gen if generation is None else generation):
                            txn.delete(_u64(ino) + name, db=self._names)
        with self.db.write() as txn:
            since = 0 if full else self.since_full(txn) + 1
            txn.put(_SINCE_FULL, _u64(since), db=self._state)

    def start(self) -> None:
        """On a store without directory entries yet, ``dir_parents`` is complete as it
        is: say so, so that the first commit need not rebuild it."""
        with self.db.write() as txn:
            if not self.indexed(txn) and txn.stat(self._dirents)["entries"] == 0:
                txn.put(_INDEX, bytes([VERSION]), db=self._state)

    def build_index(self) -> None:
        """Fill ``dir_parents`` from ``dirents`` (stores from before it), BATCH entries
        per write transaction, in a worker thread. Safe while the tree changes: each
        batch reads and writes in one transaction, and Tree keeps the rows of later
        changes itself."""
        after = b""
        while True:
            with self.db.write() as txn:
                if self.indexed(txn):
                    return
                found, after = scan_batch(txn, self._dirents, after, BATCH)
                for key, value in found:
                    parent, name = key[:8], key[8:]
                    txn.put(bytes(value[:8]) + parent + name, b"", db=self._parents)
                if after is None:
                    txn.put(_INDEX, bytes([VERSION]), db=self._state)
                    return


def _prefix_rows(txn, table, prefix: bytes) -> list[tuple[bytes, bytes]]:
    """(key without *prefix*, value) of the rows of *table* whose keys start with it."""
    rows = []
    cursor = txn.cursor(db=table)
    if cursor.set_range(prefix):
        for key, value in cursor:
            if key[: len(prefix)] != prefix:
                break
            rows.append((bytes(key[len(prefix) :]), bytes(value)))
    return rows


def _delete_prefix(txn, table, prefix: bytes) -> None:
    """Delete the rows of *table* whose keys start with *prefix*."""
    cursor = txn.cursor(db=table)
    while cursor.set_range(prefix) and cursor.key()[: len(prefix)] == prefix:
        cursor.delete()
