"""Joining a storage provider (issue 13, docs/federation.md): U holds its side of the
agreement with X itself (made without a provider, or brought home) and is now mounted
with ``--provider P``: its side moves to P in order, shards and records, and every shard
X stored stays retrievable throughout.

Real parts in-process: P, U and X are ``PeerNode``s (real services, real LMDB, real
loopback sockets); U is the real ``PeerManager`` and the real ``Departure``. U listens
while its side is held at home.
"""

from __future__ import annotations

import contextlib
import io

import trio
from providernet import SIZE, ProviderNet, Reader

from fluidfs.cli.inspect import _print_provider
from fluidfs.peers.agreements import MIB
from fluidfs.peers.departure import Departure
from fluidfs.peers.homecoming import LocalSide
from fluidfs.peers.manager import PeerManager
from fluidfs.peers.rootrecord import seal
from fluidfs.store.accounts import holder_key


class Net(ProviderNet):
    """P (the provider U joins), U (listening: its side is at home), X (partner)."""

    u_listens = True

    def __init__(self, tmp_path) -> None:
        super().__init__(tmp_path, providers=["p"], partners=["x"])
        (self.p,), (self.x,) = self.providers, self.partners

    async def start(self, nursery: trio.Nursery) -> None:
        await super().start(nursery)
        self.p.service.provider.book.add(self.u.key, 64 * MIB)
        alone = PeerManager(self.u.conns, self.u.peers, self.u.ledger, donate=1 << 30,
                            agreement_size=SIZE)
        assert await alone.add(self.x.addr)  # held at home: no provider yet
        self.with_p = self.manager_for(self.client_at(self.p))

    def departure(self, renew=None) -> Departure:
        home = LocalSide(self.u.shards, self.u.ledger, 1 << 30, self.u.key,
                         trio.CapacityLimiter(2), self.u.records)
        return Departure(self.u.conns, self.u.ledger, home, self.with_p.provider,
                         renew or self.with_p.move_to_provider)


async def test_mounting_with_a_provider_moves_the_side_held_at_home_to_it(tmp_path):
    """U's side for X is at home; the departure copies X's shards and records to P,
    renews with X naming P, copies a shard X stored in the gap, and drops U's own
    copies. X reads every shard it stored before the move all through, and the one it
    stored in the gap once step 4 has copied it. Fails before: the side stays at U."""

    async def body(net: Net) -> None:
        stored = await net.store(3)
        root = seal(net.x.keyring, "root", 3, {"peers": []}, fence=1)
        assert (await net.x.conns.call(net.u.key, "PutRecord", {"record": root}))["stored"]
        assert net.u.records.get(net.x.key, "root") == root
        reader = Reader(net.x, net.u, stored)
        late: dict[bytes, bytes] = {}

        async def renew_after_a_late_store(peer: bytes) -> bool:
            late.update(await net.store(1))  # at U after the first copy: copied again
            return await net.with_p.move_to_provider(peer)

        departure = net.departure(renew_after_a_late_store)
        assert departure.pending() == [net.x.key]
        assert net.with_p.provider.status()["held_here"] == 0  # no pass yet
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader.run)
            with trio.fail_after(5):
                assert await departure.move_all() == 1
            # A shard X stores in the gap is read from P once step 4 has copied it:
            # between the renewal and that copy X asks P, which does not hold it yet.
            stored.update(late)
            await reader.stop_after_a_full_round()  # and read all again after the move
        assert reader.failures == []
        assert (departure.moved, departure.copied) == (1, 4)
        assert departure.pending() == []
        assert net.with_p.provider.status()["held_here"] == 0  # the move is over
        assert net.x.ledger.live(net.u.key).store_at_id == net.p.key
        assert net.u.ledger.live(net.x.key).reserved_at == net.p.key
        holder = holder_key(net.u.key, net.x.key)
        for sid, data in stored.items():
            assert net.p.shards.get(holder, sid) == data
        assert net.u.shards.used(net.x.key) == 0  # U's copies dropped: P holds them
        assert net.p.service.provider.records.get(holder, "root") == root
        got = await net.x.conns.call(net.u.key, "GetRecord", {"kind": "root"})
        assert got["record"] == root  # from P now

    await ProviderNet.run(Net(tmp_path), body)


async def test_a_partner_that_does_not_renew_keeps_its_side_at_home(tmp_path):
    """The renewal fails: X's side stays at U (served and kept there) and the move is
    tried again, which succeeds once X renews. An agreement with P itself stays."""

    async def body(net: Net) -> None:
        stored = await net.store(2)

        async def refuse(_peer: bytes) -> bool:
            return False

        departure = net.departure(refuse)
        net.u.ledger.record(net.p.key, we_host=SIZE, they_host=SIZE, term=3600)
        assert departure.pending() == [net.x.key]  # P as a partner: held here, as ever
        with trio.fail_after(5):
            assert await departure.move_all() == 0
        assert departure.pending() == [net.x.key]
        shown = io.StringIO()
        with contextlib.redirect_stdout(shown):
            _print_provider(net.with_p.provider.status())
        assert "moving to this provider: 1 agreements still held here" in shown.getvalue()
        assert net.x.ledger.live(net.u.key).store_at_id is None
        for sid, data in stored.items():
            assert net.u.shards.get(net.x.key, sid) == data
            got = await net.x.conns.call(net.u.key, "RetrieveShard", {"id": sid})
            assert got["data"] == data
        departure.renew = net.with_p.move_to_provider
        with trio.fail_after(5):
            assert await departure.move_all() == 1
        assert net.x.ledger.live(net.u.key).store_at_id == net.p.key

    await ProviderNet.run(Net(tmp_path), body)
