"""Agreement lifecycle (peers/lifecycle.py) on a virtual clock: real LMDB, real record
files, real peer services on both sides.

A failing peer keeps its agreement within the one-day tolerance and loses it past it; the
peer is told (once it answers); what we host for an ended agreement is kept a day, then
dropped with its records; an agreement we ended is refused for the cool-down.

The two sides talk through ``Wire``: each call goes straight to the other side's
``PeerService.handle`` with the caller's key, as the RPC layer would deliver it. Real
sockets cannot be used here: under an autojump clock a call's timeout would fire while
the kernel still carries its bytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from fluidfs import keys
from fluidfs.blocks import merkle
from fluidfs.peers import lifecycle as lifecycle_module
from fluidfs.peers import rootrecord
from fluidfs.peers.agreements import Ledger
from fluidfs.peers.connections import PeerUnavailable
from fluidfs.peers.lifecycle import DAY, Lifecycle, LifecyclePolicy
from fluidfs.peers.peerlist import PeerList
from fluidfs.service.host import PeerService
from fluidfs.store.db import META_TABLES, Database
from fluidfs.store.records import RecordStore
from fluidfs.store.shards import ShardStore

MIB = 1 << 20
EPOCH = 1_700_000_000.0  # the wall clock when the virtual clock reads 0
TICK = 600.0  # the lifecycle checks every ten minutes here (a minute by default)


def wall() -> float:
    """Wall-clock time that moves with the test's virtual clock."""
    return EPOCH + trio.current_time()


class Wire:
    """Delivers one side's calls to the other side's service (peers absent are unreachable)."""

    def __init__(self) -> None:
        self.services: dict[bytes, PeerService] = {}
        self.down: set[bytes] = set()

    def caller(self, me: bytes) -> Caller:
        return Caller(self, me)


class Caller:
    def __init__(self, wire: Wire, me: bytes) -> None:
        self.wire, self.me = wire, me

    async def call(self, key: bytes, op: str, args: dict[str, Any], *,
                   timeout: float = 30.0) -> dict[str, Any]:
        if key in self.wire.down or key not in self.wire.services:
            raise PeerUnavailable("unreachable")
        return await self.wire.services[key].handle(self.me, op, args)


class Side:
    """One node's host side and lifecycle over real stores."""

    def __init__(self, root: Path, wire: Wire, policy: LifecyclePolicy) -> None:
        self.keyring = keys.KeyRing(keys.generate())
        self.db = Database(root / "meta", META_TABLES)
        self.shards = ShardStore(root / "shards")
        self.ledger = Ledger(self.db, clock=wall)
        self.records = RecordStore(root / "records")
        self.ended: list[bytes] = []  # on_end calls: agreements whose shards no longer count
        limiter = trio.CapacityLimiter(2)
        self.svc = PeerService(
            self.shards, self.ledger, PeerList(self.db, self.key), donate=1 << 30, ratio=1.5,
            limiter=limiter, records=self.records, on_end=self.ended.append,
            cooldown=policy.cooldown,
        )
        self.lifecycle = Lifecycle(
            wire.caller(self.key), self.ledger, self.shards, limiter, policy,
            on_end=self.ended.append, records=self.records,
        )
        wire.services[self.key] = self.svc

    @property
    def key(self) -> bytes:
        return self.keyring.public_key

    def close(self) -> None:
        self.db.close()
        self.shards.close()


@pytest.fixture
def pair(tmp_path: Path):
    """Two sides, A and B, each hosting 1 MiB for the other; A's lifecycle ends things."""

    def make(policy: LifecyclePolicy | None = None) -> tuple[Side, Side, Wire]:
        policy = policy or LifecyclePolicy(tick=TICK)
        wire = Wire()
        a, b = Side(tmp_path / "a", wire, policy), Side(tmp_path / "b", wire, policy)
        for one, other in ((a, b), (b, a)):
            one.ledger.record(other.key, we_host=MIB, they_host=MIB, term=3600)
        made.extend((a, b))
        return a, b, wire

    made: list[Side] = []
    yield make
    for side in made:
        side.close()


async def run_for(side: Side, seconds: float) -> None:
    """Run *side*'s lifecycle for *seconds* of virtual time, the way ``Lifecycle.run`` does.

    Not ``run()`` under a timeout: with a deadline pending, the autojump clock would jump
    to it while a tick waits for a worker thread.
    """
    for _ in range(int(seconds // side.lifecycle.policy.tick)):
        await trio.sleep(side.lifecycle.policy.tick)
        await side.lifecycle.tick()


async def host_shards(host: Side, owner: Side, count: int) -> None:
    """*owner* stores *count* small shards and its root record with *host*."""
    for start in range(0, count, 64):
        batch = [os.urandom(100) for _ in range(min(64, count - start))]
        reply = await host.svc.handle(owner.key, "StoreShard", {
            "shards": [{"id": merkle.shard_id(d), "data": d} for d in batch]})
        assert len(reply["stored"]) == len(batch)
    record = rootrecord.seal(owner.keyring, "root", 1, {"time": 1})
    assert (await host.svc.handle(owner.key, "PutRecord", {"record": record}))["stored"]


def test_failures_within_the_tolerance_keep_the_agreement(pair):
    async def main() -> None:
        a, b, _ = pair()
        a.ledger.failed(b.key)
        await run_for(a, DAY - 2 * TICK)
        assert a.ledger.live(b.key) is not None, "a day of failures is tolerated"
        a.ledger.passed(b.key)  # an audit passes: the failure clock stops
        a.ledger.failed(b.key)
        await run_for(a, DAY - 2 * TICK)
        assert a.ledger.live(b.key) is not None, "the tolerance counts from the last pass"
        assert a.ended == [] and b.ledger.live(a.key) is not None

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_failing_past_the_tolerance_ends_it_and_the_peer_is_told(pair):
    async def main() -> None:
        a, b, _ = pair()
        a.ledger.failed(b.key)
        await run_for(a, DAY + 2 * TICK)
        agreement = a.ledger.get(b.key)
        assert agreement is not None and not agreement.active and agreement.ended_by_us
        assert a.ended == [b.key], "our shards on it stop counting, once"
        assert agreement.notified and b.ledger.live(a.key) is None, "and the peer heard it"
        assert b.ended == [a.key]

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_an_unreachable_peer_is_told_once_it_answers(pair):
    async def main() -> None:
        a, b, wire = pair()
        wire.down.add(b.key)
        a.ledger.failed(b.key)
        await run_for(a, DAY + 10 * TICK)
        assert not a.ledger.get(b.key).active and not a.ledger.get(b.key).notified
        wire.down.clear()
        await run_for(a, 2 * TICK)
        assert a.ledger.get(b.key).notified and b.ledger.live(a.key) is None

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_what_we_host_is_kept_a_day_after_the_end_then_dropped_with_its_records(
    pair, monkeypatch
):
    monkeypatch.setattr(lifecycle_module, "DROP_BATCH", 50)  # several bounded transactions

    async def main() -> None:
        a, b, _ = pair()
        await host_shards(a, b, 130)
        held = a.shards.used(b.key)
        assert held == 130 * 100
        assert (await a.svc.handle(b.key, "EndAgreement", {}))["ended"]  # b ends it
        assert a.ended == [b.key]
        await run_for(a, DAY - 2 * TICK)
        assert a.shards.used(b.key) == held, "kept for a day: the peer may still need them"
        assert a.records.get(b.key, "root") is not None
        await run_for(a, 4 * TICK)
        assert a.shards.used(b.key) == 0 and list(a.shards.ids(b.key)) == []
        assert a.records.get(b.key, "root") is None, "its records go with them"
        assert a.ledger.get(b.key) is None, "ended by the peer: no cool-down to remember"

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_an_agreement_we_ended_is_refused_for_the_cooldown(pair):
    async def main() -> None:
        a, b, _ = pair(LifecyclePolicy(tick=TICK, cooldown=2 * DAY))
        proposal = {"offer": MIB, "ask": MIB, "term": 3600}
        await host_shards(a, b, 10)
        a.ledger.failed(b.key)
        await run_for(a, DAY + 2 * TICK)  # ended by us
        reply = await a.svc.handle(b.key, "ProposeAgreement", proposal)
        assert not reply["accepted"] and "refused for another" in reply["reason"]
        await run_for(a, DAY + 2 * TICK)  # past the keep period, within the cool-down
        assert a.shards.used(b.key) == 0 and a.ledger.get(b.key) is not None
        reply = await a.svc.handle(b.key, "ProposeAgreement", proposal)
        assert not reply["accepted"], "still in the cool-down"
        await run_for(a, DAY)
        assert a.ledger.get(b.key) is None, "forgotten once the cool-down is over"
        assert (await a.svc.handle(b.key, "ProposeAgreement", proposal))["accepted"]
        assert a.ledger.live(b.key).failing_since is None, "a fresh start"

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
