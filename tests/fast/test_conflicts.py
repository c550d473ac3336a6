"""A replaced mount's acknowledged, unpublished writes come back in its conflicts folder.

Real nodes of one keyfile (real LMDB, real block store, real root records and lease)
over three in-process peers that keep their shards and records; nothing is mounted:
files are written the way the FUSE handlers write them, and the gate is what runs
before the FUSE session opens.
"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from inproc import PeerNode, peer_nodes

from fluidfs import keys
from fluidfs.cli.inspect import print_commit_status
from fluidfs.fs.inode import Inode, now_ns
from fluidfs.fs.metaformat import Entry
from fluidfs.fs.snapshots import Snapshot
from fluidfs.fs.tree import ROOT_INO
from fluidfs.keys import BootstrapPeer
from fluidfs.node.node import Node, NodeConfig
from fluidfs.remount.conflicts import Conflicts, common_ancestor
from fluidfs.remount.options import RemountOptions
from fluidfs.statedir import StateDir

MIB = 1024 * 1024


@asynccontextmanager
async def machine(state: Path, ring: keys.KeyRing, hosts: list[PeerNode], **options
                  ) -> AsyncIterator[Node]:
    """A node of *ring* on *state* holding agreements with *hosts*, past its gate."""
    pinned = [BootstrapPeer(h.addr, h.key) for h in hosts]
    config = NodeConfig(
        ring,
        StateDir(state),
        cache_size=1 << 24,
        remount=RemountOptions(pinned=pinned, mountpoint=f"/mnt/{state.name}",
                               restore_wait=2.0, **options),
    )
    node = Node(config)
    for host in hosts:
        node.ledger.record(host.key, we_host=64 * MIB, they_host=64 * MIB, term=3600)
        node.peers.add(host.key, host.addr)
    node.blocks.use_network(node.remote)  # as a new agreement does
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.conns.run)
            await nursery.start(node.blocks.run)
            await node.start()
            await node.gate.before_mount()
            nursery.start_soon(node.data.run)
            nursery.start_soon(node.migrator.run)
            await nursery.start(node.commits.run)
            yield node
            nursery.cancel_scope.cancel()
    finally:
        node.close()


def new_inode(node: Node, parent: int, name: bytes, mode: int) -> int:
    """Create and link an inode the way fs/operations.py does."""
    t = now_ns()
    with node.meta.write() as txn:
        ino = node.tree.new_ino(txn)
        is_dir = stat.S_ISDIR(mode)
        node.tree.put(txn, Inode(ino, mode, os.getuid(), os.getgid(), nlink=2 if is_dir else 1,
                                 atime_ns=t, mtime_ns=t, ctime_ns=t))
        node.tree.link(txn, parent, name, ino)
        if is_dir:
            up = node.tree.get(parent)
            up.nlink += 1
            node.tree.put(txn, up)
    return ino


async def write_file(node: Node, parent: int, name: bytes, data: bytes) -> int:
    """An acknowledged write: created, written, size set (dirty until sealed)."""
    await node.restorer.ensure(parent)
    ino = node.tree.lookup(parent, name) or new_inode(node, parent, name, stat.S_IFREG | 0o640)
    inode = node.tree.get(ino)
    await node.data.write(inode, 0, data)
    inode.size = len(data)
    inode.touch(mtime=True, ctime=True)
    node.tree.save(inode)
    node.commits.note_change()
    return ino


async def read_path(node: Node, path: bytes) -> bytes | None:
    """The contents at *path* in the live tree (loading directories), or None."""
    ino = ROOT_INO
    for part in path.split(b"/"):
        await node.restorer.ensure(ino)
        found = node.tree.lookup(ino, part)
        if found is None:
            return None
        ino = found
    inode = node.tree.get(ino)
    return await node.data.read(inode, 0, inode.size)


async def sync(node: Node) -> None:
    reply = await node.remount_requests.sync(10.0)
    assert reply["published"] and not reply.get("missing"), reply


async def replaced_writer(tmp_path: Path, ring: keys.KeyRing, hosts: list[PeerNode]) -> bytes:
    """A commits, then acknowledges more writes and is cut off (its lease lapses, nothing
    published); B takes over from the network and commits its own. Returns the
    contents of A's late new/deep.bin."""
    async with machine(tmp_path / "a", ring, hosts, new=True) as a:
        await write_file(a, ROOT_INO, b"shared.txt", b"committed by a")
        await sync(a)
        await write_file(a, ROOT_INO, b"shared.txt", b"changed by a, never published")
        sub = new_inode(a, ROOT_INO, b"new", stat.S_IFDIR | 0o750)
        await write_file(a, sub, b"deep.bin", os.urandom(150_000))
        deep = await read_path(a, b"new/deep.bin")
        await a.data.seal_all()  # in its state directory, as at an unmount
        await a.keeper.release()  # its lease lapses: no commit, no handover
    async with machine(tmp_path / "b", ring, hosts) as b:
        assert await read_path(b, b"shared.txt") == b"committed by a"
        assert await read_path(b, b"new/deep.bin") is None, "never published by a"
        await write_file(b, ROOT_INO, b"from-b.txt", b"b's own")
        await sync(b)
        await b.keeper.release()
    assert deep is not None
    return deep


@asynccontextmanager
async def keyfile_hosts(tmp_path: Path) -> AsyncIterator[tuple[keys.KeyRing, list[PeerNode]]]:
    ring = keys.KeyRing(keys.generate(shards_total=3, shards_needed=2))
    async with peer_nodes(tmp_path / "hosts", 3) as (_nursery, hosts):
        for host in hosts:
            host.ledger.record(ring.public_key, we_host=64 * MIB, they_host=64 * MIB,
                               term=3600)
        yield ring, hosts


async def test_a_replaced_mounts_unpublished_writes_come_back_in_its_conflicts_folder(
    tmp_path: Path, caplog, capsys
) -> None:
    """A's next mount of the same state directory takes B's tree and keeps A's late
    writes under .fluidfs-conflicts/<host>-<time>/, where a third machine then finds them
    too. (On the code before: A's state directory was refused as behind the network.)"""
    async with keyfile_hosts(tmp_path) as (ring, hosts):
        deep = await replaced_writer(tmp_path, ring, hosts)
        async with machine(tmp_path / "a", ring, hosts) as a2:
            assert await read_path(a2, b"from-b.txt") == b"b's own", "the newer tree"
            assert await read_path(a2, b"shared.txt") == b"committed by a"
            assert await read_path(a2, b"new/deep.bin") is None
            (folder,) = a2.conflicts.present()
            kept = b".fluidfs-conflicts/" + folder.encode()
            assert await read_path(a2, kept + b"/shared.txt") == b"changed by a, never published"
            assert await read_path(a2, kept + b"/new/deep.bin") == deep
            status = a2.remount_requests.status()
            assert status["conflicts"] == [folder]
            print_commit_status(status)
            assert ".fluidfs-conflicts/ holds writes" in capsys.readouterr().out
            assert caplog.text.count("are kept in .fluidfs-conflicts/") == 1
            assert not (tmp_path / "a" / "conflicts" / folder).exists(), "spool gone"
            await sync(a2)
            await a2.keeper.release()
        async with machine(tmp_path / "c", ring, hosts) as c:
            assert await read_path(c, kept + b"/new/deep.bin") == deep
            assert await read_path(c, kept + b"/shared.txt") == b"changed by a, never published"
            assert await read_path(c, b"from-b.txt") == b"b's own"


class Crash(Exception):
    """The process dies here."""


async def test_a_crash_after_keeping_the_writes_loses_none_and_keeps_them_once(
    tmp_path: Path, monkeypatch
) -> None:
    """The mount dies after the spool is written, before the old tree is dropped: the
    next mount keeps the writes from that spool, in one folder, not two."""
    async with keyfile_hosts(tmp_path) as (ring, hosts):
        deep = await replaced_writer(tmp_path, ring, hosts)

        async def crash(*_args) -> None:
            raise Crash

        with monkeypatch.context() as patched:
            patched.setattr(Conflicts, "_drop_local", crash)
            with pytest.raises(BaseException) as died:
                async with machine(tmp_path / "a", ring, hosts):
                    pass
            assert died.group_contains(Crash)
        assert len(list((tmp_path / "a" / "conflicts").iterdir())) == 1, "the spool is kept"
        async with machine(tmp_path / "a", ring, hosts) as a2:
            (folder,) = a2.conflicts.present()
            kept = b".fluidfs-conflicts/" + folder.encode()
            assert await read_path(a2, kept + b"/new/deep.bin") == deep
            assert await read_path(a2, kept + b"/shared.txt") == b"changed by a, never published"
            assert await read_path(a2, b"from-b.txt") == b"b's own"


def test_the_writes_kept_are_those_since_the_last_tree_both_histories_share() -> None:
    """A published commit 3 only to the peers on its side of a partition; B took over
    from commit 2 and wrote its own commit 3. What A keeps is compared with commit 2 —
    the newest snapshot in both lists by number *and* time — not with A's commit 3,
    whose changes B's tree does not have."""
    def snap(seq: int, when: int) -> Snapshot:
        return Snapshot(seq, Entry(name=str(seq).encode(), seq=seq, when=when))

    ours = [snap(1, 100), snap(2, 200), snap(3, 300)]
    theirs = [snap(1, 100).entry, snap(2, 200).entry, snap(3, 350).entry]
    assert common_ancestor(ours, theirs) == ours[1]
    assert common_ancestor(ours, [snap(9, 900).entry]) is None, "nothing shared: keep all"
