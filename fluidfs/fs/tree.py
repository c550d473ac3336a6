"""The filesystem's metadata tables in ``meta.lmdb``, with an inode cache.

Tables (format version 1; integers are big-endian u64):

- ``inodes``:  ino → Inode record (see inode.py)
- ``dirents``: parent ‖ name → child ‖ cookie
- ``cookies``: parent ‖ cookie → name   (stable readdir offsets: new entries get
  ever larger cookies, so a listing never skips or repeats entries that stay)
- ``blockmap``: ino ‖ block index → ``b"B"`` ‖ block id, or ``b"I"`` ‖ inline bytes
- ``xattrs``:  ino ‖ name → value
- ``counters``: b"next_ino", b"next_cookie", b"tree_gen" → u64

Every change also keeps the dirty-directory tables (fs/dirstate.py) in the same
transaction: the reverse index of entries and the mark of each directory whose
committed listing the change makes stale, so a commit writes only those.

``tree_gen`` goes up in every transaction that changes the five tree tables through
this class (every change the mount makes does), once per transaction: the changes one
transaction makes share its generation. The requests of one write-behind batch
(store/batch.py) count as one transaction: readers only ever see a batch whole, so
they share one bump, and a directory is marked once per batch for each inode whose
change marks it. A reader that finds the same value in two read transactions knows
the tree did not change between them; commits rely on that to read the tree in short
snapshots (fs/commit.py).

All calls are short and run on the trio loop; writes take the caller's
transaction so that related changes commit together. The readers see the mount's
batched writes (``Database.view``, store/batch.py). The ``*_in`` readers take a
read transaction instead and bypass the inode cache: whole-tree scans (fs/health.py)
use them from worker threads, batch by batch, so the cache only ever holds inodes the
kernel knows. It holds at most ``INODE_CACHE_MAX`` of them, oldest cached first out:
the kernel knows every inode it has looked up until memory pressure makes it forget,
which on a machine with free memory is never, so a cache of every known inode grew
by ~250 bytes a file (a million-file tree: a quarter GiB of RssAnon). A miss costs one
read of the batch or the map (``Database.view``); every change goes through a copy
written with ``put``, so dropping a cached inode never drops a change.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Iterator

from fluidfs.fs.dirstate import DirState
from fluidfs.fs.inode import Inode
from fluidfs.store.db import Database

_U64 = struct.Struct(">Q")
_U64x2 = struct.Struct(">QQ")
ROOT_INO = 1
INODE_CACHE_MAX = 65536  # inodes kept decoded (~16 MiB); past it the oldest go

BLOCK_REF = b"B"
INLINE = b"I"


def u64(n: int) -> bytes:
    """Big-endian 8-byte encoding."""
    return _U64.pack(n)


def tree_generation(db: Database, txn) -> int:
    """The ``tree_gen`` counter as *txn* sees it (0 before the first change)."""
    raw = txn.get(b"tree_gen", db=db["counters"])
    return _U64.unpack(raw)[0] if raw else 0


class Tree:
    """Typed access to the metadata tables."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._inodes = db["inodes"]
        self._dirents = db["dirents"]
        self._cookies = db["cookies"]
        self._blockmap = db["blockmap"]
        self._xattrs = db["xattrs"]
        self._counters = db["counters"]
        # Oldest first. A plain dict evicting its first key walked past every slot freed
        # since its last resize: O(evictions) per eviction once full (20 CPU-s a million).
        self._cache: OrderedDict[int, Inode] = OrderedDict()
        # (transaction, the generation it bumped tree_gen to): one bump per transaction.
        # Holding the transaction keeps its identity from being reused by a later one.
        self._gen_of: tuple[object, int] | None = None
        # The open batch's shared generation and the inodes whose directories it
        # marked, valid while the batch's epoch is ``_batch_epoch`` (``_changed``).
        self._batch_epoch = -1
        self._batch_gen = 0
        self._batch_marked: set[int] = set()
        self.cache_max = INODE_CACHE_MAX
        self.dirs = DirState(db)
        db.batch.on_lost.append(self._cache.clear)  # the cache may hold what it wrote
        if not db.readonly:
            self.dirs.start()

    # --- counters ----------------------------------------------------------------------

    def _next(self, txn, name: bytes) -> int:
        raw = txn.get(name, db=self._counters)
        value = _U64.unpack(raw)[0] if raw else 2
        txn.put(name, u64(value + 1), db=self._counters)
        return value

    def _changed(self, txn, ino: int | None = None) -> int:
        """Count a change (and mark the directories naming *ino*); the new generation.

        The first change in *txn* bumps ``tree_gen``; the others reuse its value (a
        nested transaction is a transaction of its own: one that is aborted takes its
        bump with it, and the next one bumps again). The requests joining one open
        batch (store/batch.py) share one bump and mark each inode's directories once:
        no reader sees a batch but whole, so its requests' changes are one change to
        every reader (see "Dirty marks once a batch" in docs/decisions.md)."""
        batch = self.db.batch
        if batch.joins(txn):
            if self._batch_epoch != batch.epoch:  # a new batch, or a request aborted
                self._batch_epoch = batch.epoch
                self._batch_gen = 0
                self._batch_marked.clear()
            gen = self._batch_gen
            if not gen:
                gen = self._batch_gen = self._next(txn, b"tree_gen") + 1
            if ino is not None and ino not in self._batch_marked:
                self._batch_marked.add(ino)
                self.dirs.mark_parents(txn, ino, gen)
            return gen
        last = self._gen_of
        if last is not None and last[0] is txn:
            gen = last[1]
        else:
            gen = self._next(txn, b"tree_gen") + 1
            self._gen_of = (txn, gen)
        if ino is not None:
            self.dirs.mark_parents(txn, ino, gen)
        return gen

    def generation(self, txn) -> int:
        """The tree's change counter as *txn* sees it (see the module docstring)."""
        return tree_generation(self.db, txn)

    def new_ino(self, txn) -> int:
        """Allocate an inode number (never reused)."""
        return self._next(txn, b"next_ino")

    # --- inodes ------------------------------------------------------------------------

    def get(self, ino: int) -> Inode | None:
        """The inode, from the cache or the table."""
        inode = self._cache.get(ino)
        if inode is None:
            with self.db.view() as txn:
                raw = txn.get(u64(ino), db=self._inodes)
            if raw is None:
                return None
            inode = Inode.decode(ino, raw)
            if not self.db.batch.elsewhere():  # another thread may read an older copy
                self._keep(inode)
        return inode

    def _keep(self, inode: Inode) -> None:
        """Cache *inode* as the newest, letting the oldest go past ``cache_max``."""
        cache = self._cache
        cache[inode.ino] = inode
        cache.move_to_end(inode.ino)  # a rewritten inode is the last to go, not the first
        if len(cache) > self.cache_max:
            cache.popitem(last=False)

    def inode_in(self, txn, ino: int) -> Inode | None:
        """The inode as *txn* sees it (no cache: for scans, from any thread)."""
        raw = txn.get(u64(ino), db=self._inodes)
        return None if raw is None else Inode.decode(ino, raw)

    def put(self, txn, inode: Inode, *, new: bool = False) -> None:
        """Write the inode (and keep it cached). A *new* one (just numbered by
        ``new_ino``) has no directory naming it yet: no parents to mark."""
        self._keep(inode)
        txn.put(u64(inode.ino), inode.encode(), db=self._inodes)
        self._changed(txn, None if new else inode.ino)
        if new and self.db.batch.joins(txn):
            # Every directory that names it before this batch ends does so through a
            # ``link`` in the batch, which marks that name at the batch's generation:
            # marking its parents again on its next change (the write after a create)
            # would put the same rows again.
            self._batch_marked.add(inode.ino)

    def save(self, inode: Inode) -> None:
        """Write the inode in its own transaction."""
        with self.db.write() as txn:
            self.put(txn, inode)

    def delete(self, txn, ino: int) -> None:
        """Remove the inode record and its xattrs (its block map is the caller's job)."""
        self._cache.pop(ino, None)
        self._changed(txn, ino)
        self.dirs.forget(txn, ino)
        txn.delete(u64(ino), db=self._inodes)
        cursor = txn.cursor(db=self._xattrs)
        prefix = u64(ino)
        while cursor.set_range(prefix) and cursor.key()[:8] == prefix:
            cursor.delete()

    def uncache(self, ino: int) -> None:
        """Drop the cached copy (the kernel forgot it)."""
        self._cache.pop(ino, None)

    def orphans(self) -> list[int]:
        """Inodes with no links left (from a crash while they were open)."""
        with self.db.read() as txn:
            return [
                _U64.unpack(key)[0]
                for key, raw in txn.cursor(db=self._inodes)
                if Inode.decode(0, raw).nlink == 0
            ]

    # --- directory entries -------------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> int | None:
        """The child inode number for *name* in *parent*, or None."""
        with self.db.view() as txn:
            raw = txn.get(u64(parent) + name, db=self._dirents)
        return None if raw is None else _U64x2.unpack(raw)[0]

    def link(self, txn, parent: int, name: bytes, child: int) -> None:
        """Add (or replace) the entry *name* → *child* in *parent*."""
        key = u64(parent) + name
        old = txn.get(key, db=self._dirents)
        gen = self._changed(txn)
        if old is not None:
            txn.delete(u64(parent) + old[8:16], db=self._cookies)
            self.dirs.unlinked(txn, parent, name, _U64x2.unpack(old)[0], gen)
        self.dirs.linked(txn, parent, name, child, gen)
        node = self._cache.get(child)  # a file type never changes: any cached copy says it
        if node is None:
            raw = txn.get(u64(child), db=self._inodes)
            node = None if raw is None else Inode.decode(child, raw)
        if node is not None and node.is_dir and self.dirs.is_new_dir(txn, child):
            self.dirs.mark(txn, child, gen)  # never committed: its (empty) listing too
        cookie = self._next(txn, b"next_cookie")
        txn.put(key, _U64x2.pack(child, cookie), db=self._dirents)
        txn.put(u64(parent) + u64(cookie), name, db=self._cookies)

    def adopt_entries(
        self, txn, parent: int, entries: list[tuple[bytes, int, bool]]
    ) -> None:
        """Write *parent*'s entries (name, child, whether the child was in the live
        tables before this load) as a restore loads them from the committed node the
        caller records for *parent* (``DirState.adopted``): that node holds them already,
        so nothing is marked dirty, and the cookie counter is read and written once for
        all of them. A child that was already there (a hard link loaded elsewhere first,
        or a load started again after a crash) may have changed since the node was
        written: its entry is marked as ``link`` marks it, so a commit reads it again."""
        if not entries:
            return
        gen = self._changed(txn)
        raw = txn.get(b"next_cookie", db=self._counters)
        cookie = _U64.unpack(raw)[0] if raw else 2
        prefix = u64(parent)
        cursor = txn.cursor(db=self._dirents)
        if (not cursor.set_range(prefix) or cursor.key()[:8] != prefix) and len(
            {name for name, _, _ in entries}
        ) == len(entries):
            # A directory loading for the first time (the usual case: no entries yet,
            # every name once): each table's rows go in one call, not a call per row.
            self._adopt_fresh(txn, parent, entries, cookie, gen)
            cookie += len(entries)
        else:
            cookie = self._adopt_over(txn, parent, entries, cookie, gen)
        txn.put(b"next_cookie", u64(cookie), db=self._counters)

    def _adopt_fresh(
        self, txn, parent: int, entries: list[tuple[bytes, int, bool]], cookie: int, gen: int
    ) -> None:
        """``adopt_entries`` into a directory with no entries, of distinct names."""
        prefix = u64(parent)
        pack2, pack = _U64x2.pack, _U64.pack
        dirents: list[tuple[bytes, bytes]] = []
        cookies: list[tuple[bytes, bytes]] = []
        parents: list[tuple[bytes, bytes]] = []
        for name, child, existed in entries:
            dirents.append((prefix + name, pack2(child, cookie)))
            cookies.append((prefix + pack(cookie), name))
            if existed:
                self.dirs.linked(txn, parent, name, child, gen)
            else:
                parents.append((pack(child) + prefix + name, b""))
            cookie += 1
        txn.cursor(db=self._dirents).putmulti(dirents, dupdata=False)
        txn.cursor(db=self._cookies).putmulti(cookies, dupdata=False)
        self.dirs.adopted_entries(txn, parents)

    def _adopt_over(
        self, txn, parent: int, entries: list[tuple[bytes, int, bool]], cookie: int, gen: int
    ) -> int:
        """``adopt_entries`` over what the directory holds already (a load started
        again); the next cookie."""
        prefix = u64(parent)
        for name, child, existed in entries:
            key = prefix + name
            old = txn.get(key, db=self._dirents)
            if old is not None and _U64x2.unpack(old)[0] == child:
                if existed:
                    self.dirs.linked(txn, parent, name, child, gen)
                continue
            if old is not None:
                txn.delete(prefix + old[8:16], db=self._cookies)
                self.dirs.unlinked(txn, parent, name, _U64x2.unpack(old)[0], gen)
            txn.put(key, _U64x2.pack(child, cookie), db=self._dirents)
            txn.put(prefix + u64(cookie), name, db=self._cookies)
            if existed:
                self.dirs.linked(txn, parent, name, child, gen)
            else:
                self.dirs.adopted_entry(txn, parent, name, child)
            cookie += 1
        return cookie

    def adopt_inodes(self, txn, inodes: list[Inode]) -> list[bool]:
        """Write the inodes a restore loaded (``put`` with *new*: no directory names
        them yet), each only if its number is not in the table already; for each,
        whether it was written. One that was there (a hard link loaded elsewhere or
        earlier in the list, or a load started again) is left as it is. One B-tree
        operation each: writing with ``overwrite=False`` is the look-up too."""
        table = self._inodes
        written = [txn.put(u64(inode.ino), inode.encode(), db=table, overwrite=False)
                   for inode in inodes]
        keep = self._keep
        for inode, new in zip(inodes, written, strict=True):
            if new:
                keep(inode)
        if any(written):
            self._changed(txn)
        return written

    def adopt_blocks(self, txn, blocks: list[tuple[int, int, bytes]]) -> None:
        """Block map entries (ino, block index, value) of inodes ``adopt_inodes`` just
        wrote: no directory names them yet, so there is nothing to mark."""
        if blocks:
            txn.cursor(db=self._blockmap).putmulti(
                [(_U64x2.pack(ino, index), value) for ino, index, value in blocks],
                dupdata=False)

    def unlink(self, txn, parent: int, name: bytes) -> None:
        """Remove the entry *name* from *parent*."""
        key = u64(parent) + name
        old = txn.get(key, db=self._dirents)
        if old is not None:
            gen = self._changed(txn)
            self.dirs.unlinked(txn, parent, name, _U64x2.unpack(old)[0], gen)
            txn.delete(key, db=self._dirents)
            txn.delete(u64(parent) + old[8:16], db=self._cookies)

    def entries(self, parent: int, after: int = 0) -> Iterator[tuple[int, bytes, int]]:
        """(cookie, name, child) for entries of *parent* with cookie > *after*, in order.

        Yields lazily from one read transaction; stop early to end it.
        """
        with self.db.view() as txn:
            yield from self.entries_in(txn, parent, after)

    def listing(self, parent: int, after: int = 0) -> Iterator[tuple[int, bytes, Inode | None]]:
        """``entries`` with each child's inode instead of its number (None if it has no
        record), those not cached read in the listing's own transaction (and cached, as
        ``get`` does): a readdir of N uncached children costs one read transaction, not
        N + 1 (a fresh machine's find lists every entry once, none of them cached).

        Yields lazily from one read transaction; stop early to end it."""
        cache = self._cache
        keep = not self.db.batch.elsewhere()  # another thread may read an older copy
        with self.db.view() as txn:
            for cookie, name, child in self.entries_in(txn, parent, after):
                inode = cache.get(child)
                if inode is None:
                    inode = self.inode_in(txn, child)
                    if inode is not None and keep:
                        self._keep(inode)
                yield cookie, name, inode

    def entries_in(
        self, txn, parent: int, after: int = 0
    ) -> Iterator[tuple[int, bytes, int]]:
        """``entries`` as *txn* sees them."""
        prefix = u64(parent)
        cursor = txn.cursor(db=self._cookies)
        if not cursor.set_range(prefix + u64(after + 1)):
            return
        for key, name in cursor:
            if key[:8] != prefix:
                return
            raw = txn.get(prefix + name, db=self._dirents)
            if raw is None:
                continue
            yield _U64.unpack(key[8:])[0], bytes(name), _U64x2.unpack(raw)[0]

    def is_empty(self, parent: int) -> bool:
        """True if the directory has no entries."""
        return next(self.entries(parent), None) is None

    # --- block map ---------------------------------------------------------------------

    def block(self, ino: int, index: int, txn=None) -> bytes | None:
        """The block map value for block *index* of *ino* (BLOCK_REF/INLINE prefixed)."""
        if txn is not None:
            return txn.get(u64(ino) + u64(index), db=self._blockmap)
        with self.db.view() as own:
            return own.get(u64(ino) + u64(index), db=self._blockmap)

    def set_block(self, txn, ino: int, index: int, value: bytes | None) -> bytes | None:
        """Set (or clear, with None) a block map entry; return the previous value."""
        key = u64(ino) + u64(index)
        old = txn.get(key, db=self._blockmap)
        self._changed(txn, ino)
        if value is None:
            if old is not None:
                txn.delete(key, db=self._blockmap)
        else:
            txn.put(key, value, db=self._blockmap)
        return old

    def cut_blocks(self, txn, ino: int, first: int) -> list[bytes]:
        """Remove block map entries with index >= *first*; return their values."""
        prefix = u64(ino)
        removed: list[bytes] = []
        self._changed(txn, ino)
        cursor = txn.cursor(db=self._blockmap)
        if cursor.set_range(prefix + u64(first)):
            while cursor.key()[:8] == prefix:
                removed.append(bytes(cursor.value()))
                if not cursor.delete():
                    break
        return removed

    def blocks_of(self, ino: int) -> list[tuple[int, bytes]]:
        """All (index, value) block map entries of *ino*."""
        with self.db.view() as txn:
            return self.blocks_in(txn, ino)

    def blocks_in(self, txn, ino: int) -> list[tuple[int, bytes]]:
        """``blocks_of`` as *txn* sees it."""
        prefix = u64(ino)
        found: list[tuple[int, bytes]] = []
        cursor = txn.cursor(db=self._blockmap)
        if cursor.set_range(prefix):
            for key, value in cursor:
                if key[:8] != prefix:
                    break
                found.append((_U64.unpack(key[8:])[0], bytes(value)))
        return found

    # --- xattrs ------------------------------------------------------------------------

    def xattr(self, ino: int, name: bytes) -> bytes | None:
        """An extended attribute's value, or None."""
        with self.db.view() as txn:
            return txn.get(u64(ino) + name, db=self._xattrs)

    def set_xattr(self, ino: int, name: bytes, value: bytes | None) -> bool:
        """Set (or remove, with None) an xattr; return whether it existed before."""
        key = u64(ino) + name
        with self.db.write() as txn:
            existed = txn.get(key, db=self._xattrs) is not None
            self._changed(txn, ino)
            if value is None:
                txn.delete(key, db=self._xattrs)
            else:
                txn.put(key, value, db=self._xattrs)
        return existed

    def xattr_names(self, ino: int) -> list[bytes]:
        """Names of the inode's xattrs."""
        prefix = u64(ino)
        names: list[bytes] = []
        with self.db.view() as txn:
            cursor = txn.cursor(db=self._xattrs)
            if cursor.set_range(prefix):
                for key in cursor.iternext(keys=True, values=False):
                    if key[:8] != prefix:
                        break
                    names.append(bytes(key[8:]))
        return names
