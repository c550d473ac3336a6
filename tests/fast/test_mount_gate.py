"""The lease gate and the lease keeper of a real node, against real peers in this process.

Three ``PeerNode`` hosts (real peer services on 127.0.0.1) keep the records; the node
under test reaches them as pinned peers, as ``fluidfs mount`` with ``PEERID@HOST:PORT``
entries does. Nothing is mounted: the gate is what runs before the FUSE session opens.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from inproc import PeerNode, peer_nodes

from fluidfs import control, keys
from fluidfs.keys import BootstrapPeer
from fluidfs.node.node import Node, NodeConfig
from fluidfs.peers.lease import WriterLease
from fluidfs.peers.rootrecord import RecordClient
from fluidfs.remount.commits import NotWriter
from fluidfs.remount.options import RemountError, RemountOptions
from fluidfs.statedir import StateDir
from fluidfs.store.settings import ORIGIN_NEW

MIB = 1024 * 1024


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
