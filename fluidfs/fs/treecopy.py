"""A consistent copy of what a commit reads, made in short read transactions.

When the tree changes while a commit reads it in short snapshots (fs/treewalk.py,
``TreeChanged``), the commit used to start over from ONE read transaction held for its
whole run, across every await of writing nodes and placing them on peers. LMDB cannot
reuse a page freed after the oldest open reader began, so at 100,000 files meta.lmdb
grew to 883 MiB for 46 MiB of live tables.

Instead the directories the commit reads are copied into a private scratch LMDB
environment (``commit-copy.lmdb`` beside meta.lmdb, removed after the commit), a
bounded batch per read transaction (read on the loop, ``COPY_BATCH``), none open while
the loop waits; each batch is written into the scratch afterwards, in a worker thread:

- each directory is copied with everything its listing reads (its entries' inodes,
  xattrs, block maps, block records and, for subdirectories, their committed nodes),
  and remembers the tree generation (``tree_gen``) its first slice was read at;
- a directory is *stale* when its dirty mark (fs/dirstate.py: the generation of the
  last change to its entries, never lowered while a commit runs) is newer than that.
  Every change to a tree table marks the directories naming the inode changed, so a
  directory that is not stale has not changed since it was copied;
- rounds re-copy the stale directories until few are left (or ``MAX_ROUNDS``); a last
  round re-copies the rest, the root, the counters and the marks in ONE read
  transaction, so the scratch then holds every directory the commit reads as of that
  transaction's generation, exactly what one snapshot would have given.

The last transaction is bounded by what changed during the round before it, not by the
tree. The commit then reads the scratch copy (which nobody else writes, so a reader
held there costs meta.lmdb nothing).
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import trio

from fluidfs.fs.dirstate import TABLES as DIR_TABLES
from fluidfs.fs.inode import Inode
from fluidfs.fs.tree import BLOCK_REF, ROOT_INO, tree_generation
from fluidfs.fs.treewalk import DIRS_PER_BATCH, HeldSnapshot, Plan, TreeReader
from fluidfs.store.db import Database, scan_batch

_U64 = struct.Struct(">Q")
SCRATCH = "commit-copy.lmdb"
TABLES = ["inodes", "dirents", "blockmap", "xattrs", "blocks", "lazy", "counters", *DIR_TABLES]
MAX_ROUNDS = 8  # rounds of re-copying before the last one takes whatever is left
FINAL_DIRS = DIRS_PER_BATCH  # few enough stale directories to re-copy in the last round
# Reads of meta.lmdb run on the trio loop, a bounded batch (a few milliseconds) at a
# time: meta.lmdb is written from the loop, so no write can happen while one of these
# readers is open. In worker threads they could not be kept short: contending for the
# GIL with a loop that keeps writing, a batch of 256 entries stayed open across 40 to
# 130 write transactions, whose freed pages could then not be reused.
MARKS_PER_READ = 2000  # dirty marks read per transaction between rounds
COPY_BATCH = 512  # rows read per transaction (entries, inodes, block maps, xattrs...)
_S_IFDIR = 0o040000


class _Copier:
    """Copies directories from meta.lmdb into the scratch environment (worker threads).

    Each batch reads meta.lmdb into a list of changes first and closes its reader before
    writing them into the scratch, so the reader lives only as long as the reads."""

    def __init__(self, src: Database, dst: Database) -> None:
        self.src = src
        self.dst = dst
        self.copied: dict[int, int] = {}  # directory → generation its copy was read at
        self.t = {name: (src[name], dst[name]) for name in TABLES}

    # --- reading meta.lmdb: each call appends what to change in the scratch to *ops* ----

    def _prefix(self, stxn, ops: list, name: str, ino: int) -> list[tuple[bytes, bytes]]:
        """The rows of *name* under *ino*, replacing the scratch's."""
        prefix = _U64.pack(ino)
        ops.append(("clear", name, prefix))
        rows = []
        cursor = stxn.cursor(db=self.t[name][0])
        if cursor.set_range(prefix):
            for key, value in cursor:
                if key[:8] != prefix:
                    break
                rows.append((bytes(key), bytes(value)))
        ops += [("put", name, key, value) for key, value in rows]
        return rows

    def _row(self, stxn, ops: list, name: str, key: bytes) -> bytes | None:
        value = stxn.get(key, db=self.t[name][0])
        if value is None:
            ops.append(("delete", name, key))
            return None
        value = bytes(value)
        ops.append(("put", name, key, value))
        return value

    def _blockmap(self, stxn, ops: list, ino: int, after: bytes, limit: int | None):
        """Rows of *ino*'s block map after *after* (from the first: replacing the
        scratch's) and the blocks they name; where to go on (None when done)."""
        prefix = _U64.pack(ino)
        if not after:
            ops.append(("clear", "blockmap", prefix))
        cursor = stxn.cursor(db=self.t["blockmap"][0])
        last, count = None, 0
        if cursor.set_range(prefix + after):
            for key, value in cursor:
                if key[:8] != prefix:
                    return None
                if after and key[8:] == after:
                    continue
                if limit is not None and count >= limit:
                    return last
                key, value = bytes(key), bytes(value)
                ops.append(("put", "blockmap", key, value))
                if value[:1] == BLOCK_REF:
                    self._row(stxn, ops, "blocks", value[1:])
                last, count = key[8:], count + 1
        return None

    def _inode(self, stxn, ops: list, ino: int, limit: int | None) -> tuple[bool, bytes | None]:
        """One inode and what its entry reads, up to *limit* block map rows: (whether it
        is a directory, where its block map goes on or None)."""
        raw = self._row(stxn, ops, "inodes", _U64.pack(ino))
        if raw is None:
            return False, None
        self._prefix(stxn, ops, "xattrs", ino)
        more = self._blockmap(stxn, ops, ino, b"", limit)
        if Inode.decode(ino, raw).is_dir:
            top = self._row(stxn, ops, "dir_nodes", _U64.pack(ino))
            if top is not None and len(top) > 1:
                self._row(stxn, ops, "blocks", top[1:])
            return True, more
        return False, more

    def _directory(
        self, stxn, ops: list, ino: int, after: bytes, jobs: list | None
    ) -> list[int]:
        """The entries of *ino* after *after*, and what each reads; its subdirectories.
        With *jobs*, stops once ``ops`` holds COPY_BATCH changes and leaves where to go
        on in *jobs*; without, reads the directory to its end."""
        prefix = _U64.pack(ino)
        if not after:
            ops.append(("clear", "dirents", prefix))
        subdirs = []
        cursor = stxn.cursor(db=self.t["dirents"][0])
        if not cursor.set_range(prefix + after):
            return subdirs
        for key, value in cursor:
            if key[:8] != prefix:
                break
            if after and key[8:] == after:
                continue
            key, value = bytes(key), bytes(value)
            ops.append(("put", "dirents", key, value))
            child = _U64.unpack(value[:8])[0]
            limit = None if jobs is None else max(1, COPY_BATCH - len(ops))
            is_dir, more = self._inode(stxn, ops, child, limit)
            if is_dir:
                subdirs.append(child)
            if jobs is not None and (more is not None or len(ops) >= COPY_BATCH):
                jobs.append(("dir", ino, key[8:]))
                if more is not None:
                    jobs.append(("map", child, more))
                break
        return subdirs

    # --- writing the scratch -------------------------------------------------------------

    def apply(self, ops: list) -> None:
        """Write what ``read`` or ``last`` read into the scratch (in a worker thread)."""
        with self.dst.write() as dtxn:
            for op in ops:
                table = self.t[op[1]][1]
                if op[0] == "put":
                    dtxn.put(op[2], op[3], db=table)
                elif op[0] == "delete":
                    dtxn.delete(op[2], db=table)
                elif op[0] == "drop":
                    dtxn.drop(table, delete=False)
                else:  # clear: every row under a prefix
                    prefix = op[2]
                    cursor = dtxn.cursor(db=table)
                    if cursor.set_range(prefix):
                        while cursor.key()[:8] == prefix:
                            if not cursor.delete():
                                break

    def read(self, jobs: list[tuple[str, int, bytes]]) -> tuple[list[int], list]:
        """Go on with *jobs* (``("dir", ino, after)`` or ``("map", ino, after)``) for
        COPY_BATCH changes at most, read in one short transaction; what is left stays in
        *jobs*. (Subdirectories met, changes for ``apply``.)"""
        subdirs: list[int] = []
        ops: list = []
        with self.src.read() as stxn:
            gen = tree_generation(self.src, stxn)
            while jobs and len(ops) < COPY_BATCH:
                kind, ino, after = jobs.pop()
                if kind == "map":
                    more = self._blockmap(stxn, ops, ino, after, COPY_BATCH - len(ops))
                    if more is not None:
                        jobs.append(("map", ino, more))
                    continue
                if not after:
                    self.copied[ino] = gen
                subdirs += self._directory(stxn, ops, ino, after, jobs)
        return subdirs, ops

    async def marks(self) -> dict[int, int]:
        """Every dirty mark, MARKS_PER_READ per read transaction (on the loop)."""
        marks: dict[int, int] = {}
        after: bytes | None = b""
        while after is not None:
            with self.src.read() as txn:
                found, after = scan_batch(txn, self.src["dir_dirty"], after, MARKS_PER_READ)
            await trio.sleep(0)
            marks.update((_U64.unpack(k)[0], _U64.unpack(v)[0]) for k, v in found)
        return marks

    def stale(self, marks: dict[int, int]) -> list[int]:
        """Directories changed since they were copied (or never copied)."""
        return [d for d, gen in marks.items() if gen > self.copied.get(d, -1)]

    def last(self, reader: TreeReader, full: bool) -> Plan | None:
        """The last round in one read transaction; the plan for an incremental commit."""
        ops: list = []
        with self.src.read() as stxn:
            gen = tree_generation(self.src, stxn)
            marks = {
                _U64.unpack(k)[0]: _U64.unpack(v)[0]
                for k, v in stxn.cursor(db=self.src["dir_dirty"])
            }
            plan = None
            if full:
                queue = self.stale(marks)
                if ROOT_INO not in self.copied:
                    queue.append(ROOT_INO)
            else:
                plan = reader.plan(stxn, False)
                plan.names = {}  # the copy has no committed leaves: read directories whole
                queue = [
                    d
                    for level in plan.levels
                    for d in level
                    if marks.get(d, 0) > self.copied.get(d, -1)
                ]
            while queue:
                ino = queue.pop()
                self.copied[ino] = gen
                found = self._directory(stxn, ops, ino, b"", None)
                queue += [c for c in found if c not in self.copied]
            self._inode(stxn, ops, ROOT_INO, None)
            for name in ("counters", "lazy", "dir_dirty"):
                ops.append(("drop", name))
                for key, value in stxn.cursor(db=self.t[name][0]):
                    ops.append(("put", name, bytes(key), bytes(value)))
                    if name == "lazy":
                        self._row(stxn, ops, "blocks", bytes(value))
        self.apply(ops)
        return plan


class CopiedSnapshot:
    """The scratch copy of the tree for one commit: ``run`` like a ``HeldSnapshot``."""

    def __init__(self, db: Database, reader: TreeReader) -> None:
        self.path: Path = db.path.parent / SCRATCH
        shutil.rmtree(self.path, ignore_errors=True)  # left by a crash
        self.src = db
        self.scratch = Database(self.path, TABLES, map_size=db.env.info()["map_size"])
        self.reader = TreeReader(self.scratch, reader.holders, reader.stamp)
        self._held: HeldSnapshot | None = None

    async def fill(self, reader: TreeReader, full: bool) -> Plan:
        """Copy what a commit of the tree needs; the plan it follows."""
        copier = _Copier(self.src, self.scratch)
        if full:
            queue = [ROOT_INO]
        else:
            plan = await trio.to_thread.run_sync(_plan, self.src, reader)
            queue = [d for level in plan.levels for d in level]
        for _round in range(MAX_ROUNDS):
            await _copy_all(copier, queue, full)
            queue = copier.stale(await copier.marks())
            if len(queue) <= FINAL_DIRS:
                break
        plan = await trio.to_thread.run_sync(copier.last, reader, full)
        self._held = HeldSnapshot(self.scratch)
        if plan is None:  # a walk of the whole tree: off the loop
            plan = await trio.to_thread.run_sync(self._held.run, self.reader.plan, True)
        return plan

    def run(self, fn, *args):
        """``fn(txn, *args)`` in the scratch copy's read transaction."""
        assert self._held is not None
        return self._held.run(fn, *args)

    def close(self) -> None:
        """End the read transaction and remove the scratch copy."""
        if self._held is not None:
            self._held.close()
        self.scratch.env.close()
        shutil.rmtree(self.path, ignore_errors=True)


def _plan(db: Database, reader: TreeReader) -> Plan:
    with db.read() as txn:
        return reader.plan(txn, False)


async def _copy_all(copier: _Copier, dirs: list[int], full: bool) -> None:
    """Copy *dirs* (and, for a full commit, every directory under them) in batches."""
    jobs = [("dir", d, b"") for d in dirs]
    while jobs:
        subdirs, ops = copier.read(jobs)
        await trio.to_thread.run_sync(copier.apply, ops)
        if full:
            jobs[:0] = [("dir", c, b"") for c in subdirs if c not in copier.copied]
