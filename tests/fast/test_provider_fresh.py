"""A fresh machine restoring a backup whose partner's side is at a storage provider (issue
13, docs/federation.md): X's root record names, beside each listed peer, the provider
holding that peer's side of their agreement, so X's fresh machine (X's keyfile, an empty
state) asks U's provider P for the shards U's side holds while U is offline.

Real parts in-process: P, U, X and the fresh machine are ``PeerNode``s (real services,
real LMDB, real loopback sockets), the real ``RecordClient`` and ``ProviderSides``.
"""

from __future__ import annotations

import os

import pytest
import trio
from inproc import PeerNode

from fluidfs.blocks import merkle
from fluidfs.peers.agreements import MIB
from fluidfs.peers.connections import PeerUnavailable
from fluidfs.peers.manager import PeerManager
from fluidfs.peers.provider import ProviderClient
from fluidfs.peers.rootrecord import RecordClient
from fluidfs.peers.sides import ProviderSides


async def test_a_fresh_machine_reads_a_partners_side_at_its_provider(tmp_path):
    """X publishes its root with where U's side is held; X's fresh machine learns it from
    that root and reads X's shard under U's side at P, U being away. Fails before: the
    root names no provider, the fresh machine asks U and finds it unreachable."""
    p = PeerNode(tmp_path / "p", provider=True)
    u = PeerNode(tmp_path / "u", proposes_only=True)
    x = PeerNode(tmp_path / "x")
    fresh = PeerNode(tmp_path / "fresh", keyring=x.keyring)  # X's keyfile, a new state
    try:
        async with trio.open_nursery() as nursery:
            for node in (p, x):
                await node.start(nursery)
            for node in (u, fresh):
                await node.start(nursery, listen=False)
            p.service.provider.book.add(u.key, 64 * MIB)
            client = ProviderClient(u.conns, u.ledger, p.key, p.addr)
            manager = PeerManager(u.conns, u.peers, u.ledger, donate=1 << 30,
                                  agreement_size=4 * MIB, provider=client)
            assert (await manager.add(x.addr))[1]
            data = os.urandom(100_000)
            sid = merkle.shard_id(data)
            await x.conns.call(u.key, "StoreShard", {"shards": [{"id": sid, "data": data}]})

            # X's root record body: the peers it lists and where their sides are held.
            x.peers.add(u.key, "127.0.0.1:9")  # U's last address: nobody answers there
            sides = ProviderSides(x.ledger)
            published = RecordClient(x.keyring, x.conns, x.peers, sides=sides).root_listing()
            assert published["held_at"] == [[u.key, p.key, p.addr]]

            # The fresh machine: no agreement, so it would ask U itself ...
            fresh_sides = ProviderSides(fresh.ledger)
            fresh.conns.store_at = fresh_sides.store_at_of
            with pytest.raises(PeerUnavailable):
                await fresh.conns.call(u.key, "RetrieveShard", {"id": sid})
            # ... until it has read X's root record.
            records = RecordClient(fresh.keyring, fresh.conns, fresh.peers, sides=fresh_sides)
            records.learn_root(published)
            assert fresh.peers.get(u.key) is not None
            got = await fresh.conns.call(u.key, "RetrieveShard", {"id": sid})
            assert got["data"] == data
            nursery.cancel_scope.cancel()
    finally:
        for node in (p, u, x, fresh):
            node.close()


def test_a_root_listing_of_providers_is_checked_item_by_item(tmp_path):
    """The listing comes from our own signed root, but a bad item costs only itself:
    wrong shapes, an address that does not parse, a provider naming the peer itself or
    us; at most 256 entries are read; an agreement in the ledger wins over the listing."""
    x = PeerNode(tmp_path / "x")
    try:
        sides = ProviderSides(x.ledger)
        me, peer, provider = x.key, b"\x01" * 32, b"\x02" * 32
        listed = [
            [peer, provider, "127.0.0.1:7470"],
            [b"\x03" * 32, b"\x03" * 32, "127.0.0.1:1"],  # its own provider
            [b"\x04" * 32, me, "127.0.0.1:1"],  # us
            [b"\x05" * 32, provider, "no address"],
            [b"\x06" * 31, provider, "127.0.0.1:1"],
            [b"\x07" * 32, provider],
            "junk",
            *[[bytes([8, i]) + b"\x00" * 30, provider, "127.0.0.1:2"] for i in range(255)],
            [b"\x09" * 32, provider, "127.0.0.1:3"],  # past the bound
        ]
        assert sides.learn(listed, me) == 1 + 249
        assert sides.store_at_of(peer) == (provider, "127.0.0.1:7470")
        assert sides.store_at_of(b"\x03" * 32) is None
        assert sides.store_at_of(b"\x09" * 32) is None
        assert sides.learn("not a list", me) == 0
        x.ledger.record(peer, we_host=MIB, they_host=MIB, term=3600)  # no store_at
        assert sides.store_at_of(peer) is None
    finally:
        x.close()
