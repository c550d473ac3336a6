"""Reconciliation (issue 19): an owner pages through what a host keeps for it
(``ListShards``) and deletes what it no longer references there; a host drops the shards
kept from an ended agreement a keep period after its end even when a new agreement with
the same owner followed, unless the owner re-claimed them meanwhile.

Owner and hosts are real peer services on 127.0.0.1 in this process, over real LMDB.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from inproc import LocalStore, PeerNode, peer_nodes

from fluidfs import keys
from fluidfs.blocks import merkle
from fluidfs.blocks.reconcile import ReconcilePolicy, Reconciler
from fluidfs.blocks.record import NO_HOLDER, StoredBlock
from fluidfs.blocks.remote import RemoteShards
from fluidfs.net.errors import RpcError
from fluidfs.net.messages import OPS
from fluidfs.peers.lifecycle import Lifecycle, LifecyclePolicy
from fluidfs.service.host import PeerService
from fluidfs.wire.schema import SchemaError

N = 4
RING = keys.KeyRing(keys.generate(shards_total=N, shards_needed=2))
MIB = 1 << 20


def random_shard(size: int) -> dict:
    data = os.urandom(size)
    return {"id": merkle.shard_id(data), "data": data}


async def store_raw(owner: PeerNode, host: PeerNode, count: int) -> list[bytes]:
    """*count* shards the owner stores on *host* outside any block record of its own."""
    shards = [random_shard(1000) for _ in range(count)]
    reply = await owner.conns.call(host.key, "StoreShard", {"shards": shards})
    assert len(reply["stored"]) == count
    return [s["id"] for s in shards]


async def listing(owner: PeerNode, host: PeerNode, limit: int) -> list[bytes]:
    found, after = [], b""
    while True:
        reply = await owner.conns.call(host.key, "ListShards", {"after": after, "limit": limit})
        found += reply["ids"]
        if not reply["more"]:
            return found
        after = reply["ids"][-1]


async def test_list_shards_pages_the_callers_own_shards_and_nothing_else(tmp_path: Path) -> None:
    async with peer_nodes(tmp_path, 3) as (nursery, (host, owner, other)):
        stranger = await PeerNode(tmp_path / "stranger").start(nursery, listen=False)
        try:
            owner.use(host)
            other.use(host)
            mine = await store_raw(owner, host, 7)
            await store_raw(other, host, 3)
            assert await listing(owner, host, 2) == sorted(mine), "ascending, in pages"
            assert await listing(owner, host, 1024) == sorted(mine)
            stranger.peers.add(host.key, host.addr)
            with pytest.raises(RpcError) as refused:
                await stranger.conns.call(host.key, "ListShards", {"after": b"", "limit": 5})
            assert refused.value.code == "no_agreement"
            nursery.cancel_scope.cancel()
        finally:
            stranger.close()


@pytest.mark.parametrize("args", [
    {"after": b"", "limit": 0},
    {"after": b"", "limit": 1025},
    {"after": b"x" * 33, "limit": 5},
    {"after": "text", "limit": 5},
    {"after": b"", "limit": True},
    {"after": b"", "limit": 5, "more": 1},
    {"limit": 5},
])
def test_hostile_list_requests_are_refused_by_the_schema(args: dict) -> None:
    with pytest.raises(SchemaError):
        OPS["ListShards"].request.parse(args)


@pytest.mark.parametrize("reply", [
    {"ids": [b"x" * 32] * 1025, "more": False},
    {"ids": [b"x" * 31], "more": False},
    {"ids": [], "more": 1},
])
def test_hostile_list_replies_are_refused_by_the_schema(reply: dict) -> None:
    with pytest.raises(SchemaError):
        OPS["ListShards"].response.parse(reply)


class ListsBackwardsOrForever(PeerService):
    """A host whose listings no honest host would give."""

    mode = "backwards"

    async def handle(self, peer_key: bytes, op: str, args: dict) -> dict:
        if op == "ListShards":
            if self.mode == "backwards":
                return {"ids": [b"\xff" * 32, b"\x01" * 32], "more": False}
            return {"ids": [os.urandom(32) for _ in range(args["limit"])], "more": True}
        return await super().handle(peer_key, op, args)


def owner_store(tmp_path: Path, owner: PeerNode) -> LocalStore:
    store = LocalStore(tmp_path / "state", RING)
    store.blocks.use_network(
        RemoteShards(owner.conns, owner.peers, owner.ledger, store.codec, store.limiter)
    )
    return store


async def upload(store: LocalStore) -> StoredBlock:
    data = os.urandom(3000)
    record, shards = store.codec.seal(data, store.codec.block_id(data))
    with store.db.write() as txn:
        store.blocks.save(txn, StoredBlock(record, 1, [NO_HOLDER] * N))
    await store.blocks.upload(record, shards)
    return store.blocks.load(record.block_id)


async def test_the_owner_deletes_only_what_it_no_longer_references(tmp_path: Path) -> None:
    """Before ListShards there was no way to find these: the surplus stayed forever."""
    async with peer_nodes(tmp_path, N) as (nursery, hosts):
        owner = await PeerNode(tmp_path / "owner", RING).start(nursery, listen=False)
        store = owner_store(tmp_path, owner)
        writer = [False]
        try:
            for host in hosts:
                owner.use(host)
            kept = [await upload(store) for _ in range(3)]
            host = hosts[0]
            holder = owner.peers.get(host.key).index
            surplus = await store_raw(owner, host, 5)
            in_flight = await store_raw(owner, host, 1)  # sent, not yet recorded
            store.blocks.collector.placing(holder, in_flight[0], 1000, os.urandom(32))
            referenced = set(host.shards.ids(owner.key)) - set(surplus) - set(in_flight)
            assert len(referenced) == 3
            usage = {h.key: owner.ledger.get(h.key).they_use for h in hosts}
            reconciler = Reconciler(store.blocks, store.blocks.remote,
                                    ReconcilePolicy(page=2), may_run=lambda: writer[0])

            assert await reconciler.cycle() == 0, "only the writer reconciles"
            assert set(host.shards.ids(owner.key)) >= set(surplus)

            writer[0] = True
            assert await reconciler.cycle() == 5
            assert set(host.shards.ids(owner.key)) == referenced | set(in_flight)
            for other in hosts[1:]:
                assert len(list(other.shards.ids(owner.key))) == 3
            assert {h.key: owner.ledger.get(h.key).they_use for h in hosts} == usage, (
                "surplus was never counted: deleting it gives nothing back"
            )
            for stored in kept:
                assert await store.blocks.rebuild(stored)
            nursery.cancel_scope.cancel()
        finally:
            store.close()
            owner.close()


@pytest.mark.parametrize("mode", ["backwards", "forever"])
async def test_a_host_listing_out_of_order_or_forever_costs_it_nothing_of_ours(
    tmp_path: Path, mode: str
) -> None:
    ListsBackwardsOrForever.mode = mode
    async with peer_nodes(tmp_path, N) as (nursery, hosts):
        liar = await PeerNode(tmp_path / "liar", service=ListsBackwardsOrForever).start(
            nursery
        )
        owner = await PeerNode(tmp_path / "owner", RING).start(nursery, listen=False)
        store = owner_store(tmp_path, owner)
        try:
            owner.use(liar)
            for host in hosts[:N - 1]:
                owner.use(host)
            stored = await upload(store)
            reconciler = Reconciler(store.blocks, store.blocks.remote,
                                    ReconcilePolicy(page=64, max_ids=256), may_run=lambda: True)
            with trio.fail_after(5):
                await reconciler.cycle()
            assert len(list(liar.shards.ids(owner.key))) == 1, "our shard there stays"
            assert await store.blocks.rebuild(stored)
            nursery.cancel_scope.cancel()
        finally:
            store.close()
            owner.close()
            liar.close()


async def test_shards_from_an_ended_agreement_go_after_the_keep_period_unless_reclaimed(
    tmp_path: Path,
) -> None:
    """Before, a new agreement made the host keep them forever."""
    async with peer_nodes(tmp_path, 2) as (nursery, (host, owner)):
        owner.use(host)
        old = await store_raw(owner, host, 4)
        host.ledger.mark_ended(owner.key, notified=True)
        host.ledger.get(owner.key).ended_at -= 100  # it ended 100 s ago
        reply = await owner.conns.call(
            host.key, "ProposeAgreement", {"offer": 2 * MIB, "ask": 2 * MIB, "term": 3600}
        )
        assert reply["accepted"]
        new = await store_raw(owner, host, 2)
        await owner.conns.call(host.key, "AuditShard",
                               {"id": old[0], "leaf": 0, "nonce": os.urandom(32)})
        await owner.conns.call(host.key, "RetrieveShard", {"id": old[1]})
        lifecycle = Lifecycle(host.conns, host.ledger, host.shards, trio.CapacityLimiter(2),
                              LifecyclePolicy(keep=150), on_end=lambda _k: None, records=None)
        await lifecycle.tick()
        assert len(list(host.shards.ids(owner.key))) == 6, "within the keep period: kept"
        lifecycle.policy.keep = 50
        await lifecycle.tick()
        assert set(host.shards.ids(owner.key)) == {old[0], old[1], *new}, (
            "unclaimed ones dropped; re-claimed and new ones kept"
        )
        assert host.shards.used(owner.key) == 4 * 1000
        assert host.ledger.get(owner.key).unclaimed_since is None
        assert host.ledger.get(owner.key).active
        nursery.cancel_scope.cancel()
