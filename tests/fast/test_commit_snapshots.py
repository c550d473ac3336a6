"""A commit reads the tree in short snapshots (fs/commit.py, fs/treewalk.py): no LMDB
reader stays open while nodes are written (an old reader keeps freed pages from being
reused, so meta.lmdb grows), and a tree that changes during the commit still gets a
commit that describes one moment. Real LMDB and block store, no network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from inproc import LocalStore, Metadata

from fluidfs import keys
from fluidfs.fs import treewalk
from fluidfs.fs.tree import ROOT_INO
from fluidfs.fs.treewalk import TreeReader

BS = 16 * 1024
RING = keys.KeyRing(keys.generate())


@pytest.fixture
def store(tmp_path: Path):
    made = LocalStore(tmp_path / "state", RING, BS)
    yield made
    made.close()


def make_dirs(store: LocalStore, dirs: int, files: int) -> list[int]:
    made = []
    for d in range(dirs):
        ino = store.mkdir(ROOT_INO, f"d{d:03}")
        for f in range(files):
            store.new_inode(ino, f"f{f}", 0o100644)
        made.append(ino)
    return made


def reader_lag(store: LocalStore) -> int:
    """How many transactions the oldest open reader of meta.lmdb is behind (0: none)."""
    last = store.db.env.info()["last_txnid"]
    open_at = [
        int(row.split()[2])
        for row in store.db.env.readers().splitlines()[1:]
        if row.split()[2] != "-"
    ]
    return max((last - txnid for txnid in open_at), default=0)


async def test_no_reader_stays_open_while_a_commit_writes(store: LocalStore) -> None:
    meta = Metadata(store)
    make_dirs(store, 150, 3)  # three batches of directories, 150 nodes and more to write
    worst = 0
    done = trio.Event()

    async def watch() -> None:
        nonlocal worst
        while not done.is_set():
            worst = max(worst, reader_lag(store))
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        before = store.db.env.info()["last_txnid"]
        result = await meta.commit()
        done.set()
    written = store.db.env.info()["last_txnid"] - before
    assert result is not None and result.stats.dirs == 151
    assert written > 150, "the commit wrote a transaction per node at least"
    assert worst < 10, f"a reader stayed open across {worst} of {written} write transactions"


class MovesAFileMidway(TreeReader):
    """Reads like the commit's reader; a user moves a file between two directories
    right after the first batch of directories has been read."""

    def __init__(self, store: LocalStore, meta: Metadata, src: int, dst: int) -> None:
        super().__init__(store.db, meta.holders)
        self.store, self.src, self.dst = store, src, dst
        self.moved = False

    def directory_slice(self, txn, ino, content, after=b"", limit=None):
        entries = super().directory_slice(txn, ino, content, after, limit)
        if not self.moved:
            self.moved = True
            with self.store.db.write() as move:  # another transaction: the user's rename
                child = self.store.tree.lookup(self.src, b"f0")
                self.store.tree.unlink(move, self.src, b"f0")
                self.store.tree.link(move, self.dst, b"moved", child)
        return entries


async def test_a_file_moved_during_a_commit_is_in_it_exactly_once(store: LocalStore) -> None:
    meta = Metadata(store)
    dirs = make_dirs(store, 130, 2)  # the first and the last directory: different batches
    generation = store.tree.generation
    with store.db.read() as txn:
        before = generation(txn)
    reader = MovesAFileMidway(store, meta, dirs[-1], dirs[0])
    meta.committer.reader = reader
    result = await meta.commit()
    assert reader.moved
    with store.db.read() as txn:
        assert generation(txn) > before, "the rename counted as a change of the tree"
    names: list[bytes] = []
    for entry in await meta.index.entries(result.info.root.content.block_id):
        names += [e.name for e in await meta.index.entries(entry.content.block_id)]
    assert len(names) == 130 * 2, "one moment: the file is neither lost nor doubled"
    assert names.count(b"f0") + names.count(b"moved") == 130
    assert result.stats.dirs == 131 and result.stats.files == 260


def test_every_change_to_the_tree_moves_its_generation(store: LocalStore) -> None:
    tree = store.tree

    def now() -> int:
        with store.db.read() as txn:
            return tree.generation(txn)

    seen = [now()]
    ino = store.mkdir(ROOT_INO, "d")
    seen.append(now())
    inode = tree.get(ino)
    inode.mode |= 0o700
    tree.save(inode)
    seen.append(now())
    tree.set_xattr(ino, b"user.x", b"1")
    seen.append(now())
    with store.db.write() as txn:
        tree.set_block(txn, ino, 0, b"I" + os.urandom(10))
    seen.append(now())
    with store.db.write() as txn:
        tree.cut_blocks(txn, ino, 0)
    seen.append(now())
    with store.db.write() as txn:
        tree.unlink(txn, ROOT_INO, b"d")
        tree.delete(txn, ino)
    seen.append(now())
    assert seen == sorted(set(seen)), "strictly up at every change"
    tree.get(ino), tree.blocks_of(ino), list(tree.entries(ROOT_INO))
    assert now() == seen[-1], "reading changes nothing"


async def test_a_directory_read_in_slices_gets_the_same_nodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tops = []
    for slice_size in (100_000, 7, 1):
        monkeypatch.setattr(treewalk, "SLICE", slice_size)
        store = LocalStore(tmp_path / f"s{slice_size}", RING, BS)
        try:
            big = store.mkdir(ROOT_INO, "big")
            for f in range(600):  # several leaves
                store.new_inode(big, f"{f:05}-" + "n" * 200, 0o100644)
            for ino in (big, ROOT_INO):
                inode = store.tree.get(ino)
                inode.mtime_ns = inode.ctime_ns = inode.atime_ns = 1
                store.tree.save(inode)
            with store.db.write() as txn:  # the same times everywhere: the same bytes
                for _, _, child in list(store.tree.entries_in(txn, big)):
                    inode = store.tree.inode_in(txn, child)
                    inode.mtime_ns = inode.ctime_ns = inode.atime_ns = 1
                    store.tree.put(txn, inode)
            meta = Metadata(store)
            result = await meta.commit()
            assert result.stats.files == 600
            (entry,) = await meta.index.entries(result.info.root.content.block_id)
            leaves = meta.index.children(entry.content.block_id)
            assert len(leaves) > 3 and all(is_node for _, is_node in leaves)
            tops.append(leaves)  # leaf ids: keyed hashes of their bytes
        finally:
            store.close()
    assert tops[0] == tops[1] == tops[2], "the leaves are cut where a whole read cuts them"
