"""Commits, restore and reference counts, in process (fs/commit.py, restore.py, metaindex.py).

No network: machine B gets a copy of A's shard store, so blocks A holds itself are
readable on B (same keyfile, same owner). Real peers are in test_remount.py.
"""

from __future__ import annotations

import os
import shutil
import stat

import pyfuse3
import pytest
import trio

from fluidfs import keys
from fluidfs.fs.metaformat import Entry, encode_leaf
from fluidfs.fs.tree import ROOT_INO
from fluidfs.node.node import Node, NodeConfig
from fluidfs.peers.rootrecord import Found
from fluidfs.statedir import StateDir

CTX = pyfuse3.RequestContext()
BS = 64 * 1024
RING = keys.KeyRing(keys.generate())


class Machine:
    """A node plus its FileData tasks, on its own state directory."""

    def __init__(self, path, block_size: int = BS) -> None:
        config = NodeConfig(RING, StateDir(path), cache_size=1 << 30, block_size=block_size)
        self.node = Node(config)
        self.ops = self.node.ops

    async def __aenter__(self) -> Machine:
        await self.node.start()
        self._nursery_cm = trio.open_nursery()
        nursery = await self._nursery_cm.__aenter__()
        await nursery.start(self.node.data.run)
        self._nursery = nursery
        return self

    async def __aexit__(self, *exc) -> None:
        self._nursery.cancel_scope.cancel()
        await self._nursery_cm.__aexit__(None, None, None)
        self.node.close()

    async def mkdir(self, parent: int, name: str) -> int:
        return (await self.ops.mkdir(parent, name.encode(), 0o755, CTX)).st_ino

    async def write(self, parent: int, name: str, data: bytes) -> int:
        fi, attr = await self.ops.create(parent, name.encode(), 0o644, os.O_RDWR, CTX)
        await self.ops.write(fi.fh, 0, data)
        await self.ops.release(fi.fh)
        return attr.st_ino

    async def lookup(self, path: str) -> int:
        ino = ROOT_INO
        for part in path.split("/"):
            ino = (await self.ops.lookup(ino, part.encode(), CTX)).st_ino
        return ino

    async def read(self, path: str) -> bytes:
        ino = await self.lookup(path)
        fi = await self.ops.open(ino, os.O_RDONLY, CTX)
        size = (await self.ops.getattr(ino)).st_size
        data = await self.ops.read(fi.fh, 0, size + 1)
        await self.ops.release(fi.fh)
        return data

    async def names(self, ino: int) -> list[bytes]:
        await self.ops.opendir(ino, CTX)
        return sorted(name for _, name, _ in self.node.tree.entries(ino))

    def refcounts(self) -> dict[bytes, int]:
        from fluidfs.blocks.record import StoredBlock

        with self.node.meta.read() as txn:
            return {
                bytes(k): StoredBlock.decode(bytes(k), v).refcount
                for k, v in txn.cursor(db=self.node.meta["blocks"])
            }


def found_for(result) -> Found:
    body = {"commit": encode_leaf([Entry(b"commit", content=result.ref)]), "host": "a"}
    return Found(result.head.seq, body, b"raw", 1, 1)


async def restore_into(tmp_path, source: str, target: str, result, block_size=BS) -> Machine:
    shutil.copytree(tmp_path / source / "shards.lmdb", tmp_path / target / "shards.lmdb")
    machine = Machine(tmp_path / target, block_size)
    await machine.__aenter__()
    await machine.node.tree_restore.adopt(found_for(result))
    return machine


async def test_restore_is_lazy_and_commits_reuse_unloaded_directories(tmp_path) -> None:
    big = os.urandom(5 * BS + 17)
    async with Machine(tmp_path / "a") as a:
        docs = await a.mkdir(ROOT_INO, "docs")
        deep = await a.mkdir(await a.mkdir(docs, "x"), "y")
        photos = await a.mkdir(ROOT_INO, "photos")
        for i in range(300):
            await a.write(photos, f"p{i:03d}.jpg", os.urandom(i * 40))
        await a.write(deep, "big", big)
        ino = await a.write(docs, "note", b"hello")
        await a.ops.link(ino, photos, b"note-link", CTX)
        await a.ops.setxattr(docs, b"user.k", b"v", CTX)
        first = await a.node.commits.commit(user_changed=True)
        assert first.stats.nodes_written > 5 and first.stats.files == 303

    b = await restore_into(tmp_path, "a", "b", first)
    try:
        restorer = b.node.restorer
        assert restorer.pending() == [ROOT_INO], "nothing but the root is known yet"
        assert await b.names(ROOT_INO) == [b"docs", b"photos"]
        assert sorted(restorer.pending()) == sorted([docs, photos])
        assert await b.read("docs/x/y/big") == big
        assert photos in restorer.pending(), "reading docs did not load photos"
        assert b.node.tree.get(docs).mode == stat.S_IFDIR | 0o755
        assert await b.ops.getxattr(docs, b"user.k", CTX) == b"v"
        # a change while photos is still lazy: the commit reuses its committed nodes
        await b.write(await b.lookup("docs"), "from-b", b"new")
        b.node.commits.note_change()
        second = await b.node.commits.commit(user_changed=True)
        assert second.head.seq == first.head.seq + 1
        assert second.stats.nodes_written <= 6, second.stats
        assert photos in restorer.pending()
        await restorer.load_all()
        assert not restorer.pending()
        link = await b.lookup("photos/note-link")
        assert link == await b.lookup("docs/note") and b.node.tree.get(link).nlink == 2
        assert b.node.tree.get(link).nlink == 2
        await b.node.restorer.register_all(b.node.committer.held_nodes())
    finally:
        await b.__aexit__()

    c = await restore_into(tmp_path, "b", "c", second)
    try:
        assert await c.read("docs/from-b") == b"new"
        assert await c.read("photos/p299.jpg") is not None
        assert len(await c.names(await c.lookup("photos"))) == 301
        assert await c.read("docs/x/y/big") == big
        snaps = c.node.snapshots.list()
        assert [s.seq for s in snaps] == [first.head.seq, second.head.seq]
    finally:
        await c.__aexit__()


async def test_reference_counts_follow_snapshots(tmp_path) -> None:
    async with Machine(tmp_path / "a") as a:
        node = a.node
        d = await a.mkdir(ROOT_INO, "d")
        ino = await a.write(d, "f", os.urandom(3 * BS))
        data_blocks = {v[1:] for _, v in a.node.tree.blocks_of(ino)}
        assert all(a.refcounts()[b] == 1 for b in data_blocks)
        first = await node.commits.commit(user_changed=True)
        assert all(a.refcounts()[b] == 2 for b in data_blocks), "file map + committed node"
        assert await node.commits.commit(user_changed=False) is None, "nothing changed"
        await a.ops.unlink(d, b"f", CTX)
        await a.ops.forget([(ino, 1)])
        second = await node.commits.commit(user_changed=True)
        assert all(a.refcounts()[b] == 1 for b in data_blocks), "held by snapshot 1 only"
        assert len(node.committer.heads.all()) == 1, "the older head was released"
        # every registered node is referenced exactly as often as nodes and heads name it
        counts = a.refcounts()
        expected: dict[bytes, int] = {}
        for meta_node in node.index.node_ids():
            for child, _ in node.index.children(meta_node):
                expected[child] = expected.get(child, 0) + 1
        for head in node.committer.heads.all():
            expected[head.node] = expected.get(head.node, 0) + 1
        assert {k: counts[k] for k in expected} == expected
        assert set(counts) == set(expected), "no block is held by nothing"
        # forgetting the first snapshot releases the file's blocks
        oldest = node.snapshots.list()[0].name
        forgot = await node.remount_requests.forget(None, [oldest], dry_run=False)
        assert forgot["expired"] and forgot["released_blocks"] >= len(data_blocks)
        assert not data_blocks & set(a.refcounts())
        assert first.head.seq < second.head.seq


@pytest.mark.parametrize("files", [150])
async def test_large_file_manifests_and_large_directories(tmp_path, files: int) -> None:
    async with Machine(tmp_path / "a") as a:
        big = os.urandom(140 * BS + 5)  # more blocks than fit inline in an entry
        ino = await a.write(ROOT_INO, "big", big)
        d = await a.mkdir(ROOT_INO, "many")
        for i in range(files):
            await a.write(d, f"{i:04d}-{'x' * 100}", os.urandom(3000))
        first = await a.node.commits.commit(user_changed=True)
        fi = await a.ops.open(ino, os.O_RDWR, CTX)
        await a.ops.write(fi.fh, 100 * BS, b"patch")
        await a.ops.release(fi.fh)
        second = await a.node.commits.commit(user_changed=True)
        assert second.stats.bytes_written < first.stats.bytes_written / 5, second.stats
    b = await restore_into(tmp_path, "a", "b", second)
    try:
        got = await b.read("big")
        assert got[: 100 * BS] == big[: 100 * BS] and got[100 * BS : 100 * BS + 5] == b"patch"
        assert len(await b.names(await b.lookup("many"))) == files
    finally:
        await b.__aexit__()


async def test_nodes_naming_unknown_holders_teach_the_peer_list(tmp_path) -> None:
    """A fetched node may name holders this machine never heard of (a fresh machine)."""
    from fluidfs.fs.metaformat import Ref

    strangers = [os.urandom(32) for _ in range(12)]
    async with Machine(tmp_path / "a") as a:
        node = a.node
        data_id = await node.blocks.put(os.urandom(1000))
        record = node.blocks.load(data_id).record
        entry = Entry(b"f", ino=5, mode=stat.S_IFREG | 0o644, size=1000,
                      blocks=[(0, Ref(record, tuple(strangers)))])
        leaf = await node.blocks.put(encode_leaf([entry]))
        with trio.fail_after(10):
            loaded = await node.index.load(leaf)
        assert loaded.entries == [entry]
        indexes = [node.peers.get(k).index for k in strangers]
        assert node.blocks.load(data_id).refcount == 2, "the put's and the node's"
        assert node.index.children(leaf) == [(data_id, False)]
        assert node.blocks.load(data_id).holders[0] in (0, indexes[0])


async def test_a_restored_backup_keeps_its_block_size(tmp_path) -> None:
    """A fresh state started with another block size takes the backup's, for good."""
    data = os.urandom(3 * BS + 10)
    async with Machine(tmp_path / "a") as a:
        await a.write(ROOT_INO, "f", data)
        result = await a.node.commits.commit(user_changed=True)
    b = await restore_into(tmp_path, "a", "b", result, block_size=4 * BS)
    try:
        assert b.node.data.block_size == BS
        assert await b.read("f") == data
        await b.write(ROOT_INO, "g", data)
        await b.node.data.seal_all()
        assert len(b.node.tree.blocks_of(await b.lookup("g"))) == 4, "cut in the backup's size"
    finally:
        await b.__aexit__()
    again = Machine(tmp_path / "b", block_size=4 * BS)
    try:
        assert again.node.data.block_size == BS, "the state remembers it"
    finally:
        again.node.close()
