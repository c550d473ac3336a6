"""A partner's records follow a moved side (issue 13, docs/federation.md): the root
pointer and writer lease U keeps for X at its provider are copied along with X's shards
when U switches providers or brings its side home, checked as any record from a peer.

Real parts in-process: providers, U and X are ``PeerNode``s (real services, real LMDB,
real loopback sockets, real record stores); U's side moves with the real ``Handover`` and
``Homecoming``.
"""

from __future__ import annotations

import pytest
import trio
from providernet import ProviderNet

from fluidfs.net.errors import RpcError
from fluidfs.peers.agreements import MIB
from fluidfs.peers.handover import Handover
from fluidfs.peers.homecoming import Homecoming, LocalSide
from fluidfs.peers.manager import PeerManager
from fluidfs.peers.rootrecord import seal
from fluidfs.store.accounts import holder_key


class Net(ProviderNet):
    """P (where U's side is), P2 (where it may move), U (customer), X and Y (partners)."""

    def __init__(self, tmp_path) -> None:
        super().__init__(tmp_path, providers=["p", "p2"], partners=["x", "y"])
        (self.p, self.p2), (self.x, self.y) = self.providers, self.partners

    async def start(self, nursery: trio.Nursery) -> None:
        await super().start(nursery)
        for provider in (self.p, self.p2):
            provider.service.provider.book.add(self.u.key, 64 * MIB)
        self.at_p = self.manager_for(self.client_at(self.p))
        await self.at_p.add(self.x.addr)

    async def publish(self, kind: str, seq: int, fence: int = 1) -> bytes:
        """X puts a record of *kind* at U (wherever U's side is held); its bytes."""
        raw = seal(self.x.keyring, kind, seq, {"state": "held"}, fence=fence)
        reply = await self.x.conns.call(self.u.key, "PutRecord", {"record": raw})
        assert reply["stored"]
        return raw

    async def held_at_u(self, kind: str) -> bytes:
        """X's GetRecord of *kind* at U (wherever U's side is held now)."""
        return (await self.x.conns.call(self.u.key, "GetRecord", {"kind": kind}))["record"]


async def with_net(tmp_path, body) -> None:
    await Net(tmp_path).run(body)


async def test_a_switch_of_providers_takes_the_partners_records_along(tmp_path):
    """X's root pointer and lease, kept for it at P, are at P2 once U's side moved there,
    the lease X renewed at P between the copy and the renewal included. Fails before:
    X's GetRecord at P2 is not_found until X publishes again."""

    async def body(net: Net) -> None:
        root = await net.publish("root", 5)
        await net.publish("lease", 1)
        new = net.manager_for(net.client_at(net.p2))
        renewed_lease = b""

        async def renew_after_a_lease_renewal(peer: bytes) -> bool:
            nonlocal renewed_lease
            renewed_lease = await net.publish("lease", 2)  # at P, after the first copy
            return await new.move_to_provider(peer)

        handover = Handover(net.u.conns, net.u.ledger, new.provider, (net.p.key, net.p.addr),
                            renew_after_a_lease_renewal)
        with trio.fail_after(5):
            await handover.run()
        assert net.x.ledger.live(net.u.key).store_at_id == net.p2.key
        assert await net.held_at_u("root") == root  # from P2 now
        assert await net.held_at_u("lease") == renewed_lease
        kept = net.p2.service.provider.records
        assert kept.get(holder_key(net.u.key, net.x.key), "lease") == renewed_lease
        # X's lease renewal goes on from what it last held, at P2 (compare-and-swap).
        third = seal(net.x.keyring, "lease", 3, {"state": "held"}, fence=1)
        reply = await net.x.conns.call(net.u.key, "PutRecord", {"record": third, "expect": 2})
        assert reply["stored"]

    await with_net(tmp_path, body)


async def test_a_side_coming_home_takes_the_partners_records_along(tmp_path):
    """Mounted without a provider, U brings X's records home with its shards: X reads
    them from U itself afterwards. Fails before: not_found at U."""

    async def body(net: Net) -> None:
        root = await net.publish("root", 5)
        lease = await net.publish("lease", 1)
        alone = PeerManager(net.u.conns, net.u.peers, net.u.ledger, donate=1 << 30,
                            agreement_size=4 * MIB)
        home = LocalSide(net.u.shards, net.u.ledger, 1 << 30, net.u.key,
                         trio.CapacityLimiter(2), net.u.records)
        homecoming = Homecoming(net.u.conns, net.u.ledger, home, (net.p.key, net.p.addr),
                                alone.take_back)
        async with trio.open_nursery() as nursery:  # a side held at home must be reachable
            await nursery.start(net.u.conns.serve, "127.0.0.1", 0)
            with trio.fail_after(5):
                assert await homecoming.move_all() == 1
            assert net.x.ledger.live(net.u.key).store_at_id is None
            assert net.u.records.get(net.x.key, "root") == root
            assert await net.held_at_u("root") == root  # from U itself now
            assert await net.held_at_u("lease") == lease
            nursery.cancel_scope.cancel()

    await with_net(tmp_path, body)


async def test_a_moved_record_never_replaces_a_newer_one_nor_comes_from_anyone_else(
        tmp_path):
    """P holds an older lease of X than P2 already does, a root record of Y and one
    with a broken signature under U's reservation for X (a hostile or confused P): the
    handover keeps P2's newer lease and plants neither of the others; the move itself
    goes on. Fails before: there is no copy of records (and with the owner and
    signature checks taken out, the forged and Y's records are planted at P2)."""

    async def body(net: Net) -> None:
        holder = holder_key(net.u.key, net.x.key)
        old_records = net.p.service.provider.records
        await net.publish("lease", 1)
        forged = bytearray(seal(net.x.keyring, "root", 9, {"peers": []}, fence=1))
        forged[-1] ^= 1
        old_records.put(holder, "root", bytes(forged))
        new = net.manager_for(net.client_at(net.p2))
        assert await new.provider.reserve(net.x.key, 4 * MIB)
        newer = seal(net.x.keyring, "lease", 4, {"state": "held"}, fence=1)
        new_records = net.p2.service.provider.records
        new_records.put(holder, "lease", newer)
        handover = Handover(net.u.conns, net.u.ledger, new.provider, (net.p.key, net.p.addr),
                            new.move_to_provider)
        with trio.fail_after(5):
            assert await handover.copy_records(net.x.key) == 0
        assert new_records.get(holder, "lease") == newer
        assert new_records.get(holder, "root") is None
        old_records.put(holder, "root", seal(net.y.keyring, "root", 9, {"peers": []}))
        with trio.fail_after(5):
            assert await handover.move_all() == 1  # the bad records hold nothing up
        assert new_records.get(holder, "lease") == newer
        assert new_records.get(holder, "root") is None

    await with_net(tmp_path, body)


async def test_only_the_customer_fetches_and_stores_records_under_its_reservations(tmp_path):
    """Hostile FetchReservedRecord / StoreReservedRecord: a non-customer is refused, no
    reservation is no_agreement, a record not the partner's own, a forged one or
    garbage is bad_request, an older one or one under a lower fence is not stored, an
    unknown kind not_found; the provider keeps serving."""

    async def body(net: Net) -> None:
        u, x = net.u.key, net.x.key
        to_p2 = {"addr": net.p2.addr}
        own = seal(net.x.keyring, "root", 5, {"peers": []}, fence=2)
        for op, args in (("FetchReservedRecord", {"peer": x, "kind": "root"}),
                         ("StoreReservedRecord", {"peer": x, "record": own})):
            with pytest.raises(RpcError) as err:  # X is no customer of P2
                await net.x.conns.call(net.p2.key, op, args, **to_p2)
            assert err.value.code == "refused"
            with pytest.raises(RpcError) as err:  # no reservation for X at P2 yet
                await net.u.conns.call(net.p2.key, op, args, **to_p2)
            assert err.value.code == "no_agreement"

        net.p2.service.provider.book.reserve(u, x, MIB)
        forged = bytearray(own)
        forged[-1] ^= 1
        for record in (seal(net.y.keyring, "root", 5, {"peers": []}), bytes(forged),
                       b"\xa0", b"not cbor"):
            with pytest.raises(RpcError) as err:
                await net.u.conns.call(net.p2.key, "StoreReservedRecord",
                                       {"peer": x, "record": record}, **to_p2)
            assert err.value.code == "bad_request"
        store = {"peer": x, "record": own}
        assert (await net.u.conns.call(net.p2.key, "StoreReservedRecord", store, **to_p2)
                )["stored"]
        for stale in (seal(net.x.keyring, "root", 4, {"peers": []}, fence=2),  # older
                      seal(net.x.keyring, "root", 6, {"peers": []}, fence=1)):  # fenced out
            reply = await net.u.conns.call(net.p2.key, "StoreReservedRecord",
                                           {"peer": x, "record": stale}, **to_p2)
            assert reply == {"stored": False, "seq": 5}
        got = await net.u.conns.call(net.p2.key, "FetchReservedRecord",
                                     {"peer": x, "kind": "root"}, **to_p2)
        assert got["record"] == own
        for kind in ("lease", "other"):
            with pytest.raises(RpcError) as err:
                await net.u.conns.call(net.p2.key, "FetchReservedRecord",
                                       {"peer": x, "kind": kind}, **to_p2)
            assert err.value.code == "not_found"
        conn = await net.u.conns.get(net.p2.key, net.p2.addr)
        conn.ops = {}  # no client-side checks: the provider must refuse
        for bad in ({"peer": x, "kind": ""}, {"peer": b"x" * 31, "kind": "root"},
                    {"peer": x, "kind": "k" * 17}):
            with pytest.raises(RpcError) as err:
                await conn.call("FetchReservedRecord", bad)
            assert err.value.code == "bad_request"
        with pytest.raises(RpcError) as err:
            await conn.call("StoreReservedRecord", {"peer": x, "record": b"r" * (65 * 1024)})
        assert err.value.code == "bad_request"
        assert await net.u.conns.call(net.p2.key, "Ping", {}, **to_p2)

    await with_net(tmp_path, body)
