"""The writer lease (peers/lease.py): one mount per keyfile writes at a time.

Two mounts of one keyfile ("machines" a and b) keep their lease on three peers, all
real peer services in this process on 127.0.0.1. Lease times are the writers' wall
clocks (lease.py), so an old lease is made by publishing one with an old time, as a
machine that crashed long ago left it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from inproc import PeerNode, peer_nodes, silent_on, slow_jump_clock

from fluidfs import keys
from fluidfs.net.errors import RpcError
from fluidfs.peers.lease import LeaseHeld, WriterLease, margin
from fluidfs.peers.rootrecord import CALL_TIMEOUT, RecordClient, open_record, parse, seal

RENEW = 1.0  # seconds: short, so waiting out a bound is a few jumps of the mock clock


@dataclass
class Machine:
    """One mount's side: its own connections and peer list, and its lease."""

    node: PeerNode
    lease: WriterLease


@asynccontextmanager
async def two_machines(
    tmp_path: Path, *, b_reaches: int = 3
) -> AsyncIterator[tuple[Machine, Machine, list[PeerNode]]]:
    """Machines a and b of one keyfile; a reaches all three peers, b the first *b_reaches*."""
    ring = keys.KeyRing(keys.generate())
    async with peer_nodes(tmp_path, 3) as (nursery, hosts):
        machines = []
        for name, reach in (("a", 3), ("b", b_reaches)):
            node = await PeerNode(tmp_path / name, ring).start(nursery, listen=False)
            for host in hosts[:reach]:
                node.use(host)
            client = RecordClient(ring, node.conns, node.peers)
            lease = WriterLease(client, name.encode() * 16, f"/mnt/{name}", renew=RENEW)
            machines.append(Machine(node, lease))
        try:
            yield machines[0], machines[1], hosts
        finally:
            nursery.cancel_scope.cancel()
            for machine in machines:
                machine.node.close()


async def test_a_lease_is_taken_renewed_and_released(tmp_path: Path) -> None:
    async with two_machines(tmp_path) as (a, b, _hosts):
        assert await a.lease.current() is None
        assert await a.lease.acquire(takeover=False) is None, "nobody held it before"
        assert a.lease.published == 3
        held = await b.lease.current()
        assert (held.machine, held.state, held.seq, held.mount) == (b"a" * 16, "held", 1, "/mnt/a")
        assert held.live() and held.ttl == 3 * RENEW and held.fence == 1
        assert set(held.holders) == {h.key for h in _hosts}
        assert await a.lease.check()
        assert (await b.lease.current()).seq == 2, "a renewal publishes a higher seq"
        await a.lease.release()
        released = await b.lease.current()
        assert released.state == "released" and not released.live()
        assert await b.lease.acquire(takeover=False) == released, "b mounts without --takeover"
        assert (await a.lease.current()).machine == b"b" * 16


async def test_a_live_lease_elsewhere_is_taken_only_with_takeover(tmp_path: Path, clock) -> None:
    async with two_machines(tmp_path) as (a, b, _):
        await a.lease.acquire(takeover=False)
        with pytest.raises(LeaseHeld, match=r"mounted on host .* at /mnt/a .*--takeover"):
            await b.lease.acquire(takeover=False)
        assert (await a.lease.current()).machine == b"a" * 16, "a refused mount changes nothing"
        replaced = await b.lease.acquire(takeover=True)
        assert replaced.machine == b"a" * 16 and b.lease.seq > a.lease.seq
        # a finds out at its next renewal, stops writing, and does not publish again
        assert not await a.lease.check()
        assert a.lease.lost.machine == b"b" * 16 and a.lease.lost.mount == "/mnt/b"
        assert not await a.lease.check()
        seq = (await b.lease.current()).seq
        await a.lease.release()
        now = await b.lease.current()
        assert (now.machine, now.seq, now.state) == (b"b" * 16, seq, "held")
        assert await b.lease.check(), "b keeps renewing"


async def test_an_expired_lease_is_taken_without_takeover(tmp_path: Path, clock) -> None:
    """Taken without --takeover, but only after its bound and margin: the clock in the
    record is another machine's, so an old time proves nothing on its own."""
    async with two_machines(tmp_path) as (a, b, hosts):
        ttl = 3 * RENEW
        crashed = {"time": time.time_ns() - int(2 * ttl * 1e9), "machine": b"a" * 16,
                   "host": "old", "mount": "/mnt/a", "pid": 1, "addr": "", "ttl": int(ttl),
                   "state": "held", "v": 2, "bound_ms": int(ttl * 1000),
                   "holders": [h.key for h in hosts]}
        assert await a.lease.client.publish("lease", 7, crashed, fence=1) == 3
        started = trio.current_time()
        old = await b.lease.acquire(takeover=False)
        assert trio.current_time() - started >= ttl + margin(ttl)
        assert old.seq == 7 and old.state == "held" and not old.live()
        assert (b.lease.seq, b.lease.fence) == (9, 2), "7 crashed, 8 the request, 9 ours"


async def test_the_same_machine_takes_its_own_live_lease_back(tmp_path: Path) -> None:
    """After kill -9 the lease of this machine is still live; its next mount reuses it."""
    async with two_machines(tmp_path) as (a, _b, _):
        await a.lease.acquire(takeover=False)
        again = WriterLease(a.lease.client, a.lease.machine, "/mnt/a", renew=RENEW)
        held = await again.acquire(takeover=False)
        assert held.live() and held.machine == a.lease.machine
        assert again.seq == held.seq + 1


async def test_the_newest_lease_wins_over_a_peer_that_missed_the_takeover(
    tmp_path: Path, clock
) -> None:
    """b took over reaching two of the three peers; the third still holds a's lease."""
    async with two_machines(tmp_path, b_reaches=2) as (a, b, hosts):
        await a.lease.acquire(takeover=False)
        await b.lease.acquire(takeover=True)
        assert b.lease.published == 2
        assert not await a.lease.check(), "a's own newer-looking peer does not save it"
        assert a.lease.lost.machine == b"b" * 16
        # the third peer still has a's lease: a's check found b's and published nothing
        raw = hosts[2].records.get(a.node.key, "lease")
        assert open_record(a.node.keyring, raw, "lease")[1]["machine"] == b"a" * 16
        assert (await a.lease.current()).machine == b"b" * 16


async def test_a_release_after_an_unnoticed_takeover_leaves_the_new_holder(
    tmp_path: Path, clock
) -> None:
    """a unmounts cleanly before its next renewal would have shown it b's takeover."""
    async with two_machines(tmp_path) as (a, b, _):
        await a.lease.acquire(takeover=False)
        await b.lease.acquire(takeover=True)
        await a.lease.release()
        now = await b.lease.current()
        assert (now.machine, now.state) == (b"b" * 16, "held"), "a's release lost to b's lease"
        assert await b.lease.check()


@pytest.fixture
def clock():
    return slow_jump_clock()


async def test_a_peer_that_never_answers_delays_the_lease_by_one_timeout(
    tmp_path: Path, clock
) -> None:
    ring = keys.KeyRing(keys.generate())
    async with peer_nodes(tmp_path, 2) as (nursery, hosts):
        silent = await PeerNode(tmp_path / "silent", service=silent_on("GetRecord", "PutRecord")
                                ).start(nursery)
        a = await PeerNode(tmp_path / "a", ring).start(nursery, listen=False)
        try:
            for host in (*hosts, silent):
                a.use(host)
            lease = WriterLease(RecordClient(ring, a.conns, a.peers), b"a" * 16, "/mnt/a")
            started = trio.current_time()
            assert await lease.acquire(takeover=False) is None
            waited = trio.current_time() - started
            assert lease.published == 2, "the two peers that answer hold it"
            assert len(lease.holders) == 2, "the silent one is no holder"
            timeout = lease.call_timeout
            assert timeout <= CALL_TIMEOUT
            assert timeout <= waited <= 2 * timeout + 1, waited  # look, then publish
        finally:
            nursery.cancel_scope.cancel()
            silent.close()
            a.close()


async def test_a_peer_keeps_the_newest_of_two_leases_published_at_once(tmp_path: Path) -> None:
    """Two mounts of one keyfile publish their leases at the same moment. The peer
    checked the seq it held, then wrote, in two worker-thread steps with an await between,
    both under one temporary file name: one of the two writes failed with a traceback,
    and the older lease could overwrite the newer one."""
    async with two_machines(tmp_path) as (a, b, hosts):
        host = hosts[0]
        failed = kept_older = 0
        for round_ in range(10):
            newer, older = 2 * round_ + 2, 2 * round_ + 1

            async def put(machine: Machine, seq: int) -> None:
                nonlocal failed
                record = seal(machine.node.keyring, "lease", seq, {"state": "held"})
                try:
                    await machine.node.conns.call(host.key, "PutRecord", {"record": record})
                except RpcError:
                    failed += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(put, a, newer)
                nursery.start_soon(put, b, older)
            if parse(host.records.get(a.node.key, "lease")).seq != newer:
                kept_older += 1
        assert (failed, kept_older) == (0, 0), "of 10 rounds: failed, kept the older lease"
