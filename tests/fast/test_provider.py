"""Storage providers (issue 13, docs/federation.md): a provider P holds a user U's side of
its agreements, so U's partner X stores, audits and reads U's side at P while U is away.

Real parts in-process: P, U and X are ``PeerNode``s (real services, real LMDB, real
loopback sockets); U's side is the real ``PeerManager`` with a ``ProviderClient``. U does
not listen at all in these tests: whatever X gets for U comes from P.
"""

from __future__ import annotations

import os

import pytest
import trio
from inproc import room_left, until
from providernet import SIZE, ProviderNet, shard

from fluidfs.blocks import merkle
from fluidfs.cli.main import main as fluidfs_main
from fluidfs.diskspace import PEER_RESERVE
from fluidfs.keys import encode_peer_id
from fluidfs.net.errors import RpcError
from fluidfs.peers.agreements import MIB
from fluidfs.peers.manager import PeerManager
from fluidfs.peers.provider import ProviderClient
from fluidfs.peers.rootrecord import RecordClient, seal
from fluidfs.store.accounts import AccountBook, holder_key
from fluidfs.store.db import META_TABLES, Database

SHARD = 200_000


class Net(ProviderNet):
    """P (provider), U (customer, offline: it never listens), X and Y (peers)."""

    def __init__(self, tmp_path) -> None:
        super().__init__(tmp_path, providers=["p"], partners=["x", "y"])
        (self.p,), (self.x, self.y) = self.providers, self.partners
        self.book: AccountBook = self.p.service.provider.book
        self.client: ProviderClient | None = None
        self.manager: PeerManager | None = None

    async def start(self, nursery: trio.Nursery) -> None:
        await super().start(nursery)
        self.client = self.client_at(self.p)
        self.manager = self.manager_for(self.client)


async def with_net(tmp_path, body) -> None:
    await Net(tmp_path).run(body)


async def test_a_partner_stores_audits_and_reads_the_users_side_at_the_provider(tmp_path):
    """U reserves at P, proposes to X with store_at; X's stores, audits and reads of U's
    side reach P (U never listens) and pass. Fails before issue 13: X sends them to U."""

    async def body(net: Net) -> None:
        net.book.add(net.u.key, 64 * MIB)
        key, agreed = await net.manager.add(net.x.addr)
        assert (key, agreed) == (net.x.key, True)
        at_x = net.x.ledger.live(net.u.key)
        assert (at_x.store_at_id, at_x.store_at) == (net.p.key, net.p.addr)
        assert net.u.ledger.live(net.x.key).reserved_at == net.p.key
        reservation = net.book.reservation(net.u.key, net.x.key)
        assert reservation.live and reservation.size == SIZE

        sid, data = shard(SHARD)
        reply = await net.x.conns.call(net.u.key, "StoreShard",
                                       {"shards": [{"id": sid, "data": data}]})
        assert reply == {"stored": [sid], "refused": []}
        assert net.p.shards.get(holder_key(net.u.key, net.x.key), sid) == data
        assert net.p.shards.get(net.x.key, sid) is None  # not under X's own name
        assert net.u.shards.get(net.x.key, sid) is None  # U holds nothing itself

        got = await net.x.conns.call(net.u.key, "RetrieveShard", {"id": sid})
        assert got["data"] == data
        leaf = merkle.leaf_count(len(data)) - 1
        proof = await net.x.conns.call(net.u.key, "AuditShard",
                                       {"id": sid, "leaf": leaf, "nonce": os.urandom(32)})
        assert merkle.verify(sid, len(data), leaf, proof["leaf_data"], proof["path"])
        figures = net.p.service.provider.figures()
        assert figures == {"customers": 1, "reservations": 1, "reserved_bytes": SIZE,
                           "held_bytes": len(data)}
        deleted = await net.x.conns.call(net.u.key, "DeleteShard", {"ids": [sid, sid]})
        assert deleted == {"deleted": 1}
        assert net.p.shards.used(holder_key(net.u.key, net.x.key)) == 0

    await with_net(tmp_path, body)


async def test_the_provider_refuses_shards_outside_a_live_reservation(tmp_path):
    """No reservation, more than its size, or after it was removed: refused; what it held
    is still served for the keep period, then dropped."""

    async def body(net: Net) -> None:
        net.book.add(net.u.key, 64 * MIB)
        await net.manager.add(net.x.addr)
        u = net.u.key
        sid, data = shard(SHARD)

        # Y has no reservation from U (a stranger's frames are small: a small shard).
        tiny_id, tiny = shard(size=1000)
        with pytest.raises(RpcError) as err:
            await net.y.conns.call(net.p.key, "StoreShard",
                                   {"shards": [{"id": tiny_id, "data": tiny}], "for": u},
                                   addr=net.p.addr)
        assert err.value.code == "no_agreement"

        # Over the reservation's size: the rest is refused, shard by shard.
        net.book.reserve(u, net.x.key, 300_000)
        sid2, data2 = shard(SHARD)
        reply = await net.x.conns.call(u, "StoreShard", {"shards": [
            {"id": sid, "data": data}, {"id": sid2, "data": data2}]})
        assert reply["stored"] == [sid]
        assert reply["refused"] == [{"id": sid2, "code": "over_quota"}]

        # Removed: no more stores, but reads and audits go on for the keep period.
        await net.client.unreserve(net.x.key)
        assert not net.book.reservation(u, net.x.key).live
        with pytest.raises(RpcError) as err:
            await net.x.conns.call(u, "StoreShard", {"shards": [{"id": sid2, "data": data2}]})
        assert err.value.code == "no_agreement"
        assert (await net.x.conns.call(u, "RetrieveShard", {"id": sid}))["data"] == data

        provider = net.p.service.provider
        assert await provider.expire() == 0  # within the keep period
        provider.keep = -1.0
        assert await provider.expire() == 1
        assert net.p.shards.get(holder_key(u, net.x.key), sid) is None
        with pytest.raises(RpcError) as err:
            await net.x.conns.call(u, "RetrieveShard", {"id": sid})
        assert err.value.code == "no_agreement"

    await with_net(tmp_path, body)


async def test_only_admitted_customers_reserve_and_only_within_their_quota(tmp_path):
    """Hostile Reserve/Unreserve: strangers, sizes past the quota, zero, and reservations
    naming the customer or the provider itself are refused; the node keeps serving."""

    async def body(net: Net) -> None:
        stranger = net.y
        for op, args in (("Reserve", {"peer": net.x.key, "size": SIZE}),
                         ("Unreserve", {"peer": net.x.key})):
            with pytest.raises(RpcError) as err:
                await stranger.conns.call(net.p.key, op, args, addr=net.p.addr)
            assert err.value.code == "refused"
        assert not await net.client.reserve(net.x.key, SIZE)  # U not admitted yet
        assert net.book.reservations() == []

        net.book.add(net.u.key, 10 * MIB)
        assert await net.client.reserve(net.x.key, 6 * MIB)
        assert not await net.client.reserve(net.y.key, 6 * MIB)  # 12 MiB > quota
        assert await net.client.reserve(net.y.key, 4 * MIB)
        assert await net.client.reserve(net.x.key, 5 * MIB)  # a resize within the quota
        for bad in ({"peer": net.u.key, "size": MIB}, {"peer": net.p.key, "size": MIB},
                    {"peer": net.x.key, "size": 0}):
            with pytest.raises(RpcError) as err:
                await net.u.conns.call(net.p.key, "Reserve", bad, addr=net.p.addr)
            assert err.value.code == "bad_request"
        for bad in ({"peer": b"x" * 31, "size": MIB}, {"peer": net.x.key, "size": -1},
                    {"peer": net.x.key, "size": MIB, "extra": 1}):
            conn = await net.u.conns.get(net.p.key, net.p.addr)
            conn.ops = {}  # no client-side checks: the provider must refuse
            with pytest.raises(RpcError) as err:
                await conn.call("Reserve", bad)
            assert err.value.code == "bad_request"
        assert await net.u.conns.call(net.p.key, "Ping", {}, addr=net.p.addr)

        # Shard ops "for" a customer, sent to a node that is no provider.
        sid, data = shard(size=1000)
        with pytest.raises(RpcError) as err:
            await net.u.conns.call(net.x.key, "StoreShard",
                                   {"shards": [{"id": sid, "data": data}], "for": net.y.key},
                                   addr=net.x.addr)
        assert err.value.code == "refused"

    await with_net(tmp_path, body)


async def test_a_refused_proposal_or_an_ended_agreement_removes_the_reservation(tmp_path):
    """The seed: a refused proposal is followed by a reservation removal, and an ended
    agreement is forwarded as one."""

    async def body(net: Net) -> None:
        net.book.add(net.u.key, 64 * MIB)
        net.manager.agreement_size = MIB // 2  # below X's minimum terms: X declines
        assert (await net.manager.add(net.x.addr))[1] is False
        assert not net.book.reservation(net.u.key, net.x.key).live

        net.manager.agreement_size = SIZE
        assert (await net.manager.add(net.y.addr))[1] is True
        assert net.book.reservation(net.u.key, net.y.key).live
        net.u.ledger.mark_ended(net.y.key)
        await net.client.check()
        assert not net.book.reservation(net.u.key, net.y.key).live
        assert net.u.ledger.get(net.y.key).reserved_at is None
        assert net.client.status()["reachable"] is True

        # X counter-proposes less than offered (its per-peer cap, a 16th of its
        # donation): the reservation shrinks to what was granted.
        net.book.add(net.u.key, 1 << 30)
        net.manager.agreement_size = 128 * MIB
        assert (await net.manager.add(net.x.addr))[1] is True
        granted = net.u.ledger.live(net.x.key).we_host
        assert granted < 128 * MIB
        assert net.book.reservation(net.u.key, net.x.key).size == granted

    await with_net(tmp_path, body)


async def test_a_user_with_a_provider_declines_proposals_it_would_host_itself(tmp_path):
    """U's laptop goes offline: hosting a proposer's shards there would break its promise,
    so U declines (and proposes itself, with store_at)."""

    async def body(net: Net) -> None:
        await net.u.conns.connect(net.x.addr)  # U does not listen: X calls back on this
        await until(lambda: net.u.key in net.x.conns.conns, what="X seeing U's connection")
        reply = await net.x.conns.call(net.u.key, "ProposeAgreement",
                                       {"offer": SIZE, "ask": SIZE, "term": 3600})
        assert reply["accepted"] is False and "storage provider" in reply["reason"]
        assert net.u.ledger.get(net.x.key) is None

    await with_net(tmp_path, body)


async def test_status_says_loudly_when_the_provider_does_not_answer(tmp_path):
    async def body(net: Net) -> None:
        gone = ProviderClient(net.u.conns, net.u.ledger, net.y.key, "127.0.0.1:9")

        async def report(_request: dict) -> dict:
            return {"overview": {"warnings": []}}

        await gone.check()
        reply = await gone.with_status(report)({})
        assert reply["provider"]["reachable"] is False
        assert "does not answer" in reply["overview"]["warnings"][0]["text"]
        net.book.add(net.u.key, 64 * MIB)  # an admitted customer: nothing to warn of
        await net.client.check()
        reply = await net.client.with_status(report)({})
        assert reply["provider"]["reachable"] is True and not reply["overview"]["warnings"]

    await with_net(tmp_path, body)


async def test_status_shows_our_quota_there_and_says_when_we_are_not_admitted(tmp_path):
    """U's status shows its quota at P and the bytes P holds for it (issue 13 item 6);
    a P that does not know U as a customer is a warning; only a customer may ask P for
    its account. Fails before: status had no quota, and no word on admission."""

    async def body(net: Net) -> None:
        async def report(_request: dict) -> dict:
            return {"overview": {"warnings": []}}

        await net.client.check()
        reply = await net.client.with_status(report)({})
        assert reply["provider"]["reachable"] is True
        assert reply["provider"]["quota"] is None
        assert reply["provider"]["account_error"] == "refused"
        [warning] = reply["overview"]["warnings"]
        assert "does not know this node as a customer" in warning["text"]

        net.book.add(net.u.key, 64 * MIB)
        await net.manager.add(net.x.addr)
        sid, data = shard(SHARD)
        await net.x.conns.call(net.u.key, "StoreShard", {"shards": [{"id": sid, "data": data}]})
        await net.client.check()
        reply = await net.client.with_status(report)({})
        shown = reply["provider"]
        assert (shown["quota"], shown["held_bytes"], shown["account_error"]) == (
            64 * MIB, len(data), "")
        assert not reply["overview"]["warnings"]
        with pytest.raises(RpcError) as err:
            await net.y.conns.call(net.p.key, "Account", {}, addr=net.p.addr)
        assert err.value.code == "refused"

    await with_net(tmp_path, body)


async def test_a_user_whose_provider_is_gone_takes_its_side_back_home(tmp_path):
    """P stops answering for longer than give_up: U renews with X without store_at, and
    X's shard ops come to U again. Fails before: U's side stayed at the vanished P."""

    async def body(net: Net) -> None:
        net.book.add(net.u.key, 64 * MIB)
        await net.manager.add(net.x.addr)
        gone = ProviderClient(net.u.conns, net.u.ledger, net.p.key, "127.0.0.1:9",
                              give_up=0.0)
        net.u.conns.drop(net.p.key, even_if_answering=True)  # P vanished: a dead address left
        for _ in range(8):  # X's audits of U failed meanwhile: trust below the floor
            net.x.peers.record(net.u.key, False)
        await gone.check(net.manager.take_back)
        assert gone.status()["taken_back"] == 1 and gone.reachable is False
        assert net.x.ledger.live(net.u.key).store_at_id is None
        assert net.u.ledger.live(net.x.key).reserved_at is None

        sid, data = shard(SHARD)
        reply = await net.x.conns.call(net.u.key, "StoreShard",
                                       {"shards": [{"id": sid, "data": data}]})
        assert reply["stored"] == [sid]
        assert net.u.shards.get(net.x.key, sid) == data  # U holds its side itself now

    await with_net(tmp_path, body)


async def test_a_proposal_with_a_bad_store_at_is_declined(tmp_path):
    """store_at naming the acceptor itself, or an address no one can dial, is refused."""

    async def body(net: Net) -> None:
        conn = await net.u.conns.connect(net.x.addr)
        base = {"offer": SIZE, "ask": SIZE, "term": 3600}
        for where in ({"id": net.x.key, "addr": net.p.addr},
                      {"id": net.u.key, "addr": net.p.addr},
                      {"id": net.p.key, "addr": "not an address"}):
            reply = await conn.call("ProposeAgreement", {**base, "store_at": where})
            assert reply["accepted"] is False
        assert net.x.ledger.get(net.u.key) is None

    await with_net(tmp_path, body)


def test_the_operator_admits_lists_and_removes_customers(tmp_path, capsys):
    """`fluidfs provider add|list|remove` writes the accounts a provider node reads."""
    state = tmp_path / "state"
    Database(state / "meta.lmdb", META_TABLES).close()  # a provider's state directory
    customer = encode_peer_id(b"\x07" * 32)
    fluidfs_main(["provider", "add", customer, "--quota", "200G", "--state-dir", str(state)])
    fluidfs_main(["provider", "list", "--json", "--state-dir", str(state)])
    assert f'"quota": {200 << 30}' in capsys.readouterr().out
    db = Database(state / "meta.lmdb", META_TABLES)
    book = AccountBook(db)
    assert book.account(b"\x07" * 32).quota == 200 << 30
    book.reserve(b"\x07" * 32, b"\x08" * 32, 1 << 30)
    db.close()
    fluidfs_main(["provider", "remove", customer, "--state-dir", str(state)])
    db = Database(state / "meta.lmdb", META_TABLES)
    book = AccountBook(db)
    assert book.account(b"\x07" * 32) is None
    assert not book.reservation(b"\x07" * 32, b"\x08" * 32).live  # kept, removed
    db.close()
    with pytest.raises(SystemExit) as exit_:
        fluidfs_main(["provider", "add", customer, "--state-dir", str(state)])
    assert exit_.value.code == 2


async def test_a_partners_records_are_kept_and_served_by_the_provider(tmp_path):
    """X's root pointer and writer lease, which U keeps for X, go to P under U's
    reservation and are served there while U is away (U never listens): a put, a
    compare-and-swap renewal and a read. Fails before: X sends them to U, unreachable."""

    async def body(net: Net) -> None:
        net.book.add(net.u.key, 64 * MIB)
        await net.manager.add(net.x.addr)
        u, x = net.u.key, net.x
        x.conns.drop(u, even_if_answering=True)  # U goes away
        records = RecordClient(x.keyring, x.conns, x.peers)
        root = seal(x.keyring, "root", 5, {"peers": []})
        assert (await records.put_each("root", root, [u]))[u].stored
        first = seal(x.keyring, "lease", 1, {"state": "held"}, fence=1)
        assert (await records.put_each("lease", first, [u], {u: 0}))[u].stored
        renewal = seal(x.keyring, "lease", 2, {"state": "held"}, fence=1)
        stale = await records.put_each("lease", renewal, [u], {u: 7})  # wrong expect
        assert not stale[u].stored and stale[u].held.seq == 1
        assert (await records.put_each("lease", renewal, [u], {u: 1}))[u].stored
        held = await records.read_each("lease", [u])
        assert held[u].seq == 2 and held[u].fence == 1
        assert (await records.read_each("root", [u]))[u].seq == 5
        holder = holder_key(u, x.key)
        kept = net.p.service.provider.records
        assert kept.get(holder, "root") == root and kept.get(holder, "lease") == renewal
        assert net.p.records.get(x.key, "root") is None  # not under X's own name
        assert net.u.records.get(x.key, "root") is None  # U holds nothing itself

        # Removed: no new records, the held ones served for the keep period, then gone.
        await net.client.unreserve(x.key)
        later = seal(x.keyring, "root", 6, {"peers": []})
        with pytest.raises(RpcError) as err:
            await x.conns.call(u, "PutRecord", {"record": later})
        assert err.value.code == "no_agreement"
        assert (await records.read_each("root", [u]))[u].seq == 5
        provider = net.p.service.provider
        provider.keep = -1.0
        assert await provider.expire() == 1
        assert kept.get(holder, "root") is None and kept.get(holder, "lease") is None

    await with_net(tmp_path, body)


async def test_the_provider_refuses_records_outside_a_reservation_or_not_the_callers(tmp_path):
    """Hostile PutRecord/GetRecord "for" a customer: a caller without a reservation, a
    record of someone else, a forged signature, a malformed record, an unknown kind, and
    records "for" someone sent to a node that is no provider. The provider keeps serving."""

    async def body(net: Net) -> None:
        net.book.add(net.u.key, 64 * MIB)
        await net.manager.add(net.x.addr)
        u, x, y = net.u.key, net.x, net.y
        to_p = {"addr": net.p.addr}

        own = seal(y.keyring, "root", 1, {"peers": []})
        with pytest.raises(RpcError) as err:  # Y holds no reservation from U
            await y.conns.call(net.p.key, "PutRecord", {"record": own, "for": u}, **to_p)
        assert err.value.code == "no_agreement"
        with pytest.raises(RpcError) as err:
            await y.conns.call(net.p.key, "GetRecord", {"kind": "root", "for": u}, **to_p)
        assert err.value.code == "no_agreement"

        forged = bytearray(seal(x.keyring, "root", 1, {"peers": []}))
        forged[-1] ^= 1  # the signature's last byte
        for record in (own, bytes(forged), b"\xa0", b"not cbor"):
            with pytest.raises(RpcError) as err:
                await x.conns.call(u, "PutRecord", {"record": record})
            assert err.value.code == "bad_request"
        with pytest.raises(RpcError) as err:
            await x.conns.call(u, "GetRecord", {"kind": "other"})
        assert err.value.code == "not_found"
        with pytest.raises(RpcError) as err:  # a record "for" U at X, which is no provider
            await y.conns.call(x.key, "PutRecord", {"record": own, "for": u}, addr=x.addr)
        assert err.value.code == "refused"
        assert net.p.service.provider.records.owners() == set()
        assert await x.conns.call(u, "PutRecord",
                                  {"record": seal(x.keyring, "root", 1, {"peers": []})})

    await with_net(tmp_path, body)


async def test_peers_on_a_provider_lists_its_customers_with_their_reservations(tmp_path):
    """`fluidfs peers` on P (its control handler): every customer with its quota, live
    reservations and bytes reserved and held, also on the customer's own peer row."""

    async def body(net: Net) -> None:
        net.book.add(net.u.key, 64 * MIB)
        net.book.add(net.y.key, 8 * MIB)  # admitted, nothing reserved yet
        await net.manager.add(net.x.addr)
        sid, data = shard()
        await net.x.conns.call(net.u.key, "StoreShard", {"shards": [{"id": sid, "data": data}]})
        u_id, x_id = encode_peer_id(net.u.key), encode_peer_id(net.x.key)

        async def node_peers(_request: dict) -> dict:  # rows as handlers.py makes them
            return {"peers": [{"id": u_id}, {"id": x_id}]}

        reply = await net.p.service.provider.with_peers(node_peers)({})
        by_id = {c["id"]: c for c in reply["customers"]}
        assert by_id[u_id] == {"id": u_id, "quota": 64 * MIB, "reservations": 1,
                               "reserved_bytes": SIZE, "held_bytes": len(data)}
        assert by_id[encode_peer_id(net.y.key)]["reservations"] == 0
        rows = {row["id"]: row for row in reply["peers"]}
        assert rows[u_id]["customer"] == by_id[u_id]
        assert rows[x_id]["customer"] is None  # stores under U's reservation, no customer

    await with_net(tmp_path, body)


async def test_reservations_promise_no_more_than_the_providers_disk_holds(tmp_path):
    """The operator granted a 100 MiB quota, but the provider's disk has 8 MiB of room
    above PEER_RESERVE: reservations past that room are refused (over_quota), a shrink
    or a resize within it still goes, and a reservation filled by its shards no longer
    counts as unfilled. Fails on the old code: only the quota bounded a Reserve."""

    async def body(net: Net) -> None:
        net.book.add(net.u.key, 100 * MIB)
        shards = net.p.service.provider.shards
        with room_left(shards.data_file, PEER_RESERVE + 8 * MIB):
            assert await net.client.reserve(net.x.key, 6 * MIB)
            with pytest.raises(RpcError) as err:
                await net.u.conns.call(net.p.key, "Reserve",
                                       {"peer": net.y.key, "size": 6 * MIB}, addr=net.p.addr)
            assert err.value.code == "over_quota"
            assert "disk" in str(err.value)
            assert not await net.client.reserve(net.x.key, 12 * MIB)  # growth past the disk
            assert await net.client.reserve(net.y.key, MIB)  # what is left still goes
            assert await net.client.reserve(net.x.key, 4 * MIB)  # a shrink frees room
            assert await net.client.reserve(net.y.key, 3 * MIB)
        assert {r.peer: r.size for r in net.book.reservations(net.u.key)} == {
            net.x.key: 4 * MIB, net.y.key: 3 * MIB}
        assert await net.p.conns.call(net.p.key, "Ping", {}, addr=net.p.addr) is not None

    await with_net(tmp_path, body)
