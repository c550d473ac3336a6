"""Bringing a committed tree back (fs/restore.py): adopted lazily, loaded a directory at
a time on demand or in the background, with hard links, attributes and reference
counts as they were.

Machine a commits its tree (fs/commit.py); machine b starts from a fresh state
directory holding a copy of a's shard store (same keyfile, no network), adopts the
commit and restores it. Real LMDB, real block store.
"""

from __future__ import annotations

import cProfile
import logging
import os
import shutil
import stat
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from inproc import LocalStore, Metadata, until_on_mock_clock

from fluidfs import keys
from fluidfs.fs import metaformat, restore
from fluidfs.fs.metaformat import CommitInfo
from fluidfs.fs.metaindex import MetaError
from fluidfs.fs.tree import ROOT_INO
from fluidfs.fs.treewalk import TreeReader

BS = 16 * 1024
RING = keys.KeyRing(keys.generate())


class Committed:
    """Machine a's tree, committed."""

    def __init__(self, root: Path) -> None:
        self.root = root

    async def build(self) -> Committed:
        a = self.store = LocalStore(self.root / "a", RING, BS)
        meta = Metadata(a)
        self.docs = a.mkdir(ROOT_INO, "docs")
        self.photos = a.mkdir(ROOT_INO, "photos")
        deep = a.mkdir(a.mkdir(self.docs, "x"), "y")
        self.big = os.urandom(5 * BS + 17)
        await a.create(deep, "big", self.big)
        self.note = await a.create(self.docs, "note", b"hello")
        a.hard_link(self.note, self.photos, "note-link")
        for i in range(40):
            await a.create(self.photos, f"p{i:02d}", os.urandom(i * 50))
        a.tree.set_xattr(self.docs, b"user.k", b"v")
        root = a.tree.get(ROOT_INO)
        root.mode = stat.S_IFDIR | 0o750
        a.tree.save(root)
        self.result = await meta.commit()
        self.refcounts = refcounts(a)
        a.close()
        return self

    def fresh_machine(self, name: str, *, with_shards: bool = True) -> LocalStore:
        if with_shards:
            shutil.copytree(self.root / "a" / "shards", self.root / name / "shards")
        return LocalStore(self.root / name, RING, BS)


def refcounts(store: LocalStore) -> dict[bytes, int]:
    with store.db.read() as txn:
        return {bytes(k): store.blocks.load(bytes(k), txn).refcount
                for k in txn.cursor(db=store.db["blocks"]).iternext(values=False)}


async def adopt(meta: Metadata, ref) -> CommitInfo:
    """What a mount does with the newest root record on a fresh state: hold the commit
    node, fetch it, and adopt its root (the rest stays lazy)."""
    meta.holders.learn([ref])
    with meta.store.db.write() as txn:
        meta.index.adopt(txn, ref)
    info = (await meta.index.load(ref.block_id)).commit
    meta.restorer.adopt_root(info)
    return info



def lose(store: LocalStore, block_id: bytes) -> dict[bytes, bytes]:
    """Make a block unreachable on *store* (its shards and cached copy gone); return its
    shards (id → bytes) to put back."""
    record = store.blocks.load(block_id).record
    kept = {sid: store.shards.get(RING.public_key, sid) for sid in record.shard_ids}
    store.shards.delete_many(RING.public_key, list(kept))
    store.cache.forget(block_id)
    return kept


@asynccontextmanager
async def restored_tree(tmp_path: Path, root: bool = True):
    """(a, b, meta): machine a's committed tree, adopted by a fresh machine b (its root
    directory loaded unless *root* is False); b is closed afterwards."""
    a = await Committed(tmp_path).build()
    b = a.fresh_machine("b")
    try:
        meta = Metadata(b)
        await adopt(meta, a.result.ref)
        if root:
            await meta.restorer.ensure(ROOT_INO)
        yield a, b, meta
    finally:
        b.close()

def names(store: LocalStore, ino: int) -> list[bytes]:
    return sorted(name for _, name, _ in store.tree.entries(ino))


async def test_a_restored_tree_is_loaded_a_directory_at_a_time(tmp_path: Path) -> None:
    async with restored_tree(tmp_path, root=False) as (a, b, meta):
        restorer = meta.restorer
        assert restorer.pending() == [ROOT_INO], "nothing but the root is known yet"
        assert b.tree.get(ROOT_INO).mode == stat.S_IFDIR | 0o750
        assert names(b, ROOT_INO) == []
        await restorer.ensure(ROOT_INO)
        assert names(b, ROOT_INO) == [b"docs", b"photos"]
        assert sorted(restorer.pending()) == sorted([a.docs, a.photos])
        assert b.tree.lookup(ROOT_INO, b"docs") == a.docs, "inode numbers are kept"
        assert b.tree.xattr(a.docs, b"user.k") == b"v"
        await restorer.ensure(a.docs)
        await restorer.ensure(b.tree.lookup(a.docs, b"x"))
        y = b.tree.lookup(b.tree.lookup(a.docs, b"x"), b"y")
        await restorer.ensure(y)
        assert await b.read(b.tree.lookup(y, b"big")) == a.big
        assert await b.read(a.note) == b"hello"
        assert a.photos in restorer.pending(), "reading docs did not load photos"
        # a walk for the next commit names the unloaded directory by its committed nodes
        with b.db.read() as txn:
            levels, lazy = TreeReader(b.db, meta.holders).walk(txn)
        assert set(lazy) == {a.photos} and a.photos not in {i for lv in levels for i in lv}
        await restorer.load_all()
        assert restorer.pending() == []
        assert b.tree.lookup(a.photos, b"note-link") == a.note
        assert b.tree.get(a.note).nlink == 2
        assert len(names(b, a.photos)) == 41


async def test_reference_counts_are_exact_once_every_node_is_registered(
    tmp_path: Path,
) -> None:
    async with restored_tree(tmp_path, root=False) as (a, b, meta):
        await meta.restorer.load_all()
        await meta.restorer.register_all([a.result.ref.block_id])
        assert refcounts(b) == a.refcounts, "every block held as often as on machine a"
        with b.db.write() as txn:  # a new inode never reuses a restored number
            assert b.tree.new_ino(txn) > max(a.docs, a.photos, a.note)


async def test_two_loads_of_one_directory_load_it_once(tmp_path: Path) -> None:
    async with restored_tree(tmp_path) as (a, b, meta):
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(meta.restorer.ensure, a.photos)
        assert meta.restorer.loaded_dirs == 2 and len(names(b, a.photos)) == 41
        assert b.tree.get(a.note).nlink == 2, "links counted once"


async def test_a_directory_that_cannot_be_fetched_is_retried(
    tmp_path: Path, autojump_clock, caplog
) -> None:
    """Its nodes are unreachable for a while: it stays lazy, the rest loads, and the
    background loader tries again (RETRY_SECONDS later, on a virtual clock)."""
    async with restored_tree(tmp_path) as (a, b, meta):
        top = meta.restorer.lazy_top(a.photos)
        kept = lose(b, top)
        with pytest.raises(MetaError):  # its node cannot be fetched
            await meta.restorer.ensure(a.photos)
        assert a.photos in meta.restorer.pending()
        caplog.set_level(logging.WARNING, logger="fluidfs.fs.restore")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(meta.restorer.load_all)
            await until_on_mock_clock(
                lambda: "will retry" in caplog.text and a.docs not in meta.restorer.pending(),
                what="a failed attempt, and docs loaded meanwhile",
            )
            assert a.photos in meta.restorer.pending()
            b.shards.put_many(RING.public_key, kept.items())  # the peers are back
        assert meta.restorer.pending() == []
        assert len(names(b, a.photos)) == 41


async def test_a_big_directory_is_written_a_batch_at_a_time(tmp_path: Path, monkeypatch) -> None:
    """Loading a restored directory writes its rows a batch per loop step, so the loop
    keeps serving while a directory of any size loads (the directory stays lazy until
    the last batch), and what is created meanwhile takes no restored inode number.
    (Before, the whole directory was one transaction in one step: no step of the loop
    saw it in part.)"""
    monkeypatch.setattr(restore, "MATERIALISE_BATCH", 8)
    async with restored_tree(tmp_path) as (a, b, meta):
        ticks = 0
        created: list[int] = []
        seen: set[int] = set()  # how many rows of photos each step of the loop saw
        loading = True

        async def ticker() -> None:
            nonlocal ticks
            while loading:
                ticks += 1
                seen.add(len(names(b, a.photos)))
                if ticks == 2:
                    with b.db.write() as txn:  # a file created while photos loads
                        created.append(b.tree.new_ino(txn))
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await meta.restorer.ensure(a.photos)
            loading = False
        assert len({n for n in seen if 0 < n < 41}) >= 2, "the loop ran between batches"
        assert len(names(b, a.photos)) == 41
        assert b.tree.get(a.note).nlink == 2
        restored = [ino for _, _, ino in b.tree.entries(a.photos)]
        assert created and created[0] > max(restored), "no restored number was handed out"
        assert a.photos not in meta.restorer.pending()


async def test_a_missing_leaf_of_a_chunked_directory_is_a_metadata_error(
    tmp_path: Path, monkeypatch
) -> None:
    """A directory big enough to be cut into leaves under an index node, one leaf of
    which cannot be fetched: loading it fails with MetaError (the FUSE request gets EIO,
    the background loader and the prefetcher retry), not with the ExceptionGroup of the
    nursery that fetches the leaves, which none of them expected (the prefetcher's task
    crashed and restarted, the background loader ended)."""
    monkeypatch.setattr(metaformat, "NODE_TARGET", 4096)
    async with restored_tree(tmp_path) as (a, b, meta):
        top = await meta.index.load(meta.restorer.lazy_top(a.photos))
        assert top.type == metaformat.INDEX and len(top.children) >= 2
        leaf = top.children[-1][1].block_id
        lose(b, leaf)
        with pytest.raises(MetaError):  # its node cannot be fetched
            await meta.restorer.ensure(a.photos)
        assert a.photos in meta.restorer.pending()


async def test_a_fetched_metadata_node_is_opened_and_parsed_in_one_thread_hop(
    tmp_path: Path, monkeypatch
) -> None:
    """On a fresh machine each metadata node is rebuilt from its shards and parsed in the
    same worker-thread hop (a hop costs the loop more than opening a small node; a
    million-file tree has tens of thousands of nodes). Before, opening and parsing were
    two hops."""
    async with restored_tree(tmp_path) as (a, _b, meta):
        top = meta.restorer.lazy_top(a.photos)
        real = trio.to_thread.run_sync
        hops = []

        async def counting(fn, *args, **kw):
            hops.append(fn)
            return await real(fn, *args, **kw)

        monkeypatch.setattr(trio.to_thread, "run_sync", counting)
        node = await meta.index.load(top)
        assert node.type in (metaformat.LEAF, metaformat.INDEX)
        assert len(hops) == 1, f"{len(hops)} worker-thread hops for one node"


async def test_a_small_directory_loads_in_one_write_transaction(tmp_path: Path) -> None:
    """Loading a restored directory of one leaf node registers the node, writes its
    entries and clears its lazy mark in one write transaction (a fresh machine's walk
    loads every directory: each transaction costs the loop a commit). Before: three."""
    async with restored_tree(tmp_path) as (a, b, meta):
        top = meta.restorer.lazy_top(a.docs)
        real = b.db.write
        writes = []

        def counting():
            writes.append(1)
            return real()

        b.db.write = counting
        await meta.restorer.ensure(a.docs)
        b.db.write = real
        assert names(b, a.docs) == [b"note", b"x"]
        assert meta.index.registered(top)
        assert (await meta.index.load(top)).type == metaformat.LEAF
        assert len(writes) == 1, f"{len(writes)} write transactions for one small directory"


async def lmdb_calls_loading(meta, ino: int) -> dict[str, int]:
    """LMDB ``get`` and ``put`` calls (Transaction methods) while directory *ino* loads."""
    profile = cProfile.Profile()
    profile.enable()
    try:
        await meta.restorer.ensure(ino)
    finally:
        profile.disable()
    return {name: sum(stat.callcount for stat in profile.getstats()
                      if f"method '{name}' of 'Transaction'" in str(stat.code))
            for name in ("get", "put")}


async def test_loading_a_directory_reads_each_entry_once(tmp_path: Path) -> None:
    """A fresh machine's walk writes every entry of the tree: loading a directory reads
    the live tables once per entry (is its inode there already?), not twice (the
    directory's own entry table is empty until its first load: one probe tells). Counted
    as LMDB ``get`` calls while photos/ (41 entries) loads, the reads of its node's
    fetch (~30: records, the K local shards) included: 72 now, 113 before."""
    async with restored_tree(tmp_path) as (a, b, meta):
        gets = (await lmdb_calls_loading(meta, a.photos))["get"]
        assert len(names(b, a.photos)) == 41
        assert gets <= 41 + 40, f"{gets} LMDB reads to load 41 entries"


async def test_loading_a_directory_costs_one_lmdb_call_per_entry(tmp_path: Path) -> None:
    """A fresh machine's walk writes every entry of the tree, and each LMDB call is a
    Python call on the event loop: loading a directory writes each new inode with one
    call that is its look-up too (``put`` with ``overwrite=False``), and the rows of
    every other table (entries, cookies, the reverse index, block maps) with one
    ``putmulti`` call each. Counted while photos/ (41 entries) loads, the calls of its
    node's fetch and registration (~30 reads: records, the K local shards) included:
    before, 72 ``get`` and 216 ``put`` calls (a look-up and about five writes per
    entry); now 31 and 53."""
    async with restored_tree(tmp_path) as (a, b, meta):
        calls = await lmdb_calls_loading(meta, a.photos)
        assert len(names(b, a.photos)) == 41
        assert calls["get"] <= 40, f"{calls['get']} LMDB reads to load 41 entries"
        assert calls["put"] <= 41 + 15, f"{calls['put']} LMDB writes to load 41 entries"
        with b.db.read() as txn:
            for name in names(b, a.photos):
                child = b.tree.lookup(a.photos, name)
                assert b.tree.inode_in(txn, child) is not None
                assert list(b.tree.entries_in(txn, a.photos))


async def test_two_names_of_one_file_in_one_directory_load_as_one_inode(tmp_path: Path) -> None:
    """A hard link whose two names are in the same directory: the load writes the
    inode once (the first name) and finds it there for the second, in the same
    transaction, so both names lead to one inode with its data."""
    a = LocalStore(tmp_path / "a", RING, BS)
    meta_a = Metadata(a)
    d = a.mkdir(ROOT_INO, "d")
    ino = await a.create(d, "one", b"same bytes")
    a.hard_link(ino, d, "two")
    await a.create(d, "three", b"other")
    ref = (await meta_a.commit()).ref
    a.close()
    shutil.copytree(tmp_path / "a" / "shards", tmp_path / "b" / "shards")
    b = LocalStore(tmp_path / "b", RING, BS)
    try:
        meta = Metadata(b)
        await adopt(meta, ref)
        await meta.restorer.ensure(ROOT_INO)
        await meta.restorer.ensure(d)
        assert names(b, d) == [b"one", b"three", b"two"]
        assert b.tree.lookup(d, b"one") == b.tree.lookup(d, b"two") == ino
        assert b.tree.get(ino).nlink == 2
        assert await b.read(ino) == b"same bytes"
    finally:
        b.close()
