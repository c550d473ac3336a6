"""Leaving a storage provider (issue 13, docs/federation.md): mounted without
``--provider`` after having one, U brings its side of the agreement with X home from
provider P in order, and every shard X stored stays retrievable throughout.

Real parts in-process: P, U and X are ``PeerNode``s (real services, real LMDB, real
loopback sockets); U is the real ``PeerManager`` and the real ``Homecoming``. U listens
(a node holding its side itself must be reachable): X dials it once the side is home.
"""

from __future__ import annotations

import trio
from providernet import SIZE, ProviderNet, Reader

from fluidfs.peers.homecoming import Homecoming, LocalSide, leave_provider
from fluidfs.peers.manager import PeerManager
from fluidfs.service.faults import FaultInjection
from fluidfs.store.accounts import holder_key
from fluidfs.store.settings import StateSettings

MIB = 1 << 20


class Net(ProviderNet):
    """P (the provider U leaves), U (customer), X (U's partner)."""

    u_listens = True  # X dials U once the side is home

    def __init__(self, tmp_path, **provider_kw) -> None:
        super().__init__(tmp_path, providers=["p"], partners=["x"], **provider_kw)
        (self.p,), (self.x,) = self.providers, self.partners

    async def start(self, nursery: trio.Nursery) -> None:
        await super().start(nursery)
        self.p.service.provider.book.add(self.u.key, 64 * MIB)
        self.with_p = self.manager_for(self.client_at(self.p))
        self.alone = PeerManager(self.u.conns, self.u.peers, self.u.ledger, donate=1 << 30,
                                 agreement_size=SIZE)  # the next mount: no --provider

    def homecoming(self, donate: int = 1 << 30, take_back=None) -> Homecoming:
        home = LocalSide(self.u.shards, self.u.ledger, donate, self.u.key,
                         trio.CapacityLimiter(2))
        return Homecoming(self.u.conns, self.u.ledger, home, (self.p.key, self.p.addr),
                          take_back or self.alone.take_back)


async def with_net(tmp_path, body, **provider_kw) -> None:
    await Net(tmp_path, **provider_kw).run(body)


async def test_a_mount_without_the_provider_brings_the_side_home_in_order(tmp_path):
    """U's state remembers P; mounted without a provider, U copies X's shards home, renews
    with X without store_at, copies a shard X stored in the gap, unreserves at P and
    forgets it. X reads every shard all through. Fails before: the side stays at P."""

    async def body(net: Net) -> None:
        settings = StateSettings(net.u.db)
        await net.with_p.add(net.x.addr)
        settings.set_provider((net.p.key, net.p.addr))
        stored = await net.store(6)
        reader = Reader(net.x, net.u, stored)

        async def take_back_after_a_late_store(peer: bytes) -> bool:
            stored.update(await net.store(1))  # at P after the first copy: copied again
            return await net.alone.take_back(peer)

        homecoming = net.homecoming(take_back=take_back_after_a_late_store)
        assert homecoming.pending() == [net.x.key]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader.run)
            with trio.fail_after(5):
                await leave_provider(settings, homecoming)
            await reader.stop_after_a_full_round()  # and read all again after the move
        assert reader.failures == []
        assert homecoming.status()["left"] == 0
        assert (homecoming.moved, homecoming.copied) == (1, 7)
        assert settings.provider() is None
        assert net.x.ledger.live(net.u.key).store_at_id is None
        assert net.u.ledger.live(net.x.key).reserved_at is None
        for sid, data in stored.items():
            assert net.u.shards.get(net.x.key, sid) == data  # held here now
        assert not net.p.service.provider.book.reservation(net.u.key, net.x.key).live

        net.p.service.provider.keep = -1.0  # P's keep period passes
        assert await net.p.service.provider.expire() == 1
        assert net.p.shards.used(holder_key(net.u.key, net.x.key)) == 0
        for sid, data in stored.items():  # served by U alone
            got = await net.x.conns.call(net.u.key, "RetrieveShard", {"id": sid})
            assert got["data"] == data

    await with_net(tmp_path, body)


async def test_a_side_that_does_not_fit_or_a_partner_that_does_not_renew_stays_at_the_provider(
        tmp_path):
    """No room in U's donation, or X not renewing: X's side stays reserved at P (which
    keeps serving it) and the move is tried again; nothing is removed at P."""

    async def body(net: Net) -> None:
        await net.with_p.add(net.x.addr)
        stored = await net.store(3)
        cramped = net.homecoming(donate=150_000)  # room for one shard of 100 kB
        assert await cramped.move_all() == 0
        assert cramped.pending() == [net.x.key]

        async def refuse(_peer: bytes) -> bool:
            return False

        refusing = net.homecoming(take_back=refuse)
        assert await refusing.move_all() == 0
        assert refusing.pending() == [net.x.key]
        assert net.p.service.provider.book.reservation(net.u.key, net.x.key).live
        assert net.x.ledger.live(net.u.key).store_at_id == net.p.key
        for sid, data in stored.items():
            got = await net.x.conns.call(net.u.key, "RetrieveShard", {"id": sid})
            assert got["data"] == data


        async def node_status(_request: dict) -> dict:
            return {}

        shown = await refusing.with_status(node_status)({})
        assert shown["leaving_provider"]["left"] == 1  # `fluidfs status` says it is there
        homecoming = net.homecoming()
        assert await homecoming.move_all() == 1  # room and a renewal: it comes home
        assert "leaving_provider" not in await homecoming.with_status(node_status)({})

    await with_net(tmp_path, body)


async def test_a_provider_serving_other_bytes_cannot_plant_them_here(tmp_path):
    """P corrupts what it serves: U checks every fetched shard against its id, keeps
    none of them, and leaves X's side at P."""

    async def body(net: Net) -> None:
        await net.with_p.add(net.x.addr)
        await net.store(2)
        homecoming = net.homecoming()
        assert await homecoming.move_all() == 0
        assert homecoming.pending() == [net.x.key]
        assert net.u.shards.used(net.x.key) == 0
        assert net.x.ledger.live(net.u.key).store_at_id == net.p.key

    await with_net(tmp_path, body, faults=FaultInjection(lie_on_retrieve=True))
