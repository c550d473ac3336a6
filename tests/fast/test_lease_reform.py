"""The lease's holder set follows the agreements (peers/lease.py, joint re-forming).

A mount whose first lease was stored by the two peers it had agreements with then makes
more agreements: its renewals move the holder set to all its partners, through a joint
lease stored by a majority of the old set and of the new one. Real peer services in this
process, on the virtual clock.
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
from fluidfs.peers.lease import LeaseHeld, LeaseInfo, Renewal, WriterLease
from fluidfs.peers.rootrecord import RecordClient
from fluidfs.wire import SchemaError

RENEW = 1.0
DEAD = "127.0.0.1:9"  # nothing listens there: connections are refused at once


@dataclass
class Machine:
    node: PeerNode
    lease: WriterLease


@asynccontextmanager
async def network(tmp_path: Path, peers: int) -> AsyncIterator[tuple[Machine, Machine, list]]:
    """Machines a and b of one keyfile, each knowing no peer yet, and *peers* hosts."""
    ring = keys.KeyRing(keys.generate())
    async with peer_nodes(tmp_path, peers) as (nursery, hosts):
        made = []
        for name in ("a", "b"):
            node = await PeerNode(tmp_path / name, ring).start(nursery, listen=False)
            client = RecordClient(ring, node.conns, node.peers)
            lease = WriterLease(
                client, name.encode() * 16, f"/mnt/{name}", renew=RENEW,
                partners=lambda node=node: [a.peer for a in node.ledger.active()],
            )
            made.append(Machine(node, lease))
        try:
            yield made[0], made[1], hosts
        finally:
            nursery.cancel_scope.cancel()
            for m in made:
                m.node.close()


def cut(hosts: list[PeerNode], machine: Machine) -> None:
    """*machine* can no longer reach *hosts*."""
    for host in hosts:
        machine.node.peers.add(host.key, DEAD)
        machine.node.conns.drop(host.key, even_if_answering=True)


@pytest.fixture
def clock():
    return slow_jump_clock()


async def test_a_lease_taken_with_two_holders_grows_to_the_new_partners(
    tmp_path: Path, clock
) -> None:
    async with network(tmp_path, 5) as (a, _b, hosts):
        for host in hosts[:2]:
            a.node.use(host)
        await a.lease.acquire(takeover=False)
        assert set(a.lease.holders) == {h.key for h in hosts[:2]}
        for host in hosts[2:]:
            a.node.use(host)
        assert await a.lease.renew_now() is Renewal.RENEWED
        joint = await a.lease.current()
        assert set(joint.holders) == {h.key for h in hosts[:2]}, "the old set, until agreed"
        assert set(joint.joining) == {h.key for h in hosts}
        assert await a.lease.renew_now() is Renewal.RENEWED
        held = await a.lease.current()
        assert set(held.holders) == {h.key for h in hosts} and held.joining == ()
        assert a.lease.fresh()


async def test_a_holder_whose_agreement_ended_is_dropped(tmp_path: Path, clock) -> None:
    async with network(tmp_path, 4) as (a, _b, hosts):
        for host in hosts:
            a.node.use(host)
        await a.lease.acquire(takeover=False)
        assert len(a.lease.holders) == 4
        a.node.ledger.end(hosts[0].key)
        for _ in range(2):
            assert await a.lease.renew_now() is Renewal.RENEWED
        assert set((await a.lease.current()).holders) == {h.key for h in hosts[1:]}


async def test_after_an_original_holder_dies_another_mount_takes_over(
    tmp_path: Path, clock
) -> None:
    """Before, the set stayed the first two holders: with one of them gone, b failed
    with "1 of its 2 holders agreed and 2 must" though it reached four partners."""
    async with network(tmp_path, 5) as (a, b, hosts):
        for host in hosts[:2]:
            a.node.use(host)
        await a.lease.acquire(takeover=False)
        for host in hosts[2:]:
            a.node.use(host)
        for _ in range(2):
            await a.lease.renew_now()
        for host in hosts:
            b.node.use(host)
        cut(hosts[:1], b)  # the first holder is dead; a is gone too (renews no more)
        await b.lease.acquire(takeover=True)
        assert b.lease.fresh() and b.lease.fence == a.lease.fence + 1
        assert await a.lease.renew_now() is Renewal.TAKEN


async def test_during_a_re_forming_only_one_side_of_a_partition_holds_the_lease(
    tmp_path: Path, clock
) -> None:
    """a holds the lease on three peers and re-forms toward seven. The network splits:
    a reaches two old holders and one new one, b the third old holder and three new ones
    (a majority of the new set, but not of the old). a's joint renewals keep it fresh
    (a majority of the old set) but cannot switch; b, which sees only the old set's
    lease, cannot take it: at no moment do both hold it."""
    async with network(tmp_path, 7) as (a, b, hosts):
        for host in hosts[:3]:
            a.node.use(host)
        await a.lease.acquire(takeover=False)
        for host in hosts[3:]:
            a.node.use(host)
        for host in hosts:
            b.node.use(host)
        a_side, b_side = hosts[:2] + hosts[3:4], hosts[2:3] + hosts[4:]
        cut(b_side, a)
        cut(a_side, b)
        both = 0

        async def a_renews() -> None:
            nonlocal both
            while True:
                assert await a.lease.renew_now() is Renewal.RENEWED
                if a.lease.fresh() and b.lease.fresh():
                    both += 1
                await trio.sleep(RENEW)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(a_renews)
            with pytest.raises(LeaseHeld, match="holders agreed"):
                await b.lease.acquire(takeover=True)
            await trio.sleep(2 * RENEW)
            nursery.cancel_scope.cancel()
        assert both == 0 and a.lease.fresh() and not b.lease.fresh()
        assert a.lease.joining, "still joint: the new set's majority was not reached"
        assert len(a.lease.holders) == 3


def test_a_lease_with_a_mistyped_joining_set_is_unreadable() -> None:
    body = {
        "kind": "lease", "seq": 3, "v": 2, "time": 1, "machine": b"m", "host": "h",
        "mount": "/m", "pid": 1, "addr": "", "ttl": 15, "bound_ms": 15000,
        "holders": [b"k" * 32], "state": "held",
    }
    assert LeaseInfo.of(3, body | {"joining": [b"j" * 32]}).joining == (b"j" * 32,)
    for bad in ([], [b"short"], "k" * 32, [b"k" * 32] * 65, None):
        with pytest.raises(SchemaError):
            LeaseInfo.of(3, body | {"joining": bad})
