"""The lease gate and the lease keeper of a real node, against real peers in this process.

Three ``PeerNode`` hosts (real peer services on 127.0.0.1) keep the records; the node
under test reaches them as pinned peers, as ``fluidfs mount`` with ``PEERID@HOST:PORT``
entries does. Nothing is mounted: the gate is what runs before the FUSE session opens.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pyfuse3
import pytest
import trio
import trio.testing
from inproc import PeerNode, peer_nodes, slow_jump_clock

from fluidfs import control, keys
from fluidfs.fs.tree import ROOT_INO
from fluidfs.keys import BootstrapPeer
from fluidfs.node.node import Node, NodeConfig
from fluidfs.peers.lease import WriterLease
from fluidfs.peers.rootrecord import RecordClient
from fluidfs.remount.commits import NotWriter
from fluidfs.remount.options import RemountError, RemountOptions
from fluidfs.statedir import StateDir
from fluidfs.store.settings import ORIGIN_NEW

MIB = 1024 * 1024
CTX = pyfuse3.RequestContext()


@asynccontextmanager
async def node_and_hosts(
    tmp_path: Path, ring: keys.KeyRing, **options
) -> AsyncIterator[tuple[Node, list[PeerNode]]]:
    """A node of *ring* whose pinned peers are three hosts that keep its records."""
    async with peer_nodes(tmp_path / "hosts", 3) as (nursery, hosts):
        for host in hosts:
            host.ledger.record(ring.public_key, we_host=64 * MIB, they_host=64 * MIB, term=3600)
        pinned = [BootstrapPeer(h.addr, h.key) for h in hosts]
        config = NodeConfig(
            ring,
            StateDir(tmp_path / "state"),
            cache_size=1 << 24,
            remount=RemountOptions(pinned=pinned, mountpoint="/mnt/a", **options),
        )
        node = Node(config)
        try:
            await nursery.start(node.conns.run)
            yield node, hosts
        finally:
            nursery.cancel_scope.cancel()
            node.close()


async def other_machine(tmp_path: Path, ring: keys.KeyRing, hosts: list[PeerNode], nursery):
    """The lease as a second machine of the same keyfile sees it."""
    other = await PeerNode(tmp_path / "b", ring).start(nursery, listen=False)
    for host in hosts:
        other.peers.add(host.key, host.addr)
    return other, WriterLease(RecordClient(ring, other.conns, other.peers), b"b" * 16, "/mnt/b")


@pytest.fixture
def virtual_clock() -> trio.testing.MockClock:
    """Virtual time that moves only while nothing runs (inproc.slow_jump_clock)."""
    return slow_jump_clock()


async def test_a_fresh_state_without_a_quorum_of_answers_is_refused(tmp_path) -> None:
    ring = keys.KeyRing(keys.generate())  # K = 8: three not_found answers are not enough
    async with node_and_hosts(tmp_path, ring, restore_wait=0.0) as (node, _hosts):
        with pytest.raises(RemountError, match=r"3 of the 3 peers .* and 8 must"):
            await node.gate.before_mount()
        assert node.settings.origin() is None, "nothing settled"


async def test_a_fresh_state_known_new_starts_empty_and_says_so(tmp_path) -> None:
    ring = keys.KeyRing(keys.generate())
    async with node_and_hosts(tmp_path, ring, new=True) as (node, _hosts):
        await node.gate.before_mount()
        assert node.settings.origin() == ORIGIN_NEW
        assert node.keeper.lease.published == 3, "the lease is on every host"


async def test_a_mount_asked_to_hand_over_stops_writing_and_hands_over(tmp_path) -> None:
    """--takeover elsewhere asks; this mount's next renewal sees the request, it stops
    acknowledging writes, commits and releases, and the taker has the lease long before
    the bound it would otherwise wait out."""
    ring = keys.KeyRing(keys.generate())
    async with node_and_hosts(tmp_path, ring, new=True) as (node, hosts):
        await node.gate.before_mount()
        assert node.keeper.may_write()
        async with trio.open_nursery() as nursery:
            other, lease = await other_machine(tmp_path, ring, hosts, nursery)
            started = trio.current_time()
            took = trio.Event()

            async def take() -> None:
                await lease.acquire(takeover=True)  # fluidfs mount --takeover elsewhere
                took.set()

            nursery.start_soon(take)
            while await node.keeper.check():  # the holder's renewals
                await trio.sleep(0.3)
            assert node.ops.read_only and not node.keeper.may_write(), "writes stopped first"
            assert not took.is_set(), "the taker waits for the handover"
            await node.commits.hand_over()
            await took.wait()
            assert trio.current_time() - started < lease.bound, "no waiting out the bound"
            assert lease.fence == node.keeper.lease.fence + 1
            nursery.cancel_scope.cancel()
        other.close()
        assert not await node.keeper.check()
        with pytest.raises(NotWriter):
            await node.commits.commit(user_changed=True)
        sync = node.control_handlers()["sync"]
        with pytest.raises(control.ControlError, match="no longer writes: handed over to"):
            await sync({"wait": 5})
        status = node.remount_requests.status()
        assert status["writer"] is False and "handed over" in status["lost_to"]


async def test_a_mount_replaced_with_unpublished_writes_says_so(tmp_path, caplog) -> None:
    """Cut off, this mount was replaced (a later fence on the holders) while it held
    acknowledged changes no commit had published: status warns, the log says it once."""
    ring = keys.KeyRing(keys.generate())
    async with node_and_hosts(tmp_path, ring, new=True) as (node, hosts):
        await node.gate.before_mount()
        async with trio.open_nursery() as nursery:
            await nursery.start(node.commits.run)
            node.commits.note_change()  # a write acknowledged, not yet committed
            assert node.remount_requests.status()["unpublished"] is False
            other, lease = await other_machine(tmp_path, ring, hosts, nursery)
            seen = await lease.look()
            lease.holders = seen.info.holders
            lease.fence, lease.seq = seen.newest.fence, seen.newest.seq
            await lease._take(seen, seen.info, lease.fence)  # as after waiting it out
            assert not await node.keeper.check()
            await trio.testing.wait_all_tasks_blocked()
            status = node.remount_requests.status()
            assert status["writer"] is False and status["unpublished"] is True
            assert "taken over by host" in status["last_error"]
            nursery.cancel_scope.cancel()
        other.close()
        assert caplog.text.count("never published") == 1


def rounds(calls: list[tuple[float, float]]) -> int:
    """The longest chain of *calls* (start, end) each begun after the one before ended:
    the round trips one after another a caller waited for."""
    depth: list[int] = []
    ordered = sorted(calls)
    for i, (start, _end) in enumerate(ordered):
        before = [depth[j] for j in range(i) if ordered[j][1] <= start]
        depth.append(1 + max(before, default=0))
    return max(depth, default=0)


def node_config(tmp_path: Path, name: str, ring: keys.KeyRing, hosts: list[PeerNode],
                **options) -> NodeConfig:
    """A node of *ring* on state *name* whose pinned peers are *hosts*."""
    pinned = [BootstrapPeer(h.addr, h.key) for h in hosts]
    return NodeConfig(ring, StateDir(tmp_path / name), cache_size=1 << 24,
                      remount=RemountOptions(pinned=pinned, mountpoint=f"/mnt/{name}",
                                             **options))


async def backup_elsewhere(
    tmp_path: Path, ring: keys.KeyRing, hosts: list[PeerNode], *, release: bool
) -> None:
    """Machine a makes a backup on *hosts* (a directory ``docs``, committed and
    published), then stops; with *release* it gives the lease back, else it leaves it
    held (a live mount elsewhere, as far as the lease tells)."""
    a = Node(node_config(tmp_path, "a", ring, hosts, new=True))
    for host in hosts:
        a.ledger.record(host.key, we_host=64 * MIB, they_host=64 * MIB, term=3600)
        a.peers.add(host.key, host.addr)
    a.blocks.use_network(a.remote)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(a.conns.run)
            await nursery.start(a.blocks.run)
            await a.start()
            await a.gate.before_mount()
            await nursery.start(a.data.run)
            await nursery.start(a.meta.batch.run)
            nursery.start_soon(a.migrator.run)
            await nursery.start(a.commits.run)
            await a.ops.mkdir(ROOT_INO, b"docs", 0o750, CTX)
            a.commits.note_change()
            reply = await a.remount_requests.sync(10.0)
            assert reply["published"], reply
            if release:
                await a.keeper.release()
            nursery.cancel_scope.cancel()
    finally:
        a.close()


@asynccontextmanager
async def records_hosts(tmp_path: Path) -> AsyncIterator[tuple[keys.KeyRing, list[PeerNode],
                                                                trio.Nursery]]:
    """A keyfile (3 shards, 2 needed) and three hosts keeping its shards and records."""
    ring = keys.KeyRing(keys.generate(shards_total=3, shards_needed=2))
    async with peer_nodes(tmp_path / "hosts", 3) as (nursery, hosts):
        for host in hosts:
            host.ledger.record(ring.public_key, we_host=64 * MIB, they_host=64 * MIB, term=3600)
        yield ring, hosts, nursery
        nursery.cancel_scope.cancel()


async def test_a_fresh_machine_takes_the_lease_while_it_reads_the_root_and_its_tree(
    tmp_path, monkeypatch, virtual_clock
) -> None:
    """A fresh machine's gate (keyfile only, a backup on the peers) waits for as few round
    trips one after another as the rules allow: the lease is looked at while the root is
    read, and the commit node, the snapshot list and the root directory are rebuilt while
    the lease is taken and the root read again. Every peer request takes 50 ms more here,
    so that what overlaps cannot pass for sequential. Before: 7 rounds (root, lease look,
    lease put, root again, commit node, snapshot list, root directory).

    On virtual time (``virtual_clock``): requests that start together start at the same
    instant, however late a loaded machine runs them, so that overlapping requests cannot
    pass for sequential either (on real time, a worker thread waiting 50 ms for a CPU
    between two requests made them look one after the other: 4 rounds)."""
    async with records_hosts(tmp_path) as (ring, hosts, outer):
        await backup_elsewhere(tmp_path, ring, hosts, release=True)
        b = Node(node_config(tmp_path, "b", ring, hosts, restore_wait=2.0))
        b.blocks.use_network(b.remote)  # as `fluidfs mount` with pinned peers does
        calls: list[tuple[float, float]] = []
        call = b.conns.call

        async def slow_call(*args, **kwargs):
            started = trio.current_time()
            await trio.sleep(0.05)
            try:
                return await call(*args, **kwargs)
            finally:
                calls.append((started, trio.current_time()))

        monkeypatch.setattr(b.conns, "call", slow_call)
        try:
            await outer.start(b.conns.run)
            await outer.start(b.blocks.run)
            await b.gate.before_mount()
            assert b.tree_restore.restored is not None
            await b.restorer.ensure(ROOT_INO)  # the first listing
            assert b.tree.lookup(ROOT_INO, b"docs") is not None
            assert rounds(calls) <= 3, sorted(calls)
        finally:
            b.close()


async def test_a_fresh_machine_refused_the_lease_is_left_fresh(tmp_path) -> None:
    """The tree's first blocks are rebuilt while the lease is being taken, but a mount
    refused the lease (another machine's live mount holds it) has written nothing of
    that tree: its state directory is as fresh as before, so that its next mount still
    restores rather than taking it for a used one."""
    async with records_hosts(tmp_path) as (ring, hosts, outer):
        await backup_elsewhere(tmp_path, ring, hosts, release=False)
        b = Node(node_config(tmp_path, "b", ring, hosts, restore_wait=2.0))
        b.blocks.use_network(b.remote)
        try:
            await outer.start(b.conns.run)
            await outer.start(b.blocks.run)
            with pytest.raises(RemountError, match="this keyfile is mounted on"):
                await b.gate.before_mount()
            assert b.gate.fresh() and b.blocks.count() == 0
        finally:
            b.close()


async def test_a_fresh_machine_reads_each_peer_as_it_connects_not_once_all_have(
    tmp_path, monkeypatch
) -> None:
    """One pinned peer is slow to connect (its dial goes on only once another peer has
    been asked for the root, or after 3 s): the root and lease reads of the others go
    out as soon as each of them is connected, not once the slow one is too, and the
    slow one is dialled once, not by the dialer and by a read both. Before: every dial
    was waited for before the first read went out (this waited the 3 s, and failed)."""
    async with records_hosts(tmp_path) as (ring, hosts, outer):
        await backup_elsewhere(tmp_path, ring, hosts, release=True)
        b = Node(node_config(tmp_path, "b", ring, hosts, restore_wait=2.0))
        b.blocks.use_network(b.remote)
        slow = hosts[2]
        dials: list[str] = []
        read_out, slow_dialled = trio.Event(), trio.Event()
        slow_first: list[bool] = []  # at the first read: had the slow dial gone on?
        connect, call = b.conns.connect, b.conns.call

        async def slow_connect(addr, expected=None):
            dials.append(addr)
            if addr == slow.addr:
                with trio.move_on_after(3):  # under the dialer's DIAL_WAIT
                    await read_out.wait()
                slow_dialled.set()
            return await connect(addr, expected=expected)

        async def noted_call(key, op, *args, **kwargs):
            if op == "GetRecord" and key != slow.key and not read_out.is_set():
                slow_first.append(slow_dialled.is_set())
                read_out.set()
            return await call(key, op, *args, **kwargs)

        monkeypatch.setattr(b.conns, "connect", slow_connect)
        monkeypatch.setattr(b.conns, "call", noted_call)
        try:
            await outer.start(b.conns.run)
            await outer.start(b.blocks.run)
            await b.gate.before_mount()
            assert slow_first == [False], "the first read waited for the slow dial"
            assert b.tree_restore.restored is not None
            assert dials.count(slow.addr) == 1, dials
        finally:
            b.close()
