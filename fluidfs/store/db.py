"""LMDB environments: the one place persistent state goes through.

Two environments live in the state directory, so that large shard writes in
worker threads never hold the writer lock that the metadata needs:

- ``meta.lmdb``: inodes, directory entries, file→block maps, block records,
  xattrs and counters. Written from the trio loop in small transactions.
- ``shards.lmdb``: the shards this node hosts (its own and, with peers,
  others'). Written from worker threads in batched transactions.

The mount's requests write ``meta.lmdb`` through ``batch`` (store/batch.py): grouped
into one transaction committed at least every second, and before any other
transaction of the trio thread.

Both run with ``sync=False``: a commit reaches the kernel (and so survives
``kill -9`` of the process) at once; ``sync()`` makes it survive a reboot and is
called on fsync, unmount and on a timer.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import lmdb

from fluidfs.store.batch import WriteBatch
from fluidfs.store.compact import StoreUsage, compact, compact_closed, swap, usage
from fluidfs.sysutil import MappedFile

log = logging.getLogger(__name__)

TERABYTE = 1 << 40

# Tables of meta.lmdb; each is documented next to the code that writes it.
META_TABLES = [
    "inodes",
    "dirents",
    "cookies",
    "blockmap",
    "xattrs",
    "counters",  # fs/tree.py
    "blocks",  # blocks/record.py
    "gc", "placing",  # blocks/gc.py
    "settings",  # store/settings.py
    "peers",
    "peer_index",  # peers/peerlist.py
    "agreements",  # peers/agreements.py
    "meta_nodes", "dropping",  # fs/metaindex.py
    "commits",
    "snapshots",  # fs/snapshots.py
    "lazy",  # fs/restore.py
    "accounts", "reservations", "invites",  # store/accounts.py (storage providers)
    "repair_grants", "repair_caps", "repair_usage", "repair_journal",  # store/repairbook.py
    "dir_parents", "dir_dirty", "dir_nodes", "dir_state", "dir_short",  # fs/dirstate.py
    "dir_dirty_names", "dir_leaves",
]


SCAN_BATCH = 2000  # records visited per read transaction by the scans of whole tables


def scan_batch(
    txn: lmdb.Transaction, table: lmdb._Database, after: bytes, limit: int
) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
    """Up to *limit* (key, value) pairs of *table* with keys above *after*, in key order,
    and the key to pass as *after* for the next batch (None once the table is done).

    Scans that grow with the data run batch by batch, each in a short transaction of
    its own in a worker thread (DESIGN.md promise 4); ``after=b""`` starts at the top.
    """
    cursor = txn.cursor(db=table)
    found: list[tuple[bytes, bytes]] = []
    if not cursor.set_range(after):
        return found, None
    if cursor.key() == after and not cursor.next():
        return found, None
    while True:
        found.append((bytes(cursor.key()), bytes(cursor.value())))
        if not cursor.next():
            return found, None
        if len(found) >= limit:
            return found, found[-1][0]


class Database:
    """An LMDB environment with named tables."""

    def __init__(
        self,
        path: Path,
        tables: Iterable[str],
        *,
        map_size: int = TERABYTE,
        readahead: bool = False,
        readonly: bool = False,
        compacting: bool = False,
    ) -> None:
        """Open (and create) the environment at *path* with *tables*.

        With *readonly*, open an existing environment and tables for reading only, creating
        and writing nothing (``FileNotFoundError`` if either is missing): for looking into
        the state of a node that is not running. With *compacting*, the file is compacted
        when it has grown well past its tables (store/compact.py), before it opens and
        when it closes: only for an environment no other process writes.
        """
        names = list(tables)
        self.readonly = readonly
        self.path = path
        self.compacting = compacting and not readonly
        if not readonly:
            path.mkdir(parents=True, exist_ok=True)
            if self.compacting:
                compact_closed(path, len(names) + 2)
        elif not (path / "data.mdb").exists():
            raise FileNotFoundError(f"no database at {path}")
        self.env = lmdb.open(
            str(path),
            map_size=map_size,
            max_dbs=len(names) + 2,
            sync=False,
            metasync=False,
            readahead=readahead,
            max_readers=256,
            max_spare_txns=8,
            readonly=readonly,
        )
        try:
            self.tables = {
                name: self.env.open_db(name.encode(), create=not readonly) for name in names
            }
        except lmdb.NotFoundError:
            self.env.close()
            raise FileNotFoundError(f"{path} lacks one of the tables {names}") from None
        self.batch = WriteBatch(self.env)
        self._mapped = MappedFile(str(path / "data.mdb"))
        # Held while pages are released and while closing: once the file is unmapped its
        # address range may hold other memory, which MADV_DONTNEED would wipe.
        self._mapping = threading.Lock()
        self._closed = False

    def release_pages(self) -> int:
        """Give back this process's mapped pages of the file (sysutil.MappedFile: they
        stay in the page cache, the hot ones fault back in at once); the bytes covered.
        For after work that read much of the file (a commit, a scan of every record);
        does nothing once the environment is closed. Blocking: a worker thread."""
        with self._mapping:
            if self._closed:
                return 0
            return self._mapped.release()

    def records(self, table: str, batch: int) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) of *table* in key order, read *batch* at a time, each batch
        in a short read transaction of its own (``scan_batch``): a transaction held
        across a whole big table would pin every page commits free meanwhile. A record
        changed between batches is seen as it was when its batch was read. Blocking and
        proportional to the table: a worker thread."""
        after: bytes | None = b""
        while after is not None:
            with self.read() as txn:
                found, after = scan_batch(txn, self[table], after, batch)
            yield from found

    def read(self) -> lmdb.Transaction:
        """A read-only transaction (use as a context manager) of what is committed; on
        the trio thread, the open batch is committed first, so it sees everything."""
        if self.batch.owned_here() and not self.batch.in_request():
            self.batch.commit()
        return self.env.begin(write=False)

    def write(self) -> lmdb.Transaction:
        """A write transaction; commits when its ``with`` block ends without error. The
        open batch is committed before it (on another thread: waited for)."""
        if self.batch.elsewhere():
            return self.batch.begin_elsewhere()
        self.batch.commit()
        return self.env.begin(write=True)

    def view(self) -> contextlib.AbstractContextManager[lmdb.Transaction]:
        """A read transaction that sees the open batch on the trio thread (a request's
        own writes included); elsewhere, like ``read``. Use within one loop step."""
        txn = self.batch.view()
        if txn is None:
            return self.env.begin(write=False)
        return contextlib.nullcontext(txn)

    def commit_batch(self) -> None:
        """Commit the requests' batch now (fsync, and before side effects); only the
        trio thread, whose batch it is, can (elsewhere this does nothing)."""
        if self.batch.owned_here():
            self.batch.commit()

    def __getitem__(self, name: str) -> lmdb._Database:
        return self.tables[name]

    def usage(self) -> StoreUsage:
        """The file's size against its tables' pages (blocking, small: one stat a table)."""
        return usage(self.env, self.path)

    def sync(self) -> None:
        """Flush committed transactions to stable storage."""
        self.env.sync(True)

    def close(self) -> None:
        """Sync and close the environment (compacting it first if due, see __init__).

        No transaction may be open any more."""
        copied = None
        if not self.readonly:
            self.batch.commit()
            self.env.sync(True)
            if self.compacting:
                try:
                    if self.usage().due:
                        copied = compact(self.env, self.path)
                except (OSError, lmdb.Error) as exc:
                    log.warning("compacting %s failed: %s", self.path, exc)
        with self._mapping:
            self._closed = True
            self.env.close()
        if copied is not None:
            swap(copied, self.path)
