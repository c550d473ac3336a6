"""Switching storage providers (issue 13 item 5, docs/federation.md): U's side of its
agreement with X moves from provider P to provider P2, handed over through U, and every
shard X stored stays retrievable throughout.

Real parts in-process: P, P2, U and X are ``PeerNode``s (real services, real LMDB, real
loopback sockets); U is the real ``PeerManager`` with ``ProviderClient``s and the real
``Handover``. U never listens: whatever X gets for U comes from P or P2.
"""

from __future__ import annotations

import os

import pytest
import trio
from inproc import PeerNode
from providernet import ProviderNet, Reader, shard

from fluidfs.keys import encode_peer_id
from fluidfs.net.errors import RpcError
from fluidfs.peers.agreements import MIB
from fluidfs.peers.handover import Handover, switch_providers
from fluidfs.peers.manager import PeerManager
from fluidfs.store.accounts import holder_key
from fluidfs.store.settings import StateSettings


class Net(ProviderNet):
    """P (old provider), P2 (new), U (customer, never listens), X (U's partner)."""

    def __init__(self, tmp_path) -> None:
        super().__init__(tmp_path, providers=["p", "p2"], partners=["x"])
        (self.p, self.p2), (self.x,) = self.providers, self.partners

    async def start(self, nursery: trio.Nursery) -> None:
        await super().start(nursery)
        for provider in (self.p, self.p2):
            provider.service.provider.book.add(self.u.key, 64 * MIB)

    def manager(self, provider: PeerNode) -> PeerManager:
        """U's peer manager with *provider* holding its side."""
        return self.manager_for(self.client_at(provider))


async def with_net(tmp_path, body) -> None:
    await Net(tmp_path).run(body)


async def test_switching_providers_keeps_every_partner_shard_retrievable(tmp_path):
    """U moves from P to P2. X reads every shard it stored with U all through the move
    (a reader runs alongside it), a shard X stores in the gap before the renewal is
    handed over too, and afterwards X's ops go to P2; P removes its reservation and its
    shards are dropped after the keep period. Fails before: there is no handover."""

    async def body(net: Net) -> None:
        old = net.manager(net.p)
        await old.add(net.x.addr)
        stored = await net.store(6)
        new = net.manager(net.p2)
        reader = Reader(net.x, net.u, stored)

        async def renew_after_a_late_store(peer: bytes) -> bool:
            late_id, late = shard()  # stored at P after the first copy, before the renewal
            reply = await net.x.conns.call(net.u.key, "StoreShard",
                                           {"shards": [{"id": late_id, "data": late}]})
            assert reply["stored"] == [late_id]
            renewed = await new.move_to_provider(peer)
            stored[late_id] = late  # the reader checks it from here on (at P2)
            return renewed

        handover = Handover(net.u.conns, net.u.ledger, new.provider, (net.p.key, net.p.addr),
                            renew_after_a_late_store)
        assert handover.pending() == [net.x.key]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader.run)
            with trio.fail_after(5):
                await handover.run()
            await reader.stop_after_a_full_round()  # and read all again after the move
        assert reader.failures == []
        assert handover.pending() == [] and handover.moved == 1 and handover.copied == 7

        at_x = net.x.ledger.live(net.u.key)
        assert (at_x.store_at_id, at_x.store_at) == (net.p2.key, net.p2.addr)
        assert net.u.ledger.live(net.x.key).reserved_at == net.p2.key
        holder = holder_key(net.u.key, net.x.key)
        for sid, data in stored.items():
            assert net.p2.shards.get(holder, sid) == data
        assert not net.p.service.provider.book.reservation(net.u.key, net.x.key).live
        assert net.p2.service.provider.book.reservation(net.u.key, net.x.key).live

        net.p.service.provider.keep = -1.0  # P's keep period passes
        assert await net.p.service.provider.expire() == 1
        assert net.p.shards.used(holder) == 0
        for sid, data in stored.items():  # served by P2 alone now
            got = await net.x.conns.call(net.u.key, "RetrieveShard", {"id": sid})
            assert got["data"] == data
        sid, data = shard()
        reply = await net.x.conns.call(net.u.key, "StoreShard",
                                       {"shards": [{"id": sid, "data": data}]})
        assert reply["stored"] == [sid] and net.p2.shards.get(holder, sid) == data

    await with_net(tmp_path, body)


async def test_a_partner_that_does_not_renew_stays_at_the_old_provider(tmp_path):
    """The renewal fails: X's side stays reserved at P (which keeps serving it) and the
    move is tried again; nothing is removed at P."""

    async def body(net: Net) -> None:
        await net.manager(net.p).add(net.x.addr)
        sid, data = shard()
        await net.x.conns.call(net.u.key, "StoreShard", {"shards": [{"id": sid, "data": data}]})
        new = net.manager(net.p2)

        async def refuse(_peer: bytes) -> bool:
            return False

        handover = Handover(net.u.conns, net.u.ledger, new.provider, (net.p.key, net.p.addr),
                            refuse)
        with trio.fail_after(5):
            assert await handover.move_all() == 0
        assert handover.pending() == [net.x.key]
        shown = new.provider.status()
        assert (shown["moving_from"], shown["moving"]) == (encode_peer_id(net.p.key), 1)
        assert net.p.service.provider.book.reservation(net.u.key, net.x.key).live
        assert (await net.x.conns.call(net.u.key, "RetrieveShard", {"id": sid}))["data"] == data
        handover.renew = new.move_to_provider
        assert await handover.move_all() == 1
        assert new.provider.status()["moving_from"] is None
        assert (await net.x.conns.call(net.u.key, "RetrieveShard", {"id": sid}))["data"] == data

    await with_net(tmp_path, body)


async def test_only_the_customer_lists_fetches_and_hands_over_its_reservations(tmp_path):
    """Hostile ListReserved / FetchReserved / StoreReserved: a non-customer is refused, a
    peer with no reservation is no_agreement, a shard not matching its id is bad_shard,
    one past the reservation's size over_quota; the provider keeps serving."""

    async def body(net: Net) -> None:
        u, x = net.u.key, net.x.key
        provider = net.p2.service.provider
        sid, data = shard(size=1000)
        page = {"peer": x, "after": b"", "limit": 16}
        for op, args in (("ListReserved", page), ("FetchReserved", {"peer": x, "id": sid}),
                         ("StoreReserved", {"peer": x, "shards": [{"id": sid, "data": data}]})):
            with pytest.raises(RpcError) as err:  # X is no customer of P2
                await net.x.conns.call(net.p2.key, op, args, addr=net.p2.addr)
            assert err.value.code == "refused"
            with pytest.raises(RpcError) as err:  # U has no reservation for X at P2 yet
                await net.u.conns.call(net.p2.key, op, args, addr=net.p2.addr)
            assert err.value.code == "no_agreement"

        provider.book.reserve(u, x, 150_000)
        big_id, big = shard()
        past_id, past = shard()
        wrong = os.urandom(1000)
        reply = await net.u.conns.call(net.p2.key, "StoreReserved", {"peer": x, "shards": [
            {"id": sid, "data": wrong}, {"id": big_id, "data": big},
            {"id": past_id, "data": past}]}, addr=net.p2.addr)
        assert reply["stored"] == [big_id]
        assert [r["code"] for r in reply["refused"]] == ["bad_shard", "over_quota"]
        listed = await net.u.conns.call(net.p2.key, "ListReserved", page, addr=net.p2.addr)
        assert listed == {"ids": [big_id], "more": False}
        got = await net.u.conns.call(net.p2.key, "FetchReserved", {"peer": x, "id": big_id},
                                     addr=net.p2.addr)
        assert got["data"] == big
        with pytest.raises(RpcError) as err:
            await net.u.conns.call(net.p2.key, "FetchReserved", {"peer": x, "id": sid},
                                   addr=net.p2.addr)
        assert err.value.code == "not_found"
        conn = await net.u.conns.get(net.p2.key, net.p2.addr)
        conn.ops = {}  # no client-side checks: the provider must refuse
        for bad in ({"peer": x, "after": b"x" * 33, "limit": 16},
                    {"peer": x, "after": b"", "limit": 0},
                    {"peer": b"x" * 31, "after": b"", "limit": 16}):
            with pytest.raises(RpcError) as err:
                await conn.call("ListReserved", bad)
            assert err.value.code == "bad_request"
        assert await net.u.conns.call(net.p2.key, "Ping", {}, addr=net.p2.addr)

    await with_net(tmp_path, body)


async def test_a_mount_with_another_provider_moves_from_the_one_remembered(tmp_path):
    """U's state remembers P; mounted with P2 it moves its side there and then remembers
    P2, so the next mount has nothing to move. Fails before: nothing is remembered."""

    async def body(net: Net) -> None:
        settings = StateSettings(net.u.db)
        old = net.manager(net.p)
        await old.add(net.x.addr)
        await switch_providers(settings, net.u.conns, net.u.ledger, old.provider,
                               old.move_to_provider)
        assert settings.provider() == (net.p.key, net.p.addr)
        new = net.manager(net.p2)
        with trio.fail_after(5):
            await switch_providers(settings, net.u.conns, net.u.ledger, new.provider,
                                   new.move_to_provider)
        assert settings.provider() == (net.p2.key, net.p2.addr)
        assert net.x.ledger.live(net.u.key).store_at_id == net.p2.key
        assert not net.p.service.provider.book.reservation(net.u.key, net.x.key).live

    await with_net(tmp_path, body)


async def test_an_agreement_that_ended_at_the_old_provider_is_unreserved_there(tmp_path):
    """The old provider's client no longer runs: the handover forwards the end."""

    async def body(net: Net) -> None:
        await net.manager(net.p).add(net.x.addr)
        net.u.ledger.mark_ended(net.x.key)
        new = net.manager(net.p2)
        handover = Handover(net.u.conns, net.u.ledger, new.provider, (net.p.key, net.p.addr),
                            new.move_to_provider)
        assert await handover.move_all() == 0
        assert not net.p.service.provider.book.reservation(net.u.key, net.x.key).live
        assert net.u.ledger.get(net.x.key).reserved_at is None
        assert net.p2.service.provider.book.reservation(net.u.key, net.x.key) is None

    await with_net(tmp_path, body)
