"""fsync makes what a file holds durable, not only its metadata (issue h18dur).

With peers, a sealed block's cached plaintext is its only copy until its shards are
placed. fsync commits and syncs the block map naming the block; the cached file must
be on stable storage too, or a power loss (not a crash: the kernel keeps what was
written) leaves a name for bytes that are gone. The node here has a network but no
peer, so nothing is placed and every block stays in that state; the real fdatasync and
fsync calls are observed (and made) to see which files they reach.
"""

from __future__ import annotations

import os

import pyfuse3
import pytest
import trio

from fluidfs import keys
from fluidfs.fs.tree import BLOCK_REF, ROOT_INO
from fluidfs.node.node import Node, NodeConfig
from fluidfs.statedir import StateDir

CTX = pyfuse3.RequestContext()
BS = 64 * 1024


@pytest.fixture
async def node(tmp_path):
    ring = keys.KeyRing(keys.generate())
    n = Node(NodeConfig(ring, StateDir(tmp_path / "state"), cache_size=1 << 20, block_size=BS))
    await n.start()
    n.blocks.use_network(n.remote)  # shards go to peers from now on: there are none yet
    async with trio.open_nursery() as nursery:
        await nursery.start(n.data.run)
        yield n
        nursery.cancel_scope.cancel()
    n.close()


@pytest.fixture
def synced(monkeypatch) -> dict[str, list[str]]:
    """The paths fdatasync and fsync reach from now on (the real calls still run)."""
    seen: dict[str, list[str]] = {"fdatasync": [], "fsync": []}
    for name in seen:
        real = getattr(os, name)

        def observed(fd: int, real=real, name=name) -> None:
            seen[name].append(os.readlink(f"/proc/self/fd/{fd}"))
            real(fd)

        monkeypatch.setattr(os, name, observed)
    return seen


def block_ids(node: Node, ino: int, count: int) -> list[bytes]:
    values = [node.tree.block(ino, index) for index in range(count)]
    assert all(v is not None and v[:1] == BLOCK_REF for v in values)
    return [bytes(v[1:]) for v in values]


async def test_fsync_syncs_the_only_copy_of_each_unplaced_block(node, synced) -> None:
    """Both ways a block reaches the cache are covered: written there from memory, and
    a dirty file moved there. Fails on the old code: fsync synced the LMDB environments
    only, and no cached block was ever synced."""
    ops, cache = node.ops, node.cache
    fi, attr = await ops.create(ROOT_INO, b"f", 0o644, os.O_RDWR, CTX)
    await ops.write(fi.fh, 0, os.urandom(2 * BS))
    await ops.fsync(fi.fh, False)
    first = block_ids(node, attr.st_ino, 2)
    assert all(b in node.blocks.under for b in first), "placed after all: the test proves nothing"
    for block_id in first:
        assert str(cache.path(block_id)) in synced["fdatasync"], "a block's only copy unsynced"
        assert str(cache.path(block_id).parent) in synced["fsync"], "its name unsynced"

    # A rewrite of part of block 0: a dirty file, sealed and moved into the cache.
    await ops.write(fi.fh, 100, b"rewritten")
    await ops.fsync(fi.fh, False)
    again = block_ids(node, attr.st_ino, 2)
    assert again[1] == first[1] and again[0] != first[0]
    assert str(cache.path(again[0])) in synced["fdatasync"]
    assert synced["fdatasync"].count(str(cache.path(first[1]))) == 1, "synced once, not again"
    assert node.blocks.synced_files == 3

    # Nothing new: an fsync syncs no cached block again.
    before = len(synced["fdatasync"])
    await ops.fsync(fi.fh, False)
    assert len(synced["fdatasync"]) == before
    await ops.release(fi.fh)


async def test_a_placed_block_is_not_synced(node, synced) -> None:
    """Once a block's shards are all placed its cached copy is no longer the only one:
    fsync leaves it to the kernel (only fsync pays, and only for what needs it)."""
    ops = node.ops
    fi, attr = await ops.create(ROOT_INO, b"g", 0o644, os.O_RDWR, CTX)
    await ops.write(fi.fh, 0, os.urandom(BS))
    await node.data.seal_inode(attr.st_ino)
    (block_id,) = block_ids(node, attr.st_ino, 1)
    assert block_id in node.blocks.unsynced
    node.blocks.under.discard(block_id)  # as an upload that placed every shard leaves it
    await ops.fsync(fi.fh, False)
    assert str(node.cache.path(block_id)) not in synced["fdatasync"]
    assert node.blocks.synced_files == 0
    await ops.release(fi.fh)
