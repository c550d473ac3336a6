"""The inode cache (fs/tree.py): bounded, and as cheap to use full as filling."""

from __future__ import annotations

import stat
import time
from pathlib import Path

from fluidfs.fs.inode import Inode
from fluidfs.fs.tree import Tree, u64
from fluidfs.store.db import META_TABLES, Database


def test_a_full_cache_evicts_in_constant_time(tmp_path: Path) -> None:
    """Reading four times the cache's size through ``Tree.get``: the reads made once the
    cache is full (each evicting the oldest) cost at most twice the reads that filled it.

    Fails on the dict that evicted with ``del cache[next(iter(cache))]``: each eviction
    walked past every slot freed since the dict was last resized (4-20x the filling
    reads here; a 1,000,000-file walk spent 20 CPU-s in it)."""
    db = Database(tmp_path / "meta", META_TABLES)
    try:
        tree = Tree(db)
        size = tree.cache_max = 16384
        count = 4 * size
        mode = stat.S_IFREG | 0o644
        with db.write() as txn:  # the rows straight in: only the reads are measured
            for ino in range(2, 2 + count):
                txn.put(u64(ino), Inode(ino, mode, 0, 0, nlink=1).encode(), db=db["inodes"])

        def read(first: int, last: int) -> float:
            start = time.thread_time()
            for ino in range(first, last):
                assert tree.get(ino) is not None
            return time.thread_time() - start

        filling = read(2, 2 + size)
        full = read(2 + size, 2 + count) / 3  # per cache-full of reads
        assert len(tree._cache) == size
        assert full <= 2 * filling, f"full cache {full:.3f} s vs filling {filling:.3f} s"
        assert tree.get(2 + count - 1) is tree._cache[2 + count - 1], "the newest stay"
        assert 2 not in tree._cache, "the oldest went first"
    finally:
        db.close()


async def test_a_listing_of_uncached_children_is_one_read_transaction(
    tmp_path: Path, monkeypatch
) -> None:
    """readdir answers with every child's attributes (readdirplus); a child not in the
    inode cache (a fresh machine's find: none is) is read in the listing's own read
    transaction, not one of its own each. ``pyfuse3.readdir_reply`` stands in for the
    kernel's buffer (it needs a request from the kernel).

    Fails before: 101 read transactions for 100 children (one for the listing, one per
    ``Tree.get``); a fresh machine's find spent ~11 % of the mount's loop in them."""
    import pyfuse3
    from inproc import LocalStore

    from fluidfs import keys
    from fluidfs.fs.operations import FluidOperations
    from fluidfs.fs.tree import ROOT_INO

    store = LocalStore(tmp_path / "s", keys.KeyRing(keys.generate()))
    try:
        parent = store.mkdir(ROOT_INO, "d")
        made = {store.new_inode(parent, f"f{i:03d}", stat.S_IFREG | 0o644).ino
                for i in range(100)}
        store.db.commit_batch()
        store.tree._cache.clear()  # as after the kernel forgot them, or a fresh machine
        ops = FluidOperations(store.tree, store.data, str(tmp_path))
        listed: dict[bytes, int] = {}

        def reply(token, name: bytes, attrs, cookie: int) -> bool:
            listed[name] = attrs.st_ino
            return True

        views = 0
        real = store.db.view

        def view():
            nonlocal views
            views += 1
            return real()

        monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
        monkeypatch.setattr(store.db, "view", view)
        await ops.readdir(parent, 0, None)
        assert set(listed.values()) == made and len(listed) == 100
        assert views <= 2, f"{views} read transactions for a listing of 100"
    finally:
        store.close()
