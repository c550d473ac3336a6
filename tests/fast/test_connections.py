"""Connections (peers/connections.py): dial on demand, one connection per peer used both
ways, reconnect after a close, back off from unreachable peers, caps per identity.

Real nodes' peer sides in this process, on 127.0.0.1 (inproc.PeerNode).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio
from inproc import PeerNode, peer_nodes, until

from fluidfs import keys
from fluidfs.net.limits import NetLimits
from fluidfs.peers import connections
from fluidfs.peers.connections import PeerUnavailable
from fluidfs.service.host import PeerService


class CountingService(PeerService):
    """A real peer service that counts the requests it serves."""

    served = 0

    async def handle(self, peer_key: bytes, op: str, args: dict) -> dict:
        self.served += 1
        return await super().handle(peer_key, op, args)


def free_port() -> int:
    """A loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_a_peer_is_dialled_once_and_the_connection_is_reused(tmp_path: Path) -> None:
    async with peer_nodes(tmp_path, 2) as (_, (a, b)):
        a.peers.add(b.key, b.addr)
        got = []

        async def get() -> None:
            got.append(await a.conns.get(b.key))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(get)
        assert len({id(c) for c in got}) == 1, "five callers at once share one dial"
        for _ in range(3):
            assert "time" in await a.conns.call(b.key, "Ping", {})
        assert a.conns.conns[b.key] is got[0]
        assert list(b.conns.conns) == [a.key], "b registered the inbound connection"


async def test_a_peer_that_dialled_us_is_called_back_on_its_connection(tmp_path: Path) -> None:
    async with peer_nodes(tmp_path, 1) as (nursery, (b,)):
        a = await PeerNode(tmp_path / "a").start(nursery, listen=False)  # a mount behind NAT
        try:
            a.peers.add(b.key, b.addr)
            await a.conns.call(b.key, "Ping", {})
            known = b.peers.get(a.key)
            assert known is None or not known.addr, "b has no address to dial a at"
            assert "time" in await b.conns.call(a.key, "Ping", {})
            assert len(a.conns.conns) == 1 and not a.conns.conns[b.key].closed
        finally:
            nursery.cancel_scope.cancel()
            a.close()


@pytest.mark.parametrize("closer", ["us", "the peer"])
async def test_a_closed_connection_is_replaced_on_the_next_call(
    tmp_path: Path, closer: str
) -> None:
    async with peer_nodes(tmp_path, 2) as (_, (a, b)):
        a.peers.add(b.key, b.addr)
        await a.conns.call(b.key, "Ping", {})
        first = a.conns.conns[b.key]
        if closer == "us":
            await first.aclose()
        else:
            await b.conns.conns[a.key].aclose()
        # no waiting for a to notice: a call on a connection the peer just closed is retried
        assert "time" in await a.conns.call(b.key, "Ping", {})
        assert first.closed and a.conns.conns[b.key] is not first


async def test_an_unreachable_peer_is_backed_off_until_it_reaches_us(tmp_path: Path) -> None:
    async with peer_nodes(tmp_path, 2) as (_, (a, b)):
        a.peers.add(b.key, f"127.0.0.1:{free_port()}")  # b's old address: nothing there
        with pytest.raises(PeerUnavailable):
            await a.conns.call(b.key, "Ping", {})
        assert a.conns.backing_off(b.key)
        with pytest.raises(PeerUnavailable, match="backing off"):
            await a.conns.get(b.key)
        # b dials a from its new address: a can use that connection at once
        b.peers.add(a.key, a.addr)
        await b.conns.call(a.key, "Ping", {})
        assert not a.conns.backing_off(b.key)
        assert "time" in await a.conns.call(b.key, "Ping", {})


async def test_another_identity_at_the_address_is_refused(tmp_path: Path) -> None:
    async with peer_nodes(tmp_path, 3) as (_, (a, b, c)):
        a.peers.add(c.key, b.addr)  # the address a has for c is b's
        with pytest.raises(PeerUnavailable):
            await a.conns.call(c.key, "Ping", {})
        assert c.key not in a.conns.conns and b.key not in a.conns.conns
        assert a.key not in b.conns.conns
        unknown = keys.KeyRing(keys.generate()).public_key
        with pytest.raises(PeerUnavailable, match="no address"):
            await a.conns.call(unknown, "Ping", {})


async def test_a_reconnecting_identity_replaces_its_idle_connection(tmp_path: Path) -> None:
    """At most ``max_per_identity`` inbound connections per identity: a peer that dials
    again (say, after its network changed) wins over its own stale connection."""
    ring = keys.KeyRing(keys.generate())
    one = NetLimits(max_per_identity=1)
    async with trio.open_nursery() as nursery:
        b = await PeerNode(tmp_path / "b", limits=one).start(nursery)
        old = await PeerNode(tmp_path / "old", ring, service=CountingService).start(
            nursery, listen=False)
        new = await PeerNode(tmp_path / "new", ring, service=CountingService).start(
            nursery, listen=False)
        try:
            for node in (old, new):
                node.peers.add(b.key, b.addr)
                await node.conns.call(b.key, "Ping", {})
            stale = old.conns.conns.get(b.key)
            await until(lambda: stale is None or stale.closed, what="b to close the stale one")
            await b.conns.call(ring.public_key, "Ping", {})
            assert (old.service.served, new.service.served) == (0, 1), "b called the new one"
            assert "time" in await new.conns.call(b.key, "Ping", {})
        finally:
            nursery.cancel_scope.cancel()
            for node in (b, old, new):
                node.close()


async def test_a_connection_that_just_answered_is_not_dropped_as_silent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reachability ping that times out behind shards queued on a thin uplink must not
    close a connection that is still answering (every shard in flight on it would be
    lost and sent again); one that has been silent for longer is closed. (Before, drop
    closed it whatever it had just answered.)"""
    monkeypatch.setattr(connections, "ANSWERED_WITHIN", 0.3)
    async with peer_nodes(tmp_path, 2) as (_, (a, b)):
        a.peers.add(b.key, b.addr)
        await a.conns.call(b.key, "Ping", {})
        first = a.conns.conns[b.key]
        a.conns.drop(b.key)
        await trio.sleep(0.05)
        assert a.conns.conns.get(b.key) is first and not first.closed
        assert "time" in await a.conns.call(b.key, "Ping", {})  # still the same connection
        assert a.conns.conns[b.key] is first
        await trio.sleep(0.4)  # silent for longer than ANSWERED_WITHIN
        a.conns.drop(b.key)
        await until(lambda: first.closed)
        assert b.key not in a.conns.conns
        assert "time" in await a.conns.call(b.key, "Ping", {})
        assert a.conns.conns[b.key] is not first


async def test_a_stopped_node_refuses_to_dial_as_unavailable(tmp_path: Path) -> None:
    """Unmounting gives the writer lease back after the connection tasks' nursery may
    have ended (a part failed): a dial then is a peer we cannot reach, not an error that
    hides the first one and leaves the lease to time out. (Fails before: RuntimeError,
    "Nursery is closed to new arrivals".)"""
    async with peer_nodes(tmp_path, 1) as (_, (b,)):
        async with trio.open_nursery() as gone:
            a = await PeerNode(tmp_path / "a").start(gone, listen=False)
            a.peers.add(b.key, b.addr)
            gone.cancel_scope.cancel()
        try:
            with pytest.raises(PeerUnavailable):
                await a.conns.call(b.key, "Ping", {})
        finally:
            a.close()
