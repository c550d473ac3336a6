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
  here is reachable from the newest commit head, so a commit may name it again.
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

A commit writes the marked directories and every directory on the path from each of
them to the root, deepest first; every other directory is named by its ``dir_nodes``
node, unread. A full commit (the first after the index is built on a store from before
these tables, every ``FULL_EVERY``-th, or on request) reads every directory and rewrites
``dir_nodes`` whole.
"""

from __future__ import annotations

import struct

from fluidfs.store.db import Database, scan_batch

VERSION = 1
TABLES = ["dir_parents", "dir_dirty", "dir_nodes", "dir_state", "dir_short"]
ROOT_INO = 1
FULL_EVERY = 100  # commits between two full ones (the safety net: docs/decisions.md)
BATCH = 5000  # rows per write transaction when rebuilding or recording
_U64 = struct.Struct(">Q")
_INDEX = b"index"
_SINCE_FULL = b"since_full"
_SHORT_STAMP = b"short_stamp"


class StaleDirState(Exception):
    """The dirty-directory tables do not describe the tree: commit it whole instead."""


def _u64(n: int) -> bytes:
    return _U64.pack(n)


class DirState:
    """The four tables above; the ``*_in`` calls take the caller's transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._parents = db["dir_parents"]
        self._dirty = db["dir_dirty"]
        self._nodes = db["dir_nodes"]
        self._state = db["dir_state"]
        self._short = db["dir_short"]
        self._dirents = db["dirents"]

    # --- kept by Tree, inside the transaction of the change ----------------------------

    def linked(self, txn, parent: int, name: bytes, child: int, gen: int) -> None:
        """*parent* got the entry *name* → *child*."""
        txn.put(_u64(child) + _u64(parent) + name, b"", db=self._parents)
        self.mark(txn, parent, gen)

    def unlinked(self, txn, parent: int, name: bytes, child: int, gen: int) -> None:
        """*parent* lost the entry *name* → *child*."""
        txn.delete(_u64(child) + _u64(parent) + name, db=self._parents)
        self.mark(txn, parent, gen)

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

    def is_new_dir(self, txn, ino: int) -> bool:
        """True if directory *ino* was never committed (a new one must be written)."""
        return txn.get(_u64(ino), db=self._nodes) is None

    def forget(self, txn, ino: int) -> None:
        """The inode is gone."""
        txn.delete(_u64(ino), db=self._nodes)
        txn.delete(_u64(ino), db=self._dirty)
        txn.delete(_u64(ino), db=self._short)

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
    ) -> tuple[list[list[int]], dict[int, int]]:
        """The directories to write, deepest first, grouped by depth, and the dirty marks
        seen (ino → generation). Marks of directories that no longer hang from the root
        (removed, or open but unlinked) are returned but their directories not written.
        With a placement *stamp*, short directories due (``short_due``) are written too."""
        marks = {
            _U64.unpack(k)[0]: _U64.unpack(v)[0] for k, v in txn.cursor(db=self._dirty)
        }
        short = self.short_due(txn, stamp) if stamp else []
        depth: dict[int, int] = {ROOT_INO: 0}
        for start in [*marks, *short]:
            path = []
            ino: int | None = start
            while ino is not None and ino not in depth:
                if len(path) > 1_000_000:
                    raise StaleDirState("a loop in dir_parents")
                path.append(ino)
                ino = self.parent_in(txn, ino)
            if ino is None:
                continue  # not under the root
            base = depth[ino]
            for i, node in enumerate(reversed(path)):
                depth[node] = base + i + 1
        if not marks and not short:
            return [], marks
        levels: dict[int, list[int]] = {}
        for ino, d in depth.items():
            if ino not in lazy:
                levels.setdefault(d, []).append(ino)
        return [levels[d] for d in sorted(levels, reverse=True)], marks

    # --- after a commit ------------------------------------------------------------------

    def record(
        self,
        written: dict[int, bytes | None],
        marks: dict[int, int],
        full: bool,
        short: set[int] | frozenset[int] = frozenset(),
        stamp: bytes = b"",
    ) -> None:
        """Remember the nodes a commit wrote for each directory and clear the marks it
        took (those not renewed since); with *full*, forget every other directory's.
        *short*: the written directories whose nodes name short references, as of the
        placement *stamp* the commit read. Runs in a worker thread, BATCH rows per
        transaction."""
        if full:
            for table in (self._nodes, self._short):
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
