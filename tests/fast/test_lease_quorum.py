"""The quorum lease and its fence (peers/lease.py, service/records.py): races, partitions,
stale writers, and waiting out a holder that does not answer.

Machines a and b of one keyfile keep their lease on three real peer services in this
process. A partition is made by peers that stop answering one machine (their service
takes its requests and never replies), on the virtual clock, so waiting out a lease's
bound is a few jumps of it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from inproc import PeerNode, peer_nodes, slow_jump_clock

from fluidfs import keys
from fluidfs.net.errors import RpcError
from fluidfs.peers.lease import LeaseHeld, Renewal, WriterLease, margin
from fluidfs.peers.rootrecord import RecordClient, parse, seal

RENEW = 1.0
DEAD = "127.0.0.1:9"  # nothing listens there: connections are refused at once


@dataclass
class Machine:
    node: PeerNode
    lease: WriterLease
    nursery: trio.Nursery


@asynccontextmanager
async def machines(
    tmp_path: Path, *, peers: int = 3
) -> AsyncIterator[tuple[Machine, Machine, list[PeerNode]]]:
    ring = keys.KeyRing(keys.generate())
    async with peer_nodes(tmp_path, peers) as (nursery, hosts):
        made = []
        for name in ("a", "b"):
            node = await PeerNode(tmp_path / name, ring).start(nursery, listen=False)
            for host in hosts:
                node.use(host)
            client = RecordClient(ring, node.conns, node.peers)
            lease = WriterLease(client, name.encode() * 16, f"/mnt/{name}", renew=RENEW)
            made.append(Machine(node, lease, nursery))
        try:
            yield made[0], made[1], hosts
        finally:
            nursery.cancel_scope.cancel()
            for m in made:
                m.node.close()


def partition(hosts: list[PeerNode], machine: Machine) -> None:
    """*machine* can no longer reach *hosts* (both machines have the keyfile's identity,
    so the cut is on the machine's side: the hosts' addresses go dead for it)."""
    for host in hosts:
        machine.node.peers.add(host.key, DEAD)
        machine.node.conns.drop(host.key, even_if_answering=True)


def heal(hosts: list[PeerNode], machine: Machine) -> None:
    for host in hosts:
        machine.node.peers.add(host.key, host.addr)


@pytest.fixture
def clock():
    return slow_jump_clock()


async def test_two_mounts_taking_the_lease_at_once_do_not_both_get_it(tmp_path: Path) -> None:
    """Both look (no lease yet), then both write seq 1: each peer keeps one of the two by
    compare-and-swap, so only one has a majority. Before, both went ahead as the writer
    (each peer kept whichever came first, and neither counted)."""
    async with machines(tmp_path) as (a, b, _):
        outcomes: dict[str, str] = {}

        async def take(machine: Machine, name: str) -> None:
            try:
                await machine.lease.acquire(takeover=False)
                outcomes[name] = "held"
            except LeaseHeld:
                outcomes[name] = "refused"

        async with trio.open_nursery() as nursery:
            nursery.start_soon(take, a, "a")
            nursery.start_soon(take, b, "b")
        assert sorted(outcomes.values()) == ["held", "refused"], outcomes


async def test_a_stale_writers_records_are_refused_by_their_fence(tmp_path: Path, clock) -> None:
    """a is replaced (b waited out its bound while a was cut off). Reconnected, a still
    believes it writes: its root record, with a higher seq than any, is refused by every
    peer, because it carries a's fence, below b's."""
    async with machines(tmp_path) as (a, b, hosts):
        await a.lease.acquire(takeover=False)
        partition(hosts, a)
        await b.lease.acquire(takeover=True)
        assert b.lease.fence == a.lease.fence + 1
        heal(hosts, a)
        stale = seal(a.node.keyring, "root", 1000, {"time": 1}, a.lease.fence)
        for host in hosts:
            reply = await a.node.conns.call(host.key, "PutRecord", {"record": stale})
            assert reply["stored"] is False
            assert host.records.get(a.node.key, "root") is None
        assert await a.lease.client.publish("root", 1001, {"time": 2}, fence=a.lease.fence) == 0
        assert a.lease.fenced(), "a learns it was replaced from what the peers hold"
        assert await b.lease.client.publish("root", 1, {"time": 3}, fence=b.lease.fence) == 3
        # a's renewal, too, is refused, and tells it who holds the lease now
        assert await a.lease.renew_now() is Renewal.TAKEN


async def test_a_put_with_a_wrong_expect_is_refused_and_a_bad_one_is_a_bad_request(
    tmp_path: Path,
) -> None:
    async with machines(tmp_path) as (a, _b, hosts):
        host = hosts[0]
        one = seal(a.node.keyring, "lease", 1, {"x": 1}, 1)
        two = seal(a.node.keyring, "lease", 2, {"x": 2}, 1)
        call = a.node.conns.call
        assert (await call(host.key, "PutRecord", {"record": one, "expect": 0}))["stored"]
        assert not (await call(host.key, "PutRecord", {"record": two, "expect": 0}))["stored"]
        assert not (await call(host.key, "PutRecord", {"record": one, "expect": 1}))["stored"], (
            "a swap must move the seq forward"
        )
        assert (await call(host.key, "PutRecord", {"record": two, "expect": 1}))["stored"]
        conn = await a.node.conns.get(host.key)
        conn.ops = {}  # a hostile client: no checks of its own before sending
        three = seal(a.node.keyring, "lease", 3, {"x": 3}, 1)
        for bad in ("2", -1, 2**64, [2], None, b"\x02", 2.0):
            with pytest.raises(RpcError) as err:
                await conn.call("PutRecord", {"record": three, "expect": bad})
            assert err.value.code == "bad_request", bad
        assert parse(host.records.get(a.node.key, "lease")).seq == 2
        assert await conn.call("Ping", {}), "the peer is still serving"


async def test_a_partitioned_holder_stops_writing_before_the_other_side_can_take_it(
    tmp_path: Path, clock
) -> None:
    """a reaches one of three holders, b the other two. a's renewals no longer reach a
    majority: it stops acknowledging writes at its bound. b, asking on its side, takes
    the lease only after the bound and the margin: at no moment may both write."""
    async with machines(tmp_path) as (a, b, hosts):
        await a.lease.acquire(takeover=False)
        assert a.lease.fresh()
        partition(hosts[1:], a)
        partition(hosts[:1], b)
        both = 0
        b_took_at = None

        async def a_renews() -> None:
            nonlocal both
            while True:
                await a.lease.renew_now()
                if a.lease.fresh() and b.lease.fresh():
                    both += 1
                await trio.sleep(RENEW)

        async def b_takes() -> None:
            nonlocal b_took_at
            await b.lease.acquire(takeover=True)
            b_took_at = trio.current_time()

        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a_renews)
            await b_takes()
            assert not a.lease.fresh(), "a stopped writing before b holds the lease"
            nursery.cancel_scope.cancel()
        assert both == 0
        assert b_took_at - started >= a.lease.bound + margin(a.lease.bound)
        assert b.lease.fresh() and b.lease.fence == 2


async def test_a_minority_cannot_take_the_lease(tmp_path: Path, clock) -> None:
    async with machines(tmp_path) as (a, b, hosts):
        await a.lease.acquire(takeover=False)
        partition(hosts[1:], b)
        with pytest.raises(LeaseHeld, match=r"1 of its 3 holders agreed and 2 must"):
            await b.lease.acquire(takeover=True)
        assert await a.lease.renew_now() is Renewal.RENEWED, "a keeps writing"


async def test_an_unreachable_holder_is_waited_out_with_a_countdown(tmp_path: Path, clock) -> None:
    """a is gone (its machine off): b's request is answered by nobody, and b takes the
    lease once the bound and margin passed, telling how long is left as it waits."""
    async with machines(tmp_path) as (a, b, _hosts):
        await a.lease.acquire(takeover=False)
        shown: list[float] = []
        started = trio.current_time()
        await b.lease.acquire(takeover=True, on_wait=lambda left, _holder: shown.append(left))
        waited = trio.current_time() - started
        wait = a.lease.bound + margin(a.lease.bound)
        assert wait <= waited <= wait + 2
        assert len(shown) >= int(wait) - 1 and shown == sorted(shown, reverse=True)
        assert shown[0] <= wait and shown[-1] <= 1.0
        assert b.lease.fence == a.lease.fence + 1


async def test_a_later_writers_root_wins_over_a_higher_seq_of_a_replaced_one(
    tmp_path: Path,
) -> None:
    """A replaced writer, cut off with a peer that never saw the later fence, publishes a
    root numbered far past the new writer's there. A fresh machine asking every peer must
    still find the new writer's root: fence first, then seq. Before, the highest seq won."""
    async with machines(tmp_path, peers=4) as (a, b, hosts):
        nursery = a.nursery
        partition(hosts[3:], b)
        assert await b.lease.client.publish("root", 10, {"time": 1}, fence=2) == 3
        partition(hosts[:3], a)
        assert await a.lease.client.publish("root", 99, {"time": 2}, fence=1) == 1
        fresh = await PeerNode(tmp_path / "c", a.node.keyring).start(nursery, listen=False)
        try:
            for host in hosts:
                fresh.peers.add(host.key, host.addr)
            found = await RecordClient(a.node.keyring, fresh.conns, fresh.peers).newest("root")
        finally:
            fresh.close()
        assert (found.answered, found.seq, found.fence) == (4, 10, 2)


async def test_the_first_lease_is_kept_by_the_peers_that_keep_records_for_us(
    tmp_path: Path,
) -> None:
    """Three peers answer, but two have no agreement with us yet and keep no records: the
    first lease names the one that stored it as its holder set, instead of failing for
    want of a majority of three."""
    ring = keys.KeyRing(keys.generate())
    async with peer_nodes(tmp_path, 3) as (nursery, hosts):
        node = await PeerNode(tmp_path / "a", ring).start(nursery, listen=False)
        try:
            node.use(hosts[0])
            for host in hosts[1:]:
                node.peers.add(host.key, host.addr)
            lease = WriterLease(RecordClient(ring, node.conns, node.peers), b"a" * 16, "/mnt/a",
                                renew=RENEW)
            await lease.acquire(takeover=False)
            assert lease.holders == (hosts[0].key,) and lease.fresh()
            held = await lease.current()
            assert held.holders == (hosts[0].key,) and held.machine == b"a" * 16
        finally:
            nursery.cancel_scope.cancel()
            node.close()


async def test_a_new_backups_first_lease_waits_for_its_first_agreement(tmp_path: Path) -> None:
    """A first mount reaches its only peer before their agreement is made: the peer
    answers but keeps no records for us yet. The first lease waits for the agreement
    (bounded) instead of refusing the mount with "0 of its 1 holders agreed" (it did, in
    about one first mount of four with a single peer)."""
    ring = keys.KeyRing(keys.generate())
    async with peer_nodes(tmp_path, 1) as (nursery, [host]):
        node = await PeerNode(tmp_path / "a", ring).start(nursery, listen=False)
        try:
            node.peers.add(host.key, host.addr)  # known and reachable, no agreement yet
            lease = WriterLease(RecordClient(ring, node.conns, node.peers), b"a" * 16, "/mnt/a",
                                renew=RENEW)

            async def agree_later() -> None:
                await trio.sleep(1.0)
                node.use(host)

            nursery.start_soon(agree_later)
            await lease.acquire(takeover=False)
            assert lease.holders == (host.key,) and lease.fresh()
            assert (await lease.current()).machine == b"a" * 16
        finally:
            nursery.cancel_scope.cancel()
            node.close()
