"""Reading the live tree and writing it bottom-up (fs/treewalk.py), on a real block store:
directories by height, entries with everything a restore needs, and only changed
directories (and the path above them) written again."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from inproc import LocalStore, Metadata

from fluidfs import keys
from fluidfs.fs.metaformat import Entry
from fluidfs.fs.tree import ROOT_INO
from fluidfs.fs.treewalk import Snapshots, TreeReader, write_tree

BS = 16 * 1024
RING = keys.KeyRing(keys.generate())


@pytest.fixture
def store(tmp_path: Path):
    made = LocalStore(tmp_path / "state", RING, BS)
    yield made
    made.close()


def reader(meta: Metadata) -> TreeReader:
    return TreeReader(meta.store.db, meta.holders)


async def write(meta: Metadata) -> tuple[Entry, object]:
    """write_tree over the live tree; the root entry and the writer's stats.

    The top node stays held (as a commit head would hold it), so the next write can
    reuse what did not change."""
    writer = meta.committer.writer()
    root = (await write_tree(reader(meta), writer, Snapshots(meta.store.db))).root
    await writer.finish(keep=root.content.block_id)
    return root, writer.stats


async def test_directories_come_leaves_first(store: LocalStore) -> None:
    a = store.mkdir(ROOT_INO, "a")
    b = store.mkdir(a, "b")
    c = store.mkdir(b, "c")
    d = store.mkdir(ROOT_INO, "d")
    e = store.mkdir(a, "e")
    await store.create(c, "file", b"x")
    with store.db.read() as txn:
        levels, lazy = reader(Metadata(store)).walk(txn)
    assert [sorted(level) for level in levels] == [sorted([c, d, e]), [b], [a], [ROOT_INO]]
    assert lazy == {}


async def test_entries_carry_attributes_xattrs_and_blocks(store: LocalStore) -> None:
    meta = Metadata(store)
    sub = store.mkdir(ROOT_INO, "sub")
    big = os.urandom(2 * BS + 5)
    f = await store.create(ROOT_INO, "f", big)
    small = await store.create(ROOT_INO, "small", b"tiny")
    store.tree.set_xattr(f, b"user.colour", b"blue")
    link = store.new_inode(ROOT_INO, "link", stat.S_IFLNK | 0o777).ino
    with store.db.read() as txn:
        entries = reader(meta).directory(txn, ROOT_INO, {sub: None})
    assert [e.name for e in entries] == [b"f", b"link", b"small", b"sub"], "sorted by name"
    by_name = {e.name: e for e in entries}
    fe = by_name[b"f"]
    assert (fe.ino, fe.size, fe.mode) == (f, len(big), stat.S_IFREG | 0o644)
    assert fe.xattrs == [(b"user.colour", b"blue")]
    assert [i for i, _ in fe.blocks] == [0, 1, 2]
    assert all(ref.holders == (RING.public_key,) * RING.keyfile.shards_total
               for _, ref in fe.blocks), "held here: named by our own key"
    assert by_name[b"small"].inline == [(0, b"tiny")] and by_name[b"small"].ino == small
    assert stat.S_ISLNK(by_name[b"link"].mode) and by_name[b"link"].ino == link
    assert by_name[b"sub"].content is None, "an empty directory has no nodes"


async def test_only_changed_directories_and_the_path_above_are_written(
    store: LocalStore,
) -> None:
    meta = Metadata(store)
    deep = store.mkdir(store.mkdir(store.mkdir(ROOT_INO, "a"), "b"), "c")
    others = store.mkdir(ROOT_INO, "others")
    for i in range(20):
        await store.create(others, f"o{i}", os.urandom(100 + i))
    target = await store.create(deep, "target", os.urandom(BS))
    root, stats = await write(meta)
    assert (stats.dirs, stats.files) == (5, 21)
    assert stats.nodes_written == 5, "one small directory, one node"

    again, stats = await write(meta)
    assert again.content == root.content and stats.nodes_written == 0, "nothing changed"
    assert stats.nodes_reused == 5

    await store.write(target, 0, b"changed")
    await store.data.seal_all()
    changed, stats = await write(meta)
    assert changed.content != root.content
    assert stats.nodes_written == 4, "c, b, a and the root listing; not others"


async def test_a_large_directory_rewrites_one_chunk_for_one_change(store: LocalStore) -> None:
    meta = Metadata(store)
    many = store.mkdir(ROOT_INO, "many")
    inos = [await store.create(many, f"{i:05d}-{'n' * 60}", os.urandom(64)) for i in range(1500)]
    _, first = await write(meta)
    assert first.nodes_written > 5, "the listing is cut into several nodes"
    await store.write(inos[700], 0, b"!")
    await store.data.seal_all()
    _, second = await write(meta)
    assert second.nodes_written <= 4, second  # one leaf, the index above it, the root
    assert second.bytes_written < first.bytes_written / 4


class CountedCursors:
    """A read transaction that counts the cursors opened on it, by table."""

    def __init__(self, txn, db) -> None:
        self.txn = txn
        self.names = {id(db[name]): name for name in ("dirents", "xattrs", "blockmap")}
        self.opened: dict[str, int] = {}

    def cursor(self, db=None):
        name = self.names.get(id(db), "other")
        self.opened[name] = self.opened.get(name, 0) + 1
        return self.txn.cursor(db=db)

    def __getattr__(self, name: str):
        return getattr(self.txn, name)


async def test_a_directory_slice_opens_a_cursor_per_table_not_per_entry(
    store: LocalStore,
) -> None:
    """Reading a slice of a directory for a commit opened an xattrs and a blockmap cursor
    for every entry (201 cursors for 100 files); now one per table for the slice, and
    each entry still gets its own xattrs and blocks."""
    meta = Metadata(store)
    inos = [await store.create(ROOT_INO, f"f{i:03d}", os.urandom(BS + 1 + i))
            for i in range(100)]
    store.tree.set_xattr(inos[7], b"user.n", b"7")
    with store.db.read() as txn:
        counted = CountedCursors(txn, store.db)
        entries, more = reader(meta).directory_slice(counted, ROOT_INO, {})
        plain = reader(meta).directory(txn, ROOT_INO, {})
    assert not more and len(entries) == 100
    assert counted.opened == {"dirents": 1, "xattrs": 1, "blockmap": 1}
    assert [e.xattrs for e in entries] == [[(b"user.n", b"7")] if e.ino == inos[7] else []
                                           for e in entries]
    assert all([i for i, _ in e.blocks] == [0, 1] for e in entries)
    assert [(e.name, e.xattrs, e.blocks) for e in entries] == \
        [(e.name, e.xattrs, e.blocks) for e in plain]
